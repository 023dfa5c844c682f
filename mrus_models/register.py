"""Optimisation-based registration on the fused operators: affine, SVF, or affine then SVF.

Adam on a multi-resolution pyramid. The transform maps the fixed grid into the moving
image, ``warped(x) = moving(x + ddf(x))``:

- affine: ``x ↦ A x + t`` in the voxel coordinates of the input grid, parametrised about
  the grid centre so that its parameters are dimensionless;
- SVF: ``exp(v)`` by scaling and squaring (:func:`mrus_kernels.integrate_velocity`), ``v``
  a dense velocity on each level's grid, Gaussian-smoothed before integration and carried
  to the next level by linear upsampling;
- affine+svf: ``φ = A ∘ exp(v)``; the affine is first fitted alone on the coarse levels,
  then both are refined together, level by level.

The loss is ``-similarity + smoothness · grad_l2(u_svf)``, similarity MI or NMI (Parzen,
:func:`mrus_kernels.mutual_information` / :func:`mrus_kernels.nmi`) or LNCC
(:func:`mrus_kernels.lncc`); resampling is :func:`mrus_kernels.warp`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mrus_kernels import compose, grad_l2, integrate_velocity, lncc, mutual_information, nmi, warp

from ._smooth import coarse_size, downsample, gaussian_blur, resize_ddf
from .data.warps import affine_ddf

SIMILARITIES = ("mi", "nmi", "lncc")
TRANSFORMS = ("affine", "svf", "affine+svf")


@dataclass
class RegistrationResult:
    """What :func:`register` found.

    Attributes:
        ddf: Tensor [B, ndim, *S] on the fixed grid, voxel units: ``warped(x) =
            moving(x + ddf(x))``.
        warped: Tensor [B, C, *S], the moving image resampled on the fixed grid.
        inverse: Tensor [B, ndim, *S], voxel units, the displacement of the inverse map
            (``compose(ddf, inverse) ≈ 0``; exact up to interpolation for an SVF).
        matrix: Tensor [B, ndim + 1, ndim + 1] float64, the affine part in voxel coordinates
            (identity for ``transform="svf"``).
        velocity: Tensor [B, ndim, *S_v] (voxels of its own grid S_v, the grid of factor
            ``max(levels[-1], velocity_factor)``), smoothed, or None for "affine".
        loss_history: the loss at every iteration, all stages and levels in order.
        stages: one dict per (stage, level): ``stage``, ``factor``, ``shape``,
            ``iterations``, ``seconds``, ``final_loss``.
        seconds: wall time of the optimisation, s.
    """

    ddf: torch.Tensor
    warped: torch.Tensor
    inverse: torch.Tensor
    matrix: torch.Tensor
    velocity: torch.Tensor | None
    loss_history: list[float] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        return len(self.loss_history)


def _per_level(name: str, value, n: int) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} must be a number or one value per level ({n}), got {value}")
    return value


def _check_inputs(fixed, moving, fixed_mask, similarity, transform, levels):
    for name, x in (("fixed", fixed), ("moving", moving)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"register: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (4, 5):
            raise ValueError(
                f"register: {name} must be [B, C, H, W] (2D) or [B, C, D, H, W] (3D), got shape "
                f"{tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"register: {name} must be floating, got {x.dtype}")
    if fixed.dim() != moving.dim():
        raise ValueError(
            f"register: fixed and moving must have the same number of dimensions, got "
            f"{fixed.dim() - 2}D {tuple(fixed.shape)} and {moving.dim() - 2}D {tuple(moving.shape)}"
        )
    if fixed.shape[2:] != moving.shape[2:]:
        raise ValueError(
            f"register: fixed and moving must share a grid (resample moving first), got "
            f"{tuple(fixed.shape[2:])} and {tuple(moving.shape[2:])}"
        )
    if fixed.shape[0] != moving.shape[0] or fixed.shape[1] != 1:
        raise ValueError(
            f"register: fixed must be [B, 1, *S] and moving [B, C, *S] with the same B, got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    _check_mask("fixed_mask", fixed_mask, fixed)
    if similarity not in SIMILARITIES:
        raise ValueError(f"register: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"register: transform must be one of {TRANSFORMS}, got {transform!r}")
    levels = tuple(levels)
    if not levels or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in levels):
        raise ValueError(f"register: levels must be downsampling factors >= 1, got {levels}")
    if list(levels) != sorted(levels, reverse=True):
        raise ValueError(f"register: levels must go from coarse to fine, got {levels}")
    return levels


def _check_mask(name, mask, like):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != like.dim() \
            or mask.shape[2:] != like.shape[2:] or mask.shape[1] != 1 \
            or mask.shape[0] not in (1, like.shape[0]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"register: {name} must be [1 or B, 1, *S] on the grid of {tuple(like.shape)}, "
            f"got {shape}"
        )


class _Affine:
    """Affine parameters in the input grid's voxel coordinates: ``x ↦ x + W (x - c) + R b``
    (W [B, ndim, ndim], b [B, ndim] dimensionless; c the centre, R the largest half-extent)."""

    def __init__(self, b: int, size: tuple[int, ...], device, dtype):
        ndim = len(size)
        self.size = size
        self.centre = torch.tensor([(n - 1) / 2 for n in size], device=device, dtype=dtype)
        self.radius = float(max(n - 1 for n in size)) / 2
        self.w = torch.zeros(b, ndim, ndim, device=device, dtype=dtype, requires_grad=True)
        self.b = torch.zeros(b, ndim, device=device, dtype=dtype, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.w, self.b]

    def ddf(self, level_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(displacement [B, ndim, *level_size] in level voxels, linear part L in level units)."""
        ndim = len(level_size)
        dev, dt = self.w.device, self.w.dtype
        s = torch.tensor(
            [(n - 1) / max(1, m - 1) for n, m in zip(self.size, level_size, strict=True)],
            device=dev, dtype=dt,
        )
        grids = torch.meshgrid(*[torch.arange(m, device=dev, dtype=dt) for m in level_size],
                               indexing="ij")
        x = torch.stack(grids) * s.view(-1, *([1] * ndim)) - self.centre.view(-1, *([1] * ndim))
        u = torch.einsum("bij,j...->bi...", self.w, x) + (self.radius * self.b).view(
            *self.b.shape, *([1] * ndim))
        lin = self.w / s.view(1, -1, 1) * s.view(1, 1, -1)  # S⁻¹ W S
        return u / s.view(1, -1, *([1] * ndim)), lin

    def matrix(self) -> torch.Tensor:
        ndim = len(self.size)
        b = self.w.shape[0]
        with torch.no_grad():
            m = torch.eye(ndim + 1, dtype=torch.float64, device=self.w.device).repeat(b, 1, 1)
            w, c = self.w.double(), self.centre.double()
            m[:, :ndim, :ndim] += w
            m[:, :ndim, ndim] = self.radius * self.b.double() - torch.einsum("bij,j->bi", w, c)
        return m


