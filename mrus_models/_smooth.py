"""Separable Gaussian smoothing and resizing helpers shared by the data and registration code.

Plain PyTorch (``conv1d`` along each axis): these are not registration operators, only
pre-processing, so they need no fused kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, *, truncate: float = 3.0, dtype=torch.float32,
                      device=None) -> torch.Tensor:
    """Normalised 1D Gaussian taps, radius ``ceil(truncate * sigma)``: Tensor [2r + 1]."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float | tuple[float, ...], *,
                  truncate: float = 3.0) -> torch.Tensor:
    """Gaussian smoothing of every (batch, channel) volume, replicate padding.

    Args:
        x: Tensor [B, C, *S], 2D or 3D, floating.
        sigma: standard deviation in voxels, one value or one per spatial axis; 0 leaves
            that axis unsmoothed.
        truncate: kernel radius in standard deviations.

    Returns:
        Tensor [B, C, *S], same dtype.
    """
    ndim = x.dim() - 2
    sigmas = (sigma,) * ndim if isinstance(sigma, (int, float)) else tuple(sigma)
    b, c, *size = x.shape
    y = x
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        k = gaussian_kernel1d(float(s), truncate=truncate, dtype=x.dtype, device=x.device)
        r = (k.numel() - 1) // 2
        # Move the axis last, filter as a batch of 1D signals, move it back.
        moved = y.movedim(2 + axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        # Replicate padding: edge voxels are not pulled towards zero (the background of a
        # brain image is zero anyway; velocity fields must not shrink at the border).
        pad = min(r, shape[-1] - 1)
        flat = F.pad(flat, (pad, pad), mode="replicate") if pad > 0 else flat
        if pad < r:
            flat = F.pad(flat, (r - pad, r - pad), mode="constant", value=0.0)
        out = F.conv1d(flat, k.view(1, 1, -1))
        y = out.reshape(shape).movedim(-1, 2 + axis)
    return y.reshape(b, c, *size)


def resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear resampling to ``size`` with voxel centres of both grids at their corners
    (``align_corners=True``: voxel 0 and voxel n - 1 keep their positions)."""
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


def coarse_size(size: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """Grid size after downsampling by ``factor`` with the ends of the grid kept:
    ``ceil((n - 1) / factor) + 1`` (at least 2)."""
    return tuple(max(2, int(math.ceil((n - 1) / factor)) + 1) for n in size)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Anti-aliased downsampling: Gaussian of σ = factor / 2 voxels, then :func:`resize`."""
    if factor == 1:
        return x
    return resize(gaussian_blur(x, factor / 2.0), coarse_size(tuple(x.shape[2:]), factor))


def resize_ddf(u: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Displacement [B, ndim, *S] in voxel units to another grid of the same extent:
    resampled and each component scaled by (n_new - 1) / (n_old - 1) along its axis."""
    out = resize(u, size)
    scale = torch.tensor(
        [(n - 1) / max(1, m - 1) for n, m in zip(size, u.shape[2:], strict=True)], dtype=u.dtype,
        device=u.device,
    )
    return out * scale.view(1, -1, *([1] * len(size)))
