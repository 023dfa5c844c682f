"""Triton kernels of ``sobel`` and ``sobel_l1`` (the fused ACMT boundary loss).

The per-voxel semantics are those of csrc/include/sobel.h (shared by the CPU and CUDA
kernels): component i = [-1, 0, 1] along spatial axis i times [1, 2, 1] along the others,
"replicate" padding (Padding::BORDER) reads clamped indices, "zeros" reads 0 outside;
magnitude sqrt(sum_i g_i² + eps); the L1 backward factor sign(m1 - m0) * upstream.

Layout of a program: BLOCK voxels of one (batch, channel) volume, one voxel per lane. The
grid is one axis of B * C * ceil(voxels / BLOCK) programs (axis 0 takes 2**31 - 1, so the
batch is not bounded by the 65535 of axes 1 and 2); a program finds its volume with one
scalar division. The forward reads the 3^ndim neighbourhood of each voxel directly
(neighbouring lanes share it through the cache). The fused L1 forward writes one float32
partial sum per program, summed afterwards in a fixed order (deterministic).

The backward is two passes. The first (modes MAGNITUDE and L1) computes the Sobel of the
input(s) once per voxel and writes the gradient inputs h_i = r * g_i (r = upstream / m, or
the L1 factors of both inputs) to a float32 scratch [B, C, ndim, *S]; the COMPONENTS mode
has them already (the upstream gradient). The second is the adjoint filter, a gather with
a single writer per gradient element: grad(q) = sum_i sum_p w_i(q, p) h_i(p) over the
3^ndim neighbours p, with the adjoint weights of sobel.h (flipped taps, the clamped reads
of "replicate" folded onto the edge voxels). Terms of weight 0 (the derivative's centre,
neighbours outside) are not read, as on the CPU: a NaN reaches exactly the voxels whose
gradient depends on it. About 2 * 3^ndim + ndim * 3^ndim reads per voxel, no atomics.

Offsets inside a volume are int32 unless a volume nears the 64-bit threshold of
_common.needs_idx64 (IDX64); volume and component bases are int64 scalars. Arithmetic in
float32 (inputs float32, float16 or bfloat16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._blocks import item_block_offsets

# Codes of csrc/include/common.h (Padding) and csrc/include/sobel.h (Mode, Reduction).
ZEROS = 0
BORDER = 1
COMPONENTS = 0
MAGNITUDE = 1
L1 = 2
NONE, SUM, MEAN = 0, 1, 2

BLOCK = 256
# One voxel per thread: 4 warps (two voxels per thread) needed up to 146 registers in the
# backward passes (sm_90), 8 warps need at most ~80, doubling the resident warps.
NUM_WARPS = 8
# Register cap of the forward and first backward pass. Without one, ptxas picked 64
# registers and spilled 4-12 B in the 3D IDX64 L1 variants (sm_90); with 96 they take
# ~80 and spill nothing. The 3D IDX64 forward takes 128: its "replicate" L1 variants (both
# neighbourhoods read before the differences are formed) spilled 12-40 B at 96 and use
# 127-128 registers; every other forward variant keeps 96.
MAXNREG = 96
FWD_IDX64_MAXNREG = 128
# Register cap of the 3D second backward pass (the gather of the adjoint taps). Without a
# cap ptxas picked 64 registers on sm_90 and spilled 4-24 B (fp16/bf16, both paddings,
# IDX64 or not); at 96 it still spilled 4-16 B; at 128 no variant spills on sm_80 or
# sm_90 (compile gate, 40 variants).
GATHER_3D_MAXNREG = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "sobel (triton)"

# The codes the kernels read: a @triton.jit function may only read constexpr globals (the
# interpreter reads any global, the compiler does not).
_ZEROS = tl.constexpr(ZEROS)
_BORDER = tl.constexpr(BORDER)
_COMPONENTS = tl.constexpr(COMPONENTS)
_MAGNITUDE = tl.constexpr(MAGNITUDE)


# --------------------------------------------------------------------------------------
# Per-voxel math (sobel.h)
# --------------------------------------------------------------------------------------


@triton.constexpr_function
def _fwd_weight(o, deriv):
    """Forward kernel tap at offset o - 1 (o in 0, 1, 2): [-1, 0, 1] or [1, 2, 1]."""
    if deriv:
        return o - 1
    return 2 if o == 1 else 1


@triton.jit
def _program(vox, nblk, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    """(volume index as int64, flat offsets of this program's voxels, in-volume mask)."""
    v, offs = item_block_offsets(nblk, IDX64, BLOCK)
    return v, offs, offs < vox


@triton.jit
def _divmod(a, b, IDX64: tl.constexpr):
    """(a // b, a % b) for a >= 0 and a scalar b > 0. The 64-bit variant multiplies by a
    float64 reciprocal of b (a float32 reciprocal refined by two Newton steps: multiplies
    only) and corrects the quotient from the remainder (off by at most one for a < 2**50).
    A 64-bit integer division, or a float64 one, is a subroutine call whose saved registers
    spilled (16 B on sm_80 / sm_90)."""
    if IDX64:
        bf = b.to(tl.float64)
        inv = (1.0 / b.to(tl.float32)).to(tl.float64)
        inv = inv * (2.0 - bf * inv)
        inv = inv * (2.0 - bf * inv)
        q = (a.to(tl.float64) * inv).to(tl.int64)
        r = a - q * b
        low = r < 0
        high = r >= b
        q = tl.where(low, q - 1, tl.where(high, q + 1, q))
        r = tl.where(low, r + b, tl.where(high, r - b, r))
        return q, r
    else:
        return a // b, a % b


@triton.jit
def _coords(offs, S1, S2, NDIM: tl.constexpr, IDX64: tl.constexpr):
    """Spatial indices of flat offsets; the third is unused (0) in 2D."""
    if NDIM == 3:
        r, i2 = _divmod(offs, S2, IDX64)
        i0, i1 = _divmod(r, S1, IDX64)
        return i0, i1, i2
    else:
        i0, i1 = _divmod(offs, S1, IDX64)
        return i0, i1, offs * 0


@triton.jit
def _axis(c, n, PADDING: tl.constexpr):
    """An index along an axis of length n: clamped, and whether it was inside."""
    inside = (c >= 0) & (c < n)
    return tl.minimum(tl.maximum(c, 0), n - 1), inside


@triton.jit
def _line(row, inside, j, n, mask, SKIP_MID: tl.constexpr, PADDING: tl.constexpr):
    """The inputs at j - 1, j, j + 1 along the contiguous axis (length n) of the rows at
    `row`, float32: clamped indices ("replicate") or 0 outside ("zeros"; `inside`: whether
    the row itself is inside the volume). SKIP_MID: the middle input has weight 0 in every
    component (the voxel itself) and is not read (0)."""
    m = mask
    if PADDING == _ZEROS:
        m = m & inside
    cl, il = _axis(j - 1, n, PADDING)
    ch, ih = _axis(j + 1, n, PADDING)
    if PADDING == _ZEROS:
        lo = tl.load(row + cl, mask=m & il, other=0.0).to(tl.float32)
        hi = tl.load(row + ch, mask=m & ih, other=0.0).to(tl.float32)
    else:
        lo = tl.load(row + cl, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(row + ch, mask=m, other=0.0).to(tl.float32)
    if SKIP_MID:
        mid = tl.zeros(lo.shape, tl.float32)
    else:
        mid = tl.load(row + j, mask=m, other=0.0).to(tl.float32)
    return lo, mid, hi


@triton.jit
def _plane(base, c0, in0, i1, i2, S1, S2, mask, CENTRE: tl.constexpr, PADDING: tl.constexpr):
    """The 3 x 3 inputs of plane c0 (3D) around (i1, i2), row-major (rows i1 - 1, i1,
    i1 + 1); CENTRE: the voxel's own plane (its own input is not read)."""
    c1, in1 = _axis(i1 - 1, S1, PADDING)
    r00, r01, r02 = _line(base + (c0 * S1 + c1) * S2, in0 & in1, i2, S2, mask, False, PADDING)
    c1, in1 = _axis(i1, S1, PADDING)
    r10, r11, r12 = _line(base + (c0 * S1 + c1) * S2, in0 & in1, i2, S2, mask, CENTRE,
                          PADDING)
    c1, in1 = _axis(i1 + 1, S1, PADDING)
    r20, r21, r22 = _line(base + (c0 * S1 + c1) * S2, in0 & in1, i2, S2, mask, False, PADDING)
    return r00, r01, r02, r10, r11, r12, r20, r21, r22


@triton.jit
def _smooth(a, b, c):
    """The smoothing [1, 2, 1] of three values."""
    return a + 2.0 * b + c


@triton.jit
def _components(base, i0, i1, i2, S0, S1, S2, mask, NDIM: tl.constexpr, PADDING: tl.constexpr):
    """Sobel components (g0, g1, g2) at voxels (i0, i1, i2) of the volume at `base` (g2 = 0
    in 2D), float32.

    Differences first: every derivative pair x(+1) - x(-1) is formed from the two inputs
    before a smoothing weight multiplies it, so a constant image gives exactly 0 at any
    magnitude and the rounding error scales with the differences, not with the inputs (a
    running sum of the weighted inputs gave |g| ~ 1e9 on a constant image at 1e15)."""
    if NDIM == 3:
        # Planes a (axis 0 offset -1), b (0), c (+1); p_rc: row r, column c (offsets - 1).
        c0, in0 = _axis(i0 - 1, S0, PADDING)
        a00, a01, a02, a10, a11, a12, a20, a21, a22 = _plane(
            base, c0, in0, i1, i2, S1, S2, mask, False, PADDING)
        c0, in0 = _axis(i0 + 1, S0, PADDING)
        c00, c01, c02, c10, c11, c12, c20, c21, c22 = _plane(
            base, c0, in0, i1, i2, S1, S2, mask, False, PADDING)
        g0 = _smooth(_smooth(c00 - a00, c01 - a01, c02 - a02),
                     _smooth(c10 - a10, c11 - a11, c12 - a12),
                     _smooth(c20 - a20, c21 - a21, c22 - a22))
        c0, in0 = _axis(i0, S0, PADDING)
        b00, b01, b02, b10, _b11, b12, b20, b21, b22 = _plane(
            base, c0, in0, i1, i2, S1, S2, mask, True, PADDING)
        g1 = _smooth(_smooth(a20 - a00, a21 - a01, a22 - a02),
                     _smooth(b20 - b00, b21 - b01, b22 - b02),
                     _smooth(c20 - c00, c21 - c01, c22 - c02))
        g2 = _smooth(_smooth(a02 - a00, a12 - a10, a22 - a20),
                     _smooth(b02 - b00, b12 - b10, b22 - b20),
                     _smooth(c02 - c00, c12 - c10, c22 - c20))
    else:
        # Rows a (axis 0 offset -1), b (0), c (+1), each with columns -1, 0, +1.
        c0, in0 = _axis(i0 - 1, S0, PADDING)
        a0, a1, a2 = _line(base + c0 * S1, in0, i1, S1, mask, False, PADDING)
        c0, in0 = _axis(i0, S0, PADDING)
        b0, _b1, b2 = _line(base + c0 * S1, in0, i1, S1, mask, True, PADDING)
        c0, in0 = _axis(i0 + 1, S0, PADDING)
        e0, e1, e2 = _line(base + c0 * S1, in0, i1, S1, mask, False, PADDING)
        g0 = _smooth(e0 - a0, e1 - a1, e2 - a2)
        g1 = _smooth(a2 - a0, b2 - b0, e2 - e0)
        g2 = tl.zeros(g0.shape, tl.float32)
    return g0, g1, g2


@triton.jit
def _magnitude(g0, g1, g2, eps):
    return tl.sqrt(g0 * g0 + g1 * g1 + g2 * g2 + eps)


@triton.jit
def _adj_coef(o, q, n, DERIV: tl.constexpr, PADDING: tl.constexpr):
    """Adjoint weight with which the value at neighbour q + o - 1 reaches index q of an axis
    of length n (sobel.h tap_coefs): the flipped kernel, 0 for a neighbour outside, plus
    ("replicate", o == 1) the clamped reads folded onto the edges."""
    if o == 1:
        w = tl.zeros(q.shape, tl.float32) + _fwd_weight(1, DERIV)
        if PADDING == _BORDER:
            lo = (q == 0).to(tl.float32)
            hi = (q == n - 1).to(tl.float32)
            if DERIV:
                w = w - lo + hi
            else:
                w = w + lo + hi
    else:
        inside = (q + (o - 1) >= 0) & (q + (o - 1) < n)
        w = tl.where(inside, _fwd_weight(2 - o, DERIV), 0.0)
    return w


@triton.jit
def _sign(d):
    # 0 at 0, NaN for NaN (d * 0), as torch's abs backward.
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0))


