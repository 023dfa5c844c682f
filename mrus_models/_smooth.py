"""Separable Gaussian smoothing and resizing helpers shared by the data and registration code.

Plain PyTorch: these are not registration operators, only pre- and post-processing, so
they need no fused kernel. The Gaussian filters each axis as one matrix product with an
[n, n] matrix that holds the taps and the border rule (cached per size): for the field and
image sizes of registration this is several times faster than ``conv1d`` on a batch of
one-channel signals, forward and backward.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _filter_matrix(sigma: float, truncate: float, n: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """[n, n] matrix M with (M @ x)[i] = sum_t k[t] x[i + t - r] along one axis of n voxels,
    k the taps of gaussian_kernel1d, indices beyond the ends replicated (by at most n - 1
    voxels; further out they read 0, which matters only for axes shorter than the radius)."""
    k = gaussian_kernel1d(sigma, truncate=truncate, dtype=torch.float64)
    r = (k.numel() - 1) // 2
    pad = min(r, n - 1)
    i = torch.arange(n)[:, None]
    p = i + torch.arange(2 * r + 1)[None, :] - r  # source index of tap t at voxel i
    keep = (p >= -pad) & (p <= n - 1 + pad)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((i.expand_as(p)[keep], p.clamp(0, n - 1)[keep]), k.expand_as(p)[keep],
                 accumulate=True)
    return m.to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float | tuple[float, ...], *,
                  truncate: float = 3.0) -> torch.Tensor:
    """Gaussian smoothing of every (batch, channel) volume, replicate padding.

    Edge voxels are not pulled towards zero (the background of a brain image is zero
    anyway; velocity fields must not shrink at the border). Differentiable.

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
    y = x
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        m = _filter_matrix(float(s), float(truncate), x.shape[2 + axis], x.dtype, x.device)
        y = torch.tensordot(y, m, dims=([2 + axis], [1])).movedim(-1, 2 + axis)
    return y.contiguous()


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
