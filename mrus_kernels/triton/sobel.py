"""Triton kernels of the Sobel operators: sobel (components, magnitude) and the fused
Sobel-L1 boundary loss.

The per-voxel semantics are those of csrc/include/sobel.h (shared by the CPU and CUDA
kernels): component i = [-1, 0, 1] along spatial axis i times [1, 2, 1] along the others,
"replicate" padding (Padding::BORDER) reads clamped indices, "zeros" reads 0 outside;
magnitude sqrt(sum_i g_i² + eps); the L1 backward factor sign(m1 - m0) * upstream.

Layout of a program: one program per BLOCK voxels of one (batch, channel) volume (grid
axis 1), one voxel per lane. The forward reads the 3^ndim neighbourhood of each voxel
directly (neighbouring lanes share it through the cache). The backward is a gather with a
single writer per gradient element: for each of the 3^ndim neighbours p of the output
voxel q it recomputes the gradient inputs h_i(p) (the upstream components; or
upstream * g_i(p) / m(p); or the L1 factors, from both inputs) and adds them with the
adjoint weights, which fold the clamped reads of "replicate" padding back onto the edge
voxels. No scratch memory, no atomics. The fused L1 forward writes one float32 partial sum
per program, summed afterwards in a fixed order (deterministic).

This is the portable version: the backward recomputes each neighbour's Sobel (3^ndim x
3^ndim reads per voxel, cache hits); the cuda backend keeps slice tiles in shared memory
instead. Offsets inside a volume are int32 unless a volume nears 2**31 elements (IDX64);
volume offsets are 64-bit. Arithmetic in float32 (inputs float32, float16 or bfloat16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Codes of csrc/include/common.h (Padding) and csrc/include/sobel.h (Mode, Reduction).
ZEROS = 0
BORDER = 1
COMPONENTS = 0
MAGNITUDE = 1
L1 = 2
NONE, SUM, MEAN = 0, 1, 2

BLOCK = 256
NUM_WARPS = 4
_INT32_MAX = 2**31 - 1
_MAX_GRID_Y = 65535
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Per-voxel math (sobel.h)
# --------------------------------------------------------------------------------------


@triton.constexpr_function
def _fwd_weight(o, deriv):
    """Forward kernel tap at offset o - 1 (o in 0, 1, 2): [-1, 0, 1] or [1, 2, 1]."""
    if deriv:
        return o - 1
    return 2 if o == 1 else 1


@triton.constexpr_function
def _comp_weight(i, o0, o1, o2, ndim):
    """Weight of the neighbour at offsets (o0, o1, o2) - 1 in component i."""
    w = _fwd_weight(o0, i == 0) * _fwd_weight(o1, i == 1)
    if ndim == 3:
        w = w * _fwd_weight(o2, i == 2)
    return w


@triton.jit
def _voxel(vox, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < vox


@triton.jit
def _coords(offs, S1, S2, NDIM: tl.constexpr):
    """Spatial indices of flat offsets; the third is unused (0) in 2D."""
    if NDIM == 3:
        i2 = offs % S2
        r = offs // S2
        return r // S1, r % S1, i2
    else:
        return offs // S1, offs % S1, offs * 0


@triton.jit
def _axis(c, n, PADDING: tl.constexpr):
    """An index along an axis of length n: clamped, and whether it was inside."""
    inside = (c >= 0) & (c < n)
    return tl.minimum(tl.maximum(c, 0), n - 1), inside


@triton.jit
def _components(base, i0, i1, i2, S0, S1, S2, mask, NDIM: tl.constexpr, PADDING: tl.constexpr):
    """Sobel components (g0, g1, g2) at voxels (i0, i1, i2) of the volume at `base` (g2 = 0
    in 2D), float32."""
    g0 = tl.zeros(i0.shape, tl.float32)
    g1 = tl.zeros(i0.shape, tl.float32)
    g2 = tl.zeros(i0.shape, tl.float32)
    for o0 in tl.static_range(3):
        c0, in0 = _axis(i0 + (o0 - 1), S0, PADDING)
        for o1 in tl.static_range(3):
            c1, in1 = _axis(i1 + (o1 - 1), S1, PADDING)
            if NDIM == 3:
                for o2 in tl.static_range(3):
                    if (o0 != 1) | (o1 != 1) | (o2 != 1):  # the centre has weight 0
                        c2, in2 = _axis(i2 + (o2 - 1), S2, PADDING)
                        m = mask
                        if PADDING == ZEROS:
                            m = m & in0 & in1 & in2
                        val = tl.load(base + (c0 * S1 + c1) * S2 + c2, mask=m, other=0.0)
                        val = val.to(tl.float32)
                        if _comp_weight(0, o0, o1, o2, 3) != 0:
                            g0 += _comp_weight(0, o0, o1, o2, 3) * val
                        if _comp_weight(1, o0, o1, o2, 3) != 0:
                            g1 += _comp_weight(1, o0, o1, o2, 3) * val
                        if _comp_weight(2, o0, o1, o2, 3) != 0:
                            g2 += _comp_weight(2, o0, o1, o2, 3) * val
            else:
                if (o0 != 1) | (o1 != 1):
                    m = mask
                    if PADDING == ZEROS:
                        m = m & in0 & in1
                    val = tl.load(base + c0 * S1 + c1, mask=m, other=0.0).to(tl.float32)
                    if _comp_weight(0, o0, o1, 0, 2) != 0:
                        g0 += _comp_weight(0, o0, o1, 0, 2) * val
                    if _comp_weight(1, o0, o1, 0, 2) != 0:
                        g1 += _comp_weight(1, o0, o1, 0, 2) * val
    return g0, g1, g2


@triton.jit
def _magnitude(g0, g1, g2, eps):
    return tl.sqrt(g0 * g0 + g1 * g1 + g2 * g2 + eps)


@triton.jit
def _adj_weight(o, q, n, DERIV: tl.constexpr, PADDING: tl.constexpr):
    """Adjoint weight with which the value at neighbour q + o - 1 reaches index q: the
    flipped kernel, plus (replicate, o == 1) the clamped reads folded onto the edges."""
    base = _fwd_weight(2 - o, DERIV)
    w = tl.zeros(q.shape, tl.float32) + base
    if PADDING == BORDER:
        if o == 1:
            lo = (q == 0).to(tl.float32)
            hi = (q == n - 1).to(tl.float32)
            if DERIV:
                w = w - lo + hi
            else:
                w = w + lo + hi
    return w


@triton.jit
def _sign(d):
    # 0 at 0, NaN for NaN (d * 0), as torch's abs backward.
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _sobel_fwd_kernel(
    x_ptr, x0_ptr, out_ptr, partial_ptr, vox, S0, S1, S2, eps,
    NDIM: tl.constexpr, PADDING: tl.constexpr, MODE: tl.constexpr, REDUCE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    v = tl.program_id(1).to(tl.int64)
    offs, mask = _voxel(vox, BLOCK, IDX64)
    i0, i1, i2 = _coords(offs, S1, S2, NDIM)
    g0, g1, g2 = _components(x_ptr + v * vox, i0, i1, i2, S0, S1, S2, mask, NDIM, PADDING)
    ty = out_ptr.dtype.element_ty
    if MODE == COMPONENTS:
        o = out_ptr + v * NDIM * vox + offs
        tl.store(o, g0.to(ty), mask=mask)
        tl.store(o + vox, g1.to(ty), mask=mask)
        if NDIM == 3:
            tl.store(o + 2 * vox, g2.to(ty), mask=mask)
    elif MODE == MAGNITUDE:
        tl.store(out_ptr + v * vox + offs, _magnitude(g0, g1, g2, eps).to(ty), mask=mask)
    else:
        h0, h1, h2 = _components(x0_ptr + v * vox, i0, i1, i2, S0, S1, S2, mask, NDIM, PADDING)
        d = tl.abs(_magnitude(g0, g1, g2, eps) - _magnitude(h0, h1, h2, eps))
        if REDUCE:
            part = tl.sum(tl.where(mask, d, 0.0), axis=0)
            tl.store(partial_ptr + v * tl.num_programs(0) + tl.program_id(0), part)
        else:
            tl.store(out_ptr + v * vox + offs, d.to(ty), mask=mask)


@triton.jit
def _sobel_bwd_kernel(
    go_ptr, x_ptr, x0_ptr, gx_ptr, gx0_ptr, vox, S0, S1, S2, eps, scale,
    NDIM: tl.constexpr, PADDING: tl.constexpr, MODE: tl.constexpr, SCALAR_UP: tl.constexpr,
    NEED_X: tl.constexpr, NEED_X0: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    v = tl.program_id(1).to(tl.int64)
    offs, mask = _voxel(vox, BLOCK, IDX64)
    i0, i1, i2 = _coords(offs, S1, S2, NDIM)
    xb = x_ptr + v * vox
    x0b = x0_ptr + v * vox
    if SCALAR_UP:
        up_scalar = tl.load(go_ptr).to(tl.float32) * scale
    acc1 = tl.zeros(i0.shape, tl.float32)
    acc0 = tl.zeros(i0.shape, tl.float32)
    for d0 in tl.static_range(3):
        p0, in0 = _axis(i0 + (d0 - 1), S0, PADDING)
        s0 = _adj_weight(d0, i0, S0, False, PADDING)
        t0 = _adj_weight(d0, i0, S0, True, PADDING)
        for d1 in tl.static_range(3):
            p1, in1 = _axis(i1 + (d1 - 1), S1, PADDING)
            s1 = _adj_weight(d1, i1, S1, False, PADDING)
            t1 = _adj_weight(d1, i1, S1, True, PADDING)
            for d2 in tl.static_range(3 if NDIM == 3 else 1):
                if NDIM == 3:
                    p2, in2 = _axis(i2 + (d2 - 1), S2, PADDING)
                    s2 = _adj_weight(d2, i2, S2, False, PADDING)
                    t2 = _adj_weight(d2, i2, S2, True, PADDING)
                    pm = mask & in0 & in1 & in2
                    poff = (p0 * S1 + p1) * S2 + p2
                    w0 = t0 * s1 * s2
                    w1 = s0 * t1 * s2
                    w2 = s0 * s1 * t2
                else:
                    p2 = p1 * 0
                    pm = mask & in0 & in1
                    poff = p0 * S1 + p1
                    w0 = t0 * s1
                    w1 = s0 * t1
                    w2 = w0 * 0.0
                if MODE == COMPONENTS:
                    gb = go_ptr + v * NDIM * vox + poff
                    h0 = tl.load(gb, mask=pm, other=0.0).to(tl.float32)
                    h1 = tl.load(gb + vox, mask=pm, other=0.0).to(tl.float32)
                    acc = w0 * h0 + w1 * h1
                    if NDIM == 3:
                        acc += w2 * tl.load(gb + 2 * vox, mask=pm, other=0.0).to(tl.float32)
                    acc1 += tl.where(pm, acc, 0.0)
                else:
                    g0, g1, g2 = _components(xb, p0, p1, p2, S0, S1, S2, pm, NDIM, PADDING)
                    m1 = _magnitude(g0, g1, g2, eps)
                    if MODE == MAGNITUDE:
                        up = tl.load(go_ptr + v * vox + poff, mask=pm, other=0.0).to(tl.float32)
                        r1 = up / m1
                    else:
                        f0, f1, f2 = _components(x0b, p0, p1, p2, S0, S1, S2, pm, NDIM, PADDING)
                        m0 = _magnitude(f0, f1, f2, eps)
                        if SCALAR_UP:
                            up = up_scalar
                        else:
                            up = tl.load(go_ptr + v * vox + poff, mask=pm, other=0.0)
                            up = up.to(tl.float32)
                        w = _sign(m1 - m0) * up
                        r1 = w / m1
                        if NEED_X0:
                            r0 = -w / m0
                            acc0 += tl.where(pm, (w0 * f0 + w1 * f1 + w2 * f2) * r0, 0.0)
                    if NEED_X:
                        acc1 += tl.where(pm, (w0 * g0 + w1 * g1 + w2 * g2) * r1, 0.0)
    if NEED_X:
        tl.store(gx_ptr + v * vox + offs, acc1.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_X0:
        tl.store(gx0_ptr + v * vox + offs, acc0.to(gx0_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _geometry(shape: tuple[int, ...]) -> tuple[int, int, list[int], bool, tuple[int, int]]:
    ndim = len(shape) - 2
    assert ndim in (2, 3)
    volumes = shape[0] * shape[1]
    vox = 1
    for n in shape[2:]:
        vox *= n
    sizes = list(shape[2:]) + [1] * (3 - ndim)
    idx64 = vox + BLOCK > _INT32_MAX
    grid = (triton.cdiv(vox, BLOCK), volumes)
    assert grid[1] <= _MAX_GRID_Y, "sobel (triton): B * C must be at most 65535"
    return ndim, vox, sizes, idx64, grid


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
    assert x.is_contiguous() and out.is_contiguous() and x.dtype in _DTYPES
    assert out.dtype == x.dtype
    ndim, vox, sizes, idx64, grid = _geometry(tuple(x.shape))
    reduce = mode == L1 and reduction != NONE
    partials = None
    if mode == L1:
        assert x0 is not None and x0.shape == x.shape and x0.dtype == x.dtype
        assert x0.is_contiguous()
        if reduce:
            partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    _sobel_fwd_kernel[grid](
        x, x0 if x0 is not None else x, out, partials if partials is not None else out, vox,
        *sizes, float(eps),
        NDIM=ndim, PADDING=int(padding), MODE=int(mode), REDUCE=reduce, IDX64=idx64,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    if reduce:
        assert partials is not None
        total = partials.double().sum()  # fixed order: deterministic
        if reduction == MEAN:
            total = total / x.numel()
        out.copy_(total.to(out.dtype))


def sobel_backward(grad_out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor | None,
                   grad_x: torch.Tensor | None, grad_x0: torch.Tensor | None, *, mode: int,
                   padding: int, eps: float, reduction: int) -> None:
    """Gradients of sobel / the L1 loss, every element of grad_x / grad_x0 written.

    Args:
        grad_out: the forward's output shape (a scalar for L1 with SUM / MEAN), contiguous.
        x: [B, C, *S] (unused, any tensor, for COMPONENTS); x0: like x for L1, else None.
        grad_x, grad_x0: [B, C, *S] of grad_out's dtype, or None when not needed (grad_x0:
            L1 only).
    """
    assert grad_out.is_contiguous() and grad_out.dtype in _DTYPES
    ref = grad_x if grad_x is not None else grad_x0
    if ref is None:
        return
    shape = tuple(ref.shape)
    ndim, vox, sizes, idx64, grid = _geometry(shape)
    scalar_up = mode == L1 and reduction != NONE
    scale = 1.0 / (vox * shape[0] * shape[1]) if (scalar_up and reduction == MEAN) else 1.0
    if mode != COMPONENTS:
        assert x.is_contiguous() and tuple(x.shape) == shape
    _sobel_bwd_kernel[grid](
        grad_out, x, x0 if x0 is not None else x, grad_x if grad_x is not None else ref,
        grad_x0 if grad_x0 is not None else ref, vox, *sizes, float(eps), scale,
        NDIM=ndim, PADDING=int(padding), MODE=int(mode), SCALAR_UP=scalar_up,
        NEED_X=grad_x is not None, NEED_X0=grad_x0 is not None, IDX64=idx64, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
