"""Triton kernels of the warp operator: out[b, c](x) = image[b, c](x + u(x)).

The per-voxel semantics are those of csrc/include/warp.h (shared by the CPU and CUDA
kernels) and are reproduced here exactly: voxel centres at integer indices, displacement in
voxel units with component i along spatial axis i; "zeros" padding skips corners outside the
image (never reads them) after bounding the coordinate to [-2, n + 1]; "border" padding
clamps the coordinate into [0, n - 1] first (gradient gate 0 where clamped) and still skips
corners with index n; nearest rounds half to even (common.h); a NaN coordinate gives NaN in
every channel and no gradient contribution.

Layout of a program: one program per BLOCK output voxels and per displacement batch item.
The sampling point, corner offsets, weights and validity are computed once per voxel, then a
runtime loop over the image batch items that share this displacement (all of them when the
displacement is broadcast, Bd == 1) and, inside it, over channels. The linear backward
takes one corner at a time (its offset, weight and mask, then every item and channel), so
that only one corner's state is live (registers: no spills under MAX_REGISTERS). The
displacement gradient therefore has a single writer per element and the broadcast case
reuses the stencil. When
the output is small (fewer than SPLIT_BELOW_BLOCKS programs per item) and no displacement
gradient has to be summed over the batch, a broadcast displacement instead puts the batch
on grid axis 1 (one item per program): a short loop over many items would leave most of
the GPU idle.

Channel and batch offsets advance 64-bit pointers; offsets inside one volume are int32 unless
they can exceed _common.IDX64_THRESHOLD (IDX64). All arithmetic is float32 (inputs float32,
float16 or bfloat16).

Deterministic image gradient (64-bit fixed point). Every contribution v (the float32 value
the atomic path would add) is rounded once, in float64, to an integer multiple of the
quantum q = 2**E and added with an int64 atomic: integer sums do not depend on the order of
the atomics, so the result is bitwise reproducible. E is chosen so that no sum can
overflow: with vmax a bound on every finite |v| (a float32 device scalar, no host sync) and
M the most contributions one element can receive, q = 2**(e + L - 62) where
2**(e - 1) <= vmax < 2**e and 2**L is the smallest power of two >= max(M, 2**11), so a sum
of M roundings stays within 2**62 (and each rounded contribution within 2**51, where
float64 rounds to an integer in two additions). Hence
q <= max(vmax, 2**-126) * max(M, 2**11) * 2**-60, and an element that receives m
contributions v_i ends within m * q / 2 of their exact sum before the final conversion to
float32 (half an ulp of the result, plus at most 2**-53 relative from the int64 to float64
conversion):

    |grad - sum_i v_i| <= m * q / 2 + 2**-24 * |grad|.

Contributions far below q (relative to vmax, below about max(M, 2**11) * 2**-60) keep few
bits; the float-atomic path keeps 24 bits of each but depends on the order of the atomics.
vmax and M come from the launcher: vmax = max |grad_out| over finite values, and with
DDF_GRAD_SCATTER (compose's squaring step: the displacement gradient goes into the same
buffer) the bound gmax * (2 * C * umax + 1) of that gradient as well, umax the largest
finite |ddf|; M = n_out times the batch items that read one image item, plus one with
DDF_GRAD_SCATTER. A non-finite contribution (inf or NaN in grad_out, or in the field being
squared) does not enter the integer sum: it sets a bit of an int32 flag of its destination
element (1 NaN, 2 +inf, 4 -inf) and the conversion writes NaN (NaN seen, or both
infinities), +inf or -inf there, as a float sum would. So a NaN or inf poisons exactly the
elements it reaches, as on the CPU and on the float-atomic path.

Interpreter (TRITON_INTERPRET=1): the kernels avoid NaN from finite operands where warp.h
skips work (invalid corners), so NumPy raises no RuntimeWarning for NaN inputs; inf inputs
can still make valid lanes compute inf * 0, as warp.h does, and NumPy then warns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _common

# Codes of csrc/include/common.h (Interp, Padding).
LINEAR = 0
NEAREST = 1
ZEROS = 0
BORDER = 1
# WarpFlags of csrc/include/warp.h (variants used by compose / integrate_velocity).
ADD_DDF = 1
DDF_GRAD_SCATTER = 2

# Output voxels per program, one voxel per thread (two per thread doubled the backward's
# registers). Not autotuned: tuning runs would repeat the atomics into the image gradient,
# and fixed sizes keep the launch CUDA-graph friendly.
BLOCK_2D = 256
BLOCK_3D = 256
VOXELS_PER_THREAD = 1
# Register bound per thread given to ptxas (.maxnreg). Without one, ptxas sizes the
# registers of a .reqntid 256 kernel for occupancy and spills (the backward: 48 registers
# and 40-100 bytes of spills on sm_90); with it, every variant fits without spilling (at
# most about 100 registers, benchmarks/RESULTS.md), and 128 still lets two programs share
# an SM.
MAX_REGISTERS = 128
CONVERT_BLOCK = 1024
CONVERT_WARPS = 4
# A broadcast displacement puts the batch on grid axis 1 (one item per program) when one
# item needs fewer programs than this and no displacement gradient is summed over items.
SPLIT_BELOW_BLOCKS = 512
# L of the fixed-point quantum is at least this (module docstring): every rounded
# contribution stays below 2**(62 - 11) = 2**51, where float64 rounds it to an integer.
FIXED_MIN_LOG2M = 11

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Per-voxel math (warp.h)
# --------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(x):
    # common.h round_half_even: x - floor(x) is exact for the bounded coordinates here.
    r = tl.floor(x)
    d = x - r
    h = r * 0.5
    up = (d > 0.5) | ((d == 0.5) & (h != tl.floor(h)))
    return tl.where(up, r + 1.0, r)


@triton.jit
def _voxel_index(BLOCK: tl.constexpr, n_out, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n_out


@triton.jit
def _sample_point(ddf_b, offs, mask, n_out, out_sizes, NDIM: tl.constexpr):
    """x + u(x) per axis (a tuple, axis 0 first) with NaN replaced by 0, and the NaN mask."""
    rem = offs
    xs = ()
    for i in tl.static_range(NDIM - 1, -1, -1):
        if i == 0:
            xs = (rem,) + xs
        else:
            xs = (rem % out_sizes[i],) + xs
            rem = rem // out_sizes[i]
    u_ptr = ddf_b + offs
    ps = ()
    for i in tl.static_range(NDIM):
        p = xs[i].to(tl.float32) + tl.load(u_ptr, mask=mask, other=0.0).to(tl.float32)
        if i == 0:
            nan = p != p
        else:
            nan = nan | (p != p)
        # A NaN lane is masked everywhere; 0 keeps its integer conversions defined.
        ps = ps + (tl.where(p != p, 0.0, p),)
        u_ptr += n_out
    return ps, nan


@triton.jit
def _axis_linear(p, n, PADDING: tl.constexpr, IDX64: tl.constexpr):
    """warp.h axis_linear: lower corner, upper weight t, corner validity, clamp gate."""
    hi = (n - 1) * 1.0  # float32 (n may arrive as a specialised constexpr 1)
    if PADDING == 1:
        lo = 0.0
    else:
        # Bounding p keeps the integer conversion defined without changing the value; as a
        # clamp it passes no gradient outside (the reference's clamp), as border's does.
        lo = -2.0
        hi = hi + 2.0
    gate = (p >= lo) & (p <= hi)
    p = tl.minimum(tl.maximum(p, lo), hi)
    f = tl.floor(p)
    t = p - f
    if IDX64:
        i0 = f.to(tl.int64)
    else:
        i0 = f.to(tl.int32)
    v0 = (i0 >= 0) & (i0 < n)
    v1 = (i0 >= -1) & (i0 < n - 1)
    return i0, t, v0, v1, gate


@triton.jit
def _linear_stencil(ps, sizes, strides, ok, PADDING: tl.constexpr, NDIM: tl.constexpr,
                    IDX64: tl.constexpr):
    """warp.h make_linear for 2**NDIM corners; corner k takes the upper index along axis i
    when bit NDIM - 1 - i of k is set. Returns per-corner (offset, weight, load mask) and
    per-axis (t, 1 - t, gate). The mask folds in `ok` (in range and not NaN)."""
    ts = ()
    ss = ()
    gates = ()
    for i in tl.static_range(NDIM):
        i0, t, v0, v1, g = _axis_linear(ps[i], sizes[i], PADDING, IDX64)
        s = 1.0 - t
        ts = ts + (t,)
        ss = ss + (s,)
        gates = gates + (g,)
        if i == 0:
            base = i0 * strides[0]
            ws = (s, t)
            vs = (v0 & ok, v1 & ok)
            ds = (0, strides[0])
        else:
            base = base + i0 * strides[i]
            ws2 = ()
            vs2 = ()
            ds2 = ()
            for j in tl.static_range(len(ws)):
                ws2 = ws2 + (ws[j] * s, ws[j] * t)
                vs2 = vs2 + (vs[j] & v0, vs[j] & v1)
                ds2 = ds2 + (ds[j], ds[j] + strides[i])
            ws = ws2
            vs = vs2
            ds = ds2
    offs = ()
    for k in tl.static_range(len(ds)):
        offs = offs + (base + ds[k],)
    return offs, ws, vs, ts, ss, gates


@triton.jit
def _nearest_offset(ps, sizes, strides, ok, PADDING: tl.constexpr, NDIM: tl.constexpr,
                    IDX64: tl.constexpr):
    """warp.h nearest_offset: offset of the nearest voxel and whether to read it."""
    for i in tl.static_range(NDIM):
        hi = (sizes[i] - 1) * 1.0
        if PADDING == 1:
            q = tl.minimum(tl.maximum(ps[i], 0.0), hi)
        else:
            q = tl.minimum(tl.maximum(ps[i], -2.0), hi + 2.0)
        if IDX64:
            idx = _round_half_even(q).to(tl.int64)
        else:
            idx = _round_half_even(q).to(tl.int32)
        vi = (idx >= 0) & (idx < sizes[i])
        if i == 0:
            off = idx * strides[0]
            valid = ok & vi
        else:
            off = off + idx * strides[i]
            valid = valid & vi
    return off, valid


@triton.jit
def _axes_linear(ps, sizes, strides, PADDING: tl.constexpr, NDIM: tl.constexpr,
                 IDX64: tl.constexpr):
    """_axis_linear along every axis: per axis the lower corner's offset i0 * stride, t,
    1 - t, the validity of the lower and upper corner, and the clamp gate. The backward
    forms each corner from these when it needs it (_corner) rather than holding all
    2**NDIM corners at once."""
    los = ()
    ts = ()
    ss = ()
    v0s = ()
    v1s = ()
    gates = ()
    for i in tl.static_range(NDIM):
        i0, t, v0, v1, g = _axis_linear(ps[i], sizes[i], PADDING, IDX64)
        los = los + (i0 * strides[i],)
        ts = ts + (t,)
        ss = ss + (1.0 - t,)
        v0s = v0s + (v0,)
        v1s = v1s + (v1,)
        gates = gates + (g,)
    return los, ts, ss, v0s, v1s, gates


@triton.jit
def _corner(k: tl.constexpr, los, ts, ss, v0s, v1s, strides, ok, NDIM: tl.constexpr):
    """Offset, weight and load mask of corner k (as _linear_stencil: the weight is the
    product over axes 0, 1, ... in that order, as warp.h make_linear)."""
    off = los[0]
    w = 1.0
    valid = ok
    for i in tl.static_range(NDIM):
        if i > 0:
            off = off + los[i]
        if _takes_upper(k, i, NDIM):
            off = off + strides[i]
            w = w * ts[i]
            valid = valid & v1s[i]
        else:
            w = w * ss[i]
            valid = valid & v0s[i]
    return off, w, valid


@triton.constexpr_function
def _lower_corner(m, i, ndim):
    """The m-th corner (of 2**(ndim - 1)) that takes the lower index along axis i."""
    pos = ndim - 1 - i
    return ((m >> pos) << (pos + 1)) | (m & ((1 << pos) - 1))


@triton.constexpr_function
def _upper_corner(m, i, ndim):
    """The corner that differs from _lower_corner(m, i, ndim) only along axis i."""
    return _lower_corner(m, i, ndim) | (1 << (ndim - 1 - i))


@triton.constexpr_function
def _takes_upper(k, j, ndim):
    """Whether corner k takes the upper index along axis j."""
    return (k >> (ndim - 1 - j)) & 1 == 1


@triton.jit
def _linear_dweights(cs, ts, ss, gates, PADDING: tl.constexpr, NDIM: tl.constexpr):
    """sum_k cs[k] * d w_k / d p_i for each axis i (warp.h corner_gradient), pairing the
    corners that differ only along axis i; each term multiplied out as the reference does
    (an inf cs[k] gives NaN where the rest of its weight is 0, and no difference of two
    corners can overflow), and exactly 0 along a clamped axis (gate False)."""
    gu = ()
    for i in tl.static_range(NDIM):
        d = 0.0
        for m in tl.static_range(2 ** (NDIM - 1)):
            w = 1.0
            for j in tl.static_range(NDIM):
                if j != i:
                    if _takes_upper(_lower_corner(m, i, NDIM), j, NDIM):
                        w = w * ts[j]
                    else:
                        w = w * ss[j]
            d = d + cs[_upper_corner(m, i, NDIM)] * w - cs[_lower_corner(m, i, NDIM)] * w
        gu = gu + (tl.where(gates[i], d, 0.0),)
    return gu


@triton.jit
def _fixed_exponent(vmax_ptr, LOG2M):
    """E of the quantum q = 2**E (module docstring): e + LOG2M - 62 with
    2**(e - 1) <= vmax < 2**e, e read from vmax's exponent bits (e = -126 for vmax below
    2**-126, still a bound)."""
    bits = (tl.load(vmax_ptr).to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF
    bits = tl.minimum(tl.maximum(bits, 1), 254)
    return bits - 126 + LOG2M - 62


@triton.jit
def _pow2(k):
    """2.0**k as float64, exact, for -1022 <= k <= 1023 (built from the exponent bits)."""
    return ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _geometry(I0, I1, I2, IST0, IST1, O0, O1, O2, NDIM: tl.constexpr):
    if NDIM == 3:
        in_sizes = (I0, I1, I2)
        in_strides = (IST0, IST1, 1)
        out_sizes = (O0, O1, O2)
    else:
        in_sizes = (I0, I1)
        in_strides = (IST0, 1)
        out_sizes = (O0, O1)
    return in_sizes, in_strides, out_sizes


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _scatter(ptr, flag_ptr, v, mask, inv_q, DETERMINISTIC: tl.constexpr):
    """Adds v to the image gradient: a float atomic, or (DETERMINISTIC) round(v / q) into the
    int64 fixed-point sum at ptr, a non-finite v as a bit of the int32 flag at flag_ptr."""
    if DETERMINISTIC:
        finite = tl.abs(v) < float("inf")  # False for NaN too; comparisons do not trap
        x = tl.where(finite, v, 0.0).to(tl.float64) * inv_q  # exact: inv_q is 2**-E
        # |x| <= 2**51: adding and subtracting 1.5 * 2**52 rounds it half to even (the
        # float64 spacing there is 1), in two additions instead of a floor-based rounding.
        x = (x + 6755399441055744.0) - 6755399441055744.0
        tl.atomic_add(ptr, x.to(tl.int64), mask=mask, sem="relaxed")
        code = tl.where(v != v, 1, tl.where(v > 0.0, 2, 4))
        tl.atomic_or(flag_ptr, code, mask=mask & ~finite, sem="relaxed")
    else:
        tl.atomic_add(ptr, v, mask=mask, sem="relaxed")


@triton.jit
def _warp_fwd_kernel(
    img_ptr, ddf_ptr, out_ptr,
    C, n_in, n_out,
    I0, I1, I2, IST0, IST1, O0, O1, O2,
    img_bstride, ddf_bstride, out_bstride, NB,
    NDIM: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, ADD_DDF: tl.constexpr,
    IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(n_out, BLOCK), Bd, or B with the batch split). Program (pid, bd) writes
    out[bd + j] for j < NB (NB = B when a broadcast displacement is walked by one program,
    else 1; ddf_bstride is 0 for a broadcast displacement) at its BLOCK voxels, all channels.
    ADD_DDF (compose, C == NDIM, linear only as in warp.h): out[b, c] += ddf[bd, c]."""
    in_sizes, in_strides, out_sizes = _geometry(I0, I1, I2, IST0, IST1, O0, O1, O2, NDIM)
    offs, mask = _voxel_index(BLOCK, n_out, IDX64)
    bd = tl.program_id(1)
    ddf_b = ddf_ptr + bd.to(tl.int64) * ddf_bstride
    ps, nan = _sample_point(ddf_b, offs, mask, n_out, out_sizes, NDIM)
    ok = mask & ~nan
    if MODE == 1:
        off, valid = _nearest_offset(ps, in_sizes, in_strides, ok, PADDING, NDIM, IDX64)
    else:
        coffs, ws, vs, ts, ss, gates = _linear_stencil(ps, in_sizes, in_strides, ok, PADDING,
                                                       NDIM, IDX64)
    out_ty = out_ptr.dtype.element_ty
    for j in range(NB):
        b = (bd + j).to(tl.int64)
        img_c = img_ptr + b * img_bstride
        out_c = out_ptr + b * out_bstride + offs
        u_c = ddf_b + offs
        for c in range(C):
            if MODE == 1:
                acc = tl.load(img_c + off, mask=valid, other=0.0).to(tl.float32)
            else:
                if ADD_DDF:
                    acc = tl.load(u_c, mask=ok, other=0.0).to(tl.float32)
                else:
                    acc = tl.zeros([BLOCK], dtype=tl.float32)
                for k in tl.static_range(len(ws)):
                    v = tl.load(img_c + coffs[k], mask=vs[k], other=0.0).to(tl.float32)
                    acc += ws[k] * v
            acc = tl.where(nan, float("nan"), acc)
            tl.store(out_c, acc.to(out_ty), mask=mask)
            img_c += n_in
            out_c += n_out
            u_c += n_out


