"""Parzen-window mutual information, NMI and their losses (MI, NMI, INNReg's barrier NMI).

Definition (the oracle is :mod:`mrus_kernels.reference`): per batch item, bins K over
[lo, hi] (``value_range``, else the item's own min and max over the voxels with mask > 0,
computed on the device), width w = (hi - lo) / K, centres c_k = lo + (k + 1/2) w, values
clamped to [lo, hi] (torch.clamp's derivative: 1 on the closed interval, 0 outside).
Weights W_k(x) = phi((x - c_k) / w) / sum_j phi(...), phi the Gaussian exp(-t^2 / (2 sigma^2))
(sigma in bin widths) or the cubic B-spline. Joint histogram
P[a, b] = sum_v m_v W_a(f_v) W_b(g_v) / sum_v m_v, marginals its row / column sums;
MI = sum P log(P / (p_a p_b)) and H = -sum p log p with P and p clamped at eps;
NMI = (H_f + H_g) / H_fg. The range is a constant for gradients.

Structure: the custom op ``mrus::mi_histogram`` returns the un-normalised joint histogram
sum_v m_v W_a(f_v) W_b(g_v) ([B, K, K]) from one pass over the voxels (per-chunk / per-block
private histograms reduced in a fixed order: never a voxels x bins tensor, and bitwise
repeatable on every backend); MI, NMI and the entropies are cheap [B, K, K] PyTorch math
on it, so autograd delivers dL/dhist to the op's registered backward,
``mrus::mi_histogram_backward``: one fused per-voxel pass
dL/df_v = m_v sum_ab G_ab W'_a(f_v) W_b(g_v) (and symmetrically for g).

Non-finite input, the same on every backend: a voxel that counts (mask != 0) and has a NaN
value, a NaN mask weight, or an item range that is NaN or infinite, makes every entry of
its item's joint histogram NaN, hence that item's MI and NMI; other items are unaffected.
So does an item's own range whose width hi - lo overflows the working dtype (values
spread over more than float32's +-3.4e38): its bin width is infinite.
An infinite value under a finite range is clamped to the range end and counts there. This
is the definition's own arithmetic (a NaN value has NaN weights in every bin, so every
P[a, b] = sum_v W_a W_b is NaN, as the torch backend computes literally); the kernels apply
it as a rule (a flag per block or chunk, then NaN in every entry) instead of letting a NaN
weight meet zero weights wherever a kernel happens to multiply it by them. Gradients in
such an item: exactly 0 for voxels with mask 0; NaN for the offending voxel on the kernel
backends (the torch backend follows torch.clamp, whose gradient at a NaN input is 0);
elsewhere whatever dL/dP is, which for MI and NMI is 0 (their clamp of P at eps passes no
gradient through NaN).

Only a few bins have a non-negligible Gaussian weight: the kernels keep the bins within
``radius = sqrt(2 ln 2 * bits * sigma^2 + 1/4)`` bin widths of the value (bits = 24 for
float32 and half inputs, 60 for float64), so every dropped weight is below 2**-bits of the
largest; the
B-spline has 4 non-zero weights.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import nn

from . import _double, _ext, reference
from ._ext import DTYPE_CODES, cuda_stream, fake_grads, grads_or_empty, ptr
from ._validation import (
    capturing,
    check_choice,
    check_float,
    check_mask_nonnegative,
    check_mask_weights,
    check_optional_bool,
    check_same,
    check_tensor,
)
from .backends import BackendUnavailableError, call_reason, resolve

KERNELS = ("gaussian", "bspline")
_KERNEL_CODES = {"gaussian": 0, "bspline": 1}
_HALF = (torch.float16, torch.bfloat16)
# Accepted Gaussian widths, in bin widths (validated for either kernel). Below SIGMA_MIN the
# window is hard binning already: a bin other than the nearest weighs exp(-delta / sigma^2)
# of it for a value delta bin widths inside the bin edge, below 2**-60 (float64) for every
# value further than 4.2e-11 bin widths from an edge, and below float32's resolution of the
# bin coordinate (~1e-7 K) a smaller sigma changes nothing; meanwhile the 1 / sigma^2
# factors of the weights and of their derivatives stay far from float32 overflow (they
# overflow near sigma = 1e-19, and below it float32 results and gradients were NaN).
# Above SIGMA_MAX every weight is 1/K to within K^2 / (2 sigma^2) = K^2 * 5e-13 (MI ~ 0),
# and sigma^2 stays far from float64 overflow.
SIGMA_MIN = 1e-6
SIGMA_MAX = 1e6
# Truncation level of the Gaussian window, as a power of two, per working dtype.
_TRUNCATION_BITS = {torch.float32: 24, torch.float64: 60}
# Limits of the GPU kernels (csrc/include/mi.h kMaxWindowGpu; triton/mi.py register tiles).
CUDA_MAX_BINS = 64
CUDA_MAX_WINDOW = 16
TRITON_MAX_BINS = 128
# Voxels per CUDA / Triton block, at least, and blocks per batch item, at most: the
# per-block partial histograms take B * blocks * K * K * 4 bytes (8 MiB at K = 32).
GPU_MIN_BLOCK_VOXELS = 2048
GPU_MAX_BLOCKS = 2048


# ---------------------------------------------------------------------------- validation


def _check_real(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _finite(v: float) -> bool:
    # Comparisons, not math.isfinite: they also trace under torch.compile(dynamic=True),
    # where a float argument may be symbolic.
    return -math.inf < v < math.inf


def _check_sigma(op: str, sigma: object) -> float:
    """sigma in [SIGMA_MIN, SIGMA_MAX] bin widths, whatever the kernel (see SIGMA_MIN)."""
    v = _check_real(op, "sigma", sigma)
    if not SIGMA_MIN <= v <= SIGMA_MAX:
        raise ValueError(
            f"{op}: sigma must be in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] bin widths, got {sigma!r}"
        )
    return v


def _check_eps(op: str, eps: object, work: torch.dtype | None = None) -> float:
    """eps in (0, 1] and, with `work` (the working dtype), >= its smallest normal number
    (a smaller eps rounds towards 0 there: log 0). Above 1 it would clamp every probability."""
    v = _check_real(op, "eps", eps)
    lo = torch.finfo(work).tiny if work is not None else 0.0
    if not (0.0 < v <= 1.0 and v >= lo):
        accepted = f"[{lo:.4g}, 1] for {work} work" if work is not None else "(0, 1]"
        raise ValueError(f"{op}: eps must be in {accepted}, got {eps!r}")
    return v


def _check_range(
    op: str, value_range: object, work: torch.dtype | None = None
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """None, (lo, hi) for both images, or ((lo_f, hi_f), (lo_g, hi_g)); hi > lo, finite,
    and with `work` (the working dtype) representable there: |lo|, |hi| <= max / 2 (so
    hi - lo is finite) and hi - lo > eps * max(|lo|, |hi|) (lo and hi stay distinct)."""
    if value_range is None:
        return None
    expected = "None, (lo, hi) or ((lo_f, hi_f), (lo_g, hi_g)) with real numbers lo < hi"
    if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
        raise ValueError(f"{op}: value_range must be {expected}, got {value_range!r}")
    pairs = value_range if isinstance(value_range[0], (tuple, list)) else (value_range, value_range)
    out = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair
        ):
            raise ValueError(f"{op}: value_range must be {expected}, got {value_range!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if not (_finite(lo) and _finite(hi) and hi > lo):
            raise ValueError(
                f"{op}: value_range must have finite bounds with lo < hi, got {value_range!r}"
            )
        if work is not None:
            info = torch.finfo(work)
            if max(abs(lo), abs(hi)) > info.max / 2:
                raise ValueError(
                    f"{op}: value_range bounds must be within +-{info.max / 2:.3g} for {work} "
                    f"work (hi - lo must be finite there), got {value_range!r}"
                )
            if hi - lo <= info.eps * max(abs(lo), abs(hi)):
                raise ValueError(
                    f"{op}: value_range bounds must stay distinct in {work} (hi - lo > "
                    f"{info.eps:.3g} * max(|lo|, |hi|)), got {value_range!r}"
                )
        out.append((lo, hi))
    return out[0], out[1]


def _validate(
    op: str, fixed: object, moving: object, bins: object, kernel: object, sigma: object,
    value_range: object, mask: object, eps: object, deterministic: object,
):
    check_tensor(op, "fixed", fixed)
    check_tensor(op, "moving", moving)
    assert isinstance(fixed, torch.Tensor) and isinstance(moving, torch.Tensor)
    check_float(op, "fixed", fixed)
    check_float(op, "moving", moving)
    for name, x in (("fixed", fixed), ("moving", moving)):
        if x.dim() not in (4, 5) or x.shape[1] != 1:
            raise ValueError(
                f"{op}: {name} must be [B, 1, H, W] (2D) or [B, 1, D, H, W] (3D), got shape "
                f"{tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")
    if fixed.shape[2:] != moving.shape[2:] or fixed.dim() != moving.dim():
        raise ValueError(
            f"{op}: fixed and moving must have the same spatial shape, got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    if fixed.shape[0] != moving.shape[0] and 1 not in (fixed.shape[0], moving.shape[0]):
        raise ValueError(
            f"{op}: fixed and moving batch sizes must match or one must be 1, got "
            f"{fixed.shape[0]} and {moving.shape[0]}"
        )
    check_same(op, ("fixed", "moving"), (fixed, moving))
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"{op}: bins must be an int, got {type(bins).__name__}")
    if bins < 2:
        raise ValueError(f"{op}: bins must be >= 2, got {bins}")
    check_choice(op, "kernel", kernel, KERNELS)
    work = _work_dtype(fixed.dtype)
    _check_sigma(op, sigma)
    _check_eps(op, eps, work)
    ranges = _check_range(op, value_range, work)
    check_optional_bool(op, "deterministic", deterministic)
    if mask is not None:
        check_tensor(op, "mask", mask)
        assert isinstance(mask, torch.Tensor)
        batch = max(fixed.shape[0], moving.shape[0])
        if (
            mask.dim() != fixed.dim() or mask.shape[1] != 1 or mask.shape[2:] != fixed.shape[2:]
            or mask.shape[0] not in (1, batch)
        ):
            raise ValueError(
                f"{op}: mask must be [B or 1, 1, *S] with S = {tuple(fixed.shape[2:])} and "
                f"B = {batch}, got shape {tuple(mask.shape)}"
            )
        if mask.is_complex():
            raise TypeError(f"{op}: mask must be a bool, integer or float tensor, got {mask.dtype}")
        if mask.device != fixed.device:
            raise ValueError(
                f"{op}: mask must be on the device of fixed ({fixed.device}), got {mask.device}"
            )
        if mask.requires_grad:
            raise ValueError(
                f"{op}: mask must not require grad ({op} is not differentiable in it); pass "
                "mask.detach()"
            )
        # The one host sync of the operator, eager mode only: no negative or infinite weight
        # (the definition takes weights >= 0; the backends would disagree on them) and a
        # voxel with weight > 0 in every batch item (else it has no histogram). Under
        # torch.compile negative weights fail an asynchronous assert in the graph; under
        # CUDA-graph capture nothing is checked, and an item with an empty mask gets P = 0
        # (finite MI / NMI, zero gradients) in both.
        if capturing():
            check_mask_nonnegative(op, mask)
        else:
            check_mask_weights(op, mask, nonempty=True)
    return ranges


# ---------------------------------------------------------------------------- backends


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def gaussian_radius(sigma: float, dtype: torch.dtype) -> float:
    """Truncation radius of the Gaussian window in bin widths: beyond it phi is below
    2**-bits times the largest weight of the value (the nearest bin's, at |t| <= 1/2, hence
    the 1/4 under the root)."""
    bits = _TRUNCATION_BITS[_work_dtype(dtype)]
    return math.sqrt(2.0 * math.log(2.0) * bits * sigma**2 + 0.25)


def _window(bins: int, kernel: str, radius: float) -> int:
    """The largest number of bins a voxel's window can span (csrc/include/mi.h window)."""
    if kernel == "bspline":
        return min(bins, 4)
    return min(bins, int(math.floor(2 * radius)) + 2)


