"""``jacobian_det`` and ``folding_fraction``: det(I + ∇u) of the map x + u(x), per voxel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import _double, _ext, reference
from ._ext import DTYPE_CODES, cpu_threads, cuda_stream
from ._validation import check_field
from .backends import resolve

_HALF = (torch.float16, torch.bfloat16)
_VOXELS_PER_THREAD = 16384  # field elements (voxels x ndim) worth a thread of their own


# Accepted voxel sizes: the kernels take 1/h per axis in the arithmetic dtype (float32 for
# float32 and half inputs), a finite normal float32 for h in this range (1e-200 gave an
# infinite 1/h in float32 and a NaN determinant, 1e200 a 1/h flushed to 0).
SPACING_MIN, SPACING_MAX = 1e-12, 1e12


def _expected(ndim: int) -> str:
    # Built only for an error message: torch.compile does not trace string formatting.
    return (f"None, a number or {ndim} numbers (one per spatial axis) in "
            f"[{SPACING_MIN:g}, {SPACING_MAX:g}]")


def _check_spacing(op: str, spacing: object, ndim: int) -> tuple[float, ...]:
    """None, one positive number (every axis) or ndim positive numbers -> ndim floats."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        values: tuple[object, ...] = (spacing,) * ndim
    elif isinstance(spacing, Sequence) and not isinstance(spacing, str):
        values = tuple(spacing)
    else:
        raise TypeError(
            f"{op}: spacing must be {_expected(ndim)}, got {type(spacing).__name__}"
        )
    # Comparisons only (NaN fails both): under torch.compile a spacing may be symbolic,
    # which math.isfinite does not take.
    if len(values) != ndim or not all(
        isinstance(h, (int, float)) and not isinstance(h, bool)
        and SPACING_MIN <= h <= SPACING_MAX  # type: ignore[operator]
        for h in values
    ):
        raise ValueError(f"{op}: spacing must be {_expected(ndim)}, got {spacing!r}")
    return tuple(float(h) for h in values)  # type: ignore[arg-type]


def _validate(op: str, u: object, spacing: object) -> tuple[float, ...]:
    ndim = check_field(op, "u", u)
    return _check_spacing(op, spacing, ndim)


def _det_shape(u: torch.Tensor) -> tuple[int, ...]:
    return (u.shape[0], *u.shape[2:])


def _kernel_args(u: torch.Tensor, inv_h: list[float]) -> tuple:
    return DTYPE_CODES[u.dtype], u.shape[1], u.shape[0], list(u.shape[2:]), list(inv_h)


@_ext.on_tensor_device
def launch_forward(u: torch.Tensor, inv_h: list[float], backend: str) -> torch.Tensor:
    """Runs the forward kernel of `backend` (not "torch"): det [B, *S] of u's dtype."""
    u = u.contiguous()
    dtype = u.dtype
    if backend == "cpu":
        work = u.float() if dtype in _HALF else u
        det = torch.empty(_det_shape(u), dtype=work.dtype)
        _ext.C.jacobian_forward_cpu(
            *_kernel_args(work, inv_h), cpu_threads(work, _VOXELS_PER_THREAD), work.data_ptr(),
            det.data_ptr(),
        )
        return det.to(dtype)
    det = torch.empty(_det_shape(u), dtype=dtype, device=u.device)
    if backend == "cuda":
        _ext.C.jacobian_forward_cuda(
            *_kernel_args(u, inv_h), u.data_ptr(), det.data_ptr(), cuda_stream(u)
        )
    elif backend == "triton":
        from .triton import jacobian as triton_jacobian

        triton_jacobian.jacobian_forward(u, det, inv_h)
    else:  # pragma: no cover - dispatch never sends other names here
        raise ValueError(f"jacobian_det: no kernel for backend {backend!r}")
    return det


@_ext.on_tensor_device
def launch_backward(
    grad_det: torch.Tensor, u: torch.Tensor, inv_h: list[float], backend: str
) -> torch.Tensor:
    """Runs the backward kernel of `backend`: d (sum grad_det * det) / d u, [B, ndim, *S]."""
    grad_det, u = grad_det.contiguous(), u.contiguous()
    dtype = u.dtype
    if backend == "cpu":
        work = torch.float32 if dtype in _HALF else dtype
        g, w = grad_det.to(work), u.to(work)
        grad_u = torch.empty(u.shape, dtype=work)
        _ext.C.jacobian_backward_cpu(
            *_kernel_args(w, inv_h), cpu_threads(w, _VOXELS_PER_THREAD), g.data_ptr(), w.data_ptr(),
            grad_u.data_ptr(),
        )
        return grad_u.to(dtype)
    grad_det = grad_det.to(dtype)
    grad_u = torch.empty(u.shape, dtype=dtype, device=u.device)
    if backend == "cuda":
        # P = grad_det · cofactors / h per voxel, written then read by the two backward passes.
        ndim = u.shape[1]
        scratch = torch.empty(
            (u.shape[0], ndim * ndim, *u.shape[2:]), dtype=torch.float32, device=u.device
        )
        _ext.C.jacobian_backward_cuda(
            *_kernel_args(u, inv_h), grad_det.data_ptr(), u.data_ptr(), grad_u.data_ptr(),
            scratch.data_ptr(), cuda_stream(u),
        )
    elif backend == "triton":
        from .triton import jacobian as triton_jacobian

        triton_jacobian.jacobian_backward(grad_det, u, grad_u, inv_h)
    else:  # pragma: no cover
        raise ValueError(f"jacobian_det: no kernel for backend {backend!r}")
    return grad_u


