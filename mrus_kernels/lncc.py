"""``lncc``: local normalised cross-correlation (squared-correlation form) and its loss.

Per voxel v, with sums over the in-bounds voxels of the cubic (2D: square) window centred on
v (n of them; no zero padding, so ``lncc(x, a·x + b) = 1`` at the borders too):

    cross = ΣIJ − ΣIΣJ/n,  var_I = max(0, ΣI² − (ΣI)²/n),  var_J likewise,
    cc(v) = min(cross², var_I var_J) / (var_I var_J + eps)   ∈ [0, 1],

and ``lncc = Σ_v m(v) cc(v) / Σ_v m(v)`` per batch item (m = 1 without a mask). The min is
a no-op in exact arithmetic (Cauchy-Schwarz) and keeps rounding in near-constant patches of
large intensities from giving cc > 1.

:func:`lncc_monai` (not exported; for :mod:`mrus_kernels.compat.monai`) swaps in MONAI's
per-window formula, cc = (cross² + nr) / (max(ΣI² − (ΣI)²/n, dr) · max(ΣJ² − (ΣJ)²/n, dr)),
on the same sums, kernels and reduction: a form code of the custom op (``FORM_MRUS``,
``FORM_MONAI``; lncc::FORM_* of csrc/include/lncc.h), with dr passed as eps.

Kernels (cpu, cuda, triton) compute the five box sums (ΣI, ΣJ, ΣI², ΣJ², ΣIJ) by separable
running sums, one pass per axis (cost independent of the window), and never materialise cc
or the products. The backward recomputes the sums, turns them into five per-window
coefficient maps K = w ∂cc/∂S, box-sums those with the same filter and combines them with
I and J (csrc/include/lncc.h). Buffers: cpu one [B, 5, *S] float64 work buffer (sums and
coefficient maps, for either input dtype) plus the gradients; cuda and triton keep the box
sums in float64 ([B, 5, *S] float64, 3D only on triton) and, in the backward, the
coefficient maps in float32 ([B, 5, *S]): float32 running sums, float32 sums between passes
or cc computed in float32 leave errors of ~1e-7 of the largest window sum, which flat
windows next to bright tissue or on a non-zero background turn into variances far above eps
(cc ≈ 0.2 where it is 0). The per-item reduction is deterministic (per-block partials added
in fixed order, no float atomics).

Every backend sees each item of `fixed` and `moving` centred on its own mean (a constant
per item; lncc and its gradients are invariant to adding a constant to either image), so
the result does not depend on an intensity offset (MR tissue at ~1e3, CT at −1024): the
window sums of I² scale with the contrast, not with the absolute intensity, and even
float64 sums keep flat windows at cc = 0 on backgrounds of 3.7e5 and above (raw
ΣI² − (ΣI)²/n in float64 leaves variances of ~1e-2 there, far above eps). The kernels
(cpu, cuda, triton) subtract a bf16-rounded mean (:func:`_centred`); the torch backend is
the reference (:func:`mrus_kernels.reference.lncc`), which subtracts the float64 mean and
computes the box sums and cc in float64 for every input dtype. Measured on two 32³ images
(offset + 50·pattern + uniform noise, window 9, lncc 0.963) at offsets 0, 1e3, 1e4 and
−1024: float32 within 3e-8 of float64 in value and 5e-8 (relative to their largest) in
gradients on torch, cpu and triton; float32 box sums of the raw images were 2.2e-3 off at
1e4. The mean of an item holding NaN or Inf is not finite, so that item's value and
gradients are NaN (its running sums spread the NaN along whole lines anyway).

Mask weights must be finite and >= 0 (eager mode: a host sync and ValueError; under
torch.compile an in-graph assert on negative weights, see
:func:`mrus_kernels._validation.check_mask_nonnegative`). eps must lie
in float32's normal range [1.2e-38, 3.4e38] for every dtype: Triton takes it as a float32
scalar.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _double, _ext, reference
from ._ext import DTYPE_CODES, cpu_threads, cuda_stream, fake_grads, grads_or_empty, ptr
from ._validation import (
    capturing,
    check_batch,
    check_float,
    check_mask_nonnegative,
    check_mask_weights,
    check_same,
    check_spatial,
    check_tensor,
)
from .backends import resolve

_HALF = (torch.float16, torch.bfloat16)
NSUM = 5
CUDA_COLS = 256  # LNCC_CUDA_COLS of csrc/include/lncc.h
# Accepted eps: float32's normal range, for every input dtype. The Triton kernels take eps as
# a float32 scalar (a Python float argument is fp32 there): below the smallest normal it is
# flushed to 0 on the GPU (0/0 in constant windows), above the largest it is inf.
EPS_MIN = float(torch.finfo(torch.float32).tiny)
EPS_MAX = float(torch.finfo(torch.float32).max)
# Per-window formulas (lncc::FORM_* of csrc/include/lncc.h).
FORM_MRUS, FORM_MONAI = 0, 1


def _validate(
    fixed: object, moving: object, window: object, eps: object, mask: object, *, op: str = "lncc",
    eps_name: str = "eps",
) -> int:
    """Checks the arguments of `op` (its name opens every message; `eps_name`: what the
    caller calls eps) and returns the number of spatial axes."""
    check_tensor(op, "fixed", fixed)
    check_tensor(op, "moving", moving)
    assert isinstance(fixed, torch.Tensor) and isinstance(moving, torch.Tensor)
    check_float(op, "fixed", fixed)
    check_float(op, "moving", moving)
    ndim = check_spatial(op, "fixed", fixed)
    check_spatial(op, "moving", moving)
    if fixed.shape[1:] != moving.shape[1:]:
        raise ValueError(
            f"{op}: fixed and moving must have the same channel count and spatial shape, got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    if fixed.shape[1] != 1:
        raise ValueError(
            f"{op}: fixed and moving must have one channel ([B, 1, *S]), got {fixed.shape[1]} "
            f"channels (shape {tuple(fixed.shape)}); score channels separately and average"
        )
    check_batch(op, "fixed", fixed, "moving", moving)
    check_same(op, ("fixed", "moving"), (fixed, moving))
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{op}: window must be an int, got {type(window).__name__} {window!r}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"{op}: window must be an odd integer >= 1, got {window}")
    spatial = tuple(fixed.shape[2:])
    # Per axis, not min(spatial): under torch.compile(dynamic=True) min() guards on the
    # order of the sizes, so a crop of another aspect would recompile.
    if any(window > s for s in spatial):
        raise ValueError(
            f"{op}: window ({window}) must not exceed any spatial size of the images, got "
            f"spatial shape {spatial}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: {eps_name} must be a float, got {type(eps).__name__} {eps!r}")
    # Comparisons, not math.isfinite: torch.compile(dynamic=True) may pass eps as a symbolic
    # float, which comparisons guard on and math.isfinite cannot trace. NaN fails both.
    if not (EPS_MIN <= eps <= EPS_MAX):
        raise ValueError(
            f"{op}: {eps_name} must be a finite float > 0 within float32's normal range "
            f"[{EPS_MIN:g}, {EPS_MAX:g}], got {eps!r}"
        )
    if mask is not None:
        check_tensor(op, "mask", mask)
        assert isinstance(mask, torch.Tensor)
        if mask.dim() != fixed.dim() or mask.shape[1] != 1 or tuple(mask.shape[2:]) != spatial:
            raise ValueError(
                f"{op}: mask must be [B or 1, 1, *S] with S = {spatial}, got shape "
                f"{tuple(mask.shape)}"
            )
        check_batch(op, "fixed", fixed, "mask", mask)
        if mask.device != fixed.device:
            raise ValueError(
                f"{op}: mask must be on the images' device {fixed.device}, got {mask.device}"
            )
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"{op}: mask must be bool or floating point, got {mask.dtype}")
        if mask.requires_grad:
            raise ValueError(f"{op}: mask must not require grad ({op} is not differentiable in it)")
        # Eager: one host sync (negative or infinite weights, as the MI functions); under
        # torch.compile an in-graph assert (negative weights), unchecked under a CUDA graph
        # capture (mrus_kernels/_validation.py).
        if capturing():
            check_mask_nonnegative(op, mask)
        else:
            check_mask_weights(op, mask)
    return ndim


def _denominator(fixed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B]: the voxel count, or Σ mask (1 where it is 0, whose numerator is 0 too)."""
    b = fixed.shape[0]
    if mask is None:
        return torch.full((b,), float(fixed[0].numel()), dtype=fixed.dtype, device=fixed.device)
    msum = mask.reshape(b, -1).sum(1)
    return torch.where(msum > 0, msum, torch.ones_like(msum))


