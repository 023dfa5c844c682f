"""Smoothness regularisers of displacement fields: ``grad_l2``, ``harmonic_energy``,
``bending_energy`` and ``diffusion`` (the last two MONAI's ``BendingEnergyLoss`` and
``DiffusionLoss``).

The forward of each is one fused stencil pass over u (read once, no difference or Laplacian
volumes materialised) with a deterministic per-item reduction (per-plane / per-block partials
added in fixed order). The gradients of grad_l2, bending_energy and diffusion are one fused
gather pass (each gradient element written once, no atomics); that of harmonic_energy on the
GPU writes the Laplacian once (into a scratch of u's size) and applies its adjoint stencil in
a second pass (csrc/include/regularisers.h).
"""

from __future__ import annotations

import math

import torch

from . import _double, _ext, reference
from ._ext import DTYPE_CODES, cpu_threads, cuda_stream
from ._validation import check_choice, check_float, check_spatial, check_tensor
from .backends import resolve

_HALF = (torch.float16, torch.bfloat16)
GRAD_L2, HARMONIC, BENDING, DIFFUSION = 0, 1, 2, 3  # reg::Kind of csrc/include/regularisers.h
CUDA_BLOCK = 256  # REG_CUDA_BLOCK
REDUCTIONS = ("sum", "mean", "none")


def _validate(op: str, u: object, min_size: int) -> int:
    check_tensor(op, "u", u)
    assert isinstance(u, torch.Tensor)
    check_float(op, "u", u)
    ndim = check_spatial(op, "u", u)
    if min(u.shape[2:]) < min_size:
        raise ValueError(
            f"{op}: every spatial size of u must be >= {min_size}, got spatial shape "
            f"{tuple(u.shape[2:])}"
        )
    return ndim


# Accepted voxel sizes. The kernels take the axis weights 1 / (h² ndim count) in the
# arithmetic dtype (float32 for float32 and half inputs): for h in this range 1/h² lies in
# [1e-24, 1e24], so every weight is a finite normal float32 for any volume below 10**13
# differences per axis (outside it a weight overflows to inf or flushes to 0, and Python
# raised ZeroDivisionError / OverflowError computing it).
SPACING_MIN, SPACING_MAX = 1e-12, 1e12
# bending_energy weighs its terms by 1/h⁴ and 1/(8 h_i² h_j²): normal float32 numbers for h
# in this narrower range.
BENDING_SPACING_MIN, BENDING_SPACING_MAX = 1e-6, 1e6


def _spacing(
    spacing: object, ndim: int, op: str = "grad_l2", lo: float = SPACING_MIN,
    hi: float = SPACING_MAX,
) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing = (float(spacing),) * ndim
    if not isinstance(spacing, (tuple, list)) or len(spacing) != ndim or not all(
        [isinstance(h, (int, float)) and not isinstance(h, bool) for h in spacing]
    ):
        raise ValueError(
            f"{op}: spacing must be None, a number or {ndim} numbers (one per spatial "
            f"axis), got {spacing!r}"
        )
    # Comparisons only (NaN fails both): under torch.compile a spacing may be symbolic,
    # which math.isfinite does not take.
    if not all([lo <= h <= hi for h in spacing]):
        raise ValueError(
            f"{op}: spacing must be in [{lo:g}, {hi:g}] per axis (voxel sizes whose weights "
            f"are normal float32 numbers), got {tuple(spacing)}"
        )
    return tuple([float(h) for h in spacing])


