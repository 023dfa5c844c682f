"""The anatomy-aware registration network ([P25] §II-C.1, Fig. 5).

One shared encoder reads the moving image x_1^MR, the fixed image x_1^US and the
noise-perturbed fixed image x_N^US (three channels, conditioned on the diffusion step by a
time embedding); two decoders of the same layout (VoxelMorph-2's U-Net decoder, with the
shared encoder's skips) read its features: the diffusion decoder predicts the score S
(the noise added to the fixed image, DDPM's ε-prediction), the registration decoder the
field Φ. After each of the registration decoder's ``attention_levels`` coarsest blocks a
:class:`~mrus_models.nn.CrossAttention` (queries: registration features; keys and values:
the diffusion decoder's features of the same block) adds the diffusion decoder's guidance,
FSDiffReg's feature-wise guidance ([Q23]); the attention starts as the identity (zero
output projection). Φ is a stationary velocity field integrated by
:func:`mrus_kernels.integrate_velocity` (``transform="svf"``) or a displacement
(``"displacement"``); the moving image is resampled with :func:`mrus_kernels.warp`.

The forward noise follows [Q23]: a linear β schedule over ``num_timesteps`` steps,
x_N = √ᾱ_t · x + √(1 − ᾱ_t) · N with N ~ N(0, I) and t drawn uniformly in training; at
inference t = 0 and x_N is the fixed image itself (its registration pass).

[P25]: ../shared/papers/mr2us_pro.txt; [Q23]: FSDiffReg (MICCAI 2023), see
:mod:`mrus_models.anatomy_aware.config`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrus_kernels import integrate_velocity, warp
from mrus_models.acmt.model import UPPER_QUANTILE, normalise_intensity
from mrus_models.nn import (
    VOXELMORPH_DECODER,
    VOXELMORPH_ENCODER,
    ConvBlock,
    CrossAttention,
    FlowHead,
    ResidualBlock,
    TimeEmbedding,
)
from mrus_models.nn.blocks import conv

from .losses import field_of_view

#: Both images go through ACMT's intensity mapping (minimum -> -1, 99.5th percentile -> 1,
#: brighter clipped), so that translated and raw inputs see the same mapping; a min-max
#: mapping let the speckle's tail set a raw ultrasound image's scale and flattened F_Ana.
__all__ = ["UPPER_QUANTILE", "AnatomyAwareNet", "linear_alphas_cumprod", "normalise_intensity"]


def linear_alphas_cumprod(num_timesteps: int, beta_start: float, beta_end: float
                          ) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t} (1 − β_s) of the linear schedule β_t = linspace(beta_start, beta_end),
    float64 [num_timesteps]."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


class AnatomyAwareNet(nn.Module):
    """Shared encoder, diffusion decoder → score, registration decoder → Φ, cross-attention.

    Args:
        ndim: 2 or 3.
        encoder: shared encoder widths (stride-2 levels).
        decoder: widths of each decoder (more than ``len(encoder)``).
        residual: residual encoder blocks.
        norm: None, "instance", "group" or "batch".
        time_dim: sinusoidal step-embedding width (the MLP is 4× wider).
        attention_levels: cross-attention after the first (coarsest) that many blocks of
            the registration decoder, 0 to ``len(encoder)``.
        heads: attention heads.
        transform: "svf" (integrate the head's output) or "displacement".
        steps: scaling and squaring steps.
        memory: "store" or "recompute" (integration backward).
        init_std: the flow head's initial weight std.
        num_timesteps, beta_start, beta_end: the forward noise's linear schedule.
        backend: ``mrus_kernels`` backend (None: default).

    Example:
        >>> net = AnatomyAwareNet(2, encoder=(8, 8), decoder=(8, 8, 8))
        >>> out = net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
        >>> out["ddf"].shape, out["score"].shape
        (torch.Size([1, 2, 32, 32]), torch.Size([1, 1, 32, 32]))
    """

    def __init__(self, ndim: int, *, encoder: Sequence[int] = VOXELMORPH_ENCODER,
                 decoder: Sequence[int] = VOXELMORPH_DECODER, residual: bool = True,
                 norm: str | None = None, time_dim: int = 32, attention_levels: int = 2,
                 heads: int = 4, transform: str = "svf", steps: int = 7,
                 memory: str = "store", init_std: float = 1e-5, num_timesteps: int = 2000,
                 beta_start: float = 1e-6, beta_end: float = 1e-2,
                 backend: str | None = None) -> None:
        super().__init__()
        encoder, decoder = tuple(encoder), tuple(decoder)
        levels = len(encoder)
        if ndim not in (2, 3):
            raise ValueError(f"AnatomyAwareNet: ndim must be 2 or 3, got {ndim!r}")
        if not encoder or len(decoder) <= levels:
            raise ValueError(f"AnatomyAwareNet: decoder needs more widths than encoder (and "
                             f"encoder at least one), got {encoder} and {decoder}")
        if not 0 <= attention_levels <= levels:
            raise ValueError(f"AnatomyAwareNet: attention_levels must be in [0, {levels}], got "
                             f"{attention_levels!r}")
        if transform not in ("svf", "displacement"):
            raise ValueError(f"AnatomyAwareNet: transform must be 'svf' or 'displacement', got "
                             f"{transform!r}")
        self.ndim, self.steps, self.memory, self.backend = ndim, steps, memory, backend
        self.transform, self.num_timesteps = transform, num_timesteps
        self.stride = 2 ** levels
        self.time = TimeEmbedding(time_dim)
        tc = self.time.out_channels

        in_channels = 3  # moving, fixed, noisy fixed
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in encoder:
            block = (ResidualBlock(ndim, prev, width, stride=2, time_channels=tc, norm=norm)
                     if residual else
                     ConvBlock(ndim, prev, width, stride=2, time_channels=tc, norm=norm))
            self.encoder.append(block)
            prev = width
        skip_channels = (in_channels, *encoder[:-1])

        def decoder_blocks() -> nn.ModuleList:
            blocks, p = nn.ModuleList(), encoder[-1]
            for j, width in enumerate(decoder):
                blocks.append(ConvBlock(ndim, p, width, norm=norm, time_channels=tc))
                p = width + skip_channels[levels - 1 - j] if j < levels else width
            return blocks

        self.diffusion_decoder = decoder_blocks()
        self.registration_decoder = decoder_blocks()
        self.attention = nn.ModuleList(
            CrossAttention(ndim, decoder[j], decoder[j], heads) for j in range(attention_levels))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.score_head = conv(ndim, decoder[-1], 1, 3)
        self.flow_head = FlowHead(ndim, decoder[-1], init_std=init_std)
        # Not saved: rebuilt from the configuration (the schedule is no learned state).
        # Both factors in float64 first: 1 − ᾱ_t in float32 loses most digits near t = 0
        # (ᾱ_0 = 1 − 1e-6).
        ac = linear_alphas_cumprod(num_timesteps, beta_start, beta_end)
        self.register_buffer("sqrt_alphas_cumprod", ac.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - ac).sqrt().float(),
                             persistent=False)

    def noisy(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDPM's forward sample x_t = √ᾱ_t x + √(1 − ᾱ_t) N, per item step ``t`` [B]."""
        shape = (-1, *([1] * (x.dim() - 1)))
        a = self.sqrt_alphas_cumprod.to(x.device)[t].view(shape)
        s = self.sqrt_one_minus_alphas_cumprod.to(x.device)[t].view(shape)
        return a * x + s * noise

    def _check(self, moving, fixed, t, noise) -> None:
        n = self.ndim
        for name, x in (("moving", moving), ("fixed", fixed)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"AnatomyAwareNet: {name} must be a torch.Tensor, got "
                                f"{type(x).__name__}")
        if moving.dim() != n + 2 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(f"AnatomyAwareNet: moving and fixed must both be [B, 1, *S] "
                             f"({n}D) of the same shape, got {tuple(moving.shape)} and "
                             f"{tuple(fixed.shape)}")
        size = tuple(moving.shape[2:])
        if any(s % self.stride for s in size):
            raise ValueError(f"AnatomyAwareNet: every spatial size must be divisible by "
                             f"{self.stride}, got {size}")
        if t is not None:
            if t.shape != (moving.shape[0],) or t.dtype != torch.int64:
                raise ValueError(f"AnatomyAwareNet: t must be int64 [B={moving.shape[0]}], "
                                 f"got {t.dtype} {tuple(t.shape)}")
            # A host sync: skipped under torch.compile, where it would break the graph.
            if not torch.compiler.is_compiling() and \
                    bool(((t < 0) | (t >= self.num_timesteps)).any()):
                raise ValueError(f"AnatomyAwareNet: t must lie in [0, {self.num_timesteps}), "
                                 f"got {t.tolist()}")
        if noise is not None and noise.shape != fixed.shape:
            raise ValueError(f"AnatomyAwareNet: noise must have fixed's shape "
                             f"{tuple(fixed.shape)}, got {tuple(noise.shape)}")

    def fields(self, moving: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The network's pass without the spatial operators: :meth:`forward`'s inputs;
        returns ``"velocity"`` (the flow head's output), ``"score"``, ``"fixed_input"``,
        ``"moving_input"`` (both normalised to [-1, 1]), ``"noise"``, ``"t"`` and
        ``"mask"``, the fixed image's field of view (:func:`~mrus_models.anatomy_aware.
        losses.field_of_view` of the raw fixed image)."""
        self._check(moving, fixed, t, noise)
        m, f = normalise_intensity(moving), normalise_intensity(fixed)
        if t is None:
            t = torch.zeros(f.shape[0], dtype=torch.int64, device=f.device)
            noise = torch.zeros_like(f)
            x_n = f
        else:
            noise = torch.randn_like(f) if noise is None else noise.float()
            x_n = self.noisy(f, t, noise)
        t_emb = self.time(t)
        x = torch.cat([m, f, x_n], dim=1)
        h, skips = x, [x]
        for block in self.encoder:
            h = block(h, t_emb)
            skips.append(h)
        skips.pop()  # the coarsest map is the decoders' input, not a skip
        levels = len(self.encoder)
        hd, hr = h, h
        for j, (bd, br) in enumerate(zip(self.diffusion_decoder, self.registration_decoder,
                                         strict=True)):
            hd = bd(hd, t_emb)
            hr = br(hr, t_emb)
            if j < len(self.attention):
                hr = self.attention[j](hr, hd)
            if j < levels:
                skip = skips[levels - 1 - j]
                hd = torch.cat([self.upsample(hd), skip], dim=1)
                hr = torch.cat([self.upsample(hr), skip], dim=1)
        return {"velocity": self.flow_head(hr).float(), "score": self.score_head(hd).float(),
                "fixed_input": f, "moving_input": m, "noise": noise, "t": t,
                "mask": field_of_view(fixed)}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Registers ``moving`` to ``fixed``.

        Args:
            moving: Tensor [B, 1, *S], any intensity units (min-max normalised to [-1, 1]
                for the network and the loss; sizes divisible by :attr:`stride`).
            fixed: Tensor [B, 1, *S].
            t: int64 [B] diffusion steps in [0, num_timesteps); None: the registration pass
                (t = 0 and the fixed image itself as the third channel, [Q23]).
            noise: the noise N [B, 1, *S] added to the normalised fixed image (None with
                ``t``: drawn from torch's global generator).

        Returns:
            :meth:`fields`' dict and ``"ddf"`` [B, ndim, *S] (voxel units,
            ``warp(moving, ddf) ≈ fixed``; the integrated velocity, or the velocity itself
            with ``transform="displacement"``) and ``"warped_input"`` [B, 1, *S], the
            normalised moving image warped (border padding). Fields float32 even under
            autocast; ``"noise"`` is zero in the registration pass.
        """
        out = self.fields(moving, fixed, t, noise)
        velocity = out["velocity"]
        if self.transform == "svf":
            ddf = integrate_velocity(velocity, self.steps, memory=self.memory,
                                     backend=self.backend)
        else:
            ddf = velocity
        out["ddf"] = ddf
        out["warped_input"] = warp(out["moving_input"], ddf, padding="border",
                                   backend=self.backend)
        return out
