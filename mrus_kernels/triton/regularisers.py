"""Triton kernels of the regularisers (math of csrc/include/regularisers.h, reproduced here).

One program per BLOCK voxels of one item, the blocks of all items on grid axis 0 (program k:
item k // blocks, so the batch meets no 65535 limit of axes 1 and 2). The forward writes one
partial sum per program, [B, blocks], which the caller adds in fixed order (deterministic,
no atomics), reading u with its stencil neighbours straight from memory (cache hits). The
gradient of grad_l2 is one pass; that of harmonic_energy writes the Laplacian once into a
scratch of u's size, then applies its adjoint stencil (7 loads per voxel in 3D instead of
recomputing the 7-point Laplacian at each of the 7 voxels it reaches: 49). The gradients of
bending_energy and diffusion are one pass that recomputes each stencil at the interior
centres reaching the voxel (a scratch would need one volume per term: six for 3D bending).
Each gradient element is written once.

Offsets: batch offsets are int64; offsets inside one item ([C, *S]) are int32 unless an item
is near 2**31 elements (IDX64, decided by ``_common.needs_idx64``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._blocks import item_block_offsets

GRAD_L2, HARMONIC, BENDING, DIFFUSION = 0, 1, 2, 3
BLOCK = 256
_OP_NAMES = {
    GRAD_L2: "grad_l2 (triton)", HARMONIC: "harmonic_energy (triton)",
    BENDING: "bending_energy (triton)", DIFFUSION: "diffusion (triton)",
}


@triton.jit
def _load(u, off, ok):
    return tl.load(u + off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _lap(u, off, ok, s0, s1, s2, NDIM: tl.constexpr):
    c = _load(u, off, ok)
    s = (
        _load(u, off + s1, ok) + _load(u, off - s1, ok)
        + _load(u, off + s2, ok) + _load(u, off - s2, ok)
    )
    if NDIM == 3:
        s += _load(u, off + s0, ok) + _load(u, off - s0, ok)
    return s - 2.0 * NDIM * c


@triton.jit
def _second(u, off, ok, s):
    """u(x + s) − 2u(x) + u(x − s); 0 where ok is false."""
    return _load(u, off + s, ok) + _load(u, off - s, ok) - 2.0 * _load(u, off, ok)


@triton.jit
def _cross(u, off, ok, si, sj):
    """u(x + si + sj) − u(x + si − sj) − u(x − si + sj) + u(x − si − sj); 0 where not ok."""
    return (_load(u, off + si + sj, ok) - _load(u, off + si - sj, ok)) - (
        _load(u, off - si + sj, ok) - _load(u, off - si - sj, ok)
    )


@triton.jit
def _central(u, off, ok, s):
    """u(x + s) − u(x − s); 0 where ok is false."""
    return _load(u, off + s, ok) - _load(u, off - s, ok)


@triton.jit
def _interior(x0, x1, x2, n0, n1, n2, NDIM: tl.constexpr):
    inside = (x1 >= 1) & (x1 <= n1 - 2) & (x2 >= 1) & (x2 <= n2 - 2)
    if NDIM == 3:
        inside = inside & (x0 >= 1) & (x0 <= n0 - 2)
    return inside


@triton.jit
def _program_voxels(per_item, blocks, n0, n1, n2, s0, IDX64: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Offsets (int64) into [B, C, *S], mask and coordinates of this program's voxels
    (program k: block k % blocks of item k // blocks); item b's C channels are stacked along
    axis 0, so x0 is taken modulo n0."""
    b, idx = item_block_offsets(blocks, IDX64, BLOCK)
    ok = idx < per_item
    x2 = idx % n2
    x1 = (idx // n2) % n1
    x0 = (idx // s0) % n0
    return b, b * per_item + idx, ok, x0, x1, x2


@triton.jit
def _reg_fwd_kernel(
    u, out, per_item, blocks, n0, n1, n2, s0, w0, w1, w2, x0w, x1w, x2w,
    KIND: tl.constexpr, NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (B * blocks,): out[program] = the energy of its BLOCK voxels. w0..w2: the axis
    weights of grad_l2 / bending / diffusion; x0w..x2w: bending's mixed-term weights, pair
    (i, j) at the axis it leaves out (HW 0, DW 1, DH 2)."""
    b, off, ok, x0, x1, x2 = _program_voxels(per_item, blocks, n0, n1, n2, s0, IDX64, BLOCK)
    s1 = n2
    if KIND == 2:
        inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
        d = _second(u, off, inside, 1)
        e = w2 * d * d
        d = _second(u, off, inside, s1)
        e += w1 * d * d
        m = _cross(u, off, inside, s1, 1)
        e += x0w * m * m
        if NDIM == 3:
            d = _second(u, off, inside, s0)
            e += w0 * d * d
            m = _cross(u, off, inside, s0, 1)
            e += x1w * m * m
            m = _cross(u, off, inside, s0, s1)
            e += x2w * m * m
        e = tl.where(inside, e, 0.0)
    elif KIND == 3:
        inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
        d = _central(u, off, inside, 1)
        e = w2 * d * d
        d = _central(u, off, inside, s1)
        e += w1 * d * d
        if NDIM == 3:
            d = _central(u, off, inside, s0)
            e += w0 * d * d
        e = tl.where(inside, e, 0.0)
    elif KIND == 1:
        inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
        lap = _lap(u, off, inside, s0, s1, 1, NDIM)
        e = tl.where(inside, lap * lap, 0.0)
    else:
        c = _load(u, off, ok)
        hi = ok & (x2 <= n2 - 2)
        dd = tl.where(hi, _load(u, off + 1, hi) - c, 0.0)
        e = w2 * dd * dd
        hi = ok & (x1 <= n1 - 2)
        dd = tl.where(hi, _load(u, off + s1, hi) - c, 0.0)
        e += w1 * dd * dd
        if NDIM == 3:
            hi = ok & (x0 <= n0 - 2)
            dd = tl.where(hi, _load(u, off + s0, hi) - c, 0.0)
            e += w0 * dd * dd
    tl.store(out + tl.program_id(0), tl.sum(e, 0))


@triton.jit
def _grad_l2_bwd_kernel(
    u, scale, grad, per_item, blocks, n0, n1, n2, s0, w0, w1, w2,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (B * blocks,): grad = scale[b] · ∂E_b/∂u for grad_l2, one pass."""
    b, off, ok, x0, x1, x2 = _program_voxels(per_item, blocks, n0, n1, n2, s0, IDX64, BLOCK)
    s1 = n2
    sc = tl.load(scale + b).to(tl.float32)
    c = _load(u, off, ok)
    g = tl.zeros([BLOCK], tl.float32)
    lo = ok & (x2 >= 1)
    hi = ok & (x2 <= n2 - 2)
    t = tl.where(lo, c - _load(u, off - 1, lo), 0.0) - tl.where(
        hi, _load(u, off + 1, hi) - c, 0.0
    )
    g += 2.0 * w2 * t
    lo = ok & (x1 >= 1)
    hi = ok & (x1 <= n1 - 2)
    t = tl.where(lo, c - _load(u, off - s1, lo), 0.0) - tl.where(
        hi, _load(u, off + s1, hi) - c, 0.0
    )
    g += 2.0 * w1 * t
    if NDIM == 3:
        lo = ok & (x0 >= 1)
        hi = ok & (x0 <= n0 - 2)
        t = tl.where(lo, c - _load(u, off - s0, lo), 0.0) - tl.where(
            hi, _load(u, off + s0, hi) - c, 0.0
        )
        g += 2.0 * w0 * t
    tl.store(grad + off, sc * g, mask=ok)


@triton.jit
def _laplacian_kernel(
    u, lap, per_item, blocks, n0, n1, n2, s0,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Harmonic backward pass 1, grid (B * blocks,): lap = ∇²u on interior voxels, 0
    elsewhere (every element written)."""
    b, off, ok, x0, x1, x2 = _program_voxels(per_item, blocks, n0, n1, n2, s0, IDX64, BLOCK)
    inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
    value = _lap(u, off, inside, s0, n2, 1, NDIM)
    tl.store(lap + off, tl.where(inside, value, 0.0), mask=ok)


@triton.jit
def _harmonic_bwd_kernel(
    lap, scale, grad, per_item, blocks, n0, n1, n2, s0,
    NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Harmonic backward pass 2, grid (B * blocks,): grad = scale[b] · 2 Σ_y L(y) ∂L(y)/∂u
    over y = x and its neighbours, reading lap at interior voxels only."""
    b, off, ok, x0, x1, x2 = _program_voxels(per_item, blocks, n0, n1, n2, s0, IDX64, BLOCK)
    s1 = n2
    sc = tl.load(scale + b).to(tl.float32)
    inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
    g = tl.where(inside, -2.0 * NDIM * _load(lap, off, inside), 0.0)
    m = ok & _interior(x0, x1 + 1, x2, n0, n1, n2, NDIM)
    g += tl.where(m, _load(lap, off + s1, m), 0.0)
    m = ok & _interior(x0, x1 - 1, x2, n0, n1, n2, NDIM)
    g += tl.where(m, _load(lap, off - s1, m), 0.0)
    m = ok & _interior(x0, x1, x2 + 1, n0, n1, n2, NDIM)
    g += tl.where(m, _load(lap, off + 1, m), 0.0)
    m = ok & _interior(x0, x1, x2 - 1, n0, n1, n2, NDIM)
    g += tl.where(m, _load(lap, off - 1, m), 0.0)
    if NDIM == 3:
        m = ok & _interior(x0 + 1, x1, x2, n0, n1, n2, NDIM)
        g += tl.where(m, _load(lap, off + s0, m), 0.0)
        m = ok & _interior(x0 - 1, x1, x2, n0, n1, n2, NDIM)
        g += tl.where(m, _load(lap, off - s0, m), 0.0)
    g = 2.0 * g
    tl.store(grad + off, sc * g, mask=ok)


@triton.jit
def _axis_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, a0, a1, a2, s,
                  KIND: tl.constexpr, NDIM: tl.constexpr):
    """Σ_k c_k [x − o_k interior] S(x − o_k) for the axis term along the unit step
    (a0, a1, a2) of stride s: bending's [1, −2, 1] (KIND 2) or the central difference."""
    m = ok & _interior(x0 - a0, x1 - a1, x2 - a2, n0, n1, n2, NDIM)
    p = ok & _interior(x0 + a0, x1 + a1, x2 + a2, n0, n1, n2, NDIM)
    if KIND == 2:
        c = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
        t = _second(u, off - s, m, s) + _second(u, off + s, p, s) - 2.0 * _second(u, off, c, s)
    else:
        # u(x) enters D(x − s) with +1 and D(x + s) with −1.
        t = _central(u, off - s, m, s) - _central(u, off + s, p, s)
    return t


@triton.jit
def _cross_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, a0, a1, a2, si, b0, b1, b2, sj,
                   NDIM: tl.constexpr):
    """Σ over the centres y = x + p e_i + q e_j (p, q = ±1) of p q [y interior] M_ij(y)."""
    m = ok & _interior(x0 + a0 + b0, x1 + a1 + b1, x2 + a2 + b2, n0, n1, n2, NDIM)
    t = _cross(u, off + si + sj, m, si, sj)
    m = ok & _interior(x0 + a0 - b0, x1 + a1 - b1, x2 + a2 - b2, n0, n1, n2, NDIM)
    t -= _cross(u, off + si - sj, m, si, sj)
    m = ok & _interior(x0 - a0 + b0, x1 - a1 + b1, x2 - a2 + b2, n0, n1, n2, NDIM)
    t -= _cross(u, off - si + sj, m, si, sj)
    m = ok & _interior(x0 - a0 - b0, x1 - a1 - b1, x2 - a2 - b2, n0, n1, n2, NDIM)
    t += _cross(u, off - si - sj, m, si, sj)
    return t


@triton.jit
def _stencil_bwd_kernel(
    u, scale, grad, per_item, blocks, n0, n1, n2, s0, w0, w1, w2, x0w, x1w, x2w,
    KIND: tl.constexpr, NDIM: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (B * blocks,): grad = scale[b] · ∂E_b/∂u for bending (KIND 2) / diffusion (3),
    one pass: ∂E/∂u(x) = Σ_t 2 w_t Σ_k c_k [x − o_k interior] S_t(x − o_k)
    (csrc/include/regularisers.h stencil_grad), masked loads giving 0 off the interior."""
    b, off, ok, x0, x1, x2 = _program_voxels(per_item, blocks, n0, n1, n2, s0, IDX64, BLOCK)
    s1 = n2
    sc = tl.load(scale + b).to(tl.float32)
    g = w2 * _axis_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, 0, 0, 1, 1, KIND, NDIM)
    g += w1 * _axis_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, 0, 1, 0, s1, KIND, NDIM)
    if NDIM == 3:
        g += w0 * _axis_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, 1, 0, 0, s0, KIND, NDIM)
    if KIND == 2:
        g += x0w * _cross_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, 0, 1, 0, s1, 0, 0, 1, 1,
                                  NDIM)
        if NDIM == 3:
            g += x1w * _cross_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, 1, 0, 0, s0, 0, 0, 1,
                                      1, NDIM)
            g += x2w * _cross_adjoint(u, off, ok, x0, x1, x2, n0, n1, n2, 1, 0, 0, s0, 0, 1, 0,
                                      s1, NDIM)
    tl.store(grad + off, (2.0 * sc) * g, mask=ok)


# --------------------------------------------------------------------------------------
# Launchers. mrus_kernels/regularisers.py guarantees what the kernels assume: u [B, C, *S]
# contiguous float32, 2 or 3 spatial axes, each >= 2 (grad_l2) or >= 3 (the others); scale
# [B] and grad contiguous, u's dtype.
# --------------------------------------------------------------------------------------


def _launch(u: torch.Tensor, kind: int):
    """Grid, geometry arguments (per_item, blocks, n0, n1, n2, s0) and meta-params."""
    ndim = u.dim() - 2
    n0, n1, n2 = (u.shape[2:] if ndim == 3 else (1, *u.shape[2:]))
    per_item = u[0].numel()
    blocks = triton.cdiv(per_item, BLOCK)
    # Offsets inside one item (masked lanes included) stay below per_item + BLOCK plus one
    # stride along axis 0 (n1 * n2); the batch offset is int64 in every variant.
    idx64 = _common.needs_idx64(per_item + BLOCK + n1 * n2)
    grid = _common.check_grid(_OP_NAMES[kind], (u.shape[0] * blocks,), ("B * voxel blocks",))
    meta = dict(NDIM=ndim, IDX64=idx64, BLOCK=BLOCK)
    return grid, (per_item, blocks, n0, n1, n2, n1 * n2), meta


def _weights(u: torch.Tensor, kind: int, wt: list[float]) -> tuple[float, ...]:
    """(w0, w1, w2, x0w, x1w, x2w): axis weights in (D, H, W) order, then bending's pair
    weights by the axis each pair leaves out. wt: ndim axis weights (then, for bending, one
    per axis pair i < j in order), as mrus_kernels.regularisers._weights gives them."""
    w = [float(x) for x in wt]
    axes = (w[0], w[1], w[2]) if u.dim() == 5 else (0.0, w[0], w[1])
    pairs = (0.0, 0.0, 0.0)
    if kind == BENDING:
        # 3D pairs (0, 1), (0, 2), (1, 2) leave out axes 2, 1, 0; 2D's pair (H, W) axis 0.
        pairs = (w[5], w[4], w[3]) if u.dim() == 5 else (w[2], 0.0, 0.0)
    return (*axes, *pairs)


def forward(u: torch.Tensor, kind: int, wt: list[float]) -> torch.Tensor:
    """Per-item energies [B] (float32) of contiguous float32 u [B, C, *S].

    Args:
        u: [B, C, *S], contiguous float32.
        kind: GRAD_L2, HARMONIC, BENDING or DIFFUSION.
        wt: the term weights of mrus_kernels.regularisers._weights (unused for HARMONIC).
    """
    grid, geometry, meta = _launch(u, kind)
    partials = torch.empty((u.shape[0], geometry[1]), dtype=torch.float32, device=u.device)
    _reg_fwd_kernel[grid](u, partials, *geometry, *_weights(u, kind, wt), KIND=kind, **meta)
    return partials.sum(1)


def backward(u: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, kind: int,
             wt: list[float]) -> None:
    """grad = d(Σ_b scale[b] E_b)/du, every element written.

    Args:
        u: as in forward.
        scale: [B], contiguous float32.
        grad: like u; written.
        kind, wt: as in forward.
    """
    grid, geometry, meta = _launch(u, kind)
    if kind == HARMONIC:
        lap = torch.empty_like(u)  # written whole by pass 1, no host sync
        _laplacian_kernel[grid](u, lap, *geometry, **meta)
        _harmonic_bwd_kernel[grid](lap, scale, grad, *geometry, **meta)
    elif kind in (BENDING, DIFFUSION):
        _stencil_bwd_kernel[grid](u, scale, grad, *geometry, *_weights(u, kind, wt), KIND=kind,
                                  **meta)
    else:
        _grad_l2_bwd_kernel[grid](u, scale, grad, *geometry, *_weights(u, kind, wt)[:3], **meta)
