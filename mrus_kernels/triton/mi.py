"""Triton kernels of the Parzen-window mutual information operator.

The joint histogram is a matrix product: per tile of BLOCK_V voxels, the Parzen weight tiles
W_f, W_g ([BLOCK_V, KP], K bins padded to a power of two KP >= 16) are built in registers and
``tl.dot(W_f^T, W_g)`` ([KP, KP], IEEE fp32) accumulates into the program's private
histogram; each program writes its partial histogram once and the launcher's caller sums the
partials over programs in a fixed order. No atomics: deterministic by construction, and
nothing of size voxels x K leaves the registers.

The backward is the same shape per voxel tile: R = W_g G^T and S = W_f G (two tl.dot with
G = dL/dhist), then dL/df = m * sum_a dW_f * R and dL/dg = m * sum_b dW_g * S.

The weights are those of csrc/include/mi.h (same definition, same max-subtracted Gaussian
relative to the nearest bin), computed densely over all K bins instead of in a window: the
bins the C++ kernels drop weigh less than 2**-24 of the largest, far inside the float32
tolerance. All arithmetic is float32 (the Python layer converts half inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GAUSSIAN = 0
BSPLINE = 1

BLOCK_V_FWD = 128
BLOCK_V_BWD = 128
NUM_WARPS = 4


@triton.jit
def _parzen(x, lo, hi, K, KP: tl.constexpr, KERNEL: tl.constexpr, inv_2s2, NEED_D: tl.constexpr):
    """Weights W [BV, KP] (0 beyond K) and, if NEED_D, dW/dx [BV, KP] (0 where clamped)."""
    w = (hi - lo) / K
    w = tl.where(w >= 1e-12, w, 1e-12)
    inside = (x >= lo) & (x <= hi)
    # Comparisons, not minimum/maximum: a NaN value stays NaN (NaN in, NaN out).
    xc = tl.where(x < lo, lo, tl.where(x > hi, hi, x))
    s = (xc - lo) / w - 0.5
    k = tl.arange(0, KP)
    valid = (k < K)[None, :]
    t = s[:, None] - k[None, :].to(tl.float32)
    if KERNEL == 0:
        kn = tl.minimum(tl.maximum(tl.floor(s + 0.5), 0.0), (K - 1) * 1.0)
        d = s - kn
        phi = tl.exp(-(t * t - (d * d)[:, None]) * inv_2s2)
        phi = tl.where(valid, phi, 0.0)
        dphi = -t * (2.0 * inv_2s2) * phi
    else:
        a = tl.abs(t)
        near = (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
        b = tl.maximum(2.0 - a, 0.0)
        phi = tl.where(a < 1.0, near, b * b * b / 6.0)
        phi = tl.where(valid, phi, 0.0)
        sign = tl.where(t < 0.0, -1.0, 1.0)
        dphi = tl.where(a < 1.0, -2.0 * t + 1.5 * t * a, -sign * b * b * 0.5)
        dphi = tl.where(valid, dphi, 0.0)
    total = tl.sum(phi, 1)
    weights = phi / total[:, None]
    if NEED_D:
        dsum = tl.sum(dphi, 1)
        scale = tl.where(inside, 1.0 / (total * w), 0.0)
        dweights = (dphi - weights * dsum[:, None]) * scale[:, None]
    else:
        dweights = weights
    return weights, dweights


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
    """Values f, g and mask weight m of the voxels idx; masked-out and tail voxels get finite
    stand-in values (lo_f, lo_g) with weight 0."""
    f = tl.load(f_ptr + base + idx, mask=live, other=0.0)
    g = tl.load(g_ptr + base + idx, mask=live, other=0.0)
    if HAS_MASK:
        m = tl.load(m_ptr + base + idx, mask=live, other=0.0)
    else:
        m = tl.where(live, 1.0, 0.0)
    keep = m != 0.0
    f = tl.where(keep, f, lo_f)
    g = tl.where(keep, g, lo_g)
    return f, g, m


@triton.jit
def _mi_fwd_kernel(
    f_ptr, g_ptr, m_ptr, ranges_ptr, partial_ptr, N, K, chunk, inv_2s2,
    KP: tl.constexpr, KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    programs = tl.num_programs(0)
    base = b.to(tl.int64) * N
    lo_f, hi_f, lo_g, hi_g = _load_ranges(ranges_ptr, b)
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)
    acc = tl.zeros((KP, KP), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        live = idx < end
        f, g, m = _load_voxels(f_ptr, g_ptr, m_ptr, base, idx, live, lo_f, lo_g, HAS_MASK)
        wf, _ = _parzen(f, lo_f, hi_f, K, KP, KERNEL, inv_2s2, False)
        wg, _ = _parzen(g, lo_g, hi_g, K, KP, KERNEL, inv_2s2, False)
        wf = wf * m[:, None]
        acc += tl.dot(tl.trans(wf), wg, input_precision="ieee")
    rows = tl.arange(0, KP)
    out = partial_ptr + (b.to(tl.int64) * programs + pid) * K * K
    ptrs = out + rows[:, None] * K + rows[None, :]
    tl.store(ptrs, acc, mask=(rows[:, None] < K) & (rows[None, :] < K))


@triton.jit
def _mi_bwd_kernel(
    gh_ptr, f_ptr, g_ptr, m_ptr, ranges_ptr, gf_ptr, gg_ptr, N, K, inv_2s2,
    KP: tl.constexpr, KERNEL: tl.constexpr, HAS_MASK: tl.constexpr, NEED_F: tl.constexpr,
    NEED_G: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * N
    lo_f, hi_f, lo_g, hi_g = _load_ranges(ranges_ptr, b)
    rows = tl.arange(0, KP)
    gmask = (rows[:, None] < K) & (rows[None, :] < K)
    G = tl.load(gh_ptr + b.to(tl.int64) * K * K + rows[:, None] * K + rows[None, :], mask=gmask,
                other=0.0)
    idx = pid.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    live = idx < N
    f, g, m = _load_voxels(f_ptr, g_ptr, m_ptr, base, idx, live, lo_f, lo_g, HAS_MASK)
    wf, dwf = _parzen(f, lo_f, hi_f, K, KP, KERNEL, inv_2s2, NEED_F)
    wg, dwg = _parzen(g, lo_g, hi_g, K, KP, KERNEL, inv_2s2, NEED_G)
    if NEED_F:
        r = tl.dot(wg, tl.trans(G), input_precision="ieee")  # r[v, a] = sum_b G[a, b] W_b(g_v)
        tl.store(gf_ptr + base + idx, m * tl.sum(dwf * r, 1), mask=live)
    if NEED_G:
        s = tl.dot(wf, G, input_precision="ieee")  # s[v, b] = sum_a W_a(f_v) G[a, b]
        tl.store(gg_ptr + base + idx, m * tl.sum(dwg * s, 1), mask=live)


def _kp(bins: int) -> int:
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
    _mi_fwd_kernel[(programs, batch)](
        f, g, m if m is not None else f, ranges, partial, n, bins, chunk, _inv_2s2(sigma),
        KP=_kp(bins), KERNEL=kernel, HAS_MASK=m is not None, BLOCK_V=BLOCK_V_FWD,
        num_warps=NUM_WARPS,
    )


def mi_backward(
    grad_hist: torch.Tensor, f: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
    ranges: torch.Tensor, grad_f: torch.Tensor | None, grad_g: torch.Tensor | None, bins: int,
    kernel: int, sigma: float,
) -> None:
    """Writes dL/df into grad_f and dL/dg into grad_g (float32 [B, N], or None)."""
    batch, n = f.shape
    grid = (triton.cdiv(n, BLOCK_V_BWD), batch)
    _mi_bwd_kernel[grid](
        grad_hist, f, g, m if m is not None else f, ranges,
        grad_f if grad_f is not None else f, grad_g if grad_g is not None else f, n, bins,
        _inv_2s2(sigma), KP=_kp(bins), KERNEL=kernel, HAS_MASK=m is not None,
        NEED_F=grad_f is not None, NEED_G=grad_g is not None, BLOCK_V=BLOCK_V_BWD,
        num_warps=NUM_WARPS,
    )
