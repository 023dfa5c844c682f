"""Triton kernels of the jacobian_det operator: det(I + ∇u) of the map x + u(x).

The per-voxel semantics are those of csrc/include/jacobian.h (shared by the CPU and CUDA
kernels): d u_i / d x_j by central differences inside, one-sided differences at the two
borders, 0 along an axis of size 1, each times 1 / spacing_j. The backward runs in two
passes, as on CUDA: P_ij = g · cof_ij / h_j once per voxel into a float32 scratch
[B, ndim * ndim, *S], then a gather over the adjoint stencil (voxel y collects from P at
itself and at its two neighbours along each axis): each gradient element has a single
writer, there are no atomics, and a voxel costs ~27 loads in 3D instead of the ~126 of
recomputing the cofactors of every neighbour.

One program per BLOCK voxels of one batch item, the blocks of all items on grid axis 0
(program k: item k // blocks, so the batch meets no 65535 limit of axes 1 and 2). Batch and
component offsets are 64-bit; offsets inside one volume are int32 unless a volume is near
2**31 elements (IDX64, decided by ``_common.needs_idx64``). All arithmetic is float32
(inputs float32, float16 or bfloat16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._blocks import item_block_offsets

BLOCK_2D = 256
BLOCK_3D = 128  # a 3D voxel holds 9 Jacobian entries and 3 cofactors: fewer per program


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
    comp = tl.cast(n, tl.int64)  # component offsets i * n: ndim * n may pass 2**31
    J = ()
    for i in tl.static_range(NDIM):
        for j in tl.static_range(NDIM):
            d = _difference(u_ptr + i * comp, offs, xs[j], sizes[j], strides[j], inv_hs[j], mask)
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
        # Rows (i + 1) % 3 and (i + 2) % 3 written out: a constexpr assigned inside a
        # static_range loop is a reassignment, which the compiler (not the interpreter)
        # rejects.
        cof = ()
        for i in tl.static_range(3):
            cof = cof + (
                J[((i + 1) % 3) * 3 + j1] * J[((i + 2) % 3) * 3 + j2]
                - J[((i + 1) % 3) * 3 + j2] * J[((i + 2) % 3) * 3 + j1],
            )
        return cof


@triton.jit
def _geometry(S0, S1, S2, NDIM: tl.constexpr):
    """Sizes and strides per axis (axis 0 first)."""
    if NDIM == 3:
        return (S0, S1, S2), (S1 * S2, S2, 1)
    else:
        return (S0, S1), (S1, 1)


@triton.jit
def _inv_spacing(H0, H1, H2, NDIM: tl.constexpr):
    if NDIM == 3:
        return (H0, H1, H2)
    else:
        return (H0, H1)


@triton.jit
def _program_voxels(n, blocks, S1, S2, NDIM: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Batch item (int64), flat voxel indices, their mask and coordinates of this program
    (program k: block k % blocks of item k // blocks)."""
    b, offs = item_block_offsets(blocks, IDX64, BLOCK)
    mask = offs < n
    return b, offs, mask, _coords(offs, S1, S2, NDIM)