def _limit_reason(name: str, bins: int, kernel: str, radius: float) -> str | None:
    if name == "cuda":
        if bins > CUDA_MAX_BINS:
            return f"the cuda kernels take bins <= {CUDA_MAX_BINS}, got {bins}"
        if _window(bins, kernel, radius) > CUDA_MAX_WINDOW:
            return (
                f"the cuda kernels hold at most {CUDA_MAX_WINDOW} Gaussian weights per voxel; "
                f"sigma is too large for them (window of {_window(bins, kernel, radius)} bins)"
            )
    if name == "triton" and bins > TRITON_MAX_BINS:
        return f"the triton kernels take bins <= {TRITON_MAX_BINS}, got {bins}"
    return None


def _resolve(op: str, backend: str | None, x: torch.Tensor, bins: int, kernel: str,
             radius: float) -> str:
    name = resolve(op, backend, x.device, x.dtype)
    reason = _limit_reason(name, bins, kernel, radius)
    if reason is None:
        return name
    requested = backend if backend is not None else (os.environ.get("MRUS_BACKEND") or "auto")
    if requested != "auto":
        raise BackendUnavailableError(f"{op}: backend {name!r} cannot serve this call: {reason}")
    for candidate in ("triton", "torch"):
        if call_reason(candidate, x.device, x.dtype) is None and (
            _limit_reason(candidate, bins, kernel, radius) is None
        ):
            return candidate
    return "torch"  # pragma: no cover - torch has no limits


