"""Triton kernels of the LNCC operator (math of csrc/include/lncc.h, reproduced here).

Two kernels, both separable running box sums (add the voxel entering the window, subtract
the one leaving: cost independent of the window), float32 accumulators:

- ``_lncc_wpass_kernel``: one program per BLOCK_R rows along W; from (I, J) (the five
  summands computed on the fly) or from a five-channel buffer, into a five-channel buffer.
- ``_lncc_line_kernel``: one program per (item, other-axis index, BLOCK_W columns), a loop
  along H or D over rows of W (coalesced). MODE says what happens to each voxel's sums:
  COPY writes them, REDUCE adds m·cc into one partial per program (the per-item sum is the
  fixed-order sum of the partials: deterministic), COEFF writes the coefficient maps
  K = w ∂cc/∂S, FINAL writes the image gradients from the box-summed K and I, J.

Buffers: two [B, 5, *S] float32 (``work`` from the caller and one more); the forward is
W → H → D(REDUCE), the backward W → H → D(COEFF) → W → H → D(FINAL).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COPY, REDUCE, COEFF, FINAL = 0, 1, 2, 3
BLOCK_R = 64
BLOCK_W = 64


@triton.jit
def _count(i, r, n):
    lo = tl.maximum(i - r, 0)
    hi = tl.minimum(i + r, n - 1)
    return (hi - lo + 1).to(tl.float32)


@triton.jit
def _lncc_wpass_kernel(
    src_i, src_j, src5, dst, n_rows, rows_per_item, W, vol, r,
    FROM_IJ: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    b = (rows // rows_per_item).to(tl.int64)
    rw = (rows % rows_per_item).to(tl.int64) * W
    in_base = b * vol + rw  # I, J: [B, 1, ...]
    b5 = b * 5 * vol + rw  # five-channel buffers
    a0 = tl.zeros([BLOCK], tl.float32)
    a1 = tl.zeros([BLOCK], tl.float32)
    a2 = tl.zeros([BLOCK], tl.float32)
    a3 = tl.zeros([BLOCK], tl.float32)
    a4 = tl.zeros([BLOCK], tl.float32)
    # k runs from -r - 1 to W - 1: element k + r enters, k - r - 1 leaves, k is written.
    zero = tl.zeros([BLOCK], tl.int32)
    for kk in range(-r, W):
        k = kk + zero  # a vector, so that every mask below is a vector of the same shape
        e = k + r
        lv = k - r - 1
        me = ok & (e < W)
        ml = ok & (lv >= 0)
        if FROM_IJ:
            ie = tl.load(src_i + in_base + e, mask=me, other=0.0).to(tl.float32)
            je = tl.load(src_j + in_base + e, mask=me, other=0.0).to(tl.float32)
            il = tl.load(src_i + in_base + lv, mask=ml, other=0.0).to(tl.float32)
            jl = tl.load(src_j + in_base + lv, mask=ml, other=0.0).to(tl.float32)
            a0 += ie - il
            a1 += je - jl
            a2 += ie * ie - il * il
            a3 += je * je - jl * jl
            a4 += ie * je - il * jl
        else:
            a0 += tl.load(src5 + b5 + e, mask=me, other=0.0) - tl.load(
                src5 + b5 + lv, mask=ml, other=0.0)
            a1 += tl.load(src5 + b5 + vol + e, mask=me, other=0.0) - tl.load(
                src5 + b5 + vol + lv, mask=ml, other=0.0)
            a2 += tl.load(src5 + b5 + 2 * vol + e, mask=me, other=0.0) - tl.load(
                src5 + b5 + 2 * vol + lv, mask=ml, other=0.0)
            a3 += tl.load(src5 + b5 + 3 * vol + e, mask=me, other=0.0) - tl.load(
                src5 + b5 + 3 * vol + lv, mask=ml, other=0.0)
            a4 += tl.load(src5 + b5 + 4 * vol + e, mask=me, other=0.0) - tl.load(
                src5 + b5 + 4 * vol + lv, mask=ml, other=0.0)
        mk = ok & (k >= 0)
        tl.store(dst + b5 + k, a0, mask=mk)
        tl.store(dst + b5 + vol + k, a1, mask=mk)
        tl.store(dst + b5 + 2 * vol + k, a2, mask=mk)
        tl.store(dst + b5 + 3 * vol + k, a3, mask=mk)
        tl.store(dst + b5 + 4 * vol + k, a4, mask=mk)


@triton.jit
def _cc_parts(s0, s1, s2, s3, s4, n, eps):
    inv = 1.0 / n
    cross = s4 - s0 * s1 * inv
    vi_raw = s2 - s0 * s0 * inv
    vj_raw = s3 - s1 * s1 * inv
    vi = tl.where(vi_raw < 0.0, 0.0, vi_raw)
    vj = tl.where(vj_raw < 0.0, 0.0, vj_raw)
    return inv, cross, vi_raw, vj_raw, vi, vj


@triton.jit
def _lncc_line_kernel(
    src, dst, img_i, img_j, mask, scale, out_i, out_j, partials,
    N, M, W, vol, sk, sm, r, rH, rW, D, H, eps,
    AXIS_D: tl.constexpr, MODE: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_I: tl.constexpr, NEED_J: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # b * M + m
    pw = tl.program_id(1)
    b = (pid // M).to(tl.int64)
    m = pid % M
    w = pw * BLOCK + tl.arange(0, BLOCK)
    ok = w < W
    base = b * 5 * vol + m.to(tl.int64) * sm + w
    a0 = tl.zeros([BLOCK], tl.float32)
    a1 = tl.zeros([BLOCK], tl.float32)
    a2 = tl.zeros([BLOCK], tl.float32)
    a3 = tl.zeros([BLOCK], tl.float32)
    a4 = tl.zeros([BLOCK], tl.float32)
    part = tl.zeros([BLOCK], tl.float32)
    cw = _count(w, rW, W)
    zero = tl.zeros([BLOCK], tl.int32)
    for kk in range(-r, N):
        k = kk + zero  # a vector, so that every mask below is a vector of the same shape
        e = k + r
        lv = k - r - 1
        me = ok & (e < N)
        ml = ok & (lv >= 0)
        oe = base + e.to(tl.int64) * sk
        ol = base + lv.to(tl.int64) * sk
        a0 += tl.load(src + oe, mask=me, other=0.0) - tl.load(src + ol, mask=ml, other=0.0)
        a1 += tl.load(src + oe + vol, mask=me, other=0.0) - tl.load(
            src + ol + vol, mask=ml, other=0.0)
        a2 += tl.load(src + oe + 2 * vol, mask=me, other=0.0) - tl.load(
            src + ol + 2 * vol, mask=ml, other=0.0)
        a3 += tl.load(src + oe + 3 * vol, mask=me, other=0.0) - tl.load(
            src + ol + 3 * vol, mask=ml, other=0.0)
        a4 += tl.load(src + oe + 4 * vol, mask=me, other=0.0) - tl.load(
            src + ol + 4 * vol, mask=ml, other=0.0)
        mk = ok & (k >= 0)
        ok_ = base + k.to(tl.int64) * sk  # this voxel in a five-channel buffer
        if MODE == 0:
            tl.store(dst + ok_, a0, mask=mk)
            tl.store(dst + ok_ + vol, a1, mask=mk)
            tl.store(dst + ok_ + 2 * vol, a2, mask=mk)
            tl.store(dst + ok_ + 3 * vol, a3, mask=mk)
            tl.store(dst + ok_ + 4 * vol, a4, mask=mk)
        elif MODE == 3:
            # this voxel in [B, 1, *S]
            oi = b * vol + m.to(tl.int64) * sm + k.to(tl.int64) * sk + w
            iv = tl.load(img_i + oi, mask=mk, other=0.0)
            jv = tl.load(img_j + oi, mask=mk, other=0.0)
            if NEED_I:
                tl.store(out_i + oi, a0 + 2.0 * iv * a2 + jv * a4, mask=mk)
            if NEED_J:
                tl.store(out_j + oi, a1 + 2.0 * jv * a3 + iv * a4, mask=mk)
        else:
            if AXIS_D:
                d = k
                h = m
            else:
                d = m
                h = k
            n = _count(d, r if AXIS_D else 0, D) * _count(h, rH, H) * cw
            n = tl.where(mk, n, 1.0)  # lanes outside the volume: no 1/0
            oi = b * vol + m.to(tl.int64) * sm + k.to(tl.int64) * sk + w
            if HAS_MASK:
                mv = tl.load(mask + oi, mask=mk, other=0.0)
            else:
                mv = tl.where(mk, 1.0, 0.0)
            inv, cross, vi_raw, vj_raw, vi, vj = _cc_parts(a0, a1, a2, a3, a4, n, eps)
            vv = vi * vj
            den = vv + eps
            c2 = cross * cross
            clamp = c2 > vv
            if MODE == 1:
                cc = tl.where(clamp, vv, c2) / den
                part += tl.where(mk, mv * cc, 0.0)
            else:
                wt = tl.load(scale + b) * mv
                dcross = tl.where(clamp, 0.0, 2.0 * cross / den)
                dvv = tl.where(clamp, eps, -c2) / (den * den)
                dvi = tl.where(vi_raw < 0.0, 0.0, dvv * vj)
                dvj = tl.where(vj_raw < 0.0, 0.0, dvv * vi)
                tl.store(dst + ok_, wt * (-dcross * a1 * inv - 2.0 * dvi * a0 * inv), mask=mk)
                tl.store(dst + ok_ + vol, wt * (-dcross * a0 * inv - 2.0 * dvj * a1 * inv), mask=mk)
                tl.store(dst + ok_ + 2 * vol, wt * dvi, mask=mk)
                tl.store(dst + ok_ + 3 * vol, wt * dvj, mask=mk)
                tl.store(dst + ok_ + 4 * vol, wt * dcross, mask=mk)
    if MODE == 1:
        tl.store(partials + pid * tl.num_programs(1) + pw, tl.sum(part, 0))


def _geometry(x: torch.Tensor, window: int):
    b, size = x.shape[0], tuple(x.shape[2:])
    d, h, w = (size if len(size) == 3 else (1, *size))
    r = window // 2
    return b, d, h, w, r, (r if len(size) == 3 else 0)


def _wpass(i, j, src5, dst, b, d, h, w, r, from_ij):
    rows = b * d * h
    _lncc_wpass_kernel[(triton.cdiv(rows, BLOCK_R),)](
        i, j, src5, dst, rows, d * h, w, d * h * w, r, FROM_IJ=from_ij, BLOCK=BLOCK_R,
    )


def _line(src, dst, i, j, mask, scale, gi, gj, partials, geo, axis_d, mode, eps):
    b, d, h, w, r, rd = geo
    vol = d * h * w
    if axis_d:
        n_, m_, sk, sm, rr = d, h, h * w, w, rd
    else:
        n_, m_, sk, sm, rr = h, d, w, h * w, r
    grid = (b * m_, triton.cdiv(w, BLOCK_W))
    dummy = src
    _lncc_line_kernel[grid](
        src, dst if dst is not None else dummy, i if i is not None else dummy,
        j if j is not None else dummy, mask if mask is not None else dummy,
        scale if scale is not None else dummy, gi if gi is not None else dummy,
        gj if gj is not None else dummy, partials if partials is not None else dummy,
        n_, m_, w, vol, sk, sm, rr, r, r, d, h, float(eps),
        AXIS_D=axis_d, MODE=mode, HAS_MASK=mask is not None, NEED_I=gi is not None,
        NEED_J=gj is not None, BLOCK=BLOCK_W,
    )
    return grid


def lncc_forward(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
                 work: torch.Tensor, *, window: int, eps: float) -> torch.Tensor:
    """Σ_v m(v) cc(v) per item, [B] float32.

    Args:
        fixed, moving: float32 [B, 1, *S], contiguous. mask: float32 [B, 1, *S] or None.
        work: float32 [B, 5, *S] scratch.
    """
    geo = _geometry(fixed, window)
    b, d, h, w, r, rd = geo
    other = torch.empty_like(work)
    _wpass(fixed, moving, work, work, b, d, h, w, r, True)
    _line(work, other, None, None, None, None, None, None, None, geo, False, COPY, eps)
    partials = torch.empty((b, h * triton.cdiv(w, BLOCK_W)), dtype=torch.float32,
                           device=fixed.device)
    _line(other, None, fixed, moving, mask, None, None, None, partials, geo, True, REDUCE, eps)
    return partials.sum(1)


def lncc_backward(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
                  scale: torch.Tensor, work: torch.Tensor, grad_fixed: torch.Tensor | None,
                  grad_moving: torch.Tensor | None, *, window: int, eps: float) -> None:
    """Writes d(Σ_b scale[b] Σ_v m cc)/d fixed into grad_fixed (and likewise grad_moving);
    scale: float32 [B]; gradients float32 [B, 1, *S] or None."""
    geo = _geometry(fixed, window)
    b, d, h, w, r, rd = geo
    other = torch.empty_like(work)
    _wpass(fixed, moving, work, work, b, d, h, w, r, True)
    _line(work, other, None, None, None, None, None, None, None, geo, False, COPY, eps)
    _line(other, work, fixed, moving, mask, scale, None, None, None, geo, True, COEFF, eps)
    _wpass(fixed, moving, work, other, b, d, h, w, r, False)
    _line(other, work, None, None, None, None, None, None, None, geo, False, COPY, eps)
    _line(work, None, fixed, moving, None, None, grad_fixed, grad_moving, None, geo, True,
          FINAL, eps)