@triton.constexpr_function
def _zero_centre(i, d, padding):
    """Whether the derivative tap at offset d - 1 along axis i has adjoint weight 0
    everywhere: its centre under "zeros" padding (no edge folding)."""
    return d == 1 and padding == ZEROS


@triton.constexpr_function
def _other_axis(i, k):
    """The k-th (0, 1) spatial axis other than i, in increasing order."""
    return [ax for ax in range(3) if ax != i][k]


@triton.constexpr_function
def _other_taps(ndim):
    """Taps along the second smoothing axis: 3 in 3D, 1 (no such axis) in 2D."""
    return 3 if ndim == 3 else 1


@triton.jit
def _pick(AXIS: tl.constexpr, x0, x1, x2):
    """x0, x1 or x2: the value of spatial axis AXIS."""
    if AXIS == 0:
        r = x0
    elif AXIS == 1:
        r = x1
    else:
        r = x2
    return r


@triton.jit
def _adjoint_component(acc, hp, offs, mask, i0, i1, i2, S0, S1, S2, st0, st1,
                       I: tl.constexpr, NDIM: tl.constexpr, PADDING: tl.constexpr):
    """acc + the adjoint of component I applied to its gradient inputs at `hp` (the
    component's volume, any float dtype): sum over the neighbours p of w_I(q, p) h_I(p),
    terms of weight 0 not read. st0, st1: strides of the first two spatial axes.

    Differences first, as in the forward: for each offset along the smoothing axes the
    derivative taps along axis I are combined (h(-1) - h(+1) inside the volume) before the
    smoothing weights multiply them, so a constant h gives exactly 0 inside."""
    A: tl.constexpr = _other_axis(I, 0)
    B: tl.constexpr = _other_axis(I, 1)
    qi = _pick(I, i0, i1, i2)
    ni = _pick(I, S0, S1, S2)
    sti = _pick(I, st0, st1, 1)
    qa = _pick(A, i0, i1, i2)
    na = _pick(A, S0, S1, S2)
    sta = _pick(A, st0, st1, 1)
    qb = _pick(B, i0, i1, i2)
    nb = _pick(B, S0, S1, S2)
    stb = _pick(B, st0, st1, 1)
    for da in tl.static_range(3):
        wa = _adj_coef(da, qa, na, False, PADDING)
        for db in tl.static_range(_other_taps(NDIM)):
            if NDIM == 3:
                wo = wa * _adj_coef(db, qb, nb, False, PADDING)
                shift = offs + ((da - 1) * sta + (db - 1) * stb)
            else:
                wo = wa
                shift = offs + (da - 1) * sta
            inner = tl.zeros(wo.shape, tl.float32)
            for d in tl.static_range(3):
                if not _zero_centre(I, d, PADDING):
                    wd = _adj_coef(d, qi, ni, True, PADDING)
                    ok = mask & (wo != 0.0) & (wd != 0.0)
                    h = tl.load(hp + (shift + (d - 1) * sti), mask=ok, other=0.0)
                    inner += wd * h.to(tl.float32)
            acc += wo * inner
    return acc


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _sobel_fwd_kernel(
    x_ptr, x0_ptr, out_ptr, partial_ptr, vox, nblk, S0, S1, S2, eps,
    NDIM: tl.constexpr, PADDING: tl.constexpr, MODE: tl.constexpr, REDUCE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    v, offs, mask = _program(vox, nblk, BLOCK, IDX64)
    i0, i1, i2 = _coords(offs, S1, S2, NDIM, IDX64)
    g0, g1, g2 = _components(x_ptr + v * vox, i0, i1, i2, S0, S1, S2, mask, NDIM, PADDING)
    ty = out_ptr.dtype.element_ty
    if MODE == _COMPONENTS:
        # Component bases from the int64 volume index: (v * NDIM + i) * vox never in int32.
        tl.store(out_ptr + (v * NDIM) * vox + offs, g0.to(ty), mask=mask)
        tl.store(out_ptr + (v * NDIM + 1) * vox + offs, g1.to(ty), mask=mask)
        if NDIM == 3:
            tl.store(out_ptr + (v * NDIM + 2) * vox + offs, g2.to(ty), mask=mask)
    elif MODE == _MAGNITUDE:
        tl.store(out_ptr + v * vox + offs, _magnitude(g0, g1, g2, eps).to(ty), mask=mask)
    else:
        h0, h1, h2 = _components(x0_ptr + v * vox, i0, i1, i2, S0, S1, S2, mask, NDIM, PADDING)
        d = tl.abs(_magnitude(g0, g1, g2, eps) - _magnitude(h0, h1, h2, eps))
        if REDUCE:
            part = tl.sum(tl.where(mask, d, 0.0), axis=0)
            tl.store(partial_ptr + tl.program_id(0), part)
        else:
            tl.store(out_ptr + v * vox + offs, d.to(ty), mask=mask)


@triton.jit
def _sobel_bwd_prep_kernel(
    go_ptr, x_ptr, x0_ptr, h_ptr, h0_ptr, vox, nblk, S0, S1, S2, eps, scale,
    NDIM: tl.constexpr, PADDING: tl.constexpr, MODE: tl.constexpr, SCALAR_UP: tl.constexpr,
    NEED_X: tl.constexpr, NEED_X0: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """First backward pass (_MAGNITUDE, L1): h_i = r * g_i per voxel into the float32
    scratch h [B, C, NDIM, *S] (input x) and h0 (input x0, L1 only)."""
    v, offs, mask = _program(vox, nblk, BLOCK, IDX64)
    i0, i1, i2 = _coords(offs, S1, S2, NDIM, IDX64)
    g0, g1, g2 = _components(x_ptr + v * vox, i0, i1, i2, S0, S1, S2, mask, NDIM, PADDING)
    m1 = _magnitude(g0, g1, g2, eps)
    if MODE == _MAGNITUDE:
        up = tl.load(go_ptr + v * vox + offs, mask=mask, other=0.0).to(tl.float32)
        r1 = up / m1
    else:
        f0, f1, f2 = _components(x0_ptr + v * vox, i0, i1, i2, S0, S1, S2, mask, NDIM, PADDING)
        m0 = _magnitude(f0, f1, f2, eps)
        if SCALAR_UP:
            up = tl.load(go_ptr).to(tl.float32) * scale
        else:
            up = tl.load(go_ptr + v * vox + offs, mask=mask, other=0.0).to(tl.float32)
        w = _sign(m1 - m0) * up
        r1 = w / m1
        if NEED_X0:
            r0 = -w / m0
            tl.store(h0_ptr + (v * NDIM) * vox + offs, f0 * r0, mask=mask)
            tl.store(h0_ptr + (v * NDIM + 1) * vox + offs, f1 * r0, mask=mask)
            if NDIM == 3:
                tl.store(h0_ptr + (v * NDIM + 2) * vox + offs, f2 * r0, mask=mask)
    if NEED_X:
        tl.store(h_ptr + (v * NDIM) * vox + offs, g0 * r1, mask=mask)
        tl.store(h_ptr + (v * NDIM + 1) * vox + offs, g1 * r1, mask=mask)
        if NDIM == 3:
            tl.store(h_ptr + (v * NDIM + 2) * vox + offs, g2 * r1, mask=mask)


@triton.jit
def _sobel_bwd_kernel(
    h_ptr, gx_ptr, vox, nblk, S0, S1, S2,
    NDIM: tl.constexpr, PADDING: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Second backward pass: gx = sum_i S_i^T h_i, h [B, C, NDIM, *S] (the upstream
    components, or the scratch of the first pass), one writer per element of gx."""
    v, offs, mask = _program(vox, nblk, BLOCK, IDX64)
    i0, i1, i2 = _coords(offs, S1, S2, NDIM, IDX64)
    if NDIM == 3:
        if IDX64:
            st0 = S1.to(tl.int64) * S2
        else:
            st0 = S1 * S2
        st1 = S2
    else:
        st0 = S1
        st1 = 1
    acc = tl.zeros(i0.shape, tl.float32)
    acc = _adjoint_component(acc, h_ptr + (v * NDIM) * vox, offs, mask, i0, i1, i2, S0, S1,
                             S2, st0, st1, 0, NDIM, PADDING)
    acc = _adjoint_component(acc, h_ptr + (v * NDIM + 1) * vox, offs, mask, i0, i1, i2, S0,
                             S1, S2, st0, st1, 1, NDIM, PADDING)
    if NDIM == 3:
        acc = _adjoint_component(acc, h_ptr + (v * NDIM + 2) * vox, offs, mask, i0, i1, i2,
                                 S0, S1, S2, st0, st1, 2, NDIM, PADDING)
    tl.store(gx_ptr + v * vox + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{_OP}: {name} must be float32, float16 or bfloat16 (float64 runs on the torch "
            f"and cpu backends), got {t.dtype}"
        )


def _geometry(shape: tuple[int, ...]) -> tuple[int, int, int, list[int], bool, tuple[int]]:
    """(ndim, voxels per volume, blocks per volume, sizes [3], IDX64, grid) of [B, C, *S]."""
    ndim = len(shape) - 2
    if ndim not in (2, 3):
        raise ValueError(f"{_OP}: expected [B, C, H, W] or [B, C, D, H, W], got {shape}")
    vox = 1
    for n in shape[2:]:
        vox *= n
    nblk = triton.cdiv(vox, BLOCK)
    grid = _common.check_grid(_OP, (shape[0] * shape[1] * nblk,),
                              (f"B * C * ceil(voxels / {BLOCK})",))
    sizes = list(shape[2:]) + [1] * (3 - ndim)
    # Offsets inside one volume (plus a block of slack); volume bases are int64.
    idx64 = _common.needs_idx64(vox + BLOCK)
    return ndim, vox, nblk, sizes, idx64, grid


def sobel_forward(x: torch.Tensor, x0: torch.Tensor | None, out: torch.Tensor, *, mode: int,
                  padding: int, eps: float, reduction: int) -> None:
    """Forward of sobel (mode COMPONENTS / MAGNITUDE) or of the L1 loss (mode L1).

    Args:
        x: [B, C, *S], contiguous, float32/float16/bfloat16.
        x0: like x (L1 only), else None.
        out: COMPONENTS [B, C, ndim, *S]; MAGNITUDE [B, C, *S]; L1 [B, C, *S] (reduction
            NONE) or a scalar; x's dtype, contiguous; every element is written.
        mode, padding, reduction: codes of sobel.h / common.h. eps: under the square root.
    """
    _check_dtype("x", x)
    ndim, vox, nblk, sizes, idx64, grid = _geometry(tuple(x.shape))
    reduce = mode == L1 and reduction != NONE
    partials = None
    if mode == L1:
        if x0 is None:
            raise ValueError(f"{_OP}: mode L1 needs x0")
        if reduce:
            partials = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    _sobel_fwd_kernel[grid](
        x, x0 if x0 is not None else x, out, partials if partials is not None else out, vox,
        nblk, *sizes, float(eps),
        NDIM=ndim, PADDING=int(padding), MODE=int(mode), REDUCE=reduce, IDX64=idx64,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
        maxnreg=FWD_IDX64_MAXNREG if (idx64 and ndim == 3) else MAXNREG,
    )
    if partials is not None:
        total = partials.double().sum()  # fixed order: deterministic
        if reduction == MEAN:
            total = total / x.numel()
        out.copy_(total.to(out.dtype))


def sobel_backward(grad_out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor | None,
                   grad_x: torch.Tensor | None, grad_x0: torch.Tensor | None, *, mode: int,
                   padding: int, eps: float, reduction: int) -> None:
    """Gradients of sobel / the L1 loss, every element of grad_x / grad_x0 written.

    MAGNITUDE and L1 allocate a float32 scratch of ndim values per voxel for each gradient
    asked for (torch.empty: no host sync, CUDA-graph safe).

    Args:
        grad_out: the forward's output shape (a scalar for L1 with SUM / MEAN), contiguous.
        x: [B, C, *S] (unused, any tensor, for COMPONENTS); x0: like x for L1, else None.
        grad_x, grad_x0: [B, C, *S] of grad_out's dtype, or None when not needed (grad_x0:
            L1 only).
    """
    _check_dtype("grad_out", grad_out)
    ref = grad_x if grad_x is not None else grad_x0
    if ref is None:
        return
    shape = tuple(ref.shape)
    ndim, vox, nblk, sizes, idx64, grid = _geometry(shape)
    # Scratch and components offsets reach ndim * vox inside a volume's [ndim, *S] block;
    # their bases are int64, so the in-volume reach stays vox + BLOCK.
    sources = []
    if mode == COMPONENTS:
        sources.append((grad_out, grad_x))
    else:
        if mode == L1 and x0 is None:
            raise ValueError(f"{_OP}: mode L1 needs x0")
        scratch_shape = (shape[0], shape[1], ndim, *shape[2:])
        h = torch.empty(scratch_shape, dtype=torch.float32, device=ref.device) \
            if grad_x is not None else None
        h0 = torch.empty(scratch_shape, dtype=torch.float32, device=ref.device) \
            if grad_x0 is not None else None
        scalar_up = mode == L1 and reduction != NONE
        scale = 1.0 / (vox * shape[0] * shape[1]) if (scalar_up and reduction == MEAN) else 1.0
        some_h = h if h is not None else h0
        _sobel_bwd_prep_kernel[grid](
            grad_out, x, x0 if x0 is not None else x, h if h is not None else some_h,
            h0 if h0 is not None else some_h, vox, nblk, *sizes, float(eps), scale,
            NDIM=ndim, PADDING=int(padding), MODE=int(mode), SCALAR_UP=scalar_up,
            NEED_X=h is not None, NEED_X0=h0 is not None, IDX64=idx64, BLOCK=BLOCK,
            num_warps=NUM_WARPS, maxnreg=MAXNREG,
        )
        sources += [(h, grad_x), (h0, grad_x0)]
    for src, dst in sources:
        if dst is not None:
            # The 3D gather takes a cap of 128 (GATHER_3D_MAXNREG); 2D runs without one.
            cap = {"maxnreg": GATHER_3D_MAXNREG} if ndim == 3 else {}
            _sobel_bwd_kernel[grid](
                src, dst, vox, nblk, *sizes,
                NDIM=ndim, PADDING=int(padding), IDX64=idx64, BLOCK=BLOCK,
                num_warps=NUM_WARPS, **cap,
            )