def _centred(x: torch.Tensor) -> torch.Tensor:
    """x minus the mean of each item rounded to 8 significant bits (a detached constant per
    item, so gradients pass through unchanged). Computed on the device, no host sync.

    The rounding makes x − c exact for every voxel at least half the constant (c is then a
    multiple of their ulp); smaller voxels round by at most half an ulp of c. A full-precision
    mean would round every voxel instead (measured: gradients 6e-7 off float64 on a sphere
    of 1e3 on a zero background, 4e-8 with this constant)."""
    c = x.detach().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return x - c.to(torch.bfloat16).to(x.dtype)


def _work(fixed: torch.Tensor, backend: str, backward: bool) -> torch.Tensor:
    """Scratch of one call: cpu [B, 5, *S] float64; triton [B, 5, *S] float64
    (3D; 2D needs none); cuda one flat float64 buffer holding the box sums [B, 5, *S]
    float64, then (backward) the coefficient maps [B, 5, *S] float32."""
    b, size = fixed.shape[0], list(fixed.shape[2:])
    if backend == "cpu":
        return torch.empty((b, NSUM, *size), dtype=torch.float64, device=fixed.device)
    if backend == "triton":
        shape = (b, NSUM, *size) if len(size) == 3 else (0,)
        return torch.empty(shape, dtype=torch.float64, device=fixed.device)
    n = b * NSUM * math.prod(size)
    return torch.empty(n + (-(-n // 2) if backward else 0), dtype=torch.float64,
                       device=fixed.device)


@_ext.on_tensor_device
def launch_forward(
    fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None, window: int, eps: float,
    nr: float, form: int, backend: str,
) -> torch.Tensor:
    """lncc [B] by the kernels of `backend` (cpu, cuda, triton) on validated, batch-matched,
    contiguous float32/float64 inputs [B, 1, *S] (mask of their dtype or None), in the
    per-window formula `form` (FORM_MRUS: eps; FORM_MONAI: eps is the floor dr, nr)."""
    b, size = fixed.shape[0], list(fixed.shape[2:])
    work = _work(fixed, backend, backward=False)
    if backend == "cpu":
        num = torch.empty(b, dtype=fixed.dtype)
        _ext.C.lncc_forward_cpu(
            DTYPE_CODES[fixed.dtype], b, size, window, eps, nr, form, cpu_threads(fixed),
            fixed.data_ptr(), moving.data_ptr(), ptr(mask),
            work.data_ptr(), num.data_ptr(),
        )
    elif backend == "cuda":
        n_part = -(-(size[-2] * size[-1]) // CUDA_COLS)
        partials = torch.empty((b, n_part), dtype=torch.float32, device=fixed.device)
        _ext.C.lncc_forward_cuda(
            DTYPE_CODES[fixed.dtype], b, size, window, eps, nr, form, fixed.data_ptr(),
            moving.data_ptr(), ptr(mask), work.data_ptr(), partials.data_ptr(),
            cuda_stream(fixed),
        )
        num = partials.sum(1)
    elif backend == "triton":
        from .triton import lncc as triton_lncc

        num = triton_lncc.lncc_forward(fixed, moving, mask, work, window=window, eps=eps, nr=nr,
                                       form=form)
    else:  # pragma: no cover - dispatch never sends other names here
        raise ValueError(f"lncc: no kernel for backend {backend!r}")
    return num / _denominator(fixed, mask)


@_ext.on_tensor_device
def launch_backward(
    grad: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
    window: int, eps: float, nr: float, form: int, backend: str, need_fixed: bool,
    need_moving: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d lncc / d fixed, d lncc / d moving) weighted by grad [B]; None where not needed."""
    b, size = fixed.shape[0], list(fixed.shape[2:])
    scale = (grad.to(fixed.dtype) / _denominator(fixed, mask)).contiguous()
    work = _work(fixed, backend, backward=True)
    gf = torch.empty_like(fixed) if need_fixed else None
    gm = torch.empty_like(moving) if need_moving else None
    ptrs = (ptr(gf), ptr(gm))
    mptr = ptr(mask)
    if backend == "cpu":
        _ext.C.lncc_backward_cpu(
            DTYPE_CODES[fixed.dtype], b, size, window, eps, nr, form, cpu_threads(fixed),
            fixed.data_ptr(), moving.data_ptr(), mptr, scale.data_ptr(), work.data_ptr(), *ptrs,
        )
    elif backend == "cuda":
        _ext.C.lncc_backward_cuda(
            DTYPE_CODES[fixed.dtype], b, size, window, eps, nr, form, fixed.data_ptr(),
            moving.data_ptr(), mptr, scale.data_ptr(), work.data_ptr(), *ptrs, cuda_stream(fixed),
        )
    elif backend == "triton":
        from .triton import lncc as triton_lncc

        triton_lncc.lncc_backward(fixed, moving, mask, scale, work, gf, gm, window=window, eps=eps,
                                  nr=nr, form=form)
    else:  # pragma: no cover
        raise ValueError(f"lncc: no kernel for backend {backend!r}")
    return gf, gm


# ---------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mrus::lncc", mutates_args=())
def _lncc_op(
    fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None, window: int, eps: float,
    nr: float, form: int, backend: str,
) -> torch.Tensor:
    return launch_forward(fixed, moving, mask, window, eps, nr, form, backend)


@_lncc_op.register_fake
def _(fixed, moving, mask, window, eps, nr, form, backend):
    return fixed.new_empty((fixed.shape[0],))


@torch.library.custom_op("mrus::lncc_backward", mutates_args=())
def _lncc_backward_op(
    grad: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
    window: int, eps: float, nr: float, form: int, backend: str, need_fixed: bool,
    need_moving: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (fixed, moving); an empty tensor stands for one not asked for."""
    gf, gm = launch_backward(
        grad, fixed, moving, mask, window, eps, nr, form, backend, need_fixed, need_moving
    )
    return grads_or_empty((gf, fixed), (gm, moving))


@_lncc_backward_op.register_fake
def _(grad, fixed, moving, mask, window, eps, nr, form, backend, need_fixed, need_moving):
    return fake_grads((fixed, need_fixed), (moving, need_moving))


def _setup_context(ctx, inputs, output):
    fixed, moving, mask, window, eps, nr, form, backend = inputs
    ctx.save_for_backward(fixed, moving, mask)
    ctx.args = (window, eps, nr, form, backend)


def _backward(ctx, grad):
    fixed, moving, mask = ctx.saved_tensors
    need_fixed, need_moving = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    rest = (None,) * 6  # mask, window, eps, nr, form, backend
    if not (need_fixed or need_moving):
        return None, None, *rest
    gf, gm = _lncc_backward_op(grad, fixed, moving, mask, *ctx.args, need_fixed, need_moving)
    return (gf if need_fixed else None), (gm if need_moving else None), *rest


_lncc_op.register_autograd(_backward, setup_context=_setup_context)


def _double_spec(grad, fixed, moving, mask, window, eps, nr, form, backend, need_fixed,
                 need_moving):
    """Double backward of mrus::lncc_backward (mrus_kernels/_double.py): the reference lncc
    (of the form `form`) of the (centred) primals; the mask is a constant."""

    def forward(fixed, moving):
        if form == FORM_MONAI:
            return reference.lncc_monai(fixed, moving, window, nr, eps, mask)
        return reference.lncc(fixed, moving, window, eps, mask)

    return forward, ((fixed, 1, need_fixed), (moving, 2, need_moving))


_double.register(_lncc_backward_op, _double_spec)


# ---------------------------------------------------------------------------- public API


def lncc(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    window: int = 9,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Local normalised cross-correlation (squared form, as VoxelMorph / ANTs), per item.

    Statistics of each cubic (2D: square) window use its in-bounds voxels only. Constant
    patches give cc = 0 (never NaN or inf); every voxel's cc lies in [0, 1].
    Differentiable in ``fixed`` and ``moving`` (not in ``mask``).

    Args:
        fixed: Tensor [B or 1, 1, *S] (2D: S = (H, W); 3D: S = (D, H, W)), intensities.
        moving: Tensor [B or 1, 1, *S], same dtype, device and S. Batch sizes broadcast.
        window: odd side of the window in voxels, 1 <= window <= every spatial size.
        eps: added to var_I var_J (units: intensity⁴); finite, in float32's normal range
            [1.17549e-38, 3.40282e38] (``EPS_MIN``, ``EPS_MAX``) for every dtype.
        mask: optional [B or 1, 1, *S] weights (bool or float, finite and >= 0; a negative
            or infinite weight raises ValueError): lncc becomes the weighted mean
            Σ m cc / Σ m; an all-zero mask gives 0. Statistics still use every voxel of each
            window. Not differentiable: a mask that requires grad raises ValueError.
        backend: "auto", "torch", "cpu", "triton" or "cuda"; default ``MRUS_BACKEND`` or
            "auto".

    Returns:
        Tensor [max(B_fixed, B_moving)] of the inputs' dtype, values in [0, 1].

    Example:
        >>> x = torch.rand(2, 1, 32, 32, 32)
        >>> lncc(x, 3 * x + 1)  # tensor([1.0000, 1.0000])
    """
    _validate(fixed, moving, window, eps, mask)
    return _run(fixed, moving, window, float(eps), 0.0, FORM_MRUS, mask, backend)


def _run(
    fixed: torch.Tensor, moving: torch.Tensor, window: int, eps: float, nr: float, form: int,
    mask: torch.Tensor | None, backend: str | None,
) -> torch.Tensor:
    """lncc [B] of validated inputs in the per-window formula `form` (FORM_MRUS: eps;
    FORM_MONAI: eps is the variance floor dr, nr is added to cross²)."""
    dtype = fixed.dtype
    name = resolve("lncc", backend, fixed.device, dtype)
    work = torch.float32 if dtype in _HALF else dtype
    b = max(fixed.shape[0], moving.shape[0])
    f, m = fixed.to(work), moving.to(work)
    if name != "torch":  # the kernels: centred before the batch broadcast (module docstring)
        f, m = _centred(f), _centred(m)
    f = f.expand(b, *fixed.shape[1:]).contiguous()
    m = m.expand(b, *moving.shape[1:]).contiguous()
    mk = mask.to(work).expand(b, *mask.shape[1:]).contiguous() if mask is not None else None
    if name != "torch":
        out = _lncc_op(f, m, mk, window, eps, nr, form, name)
    elif form == FORM_MONAI:
        out = reference.lncc_monai(f, m, window, nr, eps, mk)
    else:
        out = reference.lncc(f, m, window, eps, mk)
    return out.to(dtype)


def lncc_monai(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    window: int,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-5,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """lncc with MONAI's per-window formula (LocalNormalizedCrossCorrelationLoss, rectangular
    kernel), per item; for :mod:`mrus_kernels.compat.monai`, not exported.

    Per voxel, from the same in-bounds window sums as :func:`lncc` (no zero padding):

        cc = (cross² + smooth_nr) / (max(var_I, smooth_dr) · max(var_J, smooth_dr)),

    raw variances ΣI² − (ΣI)²/n (no clamp at 0, no min with cross²: cc is not bounded by 1
    when smooth_nr > 0 or under rounding). Gradients are torch autograd's of that expression
    (torch.maximum: to the raw variance where it exceeds smooth_dr, half of it on a tie).
    MONAI zero-pads its windows and divides by the full window volume; its value is
    ``-lncc_monai`` of both images zero-padded by window // 2 with a mask of ones on the
    original voxels (every window of an original voxel is then whole, and the centring on
    each item's mean does not change the window statistics).

    Args:
        fixed, moving, window, mask, backend: as :func:`lncc`.
        smooth_nr: added to cross²; finite, 0 <= smooth_nr <= 3.40282e38 (``EPS_MAX``: Triton
            takes it as a float32 scalar).
        smooth_dr: the variances' floor; in float32's normal range [1.17549e-38, 3.40282e38]
            (as ``eps`` of :func:`lncc`).

    Returns:
        Tensor [max(B_fixed, B_moving)] of the inputs' dtype: per item Σ m cc / Σ m (the mean
        cc without a mask; 0 for an all-zero mask).
    """
    op = "lncc_monai"
    _validate(fixed, moving, window, smooth_dr, mask, op=op, eps_name="smooth_dr")
    if isinstance(smooth_nr, bool) or not isinstance(smooth_nr, (int, float)):
        raise TypeError(
            f"{op}: smooth_nr must be a float, got {type(smooth_nr).__name__} {smooth_nr!r}"
        )
    # Comparisons (symbolic floats under torch.compile); NaN fails them.
    if not (0.0 <= smooth_nr <= EPS_MAX):
        raise ValueError(
            f"{op}: smooth_nr must be a finite float >= 0 (at most {EPS_MAX:g}), got "
            f"{smooth_nr!r}"
        )
    return _run(fixed, moving, window, float(smooth_dr), float(smooth_nr), FORM_MONAI, mask,
                backend)


class LNCCLoss(nn.Module):
    """−LNCC averaged over the batch: a loss to minimise (−1 at perfect alignment).

    Example:
        >>> loss = LNCCLoss(window=9)(fixed, moved)
    """

    def __init__(self, window: int = 9, eps: float = 1e-5, backend: str | None = None) -> None:
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"LNCCLoss: window must be an int, got {type(window).__name__}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"LNCCLoss: window must be an odd integer >= 1, got {window}")
        self.window, self.eps, self.backend = window, eps, backend

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return -lncc(
            fixed, moving, window=self.window, eps=self.eps, mask=mask, backend=self.backend
        ).mean()

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}, backend={self.backend!r}"