def _similarity(name, fixed, warped, mask, value_range, bins, window, backend):
    if name == "lncc":
        return lncc(fixed, warped, window=window, mask=mask, backend=backend)
    fn = mutual_information if name == "mi" else nmi
    return fn(fixed, warped, bins=bins, value_range=value_range, mask=mask,
              backend=backend)


def _image_range(x: torch.Tensor, upper: float = 0.995) -> tuple[float, float]:
    """Histogram range of an image: [min(0, min x), q] with q its ``upper`` quantile.

    A robust upper end keeps the bins on the anatomy when a few voxels are very bright
    (ultrasound speckle and specular echoes); brighter voxels fall in the last bin (the
    Parzen weights clamp values into the range). 0 stays inside because zero padding
    brings it into the warped image.
    """
    flat = x.detach().flatten()
    step = max(1, flat.numel() // 1_000_000)  # quantile on at most ~1M voxels
    sample = flat[::step].float()
    lo = min(0.0, float(sample.min()))
    hi = float(torch.quantile(sample, upper))
    if not hi > lo:
        hi = max(float(sample.max()), lo + 1.0)
    return lo, hi


def register(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    similarity: str = "mi",
    transform: str = "affine+svf",
    levels: Sequence[int] = (4, 2, 1),
    iterations: int | Sequence[int] = (120, 60, 15),
    affine_iterations: int | Sequence[int] | None = None,
    smoothness: float = 50.0,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    lr: float = 0.15,
    affine_lr: float = 0.01,
    velocity_sigma: float = 1.5,
    velocity_factor: int = 1,
    steps: int = 7,
    bins: int = 32,
    window: int = 9,
    device: str | torch.device | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> RegistrationResult:
    """Registers ``moving`` to ``fixed``: finds ``ddf`` with ``moving(x + ddf(x)) ≈ fixed(x)``.

    Args:
        fixed: Tensor [B, 1, *S] (2D or 3D), floating.
        moving: Tensor [B, C, *S] on the same grid (resample it into the fixed grid first;
            the CLI does this through the NIfTI affines). Only channel 0 drives the
            similarity; every channel is warped.
        similarity: "mi" (Parzen mutual information, multi-modal; default), "nmi", "lncc"
            (local NCC, same or similar modality).
        transform: "affine", "svf" or "affine+svf" (default).
        levels: downsampling factors, coarse to fine (factor 1 is the input grid).
        iterations: Adam iterations of the deformable (or, for "affine", the only) stage, one
            number or one per level.
        affine_iterations: iterations of the affine-only stage of "affine+svf", per level;
            default: the deformable numbers on the levels coarser than the finest, 0 on it.
        smoothness: weight of ``grad_l2`` of the SVF displacement (level voxel units,
            i.e. strain, comparable across levels).
        fixed_mask: optional Tensor [1 or B, 1, *S], where the similarity is measured.
        moving_mask: optional Tensor [1 or B, 1, *S] in the moving frame, where the moving
            image has data (an ultrasound fan); warped along with the image (as a constant
            for the gradients) and multiplied into the similarity's mask.
        lr: Adam step of the velocity, level voxels.
        affine_lr: Adam step of the dimensionless affine parameters.
        velocity_sigma: Gaussian smoothing of the velocity before integration, in voxels of
            the velocity's grid.
        velocity_factor: the velocity lives, and is integrated, on the grid of downsampling
            factor ``max(level, velocity_factor)``; its displacement is upsampled linearly
            to finer levels (VoxelMorph's ``int_downsize``). 2 halves the cost of the
            finest level's integration eightfold in 3D at little loss for smooth warps.
        steps: scaling-and-squaring steps.
        bins: histogram bins of MI/NMI.
        window: LNCC window, voxels.
        device: where to run (default: fixed's device); results stay there.
        backend: operator backend for every fused op ("auto", "torch", "cpu", "triton",
            "cuda"; default ``MRUS_BACKEND`` or "auto").
        progress: show a tqdm progress bar (stderr).

    Returns:
        :class:`RegistrationResult` on ``device``.

    Example:
        >>> res = register(t1, us, similarity="mi", transform="affine+svf")
        >>> res.warped.shape, res.loss_history[-1]
    """
    levels = _check_inputs(fixed, moving, fixed_mask, similarity, transform, levels)
    _check_mask("moving_mask", moving_mask, moving)
    device = torch.device(device) if device is not None else fixed.device
    fixed = fixed.to(device=device, dtype=torch.float32)
    moving = moving.to(device=device, dtype=torch.float32)
    mask = None if fixed_mask is None else fixed_mask.to(device=device, dtype=torch.float32)
    mmask = None if moving_mask is None else moving_mask.to(device=device, dtype=torch.float32)
    n = len(levels)
    its = tuple(int(i) for i in _per_level("iterations", iterations, n))
    if transform == "affine+svf":
        default = tuple(
            i if f > levels[-1] or n == 1 else 0 for i, f in zip(its, levels, strict=True)
        )
        aff_its = tuple(int(i) for i in _per_level(
            "affine_iterations", default if affine_iterations is None else affine_iterations, n))
    else:
        aff_its = (0,) * n
    b, ndim, size = fixed.shape[0], fixed.dim() - 2, tuple(fixed.shape[2:])

    affine = _Affine(b, size, device, torch.float32) if transform != "svf" else None
    velocity = None
    history: list[float] = []
    stages: list[dict] = []
    start = time.perf_counter()

    plan = []
    if transform == "affine":
        plan = [("affine", f, i) for f, i in zip(levels, its, strict=True)]
    else:
        plan = [("affine", f, i) for f, i in zip(levels, aff_its, strict=True) if i > 0]
        plan += [("svf", f, i) for f, i in zip(levels, its, strict=True)]
    bar = _progress_bar(sum(i for _, _, i in plan), progress)

    pyramid: dict[int, tuple] = {}

    def level_data(factor: int):
        if factor not in pyramid:
            f_l = downsample(fixed, factor)
            m_l = downsample(moving[:, :1], factor)
            k_l = None if mask is None else downsample(mask, factor)
            mm_l = None if mmask is None else downsample(mmask, factor)
            # Fixed per level (from the smoothed images), so that the histogram's bins do
            # not move between iterations.
            rng = (_image_range(f_l), _image_range(m_l)) if similarity != "lncc" else None
            pyramid[factor] = (f_l, m_l, k_l, mm_l, rng)
        return pyramid[factor]

    def transform_ddf(level_size, v, smooth_v: bool = True):
        """(total displacement on level_size, SVF displacement on the velocity's grid)."""
        u_svf = u_v = None
        if v is not None:
            smooth = gaussian_blur(v, velocity_sigma) if velocity_sigma > 0 and smooth_v else v
            u_v = integrate_velocity(smooth, steps, backend=backend)
            u_svf = u_v if tuple(u_v.shape[2:]) == level_size else resize_ddf(u_v, level_size)
        if affine is None:
            return u_svf, u_v
        u_aff, lin = affine.ddf(level_size)
        if u_svf is None:
            return u_aff, None
        # A ∘ exp(v): the affine displacement at x + u(x) is a(x) + L u(x) exactly.
        return u_aff + u_svf + torch.einsum("bij,bj...->bi...", lin, u_svf), u_v

    try:
        for stage, factor, n_it in plan:
            f_l, m_l, k_l, mm_l, value_range = level_data(factor)
            level_size = tuple(f_l.shape[2:])
            params, groups = [], []
            if stage == "svf":
                v_size = coarse_size(size, max(factor, velocity_factor))
                if velocity is None:
                    velocity = torch.zeros(b, ndim, *v_size, device=device)
                elif tuple(velocity.shape[2:]) != v_size:
                    velocity = resize_ddf(velocity.detach(), v_size)
                velocity = velocity.detach().requires_grad_(True)
                groups.append({"params": [velocity], "lr": lr})
            if affine is not None:
                # The affine keeps moving during the SVF stage, more slowly.
                groups.append({"params": affine.params(),
                               "lr": affine_lr if stage == "affine" else affine_lr / 4})
            params = [p for g in groups for p in g["params"]]
            opt = torch.optim.Adam(groups)
            t0 = time.perf_counter()
            loss_value = float("nan")
            for _ in range(n_it):
                opt.zero_grad(set_to_none=True)
                u, u_svf = transform_ddf(level_size, velocity if stage == "svf" else None)
                warped = warp(m_l, u, backend=backend)
                weights = k_l
                if mm_l is not None:
                    # Where the moving image has data; a constant, so that the loss cannot
                    # improve by sliding the field of view over the anatomy.
                    seen = warp(mm_l, u.detach(), backend=backend)
                    weights = seen if weights is None else weights * seen
                sim = _similarity(similarity, f_l, warped, weights, value_range, bins, window,
                                  backend).sum()
                loss = -sim
                if u_svf is not None and smoothness > 0:
                    loss = loss + smoothness * b * grad_l2(u_svf, backend=backend)
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
                history.append(loss_value)
                if bar is not None:
                    bar.set_postfix_str(f"{stage} 1/{factor} loss {loss_value:.4f}", refresh=False)
                    bar.update(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del params
            stages.append({"stage": stage, "factor": factor, "shape": level_size,
                           "iterations": n_it, "seconds": time.perf_counter() - t0,
                           "final_loss": loss_value})
    finally:
        if bar is not None:
            bar.close()

    with torch.no_grad():
        v_final = None
        if velocity is not None:
            # Smoothed as in the optimisation, integrated on its own grid, then upsampled.
            v_final = gaussian_blur(velocity, velocity_sigma) if velocity_sigma > 0 else velocity
        ddf, _ = transform_ddf(size, v_final, smooth_v=False)
        if ddf is None:
            ddf = torch.zeros(b, ndim, *size, device=device)
        warped = warp(moving, ddf, backend=backend)
        inverse = _inverse(affine, v_final, size, steps, backend)
        matrix = affine.matrix() if affine is not None else \
            torch.eye(ndim + 1, dtype=torch.float64, device=device).repeat(b, 1, 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RegistrationResult(ddf, warped, inverse, matrix, v_final, history, stages,
                              time.perf_counter() - start)


def _inverse(affine, v, size, steps, backend):
    """Displacement of φ⁻¹ = exp(-v) ∘ A⁻¹ on the grid ``size``."""
    parts = []
    if v is not None:
        u_inv = integrate_velocity(-v, steps, backend=backend)
        parts.append(u_inv if tuple(u_inv.shape[2:]) == size else resize_ddf(u_inv, size))
    if affine is not None:
        a_inv = affine_ddf(torch.linalg.inv(affine.matrix()), size)
        if not parts:
            return a_inv
        # exp(-v) ∘ A⁻¹: a_inv(y) + u_inv(y + a_inv(y)).
        return compose(parts[0], a_inv, backend=backend)
    return parts[0]


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the `data` extra; without it, no bar
        return None
    return tqdm(total=total, desc="register", unit="it", leave=False, dynamic_ncols=True)
