"""The VoxelMorph-diff network: U-Net(moving, fixed) → velocity → exp → warp.

Balakrishnan et al., IEEE TMI 2019 (the U-Net and the spatial transformer) with the
stationary velocity field of Dalca et al., MedIA 2019 (scaling and squaring, 7 steps).
Integration and resampling are :func:`mrus_kernels.integrate_velocity` and
:func:`mrus_kernels.warp`; everything else is torch's own layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrus_kernels import integrate_velocity, warp
from mrus_models.nn import VOXELMORPH_DECODER, VOXELMORPH_ENCODER, FlowHead, UNet


def normalise_intensity(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each item's min-max rescaling to [0, 1] (no host sync): the network sees the same
    range whatever the scanner's units."""
    dims = tuple(range(1, x.dim()))
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


class VoxelMorph(nn.Module):
    """VoxelMorph with a diffeomorphic (SVF) output.

    Args:
        ndim: 2 or 3.
        encoder: U-Net encoder widths (VoxelMorph-2: 16, 32, 32, 32).
        decoder: U-Net decoder widths (VoxelMorph-2: 32, 32, 32, 32, 32, 16, 16).
        residual: residual encoder blocks.
        norm: None, "instance", "group" or "batch".
        steps: scaling and squaring steps (7).
        memory: "store" or "recompute", :func:`mrus_kernels.integrate_velocity`'s
            backward memory mode.
        init_std: the flow head's initial weight standard deviation (1e-5).
        backend: ``mrus_kernels`` backend for the integration and the warp (None: default).

    Example:
        >>> net = VoxelMorph(2)
        >>> out = net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64))
        >>> sorted(out)
        ['ddf', 'velocity', 'warped']
    """

    def __init__(self, ndim: int, *, encoder: Sequence[int] = VOXELMORPH_ENCODER,
                 decoder: Sequence[int] = VOXELMORPH_DECODER, residual: bool = True,
                 norm: str | None = None, steps: int = 7, memory: str = "store",
                 init_std: float = 1e-5, backend: str | None = None) -> None:
        super().__init__()
        self.unet = UNet(ndim, 2, encoder=encoder, decoder=decoder, residual=residual, norm=norm)
        self.flow = FlowHead(ndim, self.unet.out_channels, init_std=init_std)
        self.ndim, self.steps, self.memory, self.backend = ndim, steps, memory, backend

    @property
    def stride(self) -> int:
        """Every spatial size must be divisible by it (``2 ** len(encoder)``)."""
        return self.unet.stride

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Registers ``moving`` to ``fixed``.

        Args:
            moving: Tensor [B, 1, *S], any intensity units (each item is min-max
                normalised for the network; the warp resamples the raw values).
            fixed: Tensor [B, 1, *S], same grid.

        Returns:
            dict with ``"velocity"`` [B, ndim, *S] (voxel units), ``"ddf"`` [B, ndim, *S]
            = exp(velocity) as a displacement (voxel units, ``warped(x) = moving(x +
            ddf(x))``) and ``"warped"`` [B, 1, *S]. The fields are float32 even under
            bf16 autocast: seven compositions in bf16 would lose the small displacements.
        """
        if moving.dim() != self.ndim + 2 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(
                f"VoxelMorph: moving and fixed must both be [B, 1, *S] ({self.ndim}D) of the same "
                f"shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        x = torch.cat([normalise_intensity(moving), normalise_intensity(fixed)], dim=1)
        velocity = self.flow(self.unet(x)).float()
        ddf = integrate_velocity(velocity, self.steps, memory=self.memory, backend=self.backend)
        warped = warp(moving.float(), ddf, backend=self.backend)
        return {"velocity": velocity, "ddf": ddf, "warped": warped}
