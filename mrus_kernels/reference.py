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


def compose(u: torch.Tensor, v: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Displacement of φ_u ∘ φ_v: v(x) + u(x + v(x)). u, v: [B, ndim, *S], voxel units."""
    return v + warp(u, v, "linear", padding)


def integrate_velocity(v: torch.Tensor, steps: int = 7, padding: str = "border") -> torch.Tensor:
    """Scaling and squaring: u = v / 2**steps, then `steps` times u = compose(u, u)."""
    u = v / 2**steps
    for _ in range(steps):
        u = compose(u, u, padding)
    return u


def _derivative(x: torch.Tensor, dim: int, h: float) -> torch.Tensor:
    """d/dx along `dim`: central differences inside, one-sided at the borders, 0 for size 1."""
    n = x.shape[dim]
    if n == 1:
        # 0 (even where x is NaN), still a function of x: a field whose every axis has size 1
        # gets a zero gradient, not a det cut off from the graph.
        return torch.where(torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x), x)
    fwd = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)  # x[k + 1] - x[k]
    inner = (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2  # (x[k + 1] - x[k - 1]) / 2
    return torch.cat([fwd.narrow(dim, 0, 1), inner, fwd.narrow(dim, n - 2, 1)], dim) / h


def jacobian_det(u: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """det(I + ∇u) of the map x + u(x), per voxel: [B, ndim, *S] -> [B, *S].

    d u_i / d x_j: central differences inside, one-sided at the borders, 0 along an axis of
    size 1. Half types are computed in float32 and rounded once.

    spacing: voxel size per axis; u is then in the same units (e.g. mm). None: voxel units.
    """
    if u.dtype in _HALF:
        return jacobian_det(u.float(), spacing).to(u.dtype)
    ndim = u.shape[1]
    h = spacing if spacing is not None else (1.0,) * ndim
    jac = [
        [_derivative(u[:, i], j + 1, h[j]) + (1.0 if i == j else 0.0) for j in range(ndim)]
        for i in range(ndim)
    ]
    if ndim == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        det = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )
    return det


def folding_fraction(u: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """Fraction of voxels with det(I + ∇u) <= 0, per batch item: [B], float32 (float64 for
    float64 input)."""
    det = jacobian_det(u, spacing)
    return (det <= 0).flatten(1).to(torch.promote_types(u.dtype, torch.float32)).mean(1)