@triton.jit
def _jacobian_fwd_kernel(
    u_ptr, det_ptr, n, blocks, S0, S1, S2, H0, H1, H2,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (B * blocks,): det[b, voxel] for BLOCK voxels of batch item b."""
    sizes, strides = _geometry(S0, S1, S2, NDIM)
    inv_hs = _inv_spacing(H0, H1, H2, NDIM)
    b, offs, mask, xs = _program_voxels(n, blocks, S1, S2, NDIM, IDX64, BLOCK)
    J = _jacobian(u_ptr + b * NDIM * n, offs, xs, sizes, strides, inv_hs, n, mask, NDIM)
    det = _determinant(J, NDIM)
    tl.store(det_ptr + b * n + offs, det.to(det_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jacobian_cof_kernel(
    g_ptr, u_ptr, p_ptr, n, blocks, S0, S1, S2, H0, H1, H2,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward pass 1, grid (B * blocks,): P[b, i * NDIM + j, x] = (g(x) / h_j) cof_ij(x)
    (jacobian.h weighted_cofactors_voxel), float32."""
    sizes, strides = _geometry(S0, S1, S2, NDIM)
    inv_hs = _inv_spacing(H0, H1, H2, NDIM)
    b, offs, mask, xs = _program_voxels(n, blocks, S1, S2, NDIM, IDX64, BLOCK)
    J = _jacobian(u_ptr + b * NDIM * n, offs, xs, sizes, strides, inv_hs, n, mask, NDIM)
    g = tl.load(g_ptr + b * n + offs, mask=mask, other=0.0).to(tl.float32)
    comp = tl.cast(n, tl.int64)
    pb = p_ptr + b * (NDIM * NDIM) * n + offs
    for j in tl.static_range(NDIM):
        c = inv_hs[j] * g
        cof = _cofactor_column(J, j, NDIM)
        for i in tl.static_range(NDIM):
            tl.store(pb + (i * NDIM + j) * comp, c * cof[i], mask=mask)


@triton.jit
def _jacobian_adj_kernel(
    p_ptr, gu_ptr, n, blocks, S0, S1, S2,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward pass 2, grid (B * blocks,): grad_u[b, :, y] for BLOCK voxels y, gathered
    from P at y and at its neighbours y -/+ e_j (jacobian.h adjoint_voxel). Terms of weight
    0 are skipped, not multiplied (P may be inf or NaN there)."""
    sizes, strides = _geometry(S0, S1, S2, NDIM)
    b, offs, mask, xs = _program_voxels(n, blocks, S1, S2, NDIM, IDX64, BLOCK)
    comp = tl.cast(n, tl.int64)
    pb = p_ptr + b * (NDIM * NDIM) * n
    acc = ()
    for i in tl.static_range(NDIM):
        acc = acc + (tl.zeros([BLOCK], dtype=tl.float32),)
    # y's own differences read u(y) at the borders only: -1 at index 0, +1 at index s - 1.
    for j in tl.static_range(NDIM):
        s = sizes[j]
        m = xs[j]
        c = tl.where((m == 0) & (m < s - 1), -1.0, tl.where((m == s - 1) & (m > 0), 1.0, 0.0))
        on = mask & (c != 0.0)
        acc2 = ()
        for i in tl.static_range(NDIM):
            p = tl.load(pb + (i * NDIM + j) * comp + offs, mask=on, other=0.0)
            acc2 = acc2 + (acc[i] + tl.where(on, c * p, 0.0),)
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
            w = sign * tl.where((mx == 0) | (mx == s - 1), 1.0, 0.5)
            acc2 = ()
            for i in tl.static_range(NDIM):
                p = tl.load(pb + (i * NDIM + j) * comp + x, mask=on, other=0.0)
                acc2 = acc2 + (acc[i] + tl.where(on, w * p, 0.0),)
            acc = acc2
    out = gu_ptr + b * NDIM * n + offs
    for i in tl.static_range(NDIM):
        tl.store(out + i * comp, acc[i].to(gu_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers. mrus_kernels/jacobian.py validates and guarantees what the kernels assume: u
# [B, ndim, *S] contiguous, ndim 2 or 3, float32/float16/bfloat16, not empty; det, grad_det
# and grad_u contiguous, u's dtype, their shapes.
# --------------------------------------------------------------------------------------


def _launch(u: torch.Tensor, inv_h: list[float]):
    """Grid, geometry arguments (n, blocks, S0, S1, S2), 1 / spacing (3) and meta-params."""
    ndim = u.shape[1]
    n = math.prod(u.shape[2:])
    sizes = list(u.shape[2:]) + [1] * (3 - ndim)
    hs = [float(h) for h in inv_h] + [1.0] * (3 - ndim)
    block = BLOCK_3D if ndim == 3 else BLOCK_2D
    blocks = triton.cdiv(n, block)
    # Lane offsets inside one volume (masked lanes included) stay below n + BLOCK plus one
    # stride (<= n); batch and component offsets are int64 in every variant.
    idx64 = _common.needs_idx64(2 * n + block)
    grid = _common.check_grid(
        "jacobian_det (triton)", (u.shape[0] * blocks,), ("B * voxel blocks",)
    )
    return grid, (n, blocks, *sizes), hs, dict(NDIM=ndim, IDX64=idx64, BLOCK=block, num_warps=4)


def jacobian_forward(u: torch.Tensor, det: torch.Tensor, inv_h: list[float]) -> None:
    """det[b](x) = det(I + ∇u[b](x)).

    Args:
        u: [B, ndim, *S], contiguous, float32/float16/bfloat16.
        det: [B, *S], contiguous, u's dtype; every element is written.
        inv_h: 1 / spacing per axis (ndim floats).
    """
    grid, geometry, hs, meta = _launch(u, inv_h)
    _jacobian_fwd_kernel[grid](u, det, *geometry, *hs, **meta)


def jacobian_backward(grad_det: torch.Tensor, u: torch.Tensor, grad_u: torch.Tensor,
                      inv_h: list[float]) -> None:
    """grad_u = d (sum grad_det * det) / d u, every element written once.

    Two passes over a float32 scratch P [B, ndim * ndim, *S] allocated here (no host sync).

    Args:
        grad_det: [B, *S], contiguous, u's dtype.
        u: as in jacobian_forward.
        grad_u: [B, ndim, *S], contiguous, u's dtype.
        inv_h: as in jacobian_forward.
    """
    grid, geometry, hs, meta = _launch(u, inv_h)
    ndim = u.shape[1]
    scratch = torch.empty(
        (u.shape[0], ndim * ndim, *u.shape[2:]), dtype=torch.float32, device=u.device
    )
    _jacobian_cof_kernel[grid](grad_det, u, scratch, *geometry, *hs, **meta)
    _jacobian_adj_kernel[grid](scratch, grad_u, *geometry, **meta)
