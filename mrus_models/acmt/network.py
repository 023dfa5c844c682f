"""ACMT's translation network f_θ(x_t, t) → x_1: a time-conditioned U-Net exposing its
shallow and deep features.

[M25] (../shared/papers/acmt.txt) §II-B/§II-D: one network maps an intermediate state x_t of
the Schrödinger bridge (MR or US) to the terminal state x_1 in the intermediate modality, and
its shallow-layer features f^s (texture, eq. 7) and deep-layer features f^d (boundaries,
eq. 8-9) feed the losses. The paper gives no widths or depth (its Fig. 1 draws a U-Net); the
layout here is :class:`mrus_models.nn.UNet` (residual encoder, stride-2 levels, nearest
upsampling with skips) conditioned on t by a sinusoidal embedding and an MLP added to every
block (DDPM's conditioning, as UNSB [K24] conditions its generator on the time index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrus_models.nn import TimeEmbedding, UNet
from mrus_models.nn.blocks import check_channels, check_ndim, conv

#: Scale of t ∈ [0, 1] before the sinusoidal embedding. The embedding's frequencies run from
#: 1 to 1/10000 per unit of its argument, so times 0.06 apart (the last gaps of [K24]'s pool)
#: would be nearly equal without it; ×1000 spreads [0, 1] like DDPM's step index 0…1000.
TIME_SCALE = 1000.0


def _levels(owner: str, widths: Sequence[int]) -> tuple[int, ...]:
    try:
        widths = tuple(widths)
    except TypeError:
        raise ValueError(f"{owner}: widths must be a sequence of positive ints, got "
                         f"{widths!r}") from None
    if not widths:
        raise ValueError(f"{owner}: widths must have at least one level, got ()")
    for w in widths:
        check_channels(owner, "widths", w)
    return widths


def _check_level(owner: str, name: str, value, levels: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < levels:
        raise ValueError(f"{owner}: {name} must be an encoder level in [0, {levels - 1}] "
                         f"({levels} widths), got {value!r}")
    return value


class ACMTNet(nn.Module):
    """f_θ(x_t, t) → x̂_1, with the shallow and deep encoder features of [M25] eq. 5-6.

    The U-Net's encoder level i (``widths[i]`` channels, size ``S / 2 ** (i + 1)``) gives
    f^s at ``shallow_level`` and f^d at ``deep_level``; the decoder mirrors the encoder
    (``reversed(widths)`` then ``widths[0]`` at full resolution). The output is
    ``x_t + head(h)`` with the 1×1×1 head initialised near zero (weights N(0, head_std²),
    bias 0), so the untrained network is nearly the identity (not in the paper: it starts
    the bridge from a map that keeps every boundary, which the boundary loss asks for,
    rather than from noise; not exactly zero, so that the decoder gets gradients from the
    first step).

    Args:
        ndim: 3 for [M25]'s volumes (2 works too, for slices).
        channels: image channels (1).
        widths: encoder widths, one per level; the stride is ``2 ** len(widths)``.
        time_dim: width of the sinusoidal time embedding; the MLP maps it to
            ``4 * time_dim`` (DDPM).
        shallow_level: encoder level of f^s (texture loss).
        deep_level: encoder level of f^d (boundary loss); deeper than ``shallow_level``.
        norm: normalisation of the blocks: "group" (default: DDPM's GroupNorm, per item,
            so batch 1 works; it needs more than one value per group, i.e. a deepest map of
            2 voxels or more), "instance" (UNSB's), "batch" or None.
        head_std: standard deviation of the output head's initial weights (>= 0).

    Attributes:
        stride: ``2 ** len(widths)``; every spatial size must be divisible by it.
        shallow_channels, deep_channels: channels of f^s and f^d.

    Example:
        >>> net = ACMTNet(widths=(8, 16), time_dim=8)
        >>> x = torch.rand(2, 1, 16, 16, 8)
        >>> net(x, torch.tensor([0.0, 0.5])).shape
        torch.Size([2, 1, 16, 16, 8])
    """

    def __init__(self, ndim: int = 3, channels: int = 1, *,
                 widths: Sequence[int] = (32, 64, 64, 64), time_dim: int = 64,
                 shallow_level: int = 0, deep_level: int | None = None,
                 norm: str | None = "group", head_std: float = 1e-3) -> None:
        super().__init__()
        self.ndim = check_ndim("ACMTNet", ndim)
        self.channels = check_channels("ACMTNet", "channels", channels)
        widths = _levels("ACMTNet", widths)
        check_channels("ACMTNet", "time_dim", time_dim)
        levels = len(widths)
        deep_level = levels - 1 if deep_level is None else deep_level
        self.shallow_level = _check_level("ACMTNet", "shallow_level", shallow_level, levels)
        self.deep_level = _check_level("ACMTNet", "deep_level", deep_level, levels)
        if self.shallow_level >= self.deep_level:
            raise ValueError(f"ACMTNet: shallow_level must be below deep_level "
                             f"{self.deep_level}, got {self.shallow_level}")
        self.widths = widths
        self.time = TimeEmbedding(time_dim)
        self.unet = UNet(ndim, channels, encoder=widths,
                         decoder=(*reversed(widths), widths[0]), residual=True,
                         time_channels=self.time.out_channels, norm=norm)
        self.head = conv(ndim, self.unet.out_channels, channels, 1)
        if isinstance(head_std, bool) or not isinstance(head_std, (int, float)) \
                or not head_std >= 0:
            raise ValueError(f"ACMTNet: head_std must be a number >= 0, got {head_std!r}")
        nn.init.normal_(self.head.weight, mean=0.0, std=float(head_std))
        nn.init.zeros_(self.head.bias)
        self.stride = self.unet.stride
        self.shallow_channels = widths[self.shallow_level]
        self.deep_channels = widths[self.deep_level]

    def _check(self, x, t) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ACMTNet: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.ndim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"ACMTNet: x must be [B, {self.channels}, *S] ({self.ndim}D), "
                             f"got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(s % self.stride for s in size):
            raise ValueError(f"ACMTNet: every spatial size must be divisible by the stride "
                             f"{self.stride} (2 ** {len(self.widths)} levels), got {size}")
        b = x.shape[0]
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = torch.full((b,), float(t), device=x.device)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ACMTNet: t must be a float or a Tensor [B], got "
                            f"{type(t).__name__}")
        if t.dim() == 0:
            t = t.expand(b)
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(f"ACMTNet: t must be a scalar or a Tensor [B] = [{b}], got shape "
                             f"{tuple(t.shape)}")
        return t.to(device=x.device)

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.time(t.float() * TIME_SCALE)

    def forward(self, x: torch.Tensor, t, return_features: bool = False):
        """Predicts the terminal state x̂_1 from the state x_t at time t.

        Args:
            x: Tensor [B, channels, *S], x_t; every size of S divisible by :attr:`stride`.
            t: the bridge time of each item in [0, 1]: a float, a 0-d tensor or a Tensor [B].
            return_features: also return f^s and f^d of x_t at time t.

        Returns:
            Tensor [B, channels, *S], x̂_1; with ``return_features``, ``(x̂_1, features)``
            with ``features["shallow"]`` [B, shallow_channels, *S / 2 ** (shallow_level + 1)]
            and ``features["deep"]`` [B, deep_channels, *S / 2 ** (deep_level + 1)].
        """
        t = self._check(x, t)
        h, feats = self.unet(x, self._embed(t), return_features=True)
        out = x + self.head(h)
        if return_features:
            enc = feats["encoder"]
            return out, {"shallow": enc[self.shallow_level], "deep": enc[self.deep_level]}
        return out

    def encode(self, x: torch.Tensor, t=0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """f^s(x) and f^d(x) (eq. 5-6): the encoder alone, down to ``deep_level``.

        [M25] extracts the features of the source x_0 and of the translation x_1 with the
        network itself; the time at which it does is not stated. The default t = 0 is
        UNSB's ([K24] computes its PatchNCE features with the time index set to 0).

        Args:
            x: Tensor [B, channels, *S], an image (x_0 or x̂_1).
            t: as in :meth:`forward`.

        Returns:
            (f^s, f^d), shapes as in :meth:`forward`'s features.
        """
        t = self._check(x, t)
        t_emb = self._embed(t)
        h, shallow = x, None
        for level, block in enumerate(self.unet.encoder[: self.deep_level + 1]):
            h = block(h, t_emb)
            if level == self.shallow_level:
                shallow = h
        return shallow, h