@triton.jit
def _warp_bwd_kernel(
    gout_ptr, img_ptr, ddf_ptr, gimg_ptr, gddf_ptr, flag_ptr, vmax_ptr,
    C, n_in, n_out,
    I0, I1, I2, IST0, IST1, O0, O1, O2,
    img_bstride, ddf_bstride, out_bstride, NB, LOG2M,
    NDIM: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr,
    NEED_IMG: tl.constexpr, NEED_DDF: tl.constexpr, DETERMINISTIC: tl.constexpr,
    ADD_DDF: tl.constexpr, DDF_SCATTER: tl.constexpr,
    IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(n_out, BLOCK), programs per batch), batch items as in the forward. The
    displacement gradient of element (bd, i, voxel) is formed once, after the loop over the
    NB batch items that share the displacement, and stored into gddf_ptr or, with
    DDF_SCATTER (image is ddf: compose's squaring step), added into the image gradient at
    its own flat index. gimg_ptr: float32 (float atomics) or, if DETERMINISTIC, the int64
    fixed-point sums, with flag_ptr the int32 non-finite flags, vmax_ptr the float32 bound
    and LOG2M = L of the quantum (module docstring).
    ADD_DDF: out[b, c] had ddf[bd, c] added, so grad_out[b, i] adds to the displacement
    gradient at every voxel, NaN sample or not, in both modes (warp.h)."""
    in_sizes, in_strides, out_sizes = _geometry(I0, I1, I2, IST0, IST1, O0, O1, O2, NDIM)
    offs, mask = _voxel_index(BLOCK, n_out, IDX64)
    bd = tl.program_id(1)
    ddf_off = bd.to(tl.int64) * ddf_bstride
    ps, nan = _sample_point(ddf_ptr + ddf_off, offs, mask, n_out, out_sizes, NDIM)
    ok = mask & ~nan
    inv_q = 1.0
    if DETERMINISTIC:
        inv_q = _pow2(-_fixed_exponent(vmax_ptr, LOG2M))
    # Linear: one corner at a time (all batch items and channels), so that only that
    # corner's offset, weight and mask are live, not all 2**NDIM (register pressure); its
    # grad_out values are read again per corner (cache hits). cs[k]: sum over batch items
    # and channels of grad_out * image at corner k, for the displacement gradient.
    cs = ()
    if MODE == 1:
        if NEED_IMG:
            off, valid = _nearest_offset(ps, in_sizes, in_strides, ok, PADDING, NDIM, IDX64)
            for j in range(NB):
                b = (bd + j).to(tl.int64)
                gimg_c = gimg_ptr + b * img_bstride + off
                flag_c = flag_ptr + b * img_bstride + off
                g_c = gout_ptr + b * out_bstride + offs
                for c in range(C):
                    g = tl.load(g_c, mask=valid, other=0.0).to(tl.float32)
                    _scatter(gimg_c, flag_c, g, valid, inv_q, DETERMINISTIC)
                    gimg_c += n_in
                    flag_c += n_in
                    g_c += n_out
    elif NEED_IMG or NEED_DDF:
        los, ts, ss, v0s, v1s, gates = _axes_linear(ps, in_sizes, in_strides, PADDING, NDIM,
                                                    IDX64)
        for k in tl.static_range(2**NDIM):
            off, w, valid = _corner(k, los, ts, ss, v0s, v1s, in_strides, ok, NDIM)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for j in range(NB):
                b = (bd + j).to(tl.int64)
                img_c = img_ptr + b * img_bstride + off
                gimg_c = gimg_ptr + b * img_bstride + off
                flag_c = flag_ptr + b * img_bstride + off
                g_c = gout_ptr + b * out_bstride + offs
                for c in range(C):
                    # The image gradient skips an invalid corner as warp.h does (masked:
                    # nothing is added, g may be inf). The corner sum of the displacement
                    # gradient counts it as the value 0, as the reference: an inf or NaN g
                    # reaches it as 0 * g = NaN.
                    g = tl.load(g_c, mask=ok, other=0.0).to(tl.float32)
                    if NEED_DDF:
                        v = tl.load(img_c, mask=valid, other=0.0).to(tl.float32)
                        acc += g * v
                    if NEED_IMG:
                        _scatter(gimg_c, flag_c, w * g, valid, inv_q, DETERMINISTIC)
                    img_c += n_in
                    gimg_c += n_in
                    flag_c += n_in
                    g_c += n_out
            cs = cs + (acc,)
    # ADD_DDF: per axis, the sum over batch items of grad_out[b, i] (every voxel).
    ga = ()
    for i in tl.static_range(NDIM):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if ADD_DDF and NEED_DDF:
            for j in range(NB):
                b = (bd + j).to(tl.int64)
                g_i = gout_ptr + b * out_bstride + i * n_out + offs
                acc += tl.load(g_i, mask=mask, other=0.0).to(tl.float32)
        ga = ga + (acc,)
    if NEED_DDF:
        if MODE == 1:
            # Rounding has derivative 0: the reference's gradient is (sum of grad_out) * 0
            # along every axis it did not clamp, 0 unless grad_out is inf or NaN (warp.h).
            gsum = tl.zeros([BLOCK], dtype=tl.float32)
            for j in range(NB):
                g_c = gout_ptr + (bd + j).to(tl.int64) * out_bstride + offs
                for c in range(C):
                    gsum += tl.load(g_c, mask=ok, other=0.0).to(tl.float32)
                    g_c += n_out
            gu = ()
            for i in tl.static_range(NDIM):
                _, _, _, _, inside = _axis_linear(ps[i], in_sizes[i], PADDING, IDX64)
                gu = gu + (ga[i] + tl.where(inside, gsum * 0.0, 0.0),)
        else:
            gu = _linear_dweights(cs, ts, ss, gates, PADDING, NDIM)
            if ADD_DDF:
                gu2 = ()
                for i in tl.static_range(NDIM):
                    gu2 = gu2 + (gu[i] + ga[i],)
                gu = gu2
        if DDF_SCATTER:
            gd_ptr = gimg_ptr + ddf_off + offs
            fd_ptr = flag_ptr + ddf_off + offs
        else:
            gd_ptr = gddf_ptr + ddf_off + offs
        for i in tl.static_range(NDIM):
            if DDF_SCATTER:
                _scatter(gd_ptr, fd_ptr, gu[i], mask, inv_q, DETERMINISTIC)
                fd_ptr += n_out
            else:
                tl.store(gd_ptr, gu[i].to(gddf_ptr.dtype.element_ty), mask=mask)
            gd_ptr += n_out


@triton.jit
def _fixed_to_float_kernel(scratch_ptr, flag_ptr, out_ptr, vmax_ptr, LOG2M, numel,
                           BLOCK: tl.constexpr):
    """out = scratch * q (q = 2**E, module docstring), formed in float64 (exact scaling, one
    rounding to float32) as the CUDA kernel does; where the flag is set, NaN (NaN seen, or
    both infinities), +inf or -inf."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    q = _pow2(_fixed_exponent(vmax_ptr, LOG2M))
    s = tl.load(scratch_ptr + offs, mask=mask, other=0)
    f = tl.load(flag_ptr + offs, mask=mask, other=0)
    v = (s.to(tl.float64) * q).to(tl.float32)
    special = tl.where(((f & 1) != 0) | ((f & 6) == 6), float("nan"),
                       tl.where((f & 2) != 0, float("inf"), float("-inf")))
    tl.store(out_ptr + offs, tl.where(f != 0, special, v), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers (inputs validated upstream, in mrus_kernels/warp.py)
# --------------------------------------------------------------------------------------


class _Launch(NamedTuple):
    grid: tuple[int, int]
    args: tuple[int, ...]  # C ... NB of the kernels
    ndim: int
    idx64: bool
    block: int
    num_warps: int


def _launch(image: torch.Tensor, ddf: torch.Tensor, mode: int, padding: int, flags: int,
            split: bool) -> _Launch:
    """Grid and integer arguments of the warp kernels. split: a broadcast displacement may
    put the batch on grid axis 1 (no displacement gradient to sum over the batch)."""
    ndim = ddf.shape[1]
    assert ndim in (2, 3) and image.dim() == ndim + 2 and ddf.dim() == ndim + 2
    assert image.dtype == ddf.dtype and image.dtype in _DTYPES
    assert image.is_contiguous() and ddf.is_contiguous()
    bi, c = image.shape[:2]
    bd = ddf.shape[0]
    b = max(bi, bd)
    assert bi in (1, b) and bd in (1, b)
    assert mode in (LINEAR, NEAREST) and padding in (ZEROS, BORDER)
    assert flags & ~(ADD_DDF | DDF_GRAD_SCATTER) == 0
    if flags & ADD_DDF:
        assert c == ndim
    if flags & DDF_GRAD_SCATTER:
        assert image.shape == ddf.shape
    in_size = list(image.shape[2:]) + [1] * (3 - ndim)
    out_size = list(ddf.shape[2:]) + [1] * (3 - ndim)
    n_in = math.prod(image.shape[2:])
    n_out = math.prod(ddf.shape[2:])
    in_strides = [in_size[1] * in_size[2], in_size[2]] if ndim == 3 else [in_size[1], 1]
    block = BLOCK_3D if ndim == 3 else BLOCK_2D
    # Corner offsets reach (n + 2) per axis; the last block's lanes reach n_out + block.
    reach = 1
    for n in in_size[:ndim]:
        reach *= n + 3
    idx64 = _common.needs_idx64(reach, n_out + block)
    blocks = triton.cdiv(n_out, block)
    items = bd
    if (split and bd == 1 and b > 1 and blocks < SPLIT_BELOW_BLOCKS
            and b <= _common.MAX_GRID_YZ):
        items = b  # one batch item per program, the displacement read with stride 0
    grid = _common.check_grid("warp (triton)", (blocks, items),
                              ("blocks of output voxels", "batch items"))
    args = (
        c, n_in, n_out, *in_size, *in_strides, *out_size,
        c * n_in if bi > 1 else 0,  # image batch stride (0: broadcast)
        ndim * n_out if bd > 1 else 0,  # displacement batch stride
        c * n_out,  # output batch stride
        b if items == 1 else 1,  # batch items per program
    )
    num_warps = max(1, block // (32 * VOXELS_PER_THREAD))
    return _Launch(grid, args, ndim, idx64, block, num_warps)


def fixed_point_terms(image_shape, ddf_shape, flags: int) -> int:
    """M of the module docstring: the most contributions one element of the deterministic
    image gradient can receive. The 2**ndim corners of one sample are distinct voxels, so
    an image item gets at most one contribution per output voxel of each batch item that
    reads it, plus, with DDF_GRAD_SCATTER, one from its own displacement gradient."""
    b = max(image_shape[0], ddf_shape[0])
    n_out = math.prod(ddf_shape[2:])
    return (b if image_shape[0] == 1 else 1) * n_out + (1 if flags & DDF_GRAD_SCATTER else 0)


def warp_forward(image: torch.Tensor, ddf: torch.Tensor, out: torch.Tensor, *, mode: int,
                 padding: int, flags: int = 0) -> None:
    """out[b, c](x) = image[b or 0, c](x + ddf[b or 0](x)).

    Args:
        image: [Bi, C, *S_in], contiguous, float32/float16/bfloat16.
        ddf: [Bd, ndim, *S_out], voxel units, component i along spatial axis i; image's dtype.
        out: [max(Bi, Bd), C, *S_out], contiguous, image's dtype; every element is written.
        mode: 0 linear, 1 nearest.
        padding: 0 zeros, 1 border.
        flags: WarpFlags of csrc/include/warp.h; ADD_DDF (C == ndim): out += ddf (linear).

    Raises:
        ValueError: the batch does not fit CUDA's grid (more than 65535 displacement items).
    """
    lp = _launch(image, ddf, mode, padding, flags, split=True)
    assert out.is_contiguous() and out.dtype == image.dtype
    assert out.shape == (max(image.shape[0], ddf.shape[0]), image.shape[1], *ddf.shape[2:])
    if out.numel() == 0:
        return
    _warp_fwd_kernel[lp.grid](
        image, ddf, out, *lp.args,
        NDIM=lp.ndim, MODE=int(mode), PADDING=int(padding), ADD_DDF=bool(flags & ADD_DDF),
        IDX64=lp.idx64, BLOCK=lp.block, num_warps=lp.num_warps, maxnreg=MAX_REGISTERS,
        enable_fp_fusion=True,
    )


def warp_backward(grad_out: torch.Tensor, image: torch.Tensor, ddf: torch.Tensor,
                  grad_image: torch.Tensor | None, grad_ddf: torch.Tensor | None, *, mode: int,
                  padding: int, deterministic: bool, flags: int = 0,
                  fixed_bound: torch.Tensor | None = None) -> None:
    """Gradients of warp_forward, written into grad_image and grad_ddf.

    Args:
        grad_out: [B, C, *S_out], contiguous, image's dtype.
        image, ddf: as in warp_forward.
        grad_image: None, or float32 [Bi, C, *S_in], zero-filled; receives d loss / d image.
        grad_ddf: None, or [Bd, ndim, *S_out] of ddf's dtype, uninitialised; every element is
            written (zero for nearest).
        mode, padding: as in warp_forward.
        deterministic: accumulate grad_image in 64-bit fixed point (bitwise reproducible;
            precision in the module docstring) instead of float atomics.
        flags: WarpFlags of csrc/include/warp.h. ADD_DDF: as in warp_forward (grad_out adds
            to the displacement gradient). DDF_GRAD_SCATTER (image is ddf, grad_image
            required): the displacement gradient is added into grad_image, grad_ddf ignored.
        fixed_bound: float32 device scalar, finite, >= every finite contribution to
            grad_image (vmax of the module docstring); required when deterministic.

    Raises:
        ValueError: the batch does not fit CUDA's grid (more than 65535 displacement items).
    """
    ddf_scatter = bool(flags & DDF_GRAD_SCATTER)
    if grad_image is not None:
        assert grad_image.is_contiguous() and grad_image.dtype == torch.float32
        assert grad_image.shape == image.shape
    else:
        assert not ddf_scatter, "DDF_GRAD_SCATTER adds into grad_image"
    if ddf_scatter:
        grad_ddf = None
    if grad_ddf is not None:
        assert grad_ddf.is_contiguous() and grad_ddf.dtype == ddf.dtype
        assert grad_ddf.shape == ddf.shape
    need_img = grad_image is not None and grad_image.numel() > 0
    need_ddf = (grad_ddf is not None and grad_ddf.numel() > 0) or (ddf_scatter and need_img)
    lp = _launch(image, ddf, mode, padding, flags, split=not need_ddf)
    assert grad_out.is_contiguous() and grad_out.dtype == image.dtype
    assert grad_out.shape == (max(image.shape[0], ddf.shape[0]), image.shape[1],
                              *ddf.shape[2:])
    if not (need_img or need_ddf):
        return
    det = bool(deterministic) and need_img
    if grad_out.numel() == 0:  # no voxel samples: grad_image stays 0, grad_ddf is 0
        if grad_ddf is not None:
            grad_ddf.zero_()
        return
    log2m = 0
    if det:
        assert fixed_bound is not None and fixed_bound.dtype == torch.float32
        assert fixed_bound.numel() == 1 and fixed_bound.device == image.device
        log2m = max((fixed_point_terms(image.shape, ddf.shape, flags) - 1).bit_length(),
                    FIXED_MIN_LOG2M)
        target = torch.zeros(grad_image.shape, dtype=torch.int64, device=grad_image.device)
        flag = torch.zeros(grad_image.shape, dtype=torch.int32, device=grad_image.device)
        vmax = fixed_bound
    else:
        target = grad_image if need_img else image
        flag = vmax = ddf  # unused
    _warp_bwd_kernel[lp.grid](
        grad_out, image, ddf, target, grad_ddf if grad_ddf is not None else ddf, flag, vmax,
        *lp.args, log2m,
        NDIM=lp.ndim, MODE=int(mode), PADDING=int(padding), NEED_IMG=need_img,
        NEED_DDF=need_ddf, DETERMINISTIC=det, ADD_DDF=bool(flags & ADD_DDF),
        DDF_SCATTER=ddf_scatter, IDX64=lp.idx64, BLOCK=lp.block, num_warps=lp.num_warps,
        maxnreg=MAX_REGISTERS, enable_fp_fusion=True,
    )
    if det:
        numel = grad_image.numel()
        _fixed_to_float_kernel[(triton.cdiv(numel, CONVERT_BLOCK),)](
            target, flag, grad_image, vmax, log2m, numel, BLOCK=CONVERT_BLOCK,
            num_warps=CONVERT_WARPS, enable_fp_fusion=True,
        )