def _blocks_per_item(n: int, batch: int) -> int:
    return max(1, min(-(-n // GPU_MIN_BLOCK_VOXELS), max(1, GPU_MAX_BLOCKS // batch)))


def _args(f: torch.Tensor, bins: int, kernel: int, sigma: float, radius: float):
    return (DTYPE_CODES[f.dtype], f.shape[0], f.shape[1], bins, kernel, sigma, radius)


@_ext.on_tensor_device
def launch_forward(
    f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, ranges: torch.Tensor, bins: int,
    kernel: int, sigma: float, radius: float, backend: str,
) -> torch.Tensor:
    """Un-normalised joint histogram sum_v m_v W_a(f_v) W_b(g_v), [B, K, K].

    f, g: [B, N] contiguous, of the working dtype (float32 or float64); m: [B, N] of the
    same dtype or None; ranges: [B, 4] = (lo_f, hi_f, lo_g, hi_g), same dtype.
    """
    batch, n = f.shape
    if backend == "cpu":
        hist = torch.empty((batch, bins, bins), dtype=f.dtype)
        _ext.C.mi_forward_cpu(
            *_args(f, bins, kernel, sigma, radius), torch.get_num_threads(), f.data_ptr(),
            g.data_ptr(), ptr(m), ranges.data_ptr(), hist.data_ptr(),
        )
        return hist
    blocks = _blocks_per_item(n, batch)
    partial = torch.empty((batch, blocks, bins, bins), dtype=torch.float32, device=f.device)
    if backend == "cuda":
        _ext.C.mi_forward_cuda(
            *_args(f, bins, kernel, sigma, radius), f.data_ptr(), g.data_ptr(), ptr(m),
            ranges.data_ptr(), partial.data_ptr(), blocks, cuda_stream(f),
        )
    elif backend == "triton":
        from .triton import mi as triton_mi

        triton_mi.mi_forward(f, g, m, ranges, partial, bins, kernel, sigma)
    else:  # pragma: no cover - dispatch never sends other names here
        raise ValueError(f"mi: no kernel for backend {backend!r}")
    # Blocks in a fixed order (torch's reductions are run-to-run deterministic).
    return partial.sum(1)


@_ext.on_tensor_device
def launch_backward(
    grad_hist: torch.Tensor, f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
    ranges: torch.Tensor, bins: int, kernel: int, sigma: float, radius: float, backend: str,
    need_f: bool, need_g: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/df, dL/dg), [B, N] each, None where not needed, from grad_hist = dL/dhist."""
    gf = torch.empty(f.shape, dtype=f.dtype, device=f.device) if need_f else None
    gg = torch.empty(g.shape, dtype=g.dtype, device=g.device) if need_g else None
    grad_hist = grad_hist.to(f.dtype).contiguous()
    if backend == "cpu":
        _ext.C.mi_backward_cpu(
            *_args(f, bins, kernel, sigma, radius), torch.get_num_threads(), f.data_ptr(),
            g.data_ptr(), ptr(m), ranges.data_ptr(), grad_hist.data_ptr(), ptr(gf), ptr(gg),
        )
    elif backend == "cuda":
        _ext.C.mi_backward_cuda(
            *_args(f, bins, kernel, sigma, radius), f.data_ptr(), g.data_ptr(), ptr(m),
            ranges.data_ptr(), grad_hist.data_ptr(), ptr(gf), ptr(gg), cuda_stream(f),
        )
    elif backend == "triton":
        from .triton import mi as triton_mi

        triton_mi.mi_backward(grad_hist, f, g, m, ranges, gf, gg, bins, kernel, sigma)
    else:  # pragma: no cover
        raise ValueError(f"mi: no kernel for backend {backend!r}")
    return gf, gg


# ---------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mrus::mi_histogram", mutates_args=())
def _histogram_op(
    f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, ranges: torch.Tensor, bins: int,
    kernel: int, sigma: float, radius: float, backend: str,
) -> torch.Tensor:
    return launch_forward(f, g, m, ranges, bins, kernel, sigma, radius, backend)


@_histogram_op.register_fake
def _(f, g, m, ranges, bins, kernel, sigma, radius, backend):
    return f.new_empty((f.shape[0], bins, bins))


@torch.library.custom_op("mrus::mi_histogram_backward", mutates_args=())
def _histogram_backward_op(
    grad_hist: torch.Tensor, f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
    ranges: torch.Tensor, bins: int, kernel: int, sigma: float, radius: float, backend: str,
    need_f: bool, need_g: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (f, g); an empty tensor stands for one not asked for."""
    gf, gg = launch_backward(
        grad_hist, f, g, m, ranges, bins, kernel, sigma, radius, backend, need_f, need_g
    )
    return grads_or_empty((gf, f), (gg, g))


@_histogram_backward_op.register_fake
def _(grad_hist, f, g, m, ranges, bins, kernel, sigma, radius, backend, need_f, need_g):
    return fake_grads((f, need_f), (g, need_g))


def _setup_context(ctx, inputs, output):
    f, g, m, ranges, *args = inputs
    ctx.save_for_backward(f, g, m, ranges)
    ctx.args = tuple(args)


def _backward(ctx, grad_hist):
    f, g, m, ranges = ctx.saved_tensors
    need_f, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_f or need_g):
        return (None,) * 9
    gf, gg = _histogram_backward_op(grad_hist, f, g, m, ranges, *ctx.args, need_f, need_g)
    return (gf if need_f else None), (gg if need_g else None), *(None,) * 7


_histogram_op.register_autograd(_backward, setup_context=_setup_context)


def _double_spec(grad_hist, f, g, m, ranges, bins, kernel, sigma, radius, backend, need_f,
                 need_g):
    """Double backward of mrus::mi_histogram_backward (mrus_kernels/_double.py): the
    un-normalised joint histogram sum_v m_v W_a(f_v) W_b(g_v) by the reference's Parzen
    weights (untruncated: they differ from the kernels' by < 2**-bits of the largest), with
    the mask and the ranges constants. Memory O(voxels x bins), as backend="torch"."""
    name = "gaussian" if kernel == _KERNEL_CODES["gaussian"] else "bspline"
    r = ranges.detach()
    lo_f, hi_f, lo_g, hi_g = r[:, 0:1], r[:, 1:2], r[:, 2:3], r[:, 3:4]

    def forward(f, g):
        if m is not None:
            # Voxels with mask 0 do not count, whatever their values (as the reference).
            inside = m > 0
            f, g = torch.where(inside, f, lo_f), torch.where(inside, g, lo_g)
        wf = reference.parzen_weights(f, lo_f, hi_f, bins, name, sigma)
        wg = reference.parzen_weights(g, lo_g, hi_g, bins, name, sigma)
        if m is not None:
            wf = wf * m[..., None]
        return torch.einsum("bna,bnc->bac", wf, wg)

    return forward, ((f, 1, need_f), (g, 2, need_g))


_double.register(_histogram_backward_op, _double_spec)


# ---------------------------------------------------------------------------- shared path


def _item_ranges(
    f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
    fixed_ranges: tuple[tuple[float, float], tuple[float, float]] | None,
) -> torch.Tensor:
    """[B, 4] = (lo_f, hi_f, lo_g, hi_g), detached, on the device, without a host sync."""
    batch = f.shape[0]
    if fixed_ranges is not None:
        # Fills, not torch.tensor(list): no host-to-device copy (CUDA-graph capture).
        values = [*fixed_ranges[0], *fixed_ranges[1]]
        return torch.stack(
            [torch.full((batch,), v, dtype=f.dtype, device=f.device) for v in values], 1
        )
    cols = []
    for x in (f, g):
        lo, hi = reference._item_range(x.detach(), m)
        # An item with an empty mask (only reachable when validation is skipped, see
        # _validate) gets a finite dummy range instead of (inf, -inf).
        empty = lo > hi
        cols += [
            torch.where(empty, torch.zeros_like(lo), lo),
            torch.where(empty, torch.zeros_like(hi), hi),
        ]
    return torch.cat(cols, 1).contiguous()


def _joint(
    op: str, fixed, moving, bins, kernel, sigma, value_range, mask, eps, backend, deterministic
) -> tuple[torch.Tensor, torch.dtype]:
    """Normalised joint histogram P [B, K, K] (float32 for half inputs) and the input dtype."""
    ranges = _validate(
        op, fixed, moving, bins, kernel, sigma, value_range, mask, eps, deterministic
    )
    dtype = fixed.dtype
    work = _work_dtype(dtype)
    # The B-spline ignores sigma; its support is 2 bin widths either side.
    radius = 2.0 if kernel == "bspline" else min(gaussian_radius(float(sigma), dtype), float(bins))
    name = _resolve(op, backend, fixed, bins, kernel, radius)
    if name == "torch":
        cast = (lambda t: t.to(work)) if dtype in _HALF else (lambda t: t)
        p = reference.joint_histogram(cast(fixed), cast(moving), bins, kernel, float(sigma),
                                      value_range, mask)
        return p, dtype
    batch = max(fixed.shape[0], moving.shape[0])
    f = fixed.to(work).expand(batch, *fixed.shape[1:]).reshape(batch, -1).contiguous()
    g = moving.to(work).expand(batch, *moving.shape[1:]).reshape(batch, -1).contiguous()
    m = None
    if mask is not None:
        m = reference._mask_weights(mask.detach().flatten(1), work).expand(batch, -1).contiguous()
    item_ranges = _item_ranges(f, g, m, ranges)
    hist = _histogram_op(
        f, g, m, item_ranges, bins, _KERNEL_CODES[kernel], float(sigma), radius, name
    )
    if m is None:
        return hist / f.shape[1], dtype
    # tiny, not 0: an empty mask (validation skipped) gives P = 0 instead of NaN.
    total = m.sum(1).clamp_min(torch.finfo(work).tiny)
    return hist / total[:, None, None], dtype


# ---------------------------------------------------------------------------- public API

_ARGS_DOC = """
    Args:
        fixed: Tensor [B, 1, *S] (2D: S = (H, W); 3D: S = (D, H, W)), any float dtype.
        moving: Tensor [B, 1, *S], same dtype and device; either batch size may be 1.
            Both images are differentiable (either may play the fixed role).
        bins: number of bins K >= 2 per image.
        kernel: "gaussian" (Parzen window exp(-t^2 / (2 sigma^2))) or "bspline" (cubic).
        sigma: Gaussian width in bin widths, in [1e-6, 1e6] (``SIGMA_MIN``, ``SIGMA_MAX``:
            at 1e-6 the window is hard binning to the working precision and smaller values
            change nothing but float32 overflow; above 1e6 the weights are uniform). Checked
            for "bspline" too, which ignores it.
        value_range: None (each item's own min and max over the voxels with mask > 0, per
            image, computed on the device), (lo, hi) for both images, or
            ((lo_f, hi_f), (lo_g, hi_g)); intensity units, lo < hi, both within half the
            working dtype's largest value and distinct in it. A constant for gradients.
        mask: optional Tensor [B or 1, 1, *S] of voxel weights >= 0 (bool, integer or float;
            not differentiable: a mask that requires grad raises ValueError). Voxels with
            mask 0 do not count, whatever their values; only ratios of weights matter (each
            item's weights are scaled by a power of two near their largest, so 1e38 or
            1e-300 weights work). In eager mode a negative or infinite weight, or a batch
            item whose mask selects no voxel, raises ValueError (one host sync for both).
            Under torch.compile a negative weight fails an assert in the graph and an empty
            item gets P = 0; under CUDA-graph capture nothing is checked.
        eps: clamp of P and the marginals before the logarithms, in [tiny, 1] with tiny
            the working dtype's smallest normal number (1.2e-38 for float32 and half inputs).
        backend: "auto", "torch", "cpu", "triton" or "cuda"; default ``MRUS_BACKEND`` or
            "auto".
        deterministic: accepted for symmetry with the other operators; every backend's
            reduction is in a fixed order and bitwise repeatable anyway.
"""


def joint_histogram(
    fixed: torch.Tensor, moving: torch.Tensor, *, bins: int = 32, kernel: str = "gaussian",
    sigma: float = 0.5, value_range: tuple | None = None, mask: torch.Tensor | None = None,
    backend: str | None = None, deterministic: bool | None = None,
) -> torch.Tensor:
    """Normalised joint Parzen histogram P[a, b] (a: fixed bin, b: moving bin), for inspection.

    Returns:
        Tensor [B, K, K] summing to 1 per item (float32 for half inputs), differentiable.

    Example:
        >>> p = joint_histogram(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), bins=16)
        >>> p.shape
        torch.Size([1, 16, 16])
    """
    return _joint("joint_histogram", fixed, moving, bins, kernel, sigma, value_range, mask,
                  1e-10, backend, deterministic)[0]


def mutual_information(
    fixed: torch.Tensor, moving: torch.Tensor, *, bins: int = 32, kernel: str = "gaussian",
    sigma: float = 0.5, value_range: tuple | None = None, mask: torch.Tensor | None = None,
    eps: float = 1e-10, backend: str | None = None, deterministic: bool | None = None,
) -> torch.Tensor:
    """Parzen-window mutual information MI = sum P log(P / (p_a p_b)) per batch item, nats.

    Returns:
        Tensor [B] of the input dtype.

    Example:
        >>> x = torch.rand(2, 1, 16, 32, 32)
        >>> mutual_information(x, x ** 2).shape
        torch.Size([2])
    """
    p, dtype = _joint("mutual_information", fixed, moving, bins, kernel, sigma, value_range,
                      mask, eps, backend, deterministic)
    return reference._entropies(p, float(eps))[0].to(dtype)


def nmi(
    fixed: torch.Tensor, moving: torch.Tensor, *, bins: int = 32, kernel: str = "gaussian",
    sigma: float = 0.5, value_range: tuple | None = None, mask: torch.Tensor | None = None,
    eps: float = 1e-10, backend: str | None = None, deterministic: bool | None = None,
) -> torch.Tensor:
    """Normalised mutual information (H_f + H_g) / H_fg per batch item, in [1, 2].

    Returns:
        Tensor [B] of the input dtype.

    Example:
        >>> x = torch.rand(1, 1, 32, 32)
        >>> bool(nmi(x, x) > 1)
        True
    """
    p, dtype = _joint("nmi", fixed, moving, bins, kernel, sigma, value_range, mask, eps,
                      backend, deterministic)
    _, h_f, h_g, h_fg = reference._entropies(p, float(eps))
    return ((h_f + h_g) / h_fg).to(dtype)


for _fn in (joint_histogram, mutual_information, nmi):
    _fn.__doc__ = _fn.__doc__.replace("\n    Returns:", _ARGS_DOC + "\n    Returns:", 1)


class _MIModule(nn.Module):
    def __init__(
        self, op: str, bins: int, kernel: str, sigma: float, value_range: tuple | None,
        eps: float, backend: str | None, deterministic: bool | None,
    ) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int):
            raise TypeError(f"{op}: bins must be an int, got {type(bins).__name__}")
        if bins < 2:
            raise ValueError(f"{op}: bins must be >= 2, got {bins}")
        check_choice(op, "kernel", kernel, KERNELS)
        _check_sigma(op, sigma)
        _check_eps(op, eps)
        _check_range(op, value_range)
        check_optional_bool(op, "deterministic", deterministic)
        self.kwargs = dict(bins=bins, kernel=kernel, sigma=sigma, value_range=value_range,
                           eps=eps, backend=backend, deterministic=deterministic)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class MutualInformationLoss(_MIModule):
    """-MI averaged over the batch (Plasticine's L_MI; the registration command's similarity).

    Example:
        >>> loss = MutualInformationLoss(bins=32)(fixed, moved)
        >>> loss.backward()
    """

    def __init__(
        self, bins: int = 32, kernel: str = "gaussian", sigma: float = 0.5,
        value_range: tuple | None = None, eps: float = 1e-10, backend: str | None = None,
        deterministic: bool | None = None,
    ) -> None:
        super().__init__("MutualInformationLoss", bins, kernel, sigma, value_range, eps,
                         backend, deterministic)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return -mutual_information(fixed, moving, mask=mask, **self.kwargs).mean()


#: The barrier loss's forms (``NMILoss(barrier=b, form=...)``), see :class:`NMILoss`.
BARRIER_FORMS = ("released", "paper")


def extended_log_barrier(d: torch.Tensor, barrier: float, margin: float) -> torch.Tensor:
    """-log(b - d) for d <= b - margin, continued past that knot by its tangent.

    The log barrier is infinite at d = b and undefined beyond; a loss that can start beyond
    its barrier (INNReg's paper form starts there on misaligned multi-modal pairs) needs a
    value and a gradient there. Past the knot k = b - margin the loss is the tangent
    -log(margin) + (d - k) / margin: finite, continuous with its first derivative, and its
    gradient 1 / margin keeps pushing d down towards the barrier's inside. NaN in, NaN out.

    Args:
        d: dissimilarity, any shape.
        barrier: b.
        margin: distance of the knot from the barrier, > 0.

    Returns:
        Tensor of d's shape and dtype.
    """
    knot = barrier - margin
    inside = d <= knot
    # The log never sees d beyond the knot, so the branch torch.where discards has a
    # finite gradient there (a where's unused branch still multiplies its gradient by 0).
    log_part = -torch.log(barrier - torch.where(inside, d, torch.full_like(d, knot)))
    return torch.where(inside, log_part, (d - knot) / margin - math.log(margin))


class NMILoss(_MIModule):
    """-NMI averaged over the batch or, with ``barrier=b``, INNReg's barrier loss.

    The barrier loss is -log(b - d) averaged over the batch, d a dissimilarity that falls
    as the images align, so that minimising the loss aligns them (-log(b - NMI) would push
    them apart: NMI grows with alignment). ``form`` picks d:

    - ``"released"`` (default; the INNReg authors' released code): d = 1 - MI, MI the
      Parzen mutual information in nats (:func:`mutual_information`). The released code
      uses a Gaussian window with 19 bins (``bins=19``).
    - ``"paper"`` (INNReg, eq. 10-11): d = I = (H_f + H_g) / MI, the entropies and MI of
      one joint histogram. I >= 2 (MI <= min(H_f, H_g)) and grows without bound as MI
      falls: misaligned multi-modal pairs can start with I far beyond b = 5. MI is clamped
      at ``eps`` below (I stays finite; no gradient through MI < eps, independent images).

    Past d = b - ``margin`` the loss continues as the tangent of the log barrier
    (:func:`extended_log_barrier`): finite, with gradient 1 / margin pushing d down, never
    NaN or infinite for finite inputs. Inputs, masks and NaN rules as :func:`nmi`.

    Args:
        barrier: b, a finite real number, or None for -NMI (then ``form`` and ``margin``
            are not used).
        bins, kernel, sigma, value_range, eps, backend, deterministic: as :func:`nmi`.
        form: "released" or "paper", the dissimilarity under the barrier.
        margin: where the log barrier hands over to its tangent (b - d = margin), a finite
            number > 0.

    Example:
        >>> loss = NMILoss(barrier=5.0)(fixed, moved)  # -log(5 - (1 - MI))
        >>> loss = NMILoss(barrier=5.0, form="paper")(fixed, moved)  # -log(5 - I)
    """

    def __init__(
        self, barrier: float | None = None, bins: int = 32, kernel: str = "gaussian",
        sigma: float = 0.5, value_range: tuple | None = None, eps: float = 1e-10,
        backend: str | None = None, deterministic: bool | None = None, *,
        form: str = "released", margin: float = 0.1,
    ) -> None:
        super().__init__("NMILoss", bins, kernel, sigma, value_range, eps, backend, deterministic)
        if barrier is not None:
            barrier = _check_real("NMILoss", "barrier", barrier)
            if not _finite(barrier):
                raise ValueError(f"NMILoss: barrier must be a finite number, got {barrier!r}")
        check_choice("NMILoss", "form", form, BARRIER_FORMS)
        margin_value = _check_real("NMILoss", "margin", margin)
        if not (0.0 < margin_value < math.inf):
            raise ValueError(f"NMILoss: margin must be a finite number > 0, got {margin!r}")
        self.barrier = barrier
        self.form = form
        self.margin = margin_value

    def _dissimilarity(self, fixed, moving, mask) -> tuple[torch.Tensor, torch.dtype]:
        """d [B] in the working dtype (float32 for half inputs) and the input dtype."""
        kw = self.kwargs
        eps = float(kw["eps"])
        p, dtype = _joint("NMILoss", fixed, moving, kw["bins"], kw["kernel"], kw["sigma"],
                          kw["value_range"], mask, eps, kw["backend"], kw["deterministic"])
        mi, h_f, h_g, _ = reference._entropies(p, eps)
        if self.form == "released":
            return 1.0 - mi, dtype
        return (h_f + h_g) / mi.clamp_min(eps), dtype

    def dissimilarity(self, fixed: torch.Tensor, moving: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """d per batch item ([B], the input dtype): 1 - MI ("released") or
        (H_f + H_g) / MI ("paper"), whatever ``barrier`` is."""
        d, dtype = self._dissimilarity(fixed, moving, mask)
        return d.to(dtype)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.barrier is None:
            return -nmi(fixed, moving, mask=mask, **self.kwargs).mean()
        # In the working dtype: the log near b would lose half precision's few digits.
        d, dtype = self._dissimilarity(fixed, moving, mask)
        return extended_log_barrier(d, self.barrier, self.margin).mean().to(dtype)

    def extra_repr(self) -> str:
        return (f"barrier={self.barrier!r}, form={self.form!r}, margin={self.margin!r}, "
                + super().extra_repr())
