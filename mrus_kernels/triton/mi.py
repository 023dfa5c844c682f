"""Triton kernels of the Parzen-window mutual information operator.

The joint histogram is a matrix product: per tile of BLOCK_V voxels, the Parzen weight tiles
W_f, W_g ([BLOCK_V, KP], K bins padded to a power of two KP >= 16) are built in registers
and ``W_f^T W_g`` ([KP, KP]) accumulates on tensor cores into the program's private
histogram; each program writes its partial histogram once and the launcher's caller sums the
partials over programs in a fixed order. No atomics: deterministic by construction, and
nothing of size voxels x K leaves the registers.

The backward is the same shape per voxel tile: R = W_g G^T and S = W_f G (G = dL/dhist),
then dL/df = m * sum_a dW_f * R and dL/dg = m * sum_b dW_g * S.

Precision of the products (3xTF32): each operand x is split into hi = tf32(x) and
lo = tf32(x - hi), both exactly representable in TF32, and a b is taken as
lo_a hi_b + hi_a lo_b + hi_a hi_b (three TF32 tensor-core products, fp32 accumulation).
The dropped lo_a lo_b and the rounding of lo leave about 2**-21 relative per product, near
float32; one TF32 product alone (2**-11 per operand) puts ~1e-4 relative into histogram
entries and ~5e-6 into MI (measured against float64), too close to the float32 tolerance
of 1e-5 and far outside it for gradients. The split is written out rather than asked of
``tl.dot(input_precision="tf32x3")`` so that the interpreter, whose ``tl.dot`` is a float32
NumPy matmul whatever the precision, computes the same operands as the GPU and the tests
measure the error of the GPU's arithmetic.

Non-finite input (the same rule as csrc/include/mi.h and reference.joint_histogram): a
voxel with mask != 0 whose value or range gives a non-finite bin coordinate, or whose mask
is NaN, makes its item's whole histogram NaN (each program that meets one stores NaN in
every entry of its partial) and its own gradient NaN; the voxel contributes no weights to
the products, so no NaN * 0 pattern depends on where it sits.

The weights are those of csrc/include/mi.h (same definition, same Gaussian relative to the
nearest bin), computed densely over all K bins instead of in a window: the bins the C++
kernels drop weigh less than 2**-24 of the largest, far inside the float32 tolerance. All
arithmetic is float32 (the Python layer converts half inputs).

Offsets: int32 unless an item offset or a partial-histogram offset can pass
``_common.IDX64_THRESHOLD`` (the IDX64 variants widen to int64 before multiplying). The
batch shares grid axis 0 with the programs of an item (axis 0 takes 2**31 - 1 programs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _common

GAUSSIAN = 0
BSPLINE = 1

# Bin counts the kernels take (padded to KP = next power of two, at least 16: tl.dot's
# smallest tile side).
KP_VALUES = (16, 32, 64, 128)


class Config(NamedTuple):
    """Voxels per tile, warps, tiles per program (backward) and software-pipeline stages of
    one kernel variant."""

    block_v: int
    num_warps: int
    tiles: int = 1
    # One stage: the loops are bound by the weights' arithmetic, not by their loads, and
    # Triton's default of 3 keeps more tiles in flight than the registers hold (ptxas spilled
    # 8-24 bytes on sm_90 in some KP = 16 / 32 forward and KP = 64 backward variants).
    num_stages: int = 1
    # The register ceiling handed to ptxas (.maxnreg): without it, ptxas 13 for sm_90 aims
    # at 128 or 168 registers and spilled 4-8 bytes in a few backward variants; with it,
    # every variant fits without spills (they use 100-240).
    maxnreg: int = 255


# Chosen so that no variant spills on sm_80 or sm_90 and each fits the architecture's
# shared memory (ptxas -v on every variant: benchmarks/compile_gate.py). The forward
# holds a [KP, KP] fp32 accumulator and two [BLOCK_V, KP] weight tiles with their hi / lo
# halves. The backward keeps G's halves (loop-invariant dot operands, shared memory) over
# TILES tiles of BLOCK_V voxels, so G is loaded and split once per TILES * BLOCK_V voxels.
FWD_CONFIG = {16: Config(64, 4), 32: Config(64, 4), 64: Config(32, 4), 128: Config(16, 8)}
BWD_CONFIG = {16: Config(64, 4, 8), 32: Config(32, 4, 16), 64: Config(16, 4, 32),
              128: Config(16, 8, 16)}
# From this KP on, a backward that needs both gradients runs as two launches (dL/df, then
# dL/dg): one launch would hold G and G^T in two shared-memory layouts, 272 KiB at KP = 128,
# above sm_90's 227 KiB per block.
BWD_SPLIT_KP = 128


@triton.jit
def _to_tf32(x):
    """x rounded to the nearest TF32 value (10 explicit mantissa bits, ties away from 0)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split(x):
    """(hi, lo) with hi + lo = x to about 2**-22 relative, both exact in TF32."""
    hi = _to_tf32(x)
    return hi, _to_tf32(x - hi)


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc):
    """acc + a b in 3xTF32 (small terms first)."""
    acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _parzen(x, lo, hi, K, KP: tl.constexpr, KERNEL: tl.constexpr, inv_2s2, NEED_D: tl.constexpr):
    """Weights W [BV, KP] (0 beyond K), dW/dx [BV, KP] if NEED_D (0 where clamped), and ok
    [BV]: the bin coordinate is finite (mi.h bin_coord); where it is not, W = dW = 0."""
    w = (hi - lo) / K
    w = tl.where(w >= 1e-12, w, 1e-12)
    inside = (x >= lo) & (x <= hi)
    # Comparisons, not minimum/maximum: a NaN value stays NaN and fails `ok` below.
    xc = tl.where(x < lo, lo, tl.where(x > hi, hi, x))
    s = (xc - lo) / w - 0.5
    # The range test is broadcast to a tensor first (the interpreter cannot `&` a scalar
    # boolean with a tensor of them).
    ok = (s >= -0.501) & (s <= K - 0.499) & ((tl.zeros_like(s) + hi) >= lo)
    s = tl.where(ok, s, 0.0)
    k = tl.arange(0, KP)
    valid = (k < K)[None, :] & ok[:, None]
    if KERNEL == 0:
        # Relative to the nearest bin kn (d = s - kn in [-1/2, 1/2]): bin kn + j has
        # phi = exp(-j (j - 2d) / (2 sigma^2)), exact in j, as in mi.h.
        kn = tl.minimum(tl.maximum(tl.floor(s + 0.5), 0.0), (K - 1) * 1.0)
        d = s - kn
        j = k[None, :].to(tl.float32) - kn[:, None]
        phi = tl.exp(-j * (j - 2.0 * d[:, None]) * inv_2s2)
        phi = tl.where(valid, phi, 0.0)
        dphi = (j - d[:, None]) * (2.0 * inv_2s2) * phi
    else:
        t = s[:, None] - k[None, :].to(tl.float32)
        a = tl.abs(t)
        near = (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
        b = tl.maximum(2.0 - a, 0.0)
        phi = tl.where(a < 1.0, near, b * b * b / 6.0)
        phi = tl.where(valid, phi, 0.0)
        sign = tl.where(t < 0.0, -1.0, 1.0)
        dphi = tl.where(a < 1.0, -2.0 * t + 1.5 * t * a, -sign * b * b * 0.5)
        dphi = tl.where(valid, dphi, 0.0)
    total = tl.sum(phi, 1)
    total = tl.where(ok, total, 1.0)
    weights = phi / total[:, None]
    if NEED_D:
        dsum = tl.sum(dphi, 1)
        scale = tl.where(inside & ok, 1.0 / (total * w), 0.0)
        dweights = (dphi - weights * dsum[:, None]) * scale[:, None]
    else:
        dweights = weights
    return weights, dweights, ok


@triton.jit
def _load_ranges(ranges_ptr, b):
    """Item b's value ranges (lo_f, hi_f, lo_g, hi_g)."""
    lo_f = tl.load(ranges_ptr + 4 * b)
    hi_f = tl.load(ranges_ptr + 4 * b + 1)
    lo_g = tl.load(ranges_ptr + 4 * b + 2)
    hi_g = tl.load(ranges_ptr + 4 * b + 3)
    return lo_f, hi_f, lo_g, hi_g


@triton.jit
def _load_voxels(f_ptr, g_ptr, m_ptr, base, idx, live, lo_f, lo_g, HAS_MASK: tl.constexpr):
    """Values f, g, mask weight m of the voxels idx, and whether each counts (m != 0);
    masked-out and tail voxels get finite stand-in values (lo_f, lo_g) with weight 0."""
    f = tl.load(f_ptr + base + idx, mask=live, other=0.0)
    g = tl.load(g_ptr + base + idx, mask=live, other=0.0)
    if HAS_MASK:
        m = tl.load(m_ptr + base + idx, mask=live, other=0.0)
    else:
        m = tl.where(live, 1.0, 0.0)
    keep = m != 0.0  # True for a NaN mask: it poisons, as on the CPU
    f = tl.where(keep, f, lo_f)
    g = tl.where(keep, g, lo_g)
    return f, g, m, keep


@triton.jit
def _mi_fwd_kernel(
    f_ptr, g_ptr, m_ptr, ranges_ptr, partial_ptr, N, K, programs, chunk, inv_2s2,
    KP: tl.constexpr, KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // programs
    p = pid - b * programs
    base = b * N
    lo_f, hi_f, lo_g, hi_g = _load_ranges(ranges_ptr, b)
    start = p * chunk
    end = tl.minimum(start + chunk, N)
    acc = tl.zeros((KP, KP), dtype=tl.float32)
    bad = tl.zeros((BLOCK_V,), dtype=tl.int32)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        live = idx < end
        f, g, m, keep = _load_voxels(f_ptr, g_ptr, m_ptr, base, idx, live, lo_f, lo_g, HAS_MASK)
        wf, _, ok_f = _parzen(f, lo_f, hi_f, K, KP, KERNEL, inv_2s2, False)
        wg, _, ok_g = _parzen(g, lo_g, hi_g, K, KP, KERNEL, inv_2s2, False)
        ok = ok_f & ok_g & (m == m)
        bad = tl.maximum(bad, (keep & ~ok).to(tl.int32))
        wf = tl.where(ok[:, None], wf * m[:, None], 0.0)
        wf_hi, wf_lo = _split(tl.trans(wf))
        wg_hi, wg_lo = _split(wg)
        acc = _dot3(wf_hi, wf_lo, wg_hi, wg_lo, acc)
    acc = tl.where(tl.max(bad, 0) != 0, float("nan"), acc)
    rows = tl.arange(0, KP)
    out = partial_ptr + pid * K * K
    ptrs = out + rows[:, None] * K + rows[None, :]
    tl.store(ptrs, acc, mask=(rows[:, None] < K) & (rows[None, :] < K))


@triton.jit
def _mi_bwd_kernel(
    gh_ptr, f_ptr, g_ptr, m_ptr, ranges_ptr, gf_ptr, gg_ptr, N, K, chunks, inv_2s2,
    KP: tl.constexpr, KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, NEED_F: tl.constexpr,
    NEED_G: tl.constexpr, BLOCK_V: tl.constexpr, TILES: tl.constexpr, IDX64: tl.constexpr,
):
    # One program per TILES * BLOCK_V voxels of one item: G is loaded and split once per
    # program, not once per tile (at KP = 64 it is 16 KiB, more than a tile's voxel data).
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    b = pid // chunks
    c = pid - b * chunks
    base = b * N
    lo_f, hi_f, lo_g, hi_g = _load_ranges(ranges_ptr, b)
    rows = tl.arange(0, KP)
    gmask = (rows[:, None] < K) & (rows[None, :] < K)
    g_mat = tl.load(gh_ptr + b * K * K + rows[:, None] * K + rows[None, :], mask=gmask,
                    other=0.0)
    g_hi, g_lo = _split(g_mat)
    for tile in range(TILES):
        idx = (c * TILES + tile) * BLOCK_V + tl.arange(0, BLOCK_V)
        live = idx < N
        f, g, m, keep = _load_voxels(f_ptr, g_ptr, m_ptr, base, idx, live, lo_f, lo_g,
                                     HAS_MASK)
        wf, dwf, ok_f = _parzen(f, lo_f, hi_f, K, KP, KERNEL, inv_2s2, NEED_F)
        wg, dwg, ok_g = _parzen(g, lo_g, hi_g, K, KP, KERNEL, inv_2s2, NEED_G)
        bad = keep & ~(ok_f & ok_g)  # NaN gradient, as mi.h's callers give
        if NEED_F:
            # r[v, a] = sum_b W_b(g_v) G[a, b]: G's transpose as the dot operand.
            wg_hi, wg_lo = _split(wg)
            r = _dot3(wg_hi, wg_lo, tl.trans(g_hi), tl.trans(g_lo),
                      tl.zeros((BLOCK_V, KP), dtype=tl.float32))
            # Masked-out voxels get exactly 0 even where G is NaN (a poisoned item).
            gf = tl.where(bad, float("nan"), tl.where(keep, m * tl.sum(dwf * r, 1), 0.0))
            tl.store(gf_ptr + base + idx, gf, mask=live)
        if NEED_G:
            # s[v, b] = sum_a W_a(f_v) G[a, b]
            wf_hi, wf_lo = _split(wf)
            s = _dot3(wf_hi, wf_lo, g_hi, g_lo, tl.zeros((BLOCK_V, KP), dtype=tl.float32))
            gg = tl.where(bad, float("nan"), tl.where(keep, m * tl.sum(dwg * s, 1), 0.0))
            tl.store(gg_ptr + base + idx, gg, mask=live)


def kp(bins: int) -> int:
    """Padded bin count of the kernels (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(bins))


def _inv_2s2(sigma: float) -> float:
    return 1.0 / (2.0 * sigma * sigma)


def mi_forward(
    f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, ranges: torch.Tensor,
    partial: torch.Tensor, bins: int, kernel: int, sigma: float,
) -> None:
    """Fills partial [B, P, K, K] (float32) with each program's histogram of m W_a(f) W_b(g).

    f, g, m (or None): float32 [B, N] contiguous; ranges float32 [B, 4].
    """
    batch, n = f.shape
    programs = partial.shape[1]
    chunk = -(-n // programs)
    cfg = FWD_CONFIG[kp(bins)]
    grid = _common.check_grid("mi (triton)", (batch * programs,), ("B * blocks per item",))
    idx64 = _common.needs_idx64(batch * n + cfg.block_v, partial.numel())
    _mi_fwd_kernel[grid](
        f, g, m if m is not None else f, ranges, partial, n, bins, programs, chunk,
        _inv_2s2(sigma), KP=kp(bins), KERNEL=kernel, HAS_MASK=m is not None,
        BLOCK_V=cfg.block_v, IDX64=idx64, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )


def mi_backward(
    grad_hist: torch.Tensor, f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
    ranges: torch.Tensor, grad_f: torch.Tensor | None, grad_g: torch.Tensor | None, bins: int,
    kernel: int, sigma: float,
) -> None:
    """Writes dL/df into grad_f and dL/dg into grad_g (float32 [B, N], or None)."""
    batch, n = f.shape
    cfg = BWD_CONFIG[kp(bins)]
    chunks = triton.cdiv(n, cfg.block_v * cfg.tiles)
    grid = _common.check_grid("mi (triton)", (batch * chunks,), ("B * voxel chunks",))
    idx64 = _common.needs_idx64(batch * chunks * cfg.block_v * cfg.tiles, grad_hist.numel())
    if grad_f is not None and grad_g is not None and kp(bins) >= BWD_SPLIT_KP:
        mi_backward(grad_hist, f, g, m, ranges, grad_f, None, bins, kernel, sigma)
        mi_backward(grad_hist, f, g, m, ranges, None, grad_g, bins, kernel, sigma)
        return
    _mi_bwd_kernel[grid](
        grad_hist, f, g, m if m is not None else f, ranges,
        grad_f if grad_f is not None else f, grad_g if grad_g is not None else f, n, bins,
        chunks, _inv_2s2(sigma), KP=kp(bins), KERNEL=kernel, HAS_MASK=m is not None,
        NEED_F=grad_f is not None, NEED_G=grad_g is not None, BLOCK_V=cfg.block_v,
        TILES=cfg.tiles, IDX64=idx64, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )
