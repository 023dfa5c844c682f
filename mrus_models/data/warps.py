"""Known warps: a random small affine and a random smooth stationary velocity field.

The displacement and its inverse are both returned, so that a moving image made with one
has a ground-truth answer: with ``moving = warp(S, inverse)``, ``moving(x + ddf(x)) = S(x)``,
i.e. ``ddf`` is exactly what a registration of ``moving`` to ``S`` should recover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mrus_kernels import compose, integrate_velocity

from .._smooth import coarse_size, resize_ddf
from .modalities import smooth_random_field


@dataclass
class KnownWarp:
    """A random warp and its inverse, on one grid.

    Attributes:
        ddf: Tensor [1, ndim, *S], voxel units: the displacement of φ = A ∘ exp(v),
            ``φ(x) = x + ddf(x)``.
        inverse: Tensor [1, ndim, *S], voxel units: the displacement of
            φ⁻¹ = exp(-v) ∘ A⁻¹; ``compose(ddf, inverse) ≈ compose(inverse, ddf) ≈ 0``.
        matrix: Tensor [ndim + 1, ndim + 1] float64, the affine part A in voxel coordinates.
        velocity: Tensor [1, ndim, *S], voxel units, the stationary velocity v.
    """

    ddf: torch.Tensor
    inverse: torch.Tensor
    matrix: torch.Tensor
    velocity: torch.Tensor


def _rotation(angles: list[float]) -> np.ndarray:
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    return rot


def random_affine(size: tuple[int, ...], *, rotation: float = 3.0, scale: float = 0.03,
                  translation: float = 2.0, spacing: tuple[float, ...] | None = None,
                  seed: int = 0) -> torch.Tensor:
    """A random affine about the grid's centre, in voxel coordinates.

    Rotation angles uniform in ±``rotation`` degrees (one per plane), scales uniform in
    1 ± ``scale`` per axis, translation uniform in ±``translation`` mm per axis. The
    rotation is built in mm so that it stays a rotation on anisotropic grids.

    Returns:
        Tensor [ndim + 1, ndim + 1] float64 mapping voxel coordinates of the grid to voxel
        coordinates: ``x ↦ M[:ndim, :ndim] x + M[:ndim, ndim]``.
    """
    ndim = len(size)
    h = np.asarray(spacing if spacing is not None else (1.0,) * ndim, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_angles = 1 if ndim == 2 else 3
    angles = list(np.radians(rng.uniform(-rotation, rotation, n_angles)))
    lin_mm = _rotation(angles) @ np.diag(rng.uniform(1 - scale, 1 + scale, ndim))
    t_mm = rng.uniform(-translation, translation, ndim)
    lin = np.diag(1 / h) @ lin_mm @ np.diag(h)
    centre = (np.asarray(size, dtype=np.float64) - 1) / 2
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] = lin
    m[:ndim, ndim] = centre - lin @ centre + t_mm / h
    return torch.from_numpy(m)


def affine_ddf(matrix: torch.Tensor, size: tuple[int, ...], *, dtype=torch.float32,
               device=None) -> torch.Tensor:
    """Displacement (voxel units) of a voxel-coordinate affine on the grid ``size``.

    Args:
        matrix: Tensor [ndim + 1, ndim + 1] or [B, ndim + 1, ndim + 1].
        size: spatial size S.

    Returns:
        Tensor [B, ndim, *size] (B = 1 for a single matrix): ``M x - x``.
    """
    ndim = len(size)
    device = matrix.device if device is None else device
    m = matrix.to(device=device, dtype=torch.float64)
    m = m[None] if m.dim() == 2 else m
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=device) for n in size],
                           indexing="ij")
    x = torch.stack(grids)
    y = torch.einsum("bij,j...->bi...", m[:, :ndim, :ndim], x) + \
        m[:, :ndim, ndim].reshape(m.shape[0], ndim, *([1] * ndim))
    return (y - x).to(dtype)


def random_velocity(size: tuple[int, ...], *, max_displacement: float = 4.0,
                    spacing: tuple[float, ...] | None = None, control: int = 5,
                    seed: int = 0) -> torch.Tensor:
    """A smooth random stationary velocity field [1, ndim, *size], voxel units, scaled so that
    the largest displacement of its exponential is ``max_displacement`` mm.

    Each component is :func:`smooth_random_field` with ``control`` points per axis. The
    velocity is scaled, integrated, and rescaled twice by the ratio of the wanted to the
    obtained maximum, on a half-resolution copy: the maximum is met to about 1 %.
    """
    ndim = len(size)
    h = torch.tensor(spacing if spacing is not None else (1.0,) * ndim, dtype=torch.float32)
    v = torch.cat([smooth_random_field(size, control=control, seed=seed * 101 + i)
                   for i in range(ndim)], 1)
    if max_displacement == 0:
        return torch.zeros_like(v)
    hv = h.view(1, ndim, *([1] * ndim))
    v = v * (max_displacement / hv)  # max |v| component = max_displacement mm
    # The scale is found on a half-resolution copy (8x cheaper in 3D; the field is smooth,
    # so the maximum agrees to within about a percent).
    small = coarse_size(size, 2)
    v_small = resize_ddf(v, small)
    h_small = hv * torch.tensor(
        [(n - 1) / (m - 1) for n, m in zip(size, small, strict=True)]
    ).view_as(hv)
    gain = 1.0
    for _ in range(2):
        u = integrate_velocity(v_small * gain, 7)
        largest = float((u * h_small).square().sum(1).sqrt().max())
        gain *= max_displacement / max(largest, 1e-12)
    return v * gain
    return v


def known_warp(size: tuple[int, ...], *, max_displacement: float = 4.0,
               spacing: tuple[float, ...] | None = None, affine: bool = True,
               rotation: float = 3.0, scale: float = 0.03, translation: float = 2.0,
               control: int = 5, steps: int = 7, seed: int = 0) -> KnownWarp:
    """A random small affine composed with a random smooth SVF, with its inverse.

    ``φ = A ∘ exp(v)``: ``ddf(x) = u(x) + (A - I)(x + u(x))``, u = integrate_velocity(v);
    the inverse is ``exp(-v) ∘ A⁻¹`` via :func:`mrus_kernels.compose`.

    Args:
        size: spatial size S (2D or 3D).
        max_displacement: largest displacement of the SVF part, mm.
        spacing: voxel size per axis, mm (default 1).
        affine: include the affine part (see :func:`random_affine` for its ranges).
        rotation, scale, translation: affine ranges (degrees, fraction, mm).
        control: control points per axis of the random velocity (fewer = smoother).
        steps: scaling-and-squaring steps.
        seed: seed of every draw.

    Returns:
        :class:`KnownWarp` (float32 fields on the CPU).

    Example:
        >>> w = known_warp((64, 64, 64), max_displacement=5, seed=1)
        >>> moving = warp(image, w.inverse)   # then moving(x + w.ddf(x)) = image(x)
    """
    size = tuple(int(n) for n in size)
    if len(size) not in (2, 3):
        raise ValueError(f"size must be 2D or 3D, got {size}")
    if max_displacement < 0:
        raise ValueError(f"max_displacement must be >= 0 mm, got {max_displacement}")
    ndim = len(size)
    v = random_velocity(size, max_displacement=max_displacement, spacing=spacing,
                        control=control, seed=seed)
    u = integrate_velocity(v, steps)
    u_inv = integrate_velocity(-v, steps)
    if affine:
        m = random_affine(size, rotation=rotation, scale=scale, translation=translation,
                          spacing=spacing, seed=seed)
    else:
        m = torch.eye(ndim + 1, dtype=torch.float64)
    a = affine_ddf(m, size)
    a_inv = affine_ddf(torch.linalg.inv(m), size)
    # A ∘ exp(v): the affine displacement at x + u(x) is a(x) + (A - I) u(x), exactly
    # (no resampling of the affine field, which would clamp at the border).
    lin = (m[:ndim, :ndim] - torch.eye(ndim, dtype=torch.float64)).float()
    ddf = a + u + torch.einsum("ij,bj...->bi...", lin, u)
    inverse = compose(u_inv, a_inv)
    return KnownWarp(ddf.contiguous(), inverse.contiguous(), m, v)