# ---------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mrus::jacobian_det", mutates_args=())
def _jacobian_op(u: torch.Tensor, inv_h: list[float], backend: str) -> torch.Tensor:
    return launch_forward(u, inv_h, backend)


@_jacobian_op.register_fake
def _(u, inv_h, backend):
    return u.new_empty(_det_shape(u))


@torch.library.custom_op("mrus::jacobian_det_backward", mutates_args=())
def _jacobian_backward_op(
    grad_det: torch.Tensor, u: torch.Tensor, inv_h: list[float], backend: str
) -> torch.Tensor:
    return launch_backward(grad_det, u, inv_h, backend)


@_jacobian_backward_op.register_fake
def _(grad_det, u, inv_h, backend):
    return u.new_empty(u.shape)


def _setup_context(ctx, inputs, output):
    u, inv_h, backend = inputs
    ctx.save_for_backward(u)
    ctx.args = (inv_h, backend)


def _backward(ctx, grad_det):
    (u,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return _jacobian_backward_op(grad_det, u, *ctx.args), None, None


_jacobian_op.register_autograd(_backward, setup_context=_setup_context)


def _double_spec(grad_det, u, inv_h, backend):
    """Double backward of mrus::jacobian_det_backward (mrus_kernels/_double.py): the
    reference determinant of u."""
    spacing = tuple(1.0 / x for x in inv_h)

    def forward(u):
        return reference.jacobian_det(u, spacing)

    return forward, ((u, 1, True),)


_double.register(_jacobian_backward_op, _double_spec)


# ---------------------------------------------------------------------------- public API


def jacobian_det(
    u: torch.Tensor,
    *,
    spacing: float | Sequence[float] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Jacobian determinant det(I + ∇u(x)) of the map x + u(x), at every voxel.

    d u_i / d x_j by central differences inside, (u[k + 1] - u[k - 1]) / 2, one-sided
    differences at the two borders, 0 along an axis of size 1. Differentiable in ``u`` (the
    backward is a gather over the adjoint stencil: one writer per element, no atomics).

    Args:
        u: Tensor [B, ndim, *S] (2D: S = (H, W); 3D: S = (D, H, W)), component i along
            spatial axis i, in voxel units, or in the units of ``spacing`` when given.
        spacing: voxel size per spatial axis (one number for all axes, or ndim numbers,
            each in [1e-12, 1e12]), in the units of ``u`` (e.g. mm for a displacement in
            mm). None: voxel units.
            (A displacement in voxel units has the same determinant at any spacing.)
        backend: "auto", "torch", "cpu", "triton" or "cuda"; default ``MRUS_BACKEND`` or
            "auto".

    Returns:
        Tensor [B, *S] of u's dtype (float32 arithmetic for float16/bfloat16); <= 0 where
        the map folds.

    Example:
        >>> u = torch.zeros(1, 3, 8, 8, 8)
        >>> bool((jacobian_det(u) == 1).all())
        True
    """
    h = _validate("jacobian_det", u, spacing)
    name = resolve("jacobian_det", backend, u.device, u.dtype)
    if name == "torch":
        return reference.jacobian_det(u, h)
    return _jacobian_op(u, [1.0 / x for x in h], name)


def folding_fraction(
    u: torch.Tensor,
    *,
    spacing: float | Sequence[float] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fraction of voxels where the map x + u(x) folds, det(I + ∇u) <= 0 (the
    ``%|Jφ| <= 0`` of registration papers, as a fraction in [0, 1]).

    Computed on the tensor's device with no host sync; not differentiable (a count).

    Args:
        u: Tensor [B, ndim, *S], as in :func:`jacobian_det`.
        spacing: as in :func:`jacobian_det` (changes the determinant only for a
            displacement given in the units of the spacing).
        backend: as in :func:`jacobian_det`.

    Returns:
        Tensor [B], float32 (float64 for float64 input). A NaN determinant does not count
        as folded.

    Example:
        >>> folding_fraction(torch.zeros(2, 2, 16, 16))
        tensor([0., 0.])
    """
    h = _validate("folding_fraction", u, spacing)
    name = resolve("folding_fraction", backend, u.device, u.dtype)
    with torch.no_grad():
        if name == "torch":
            det = reference.jacobian_det(u, h)
        else:
            det = _jacobian_op(u, [1.0 / x for x in h], name)
    out = torch.promote_types(u.dtype, torch.float32)
    return (det <= 0).flatten(1).sum(1, dtype=out) / det[0].numel()


class JacobianDet(nn.Module):
    """``nn.Module`` form of :func:`jacobian_det`: ``forward(u)`` -> [B, *S].

    Example:
        >>> layer = JacobianDet(spacing=(1.0, 1.0, 2.0))
        >>> det = layer(ddf_mm)
    """

    def __init__(
        self, spacing: float | Sequence[float] | None = None, backend: str | None = None
    ) -> None:
        super().__init__()
        if spacing is not None:  # the field's ndim is not known yet: 2 or 3 numbers, or one
            sequence = isinstance(spacing, Sequence) and not isinstance(spacing, str)
            ndim = len(spacing) if sequence and len(spacing) == 2 else 3  # type: ignore[arg-type]
            _check_spacing("JacobianDet", spacing, ndim)
        self.spacing, self.backend = spacing, backend

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return jacobian_det(u, spacing=self.spacing, backend=self.backend)

    def extra_repr(self) -> str:
        return f"spacing={self.spacing!r}, backend={self.backend!r}"
