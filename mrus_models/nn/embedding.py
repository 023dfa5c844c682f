"""Sinusoidal time / noise-level embedding (Transformer positional encoding applied to a
diffusion step or a noise level, as in DDPM, Ho et al., NeurIPS 2020, Appendix B)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import check_channels


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embeds scalars ``t`` as ``[cos(t ω_0), …, cos(t ω_{h-1}), sin(t ω_0), …, sin(t ω_{h-1})]``.

    ``h = dim // 2`` and ``ω_k = max_period ** (-k / h)``, frequencies from 1 down to
    ``max_period ** (-(h-1)/h)`` (Vaswani et al. 2017's positional encoding, in the
    cos-then-sin order of Dhariwal & Nichol's guided diffusion). An odd ``dim`` gets a
    trailing zero column.

    Args:
        t: Tensor [B] of time steps or noise levels (any real dtype; integers are
            converted), one per batch item.
        dim: embedding width, >= 2.
        max_period: the longest period, in units of ``t``; > 0.

    Returns:
        Tensor [B, dim], float32 (float64 for float64 ``t``), on ``t``'s device.

    Example:
        >>> sinusoidal_embedding(torch.tensor([0.0, 10.0]), 8).shape
        torch.Size([2, 8])
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sinusoidal_embedding: t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"sinusoidal_embedding: t must be [B] (one value per item), got shape "
                         f"{tuple(t.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"sinusoidal_embedding: dim must be an int >= 2, got {dim!r}")
    if not max_period > 0:
        raise ValueError(f"sinusoidal_embedding: max_period must be > 0, got {max_period!r}")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=dtype)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding → Linear → SiLU → Linear (DDPM's time embedding MLP).

    Args:
        dim: width of the sinusoidal embedding.
        hidden: width of both linear layers and of the output; default ``4 * dim`` (DDPM).
        max_period: as in :func:`sinusoidal_embedding`.

    Attributes:
        out_channels: the output width (``hidden``): the ``time_channels`` of the blocks
            and of :class:`~mrus_models.nn.UNet` it conditions.

    Example:
        >>> emb = TimeEmbedding(32)
        >>> emb(torch.tensor([1, 500])).shape
        torch.Size([2, 128])
    """

    def __init__(self, dim: int, hidden: int | None = None, max_period: float = 10000.0) -> None:
        super().__init__()
        check_channels("TimeEmbedding", "dim", dim)
        hidden = 4 * dim if hidden is None else hidden
        check_channels("TimeEmbedding", "hidden", hidden)
        self.dim, self.max_period, self.out_channels = dim, max_period, hidden
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Args: t [B]. Returns [B, out_channels] in the dtype of the layers."""
        emb = sinusoidal_embedding(t, self.dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