def _weights(kind: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[float]:
    """The kernels' term weights (csrc/include/regularisers.h), spacing folded in.

    grad_l2: 1 / (h_i² ndim count_i) per axis (count_i: differences along axis i);
    bending: 1/h_i⁴ per axis (raw [1, −2, 1] stencil), then 2 / (16 h_i² h_j²) per axis pair
    i < j in order (raw 4-point mixed stencil; MONAI's factor 2 and its 1/4 squared);
    diffusion: 1 / (4 h_i²) per axis (raw central difference u(x + e_i) − u(x − e_i)).
    """
    ndim = len(shape) - 2
    if kind == BENDING:
        pairs = [(i, j) for i in range(ndim) for j in range(i + 1, ndim)]
        return [1.0 / spacing[i] ** 4 for i in range(ndim)] + [
            2.0 / (16.0 * spacing[i] ** 2 * spacing[j] ** 2) for i, j in pairs
        ]
    if kind == DIFFUSION:
        return [1.0 / (4.0 * spacing[i] ** 2) for i in range(ndim)]
    if kind != GRAD_L2:
        return [0.0] * ndim
    numel = math.prod(shape)
    return [
        1.0 / (spacing[i] ** 2 * ndim * (numel // shape[2 + i] * (shape[2 + i] - 1)))
        for i in range(ndim)
    ]


def _args(u: torch.Tensor, kind: int, wt: list[float]):
    return (DTYPE_CODES[u.dtype], kind, u.shape[0], u.shape[1], list(u.shape[2:]), wt)


@_ext.on_tensor_device
def launch_forward(u: torch.Tensor, kind: int, wt: list[float], backend: str) -> torch.Tensor:
    """Per-item sums [B] of the energy, by the kernels of `backend` (cpu, cuda, triton);
    u contiguous float32/float64."""
    b = u.shape[0]
    if backend == "cpu":
        out = torch.empty(b, dtype=u.dtype)
        _ext.C.regularisers_forward_cpu(
            *_args(u, kind, wt), cpu_threads(u), u.data_ptr(), out.data_ptr()
        )
        return out
    if backend == "cuda":
        n_part = -(-(u[0].numel()) // CUDA_BLOCK)
        partials = torch.empty((b, n_part), dtype=torch.float32, device=u.device)
        _ext.C.regularisers_forward_cuda(
            *_args(u, kind, wt), u.data_ptr(), partials.data_ptr(), cuda_stream(u)
        )
        return partials.sum(1)
    if backend == "triton":
        from .triton import regularisers as triton_reg

        return triton_reg.forward(u, kind, wt)
    raise ValueError(f"regularisers: no kernel for backend {backend!r}")  # pragma: no cover


@_ext.on_tensor_device
def launch_backward(
    scale: torch.Tensor, u: torch.Tensor, kind: int, wt: list[float], backend: str
) -> torch.Tensor:
    """d (Σ_b scale[b] E_b) / d u."""
    scale = scale.to(u.dtype).contiguous()
    grad = torch.empty_like(u)
    if backend == "cpu":
        _ext.C.regularisers_backward_cpu(
            *_args(u, kind, wt), cpu_threads(u), u.data_ptr(), scale.data_ptr(),
            grad.data_ptr(),
        )
    elif backend == "cuda":
        # The harmonic backward writes the Laplacian here, then applies its adjoint stencil.
        lap = torch.empty_like(u) if kind == HARMONIC else None
        _ext.C.regularisers_backward_cuda(
            *_args(u, kind, wt), u.data_ptr(), scale.data_ptr(), grad.data_ptr(),
            lap.data_ptr() if lap is not None else 0, cuda_stream(u),
        )
    elif backend == "triton":
        from .triton import regularisers as triton_reg

        triton_reg.backward(u, scale, grad, kind, wt)
    else:  # pragma: no cover
        raise ValueError(f"regularisers: no kernel for backend {backend!r}")
    return grad


@torch.library.custom_op("mrus::regulariser", mutates_args=())
def _reg_op(u: torch.Tensor, kind: int, wt: list[float], backend: str) -> torch.Tensor:
    """Per-item energies [B]."""
    return launch_forward(u, kind, wt, backend)


@_reg_op.register_fake
def _(u, kind, wt, backend):
    return u.new_empty((u.shape[0],))


@torch.library.custom_op("mrus::regulariser_backward", mutates_args=())
def _reg_backward_op(
    scale: torch.Tensor, u: torch.Tensor, kind: int, wt: list[float], backend: str
) -> torch.Tensor:
    return launch_backward(scale, u, kind, wt, backend)


@_reg_backward_op.register_fake
def _(scale, u, kind, wt, backend):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    u, kind, wt, backend = inputs
    ctx.save_for_backward(u)
    ctx.args = (kind, wt, backend)


def _backward(ctx, grad):
    (u,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _reg_backward_op(grad, u, *ctx.args), None, None, None


_reg_op.register_autograd(_backward, setup_context=_setup_context)


def _double_spec(scale, u, kind, wt, backend):
    """Double backward of mrus::regulariser_backward (mrus_kernels/_double.py): the per-item
    energies [B] in plain PyTorch (grad_l2: Σ_i wt_i Σ (Δ_i u)², wt from _weights)."""

    def forward(u):
        if kind == HARMONIC:
            return reference.harmonic_energy(u, "none")
        if kind in (BENDING, DIFFUSION):
            return _stencil_energy_torch(u, kind, wt)
        total = u.new_zeros(u.shape[0])
        for i, w in enumerate(wt):
            n = u.shape[2 + i]
            d = u.narrow(2 + i, 1, n - 1) - u.narrow(2 + i, 0, n - 1)
            total = total + w * (d * d).flatten(1).sum(1)
        return total

    return forward, ((u, 1, True),)


_double.register(_reg_backward_op, _double_spec)


def _stencil_energy_torch(u: torch.Tensor, kind: int, wt: list[float]) -> torch.Tensor:
    """Per-item energies [B] of bending / diffusion from the kernels' weights (_weights), in
    plain PyTorch on slices of the interior: the double backward's forward."""
    ndim = u.dim() - 2
    size = u.shape[2:]

    def at(offsets: dict[int, int]) -> torch.Tensor:
        # u(x + o) for x over the interior voxels: axis i sliced to [1 + o_i, n_i − 1 + o_i).
        idx = [slice(None), slice(None)]
        idx += [slice(1 + offsets.get(i, 0), size[i] - 1 + offsets.get(i, 0)) for i in range(ndim)]
        return u[tuple(idx)]

    total = u.new_zeros(u.shape[0])
    for i in range(ndim):
        if kind == BENDING:
            d = at({i: 1}) - 2 * at({}) + at({i: -1})
        else:
            d = at({i: 1}) - at({i: -1})
        total = total + wt[i] * (d * d).flatten(1).sum(1)
    if kind == BENDING:
        k = ndim
        for i in range(ndim):
            for j in range(i + 1, ndim):
                m = (at({i: 1, j: 1}) - at({i: 1, j: -1})) - (
                    at({i: -1, j: 1}) - at({i: -1, j: -1})
                )
                total = total + wt[k] * (m * m).flatten(1).sum(1)
                k += 1
    return total


def _reduce_interior(per_item: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    """Per-item sums over the interior voxels to the reduction: "mean" divides by the
    number of terms, B · C · Π(S_i − 2)."""
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    return per_item.sum() / (shape[0] * shape[1] * math.prod([n - 2 for n in shape[2:]]))


def _per_item(u: torch.Tensor, kind: int, wt: list[float], name: str) -> torch.Tensor:
    return _reg_op(u.contiguous(), kind, wt, name)


def _work(u: torch.Tensor) -> torch.Tensor:
    return u.float() if u.dtype in _HALF else u


def grad_l2(
    u: torch.Tensor, *, spacing: float | tuple[float, ...] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean squared forward difference, averaged over the axes (VoxelMorph's ``Grad("l2")``,
    the papers' smoothness Σ‖∇Φ‖²): (1/ndim) Σ_i mean((u(x + e_i) − u(x))² / h_i²).

    Args:
        u: Tensor [B, C, *S] (a displacement field has C = ndim), any units; every spatial
            size >= 2.
        spacing: voxel size per spatial axis (h_i, in the units of u per voxel), a single
            number for all axes, or None (1); each in [1e-12, 1e12] (ValueError otherwise).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        Scalar tensor of u's dtype (units of u² / h²). Differentiable in u.

    Example:
        >>> u = torch.randn(1, 3, 32, 32, 32)
        >>> loss = grad_l2(u, spacing=(1.0, 1.0, 2.0))
    """
    ndim = _validate("grad_l2", u, 2)
    h = _spacing(spacing, ndim)
    name = resolve("grad_l2", backend, u.device, u.dtype)
    w = _work(u)
    if name == "torch":
        out = reference.grad_l2(w, h)
    else:
        out = _per_item(w, GRAD_L2, _weights(GRAD_L2, tuple(u.shape), h), name).sum()
    return out.to(u.dtype)


def harmonic_energy(
    u: torch.Tensor, *, reduction: str = "sum", backend: str | None = None
) -> torch.Tensor:
    """Harmonic energy of MR2US-Pro (its eq. 20): Σ_i ‖∇²u_i‖², the squared Laplacian of each
    component by the 7-point (3D) / 5-point (2D) stencil on interior voxels.

    Args:
        u: Tensor [B, C, *S] displacement field (voxel units); every spatial size >= 3.
        reduction: "sum" (over batch, components and interior voxels: the paper's metric,
            per volume when B = 1), "mean" (the same terms averaged: a regulariser whose scale
            does not depend on the volume size) or "none" ([B], per-item sums).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        Scalar (or [B] for "none") of u's dtype. Differentiable in u.

    Example:
        >>> u = torch.randn(1, 3, 32, 32, 32)
        >>> he = harmonic_energy(u)  # Σ ‖∇²u‖²
    """
    ndim = _validate("harmonic_energy", u, 3)
    check_choice("harmonic_energy", "reduction", reduction, REDUCTIONS)
    name = resolve("harmonic_energy", backend, u.device, u.dtype)
    w = _work(u)
    if name == "torch":
        return reference.harmonic_energy(w, reduction).to(u.dtype)
    per_item = _per_item(w, HARMONIC, [0.0] * ndim, name)
    return _reduce_interior(per_item, reduction, u.shape).to(u.dtype)


def _stencil_regulariser(
    op: str, kind: int, u: torch.Tensor, spacing: object, reduction: str, backend: str | None
) -> torch.Tensor:
    ndim = _validate(op, u, 3)
    if kind == BENDING:
        h = _spacing(spacing, ndim, op, BENDING_SPACING_MIN, BENDING_SPACING_MAX)
    else:
        h = _spacing(spacing, ndim, op)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    name = resolve(op, backend, u.device, u.dtype)
    w = _work(u)
    if name == "torch":
        fn = reference.bending_energy if kind == BENDING else reference.diffusion
        return fn(w, h, reduction).to(u.dtype)
    per_item = _per_item(w, kind, _weights(kind, tuple(u.shape), h), name)
    return _reduce_interior(per_item, reduction, u.shape).to(u.dtype)


def bending_energy(
    u: torch.Tensor, *, spacing: float | tuple[float, ...] | None = None,
    reduction: str = "mean", backend: str | None = None,
) -> torch.Tensor:
    """Bending energy (MONAI's ``BendingEnergyLoss``): on the voxels interior in every axis,
    Σ_i (∂²u/∂x_i²)² + 2 Σ_{i<j} (∂²u/∂x_i∂x_j)² per component, with the compact stencils
    ∂²_ii = (u(x + e_i) − 2u(x) + u(x − e_i)) / h_i² and ∂²_ij = (u(x + e_i + e_j) −
    u(x + e_i − e_j) − u(x − e_i + e_j) + u(x − e_i − e_j)) / (4 h_i h_j).

    MONAI's ``BendingEnergyLoss(normalize=False, reduction=r)(u)`` equals
    ``bending_energy(u, reduction=r)`` (r "mean" or "sum"); ``normalize=True`` equals
    ``bending_energy(u / S_c, spacing=1 / S_i)``, component c divided by the size of axis c.

    Args:
        u: Tensor [B, C, *S] (a displacement field has C = ndim), any units; every spatial
            size >= 3 (ValueError otherwise).
        spacing: voxel size per spatial axis (h_i), a single number for all axes, or None
            (1); each in [1e-6, 1e6] (ValueError otherwise).
        reduction: "mean" (over B · C · Π(S_i − 2) interior terms: MONAI's mean of its
            map), "sum", or "none" ([B], per-item sums).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        Scalar (or [B] for "none") of u's dtype. Differentiable in u (twice).

    Example:
        >>> u = torch.randn(1, 3, 32, 32, 32)
        >>> loss = bending_energy(u)
    """
    return _stencil_regulariser("bending_energy", BENDING, u, spacing, reduction, backend)


def diffusion(
    u: torch.Tensor, *, spacing: float | tuple[float, ...] | None = None,
    reduction: str = "mean", backend: str | None = None,
) -> torch.Tensor:
    """Diffusion regulariser (MONAI's ``DiffusionLoss``): on the voxels interior in every
    axis, Σ_i ((u(x + e_i) − u(x − e_i)) / (2 h_i))² per component (central differences).

    MONAI's ``DiffusionLoss(normalize=False, reduction=r)(u)`` equals
    ``diffusion(u, reduction=r)`` (r "mean" or "sum"); ``normalize=True`` equals
    ``diffusion(u / S_c, spacing=1 / S_i)``, component c divided by the size of axis c.

    Args:
        u: Tensor [B, C, *S], any units; every spatial size >= 3 (ValueError otherwise).
        spacing: voxel size per spatial axis (h_i), a single number for all axes, or None
            (1); each in [1e-12, 1e12] (ValueError otherwise).
        reduction: "mean" (over B · C · Π(S_i − 2) interior terms: MONAI's mean of its
            map), "sum", or "none" ([B], per-item sums).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        Scalar (or [B] for "none") of u's dtype. Differentiable in u (twice).

    Example:
        >>> u = torch.randn(1, 3, 32, 32, 32)
        >>> loss = diffusion(u, spacing=(1.0, 1.0, 2.0))
    """
    return _stencil_regulariser("diffusion", DIFFUSION, u, spacing, reduction, backend)
