"""Triton kernels of the jacobian_det operator: det(I + ∇u) of the map x + u(x).

The per-voxel semantics are those of csrc/include/jacobian.h (shared by the CPU and CUDA
kernels): d u_i / d x_j by central differences inside, one-sided differences at the two
borders, 0 along an axis of size 1, each times 1 / spacing_j. The backward is a gather over
the adjoint stencil (voxel y collects from itself and its two neighbours along each axis,
recomputing their cofactors), so each gradient element has a single writer and there are no
atomics.

One program per BLOCK voxels of one batch item (grid (cdiv(n, BLOCK), B)). Batch offsets
are 64-bit; offsets inside one volume are int32 unless a volume is near 2**31 elements
(IDX64). All arithmetic is float32 (inputs float32, float16 or bfloat16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_2D = 256
BLOCK_3D = 128  # the 3D backward recomputes 7 Jacobians per voxel: fewer registers per program
_INT32_MAX = 2**31 - 1
_MAX_GRID_Y = 65535
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _coords(offs, S1, S2, NDIM: tl.constexpr):
    """Coordinates per axis (axis 0 first) of flat voxel indices."""
    if NDIM == 3:
        return (offs // (S1 * S2), (offs // S2) % S1, offs % S2)
    else:
        return (offs // S1, offs % S1)


@triton.jit
def _difference(u_ptr, offs, x, s, st, inv_h, mask):
    """d u / d x along one axis (size s, stride st) at flat index offs, times inv_h."""
    inner_lo = x > 0
    inner_hi = x < s - 1
    lo = tl.where(inner_lo, offs - st, offs)
    hi = tl.where(inner_hi, offs + st, offs)
    scale = tl.where(inner_lo & inner_hi, 0.5, 1.0) * inv_h
    a = tl.load(u_ptr + hi, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(u_ptr + lo, mask=mask, other=0.0).to(tl.float32)
    # Along an axis of size 1 neither side is inner: 0, as jacobian.h (no constexpr test of
    # s, which Triton may specialise to 1).
    return tl.where(inner_lo | inner_hi, (a - b) * scale, 0.0)


@triton.jit
def _jacobian(u_ptr, offs, xs, sizes, strides, inv_hs, n, mask, NDIM: tl.constexpr):
    """J = I + ∇u at voxels offs (coordinates xs), flattened row-major: J[i * NDIM + j]."""
    J = ()
    for i in tl.static_range(NDIM):
        for j in tl.static_range(NDIM):
            d = _difference(u_ptr + i * n, offs, xs[j], sizes[j], strides[j], inv_hs[j], mask)
            if i == j:
                d = d + 1.0
            J = J + (d,)
    return J


@triton.jit
def _determinant(J, NDIM: tl.constexpr):
    if NDIM == 2:
        return J[0] * J[3] - J[1] * J[2]
    else:
        return (J[0] * (J[4] * J[8] - J[5] * J[7]) - J[1] * (J[3] * J[8] - J[5] * J[6])
                + J[2] * (J[3] * J[7] - J[4] * J[6]))


@triton.jit
def _cofactor_column(J, j: tl.constexpr, NDIM: tl.constexpr):
    """(d det / d J[i][j]) for i < NDIM."""
    if NDIM == 2:
        if j == 0:
            return (J[3], -J[1])
        else:
            return (-J[2], J[0])
    else:
        j1: tl.constexpr = (j + 1) % 3
        j2: tl.constexpr = (j + 2) % 3
        cof = ()
        for i in tl.static_range(3):
            i1: tl.constexpr = (i + 1) % 3
            i2: tl.constexpr = (i + 2) % 3
            cof = cof + (J[i1 * 3 + j1] * J[i2 * 3 + j2] - J[i1 * 3 + j2] * J[i2 * 3 + j1],)
        return cof


@triton.jit
def _geometry(S0, S1, S2, H0, H1, H2, NDIM: tl.constexpr):
    if NDIM == 3:
        return (S0, S1, S2), (S1 * S2, S2, 1), (H0, H1, H2)
    else:
        return (S0, S1), (S1, 1), (H0, H1)


@triton.jit
def _program_voxels(n, S1, S2, NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """Batch item (int64), flat voxel indices, their mask and coordinates of this program."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    return b, offs, mask, _coords(offs, S1, S2, NDIM)


