"""Plain-PyTorch oracles of every operator: written for clarity, float64 capable,
differentiable by autograd. Tests compare every backend against these; the ``torch``
backend runs them."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .convert import ddf_to_grid

_HALF = (torch.float16, torch.bfloat16)


def _sample_points(ddf: torch.Tensor) -> list[torch.Tensor]:
    """x + u(x) per spatial axis, each [B, *S]."""
    axes = [torch.arange(n, device=ddf.device, dtype=ddf.dtype) for n in ddf.shape[2:]]
    grid = torch.meshgrid(*axes, indexing="ij")
    return [grid[i] + ddf[:, i] for i in range(ddf.shape[1])]


def warp(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear", padding: str = "zeros"
) -> torch.Tensor:
    """out(x) = image(x + ddf(x)) by explicit corner gathers (the oracle for `warp`).

    Args:
        image: Tensor [B, C, *S_in].
        ddf: Tensor [B, ndim, *S_out], voxel units, component i along spatial axis i.
        mode: "linear" or "nearest" (round half to even).
        padding: "zeros" (interpolate against zero voxels outside) or "border" (clamp the
            coordinate into [0, n - 1]).

    Returns:
        Tensor [B, C, *S_out]; NaN in every channel where the displacement is NaN.
    """
    if image.dtype in _HALF:
        return warp(image.float(), ddf.float(), mode, padding).to(image.dtype)
    ndim = ddf.shape[1]
    batch = max(image.shape[0], ddf.shape[0])
    channels = image.shape[1]
    size_in = image.shape[2:]
    image = image.expand(batch, *image.shape[1:])
    ddf = ddf.expand(batch, *ddf.shape[1:])
    points = _sample_points(ddf)
    nan = torch.stack(points).isnan().any(0)
    flat = image.reshape(batch, channels, -1)

    def gather(idx: list[torch.Tensor]) -> torch.Tensor:
        valid = torch.ones_like(nan)
        off = torch.zeros_like(idx[0])
        for i, n in enumerate(size_in):
            valid = valid & (idx[i] >= 0) & (idx[i] < n)
            off = off * n + idx[i].clamp(0, n - 1)
        values = torch.gather(flat, 2, off.reshape(batch, 1, -1).expand(-1, channels, -1))
        values = values.reshape(batch, channels, *off.shape[1:])
        return torch.where(valid[:, None], values, torch.zeros_like(values))

    clamped = []
    for i, n in enumerate(size_in):
        p = torch.where(nan, torch.zeros_like(points[i]), points[i])
        clamped.append(p.clamp(0, n - 1) if padding == "border" else p.clamp(-2, n + 1))
    if mode == "nearest":
        out = gather([torch.round(p).long() for p in clamped])
    else:
        lower = [torch.floor(p) for p in clamped]
        frac = [p - f for p, f in zip(clamped, lower)]
        out = torch.zeros(batch, channels, *ddf.shape[2:], dtype=image.dtype, device=image.device)
        for bits in itertools.product((0, 1), repeat=ndim):
            weight = torch.ones_like(frac[0])
            for t, bit in zip(frac, bits):
                weight = weight * (t if bit else 1 - t)
            idx = [f.long() + bit for f, bit in zip(lower, bits)]
            out = out + gather(idx) * weight[:, None]
    return torch.where(nan[:, None], torch.full_like(out, float("nan")), out)


def warp_grid_sample(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear", padding: str = "zeros"
) -> torch.Tensor:
    """The VoxelMorph-style spatial transformer: ddf to a normalised grid, then grid_sample.

    What users write today; the baseline of the benchmarks. Needs every spatial size >= 2.
    """
    batch = max(image.shape[0], ddf.shape[0])
    grid = ddf_to_grid(
        ddf.expand(batch, *ddf.shape[1:]), align_corners=True, size=tuple(image.shape[2:])
    )
    gs_mode = "bilinear" if mode == "linear" else "nearest"
    return F.grid_sample(
        image.expand(batch, *image.shape[1:]), grid, mode=gs_mode, padding_mode=padding,
        align_corners=True,
    )