@triton.jit
def _jacobian_fwd_kernel(
    u_ptr, det_ptr, n, S0, S1, S2, H0, H1, H2,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(n, BLOCK), B): det[b, voxel] for BLOCK voxels of batch item b."""
    sizes, strides, inv_hs = _geometry(S0, S1, S2, H0, H1, H2, NDIM)
    b, offs, mask, xs = _program_voxels(n, S1, S2, NDIM, IDX64, BLOCK)
    J = _jacobian(u_ptr + b * NDIM * n, offs, xs, sizes, strides, inv_hs, n, mask, NDIM)
    det = _determinant(J, NDIM)
    tl.store(det_ptr + b * n + offs, det.to(det_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jacobian_bwd_kernel(
    g_ptr, u_ptr, gu_ptr, n, S0, S1, S2, H0, H1, H2,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(n, BLOCK), B): grad_u[b, :, y] for BLOCK voxels y, gathered from y and its
    neighbours y -/+ e_j (jacobian.h backward_voxel)."""
    sizes, strides, inv_hs = _geometry(S0, S1, S2, H0, H1, H2, NDIM)
    b, offs, mask, xs = _program_voxels(n, S1, S2, NDIM, IDX64, BLOCK)
    ub = u_ptr + b * NDIM * n
    gb = g_ptr + b * n
    acc = ()
    for i in tl.static_range(NDIM):
        acc = acc + (tl.zeros([BLOCK], dtype=tl.float32),)
    # y's own differences read u(y) at the borders only: -1 at index 0, +1 at index s - 1.
    J = _jacobian(ub, offs, xs, sizes, strides, inv_hs, n, mask, NDIM)
    g0 = tl.load(gb + offs, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(NDIM):
        s = sizes[j]
        m = xs[j]
        c = tl.where((m == 0) & (m < s - 1), -1.0, tl.where((m == s - 1) & (m > 0), 1.0, 0.0))
        # Where c is 0 the cofactor term is skipped, not multiplied (it may be inf or NaN).
        on = mask & (c != 0.0)
        c = c * inv_hs[j] * g0
        cof = _cofactor_column(J, j, NDIM)
        acc2 = ()
        for i in tl.static_range(NDIM):
            acc2 = acc2 + (acc[i] + tl.where(on, c * cof[i], 0.0),)
        acc = acc2
    # The neighbours x = y -/+ e_j read u(y) with weight +/-1/2 (central) or +/-1 (x at the
    # border, one-sided).
    for j in tl.static_range(NDIM):
        s = sizes[j]
        m = xs[j]
        for side in tl.static_range(2):
            if side == 0:
                mx = m - 1
                x = offs - strides[j]
                sign = 1.0
            else:
                mx = m + 1
                x = offs + strides[j]
                sign = -1.0
            on = mask & (mx >= 0) & (mx <= s - 1)  # never along an axis of size 1
            border = (mx == 0) | (mx == s - 1)
            g = tl.load(gb + x, mask=on, other=0.0).to(tl.float32)
            c = sign * tl.where(border, 1.0, 0.5) * inv_hs[j] * g
            xn = ()
            for k in tl.static_range(NDIM):
                if k == j:
                    xn = xn + (mx,)
                else:
                    xn = xn + (xs[k],)
            Jn = _jacobian(ub, x, xn, sizes, strides, inv_hs, n, on, NDIM)
            cof = _cofactor_column(Jn, j, NDIM)
            acc2 = ()
            for i in tl.static_range(NDIM):
                acc2 = acc2 + (acc[i] + tl.where(on, c * cof[i], 0.0),)
            acc = acc2
    out = gu_ptr + b * NDIM * n + offs
    for i in tl.static_range(NDIM):
        tl.store(out, acc[i].to(gu_ptr.dtype.element_ty), mask=mask)
        out += n


# --------------------------------------------------------------------------------------
# Launchers (inputs validated upstream, in mrus_kernels/jacobian.py)
# --------------------------------------------------------------------------------------


def _launch(u: torch.Tensor, inv_h: list[float]):
    ndim = u.shape[1]
    assert ndim in (2, 3) and u.dim() == ndim + 2 and len(inv_h) == ndim
    assert u.dtype in _DTYPES and u.is_contiguous()
    n = math.prod(u.shape[2:])
    sizes = list(u.shape[2:]) + [1] * (3 - ndim)
    hs = [float(h) for h in inv_h] + [1.0] * (3 - ndim)
    block = BLOCK_3D if ndim == 3 else BLOCK_2D
    # Neighbour offsets reach one stride beyond the volume; the last block's lanes n + block.
    idx64 = ndim * n + block + n > _INT32_MAX
    assert u.shape[0] <= _MAX_GRID_Y
    grid = (triton.cdiv(n, block), u.shape[0])
    return grid, (n, *sizes, *hs), dict(NDIM=ndim, IDX64=idx64, BLOCK=block, num_warps=4)


def jacobian_forward(u: torch.Tensor, det: torch.Tensor, inv_h: list[float]) -> None:
    """det[b](x) = det(I + ∇u[b](x)).

    Args:
        u: [B, ndim, *S], contiguous, float32/float16/bfloat16.
        det: [B, *S], contiguous, u's dtype; every element is written.
        inv_h: 1 / spacing per axis (ndim floats).
    """
    assert det.is_contiguous() and det.dtype == u.dtype
    assert det.shape == (u.shape[0], *u.shape[2:])
    grid, args, meta = _launch(u, inv_h)
    _jacobian_fwd_kernel[grid](u, det, *args, **meta)


def jacobian_backward(grad_det: torch.Tensor, u: torch.Tensor, grad_u: torch.Tensor,
                      inv_h: list[float]) -> None:
    """grad_u = d (sum grad_det * det) / d u, every element written once.

    Args:
        grad_det: [B, *S], contiguous, u's dtype.
        u: as in jacobian_forward.
        grad_u: [B, ndim, *S], contiguous, u's dtype.
        inv_h: as in jacobian_forward.
    """
    assert grad_det.is_contiguous() and grad_det.dtype == u.dtype
    assert grad_det.shape == (u.shape[0], *u.shape[2:])
    assert grad_u.is_contiguous() and grad_u.dtype == u.dtype and grad_u.shape == u.shape
    grid, args, meta = _launch(u, inv_h)
    _jacobian_bwd_kernel[grid](grad_det, u, grad_u, *args, **meta)
