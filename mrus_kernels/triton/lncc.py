"""Triton kernels of the LNCC operator (math of csrc/include/lncc.h, reproduced here).

One kernel, ``_lncc_line_kernel``: a program owns BLOCK adjacent columns (w) of one line
along H or D (AXIS_D) of one item, over a chunk of that line, and keeps five running box
sums along the line in float64 registers (add the row entering the window, subtract the one
leaving: cost independent of the window). Rows are read as BLOCK contiguous elements (w
fastest), so every load is coalesced. The row it adds is either

- a row of a five-channel float64 buffer (the sums already boxed along W and H), or
- (WSUM) the window sums along W of that row, computed on the fly from the summands of the
  images (FROM_IJ: I, J, I², J², IJ) or from a five-channel buffer (the coefficient maps
  K): 2r + 1 shifted contiguous loads per row, cache hits after the first.

MODE says what happens to each voxel's sums: COPY writes them (float64), REDUCE adds m·cc
into one partial per program (the per-item sum is the fixed-order sum of the partials:
deterministic), COEFF writes the coefficient maps K = w ∂cc/∂S (float32), FINAL writes the
image gradients from the box-summed K and I, J. FORM picks the per-window formula of REDUCE
and COEFF (0: mrus, 1: MONAI's, with eps as its variance floor dr and nr; csrc/include/lncc.h).

Why float64: the running sums leave about one ulp of the largest window sum they have seen,
and the variances ΣI² − (ΣI)²/n cancel; in float32 a window of flat background downstream of
bright tissue (intensity ~1000) kept variances of 10²–10³ against eps = 1e-5 (cc ≈ 0.2
instead of 0). The WH sums are stored in float64 too, since rounding them to float32 between
passes leaves the same kind of error (~1e-7 n I²). The coefficient maps are rounded to
float32 (they have no cancellation of that kind: a flat window's K is exactly 0).

Passes (3D): forward H(WSUM from I, J → S, COPY) | D(S → REDUCE);
backward H(WSUM I, J → S) | D(S → K, COEFF) | H(WSUM K → S) | D(S → dI, dJ, FINAL).
2D has no D pass: the H pass does REDUCE, COEFF or FINAL itself. Buffers: S [B, 5, *S]
float64 (the caller's work buffer) and, in the backward, K [B, 5, *S] float32.
The backward recomputes the forward's box sums instead of keeping S from the forward:
keeping it would hold 40 bytes per voxel from the forward to the backward (275 MB at
160×192×224), for one H pass (~1/4 of the backward) saved.

Long lines are split into chunks (each starts with 2r rows of warm-up) when there are too
few (item, line, column block) programs to fill a GPU: 2D images and small batches.
64-bit offsets (IDX64) when 5·B·|S| can exceed ``_common.IDX64_THRESHOLD``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

COPY, REDUCE, COEFF, FINAL = 0, 1, 2, 3
NSUM = 5
# Programs wanted before lines get split into chunks (a few per SM on an H100/H200).
TARGET_PROGRAMS = 1024
# Shortest chunk worth its 2r rows of warm-up.
MIN_CHUNK = 16


@triton.jit
def _count(i, r, n):
    lo = tl.maximum(i - r, 0)
    hi = tl.minimum(i + r, n - 1)
    return (hi - lo + 1).to(tl.float64)


@triton.jit
def _row(src_i, src_j, src5, ib, b5, e, lo, sk, w, ok, N, W, r, vol,
         WSUM: tl.constexpr, FROM_IJ: tl.constexpr, WT: tl.constexpr):
    """Five float64 sums of row e (0 where e lies outside [lo, N)) at columns w.

    ib: this line's offset in [B, 1, *S]; b5: in [B, 5, *S] (both without w and e). WSUM:
    each sum runs over columns w - r .. w + r, taken WT at a time as a [BLOCK, WT] tile of
    shifted contiguous loads.
    """
    ev = tl.zeros(w.shape, tl.int32) + e  # a vector, so that every mask is a vector
    valid = ok & (ev >= lo) & (ev < N)
    ro = e * sk  # row offset (int64 when the caller's indices are)
    if WSUM:
        s0 = tl.zeros(w.shape, tl.float64)
        s1 = tl.zeros(w.shape, tl.float64)
        s2 = tl.zeros(w.shape, tl.float64)
        s3 = tl.zeros(w.shape, tl.float64)
        s4 = tl.zeros(w.shape, tl.float64)
        for t0 in range(-r, r + 1, WT):
            t = t0 + tl.arange(0, WT)
            ww = w[:, None] + t[None, :]
            m = valid[:, None] & (t[None, :] <= r) & (ww >= 0) & (ww < W)
            if FROM_IJ:
                o = ib + ro + ww
                iv = tl.load(src_i + o, mask=m, other=0.0).to(tl.float64)
                jv = tl.load(src_j + o, mask=m, other=0.0).to(tl.float64)
                s0 += tl.sum(iv, 1)
                s1 += tl.sum(jv, 1)
                s2 += tl.sum(iv * iv, 1)  # exact: a product of two float32 fits a float64
                s3 += tl.sum(jv * jv, 1)
                s4 += tl.sum(iv * jv, 1)
            else:
                o = b5 + ro + ww
                s0 += tl.sum(tl.load(src5 + o, mask=m, other=0.0).to(tl.float64), 1)
                s1 += tl.sum(tl.load(src5 + o + vol, mask=m, other=0.0).to(tl.float64), 1)
                s2 += tl.sum(tl.load(src5 + o + 2 * vol, mask=m, other=0.0).to(tl.float64), 1)
                s3 += tl.sum(tl.load(src5 + o + 3 * vol, mask=m, other=0.0).to(tl.float64), 1)
                s4 += tl.sum(tl.load(src5 + o + 4 * vol, mask=m, other=0.0).to(tl.float64), 1)
    else:
        o = b5 + ro + w
        s0 = tl.load(src5 + o, mask=valid, other=0.0).to(tl.float64)
        s1 = tl.load(src5 + o + vol, mask=valid, other=0.0).to(tl.float64)
        s2 = tl.load(src5 + o + 2 * vol, mask=valid, other=0.0).to(tl.float64)
        s3 = tl.load(src5 + o + 3 * vol, mask=valid, other=0.0).to(tl.float64)
        s4 = tl.load(src5 + o + 4 * vol, mask=valid, other=0.0).to(tl.float64)
    return s0, s1, s2, s3, s4


@triton.jit
def _lncc_line_kernel(
    src_i, src_j, src5, dst, mask, scale, out_i, out_j, partials,
    N, M, W, vol, sk, sm, r, rD, rH, rW, D, H, eps, nr, n_wblk, n_chunk, chunk,
    AXIS_D: tl.constexpr, WSUM: tl.constexpr, FROM_IJ: tl.constexpr, MODE: tl.constexpr,
    FORM: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_I: tl.constexpr, NEED_J: tl.constexpr,
    IDX64: tl.constexpr, BLOCK: tl.constexpr, WT: tl.constexpr,
):
    # One program per (item b, line m, column block, chunk), chunk fastest; axis 0 only.
    pid = tl.program_id(0)
    c = pid % n_chunk
    rest = pid // n_chunk
    wb = rest % n_wblk
    rest = rest // n_wblk
    m = rest % M
    b = rest // M
    if IDX64:
        b = b.to(tl.int64)
        m = m.to(tl.int64)
        k0 = c.to(tl.int64) * chunk
    else:
        k0 = c * chunk
    k1 = tl.minimum(k0 + chunk, N)
    w = wb * BLOCK + tl.arange(0, BLOCK)
    ok = w < W
    if IDX64:
        vol = b * 0 + vol  # int64: 2 * vol ... 4 * vol below
    ib = b * vol + m * sm  # this line in [B, 1, *S]
    b5 = b * 5 * vol + m * sm  # this line in [B, 5, *S]
    lo = tl.maximum(k0 - r, 0)  # rows before the warm-up were never added
    a0 = tl.zeros([BLOCK], tl.float64)
    a1 = tl.zeros([BLOCK], tl.float64)
    a2 = tl.zeros([BLOCK], tl.float64)
    a3 = tl.zeros([BLOCK], tl.float64)
    a4 = tl.zeros([BLOCK], tl.float64)
    # Warm-up: rows k0 - r .. k0 + r - 1; the loop adds k + r and drops k - r - 1.
    for e in range(k0 - r, k0 + r):
        s0, s1, s2, s3, s4 = _row(src_i, src_j, src5, ib, b5, e, lo, sk, w, ok, N, W, rW,
                                  vol, WSUM, FROM_IJ, WT)
        a0 += s0
        a1 += s1
        a2 += s2
        a3 += s3
        a4 += s4
    part = tl.zeros([BLOCK], tl.float64)
    cw = _count(w, rW, W)
    for k in range(k0, k1):
        s0, s1, s2, s3, s4 = _row(src_i, src_j, src5, ib, b5, k + r, lo, sk, w, ok, N, W, rW,
                                  vol, WSUM, FROM_IJ, WT)
        l0, l1, l2, l3, l4 = _row(src_i, src_j, src5, ib, b5, k - r - 1, lo, sk, w, ok, N, W,
                                  rW, vol, WSUM, FROM_IJ, WT)
        a0 += s0 - l0
        a1 += s1 - l1
        a2 += s2 - l2
        a3 += s3 - l3
        a4 += s4 - l4
        vo = k * sk + w  # this voxel, from the line's start
        if MODE == 0:
            o = b5 + vo
            tl.store(dst + o, a0, mask=ok)
            tl.store(dst + o + vol, a1, mask=ok)
            tl.store(dst + o + 2 * vol, a2, mask=ok)
            tl.store(dst + o + 3 * vol, a3, mask=ok)
            tl.store(dst + o + 4 * vol, a4, mask=ok)
        elif MODE == 3:
            o = ib + vo
            iv = tl.load(src_i + o, mask=ok, other=0.0).to(tl.float64)
            jv = tl.load(src_j + o, mask=ok, other=0.0).to(tl.float64)
            if NEED_I:
                tl.store(out_i + o, (a0 + 2.0 * iv * a2 + jv * a4).to(tl.float32), mask=ok)
            if NEED_J:
                tl.store(out_j + o, (a1 + 2.0 * jv * a3 + iv * a4).to(tl.float32), mask=ok)
        else:
            if AXIS_D:
                n = _count(k, rD, D) * _count(m, rH, H) * cw
            else:
                n = _count(m, rD, D) * _count(k, rH, H) * cw
            inv = 1.0 / tl.where(ok, n, 1.0)  # columns past W: no 1/0
            cross = a4 - a0 * a1 * inv
            vi_raw = a2 - a0 * a0 * inv
            vj_raw = a3 - a1 * a1 * inv
            c2 = cross * cross
            if HAS_MASK:
                mv = tl.load(mask + ib + vo, mask=ok, other=0.0).to(tl.float64)
            else:
                mv = tl.where(ok, 1.0, 0.0).to(tl.float64)
            if FORM == 1:  # MONAI: (cross² + nr) / (max(var_I, dr) max(var_J, dr)), dr = eps
                vi = tl.where(vi_raw < eps, eps, vi_raw)  # NaN passes, as torch.maximum
                vj = tl.where(vj_raw < eps, eps, vj_raw)
                rden = 1.0 / (vi * vj)  # >= eps² > 0, also past W (raw variances 0 there)
                cc = (c2 + nr) * rden
                if MODE == 2:
                    dcross = 2.0 * cross * rden
                    # torch.maximum's subgradient: 1 above the floor, 1/2 on a tie, 0 below.
                    gate_i = tl.where(vi_raw > eps, 1.0, tl.where(vi_raw == eps, 0.5, 0.0))
                    gate_j = tl.where(vj_raw > eps, 1.0, tl.where(vj_raw == eps, 0.5, 0.0))
                    dvi = -gate_i * cc / vi
                    dvj = -gate_j * cc / vj
            else:
                vi = tl.where(vi_raw < 0.0, 0.0, vi_raw)
                vj = tl.where(vj_raw < 0.0, 0.0, vj_raw)
                vv = vi * vj
                den = vv + eps
                clamp = c2 > vv  # rounding only: cross² <= var_I var_J exactly
                cc = tl.where(clamp, vv, c2) / den
                if MODE == 2:
                    dcross = tl.where(clamp, 0.0, 2.0 * cross / den)
                    dvv = tl.where(clamp, eps, -c2) / (den * den)
                    dvi = tl.where(vi_raw < 0.0, 0.0, dvv * vj)
                    dvj = tl.where(vj_raw < 0.0, 0.0, dvv * vi)
            if MODE == 1:
                part += tl.where(ok, mv * cc, 0.0)
            else:
                wt = tl.load(scale + b).to(tl.float64) * mv
                o = b5 + vo
                tl.store(dst + o, (wt * (-dcross * a1 * inv - 2.0 * dvi * a0 * inv)).to(
                    tl.float32), mask=ok)
                tl.store(dst + o + vol, (wt * (-dcross * a0 * inv - 2.0 * dvj * a1 * inv)).to(
                    tl.float32), mask=ok)
                tl.store(dst + o + 2 * vol, (wt * dvi).to(tl.float32), mask=ok)
                tl.store(dst + o + 3 * vol, (wt * dvj).to(tl.float32), mask=ok)
                tl.store(dst + o + 4 * vol, (wt * dcross).to(tl.float32), mask=ok)
    if MODE == 1:
        tl.store(partials + pid, tl.sum(part, 0).to(tl.float32))


def _geometry(x: torch.Tensor, window: int):
    b, size = x.shape[0], tuple(x.shape[2:])
    d, h, w = (size if len(size) == 3 else (1, *size))
    r = window // 2
    return b, d, h, w, r, (r if len(size) == 3 else 0)


def block_w(w: int) -> int:
    """Columns per program: 64 (two warps), 32 (one warp) for images at most 32 wide.

    Narrower blocks with the [BLOCK, 16] window tile compile to 170-255 registers and spill
    (ptxas, sm_80 and sm_90); these two spill in no variant."""
    return 32 if w <= 32 else 64


def window_tile(r: int) -> int:
    """Columns of the window summed per step of the W sums: 4, 8 or 16 (windows > 16 loop)."""
    return max(4, min(16, triton.next_power_of_2(2 * r + 1)))


def plan(geo, axis_d: bool) -> tuple[int, int, int, int]:
    """(programs, column blocks, chunks per line, chunk length) of one pass."""
    b, d, h, w, r, rd = geo
    n_line, m_lines = (d, h) if axis_d else (h, d)
    rr = rd if axis_d else r
    n_wblk = triton.cdiv(w, block_w(w))
    lines = b * m_lines * n_wblk
    n_chunk = 1
    if lines < TARGET_PROGRAMS:
        longest = max(1, n_line // max(MIN_CHUNK, 4 * rr))  # warm-up <= ~half a chunk
        n_chunk = max(1, min(longest, triton.cdiv(TARGET_PROGRAMS, lines)))
    chunk = triton.cdiv(n_line, n_chunk)
    n_chunk = triton.cdiv(n_line, chunk)
    return lines * n_chunk, n_wblk, n_chunk, chunk


def _line(geo, axis_d, mode, *, i=None, j=None, src5=None, dst=None, mask=None, scale=None,
          gi=None, gj=None, partials=None, wsum=False, from_ij=False, eps=1e-5, nr=0.0,
          form=0):
    b, d, h, w, r, rd = geo
    vol = d * h * w
    if axis_d:
        n_, m_, sk, sm = d, h, h * w, w
    else:
        n_, m_, sk, sm = h, d, w, h * w
    total, n_wblk, n_chunk, chunk = plan(geo, axis_d)
    _common.check_grid("lncc (triton)", (total,), ("B * lines * column blocks * chunks",))
    idx64 = _common.needs_idx64(NSUM * b * vol + block_w(w) + (2 * r + 1))
    anyt = next(t for t in (i, src5, dst) if t is not None)  # a pointer for unused slots
    pick = lambda t: anyt if t is None else t  # noqa: E731
    _lncc_line_kernel[(total,)](
        pick(i), pick(j), pick(src5), pick(dst), pick(mask), pick(scale), pick(gi), pick(gj),
        pick(partials),
        n_, m_, w, vol, sk, sm, rd if axis_d else r, rd, r, r, d, h, float(eps), float(nr),
        n_wblk, n_chunk, chunk,
        AXIS_D=axis_d, WSUM=wsum, FROM_IJ=from_ij, MODE=mode,
        FORM=form if mode in (REDUCE, COEFF) else 0,
        HAS_MASK=mask is not None and mode in (REDUCE, COEFF),
        NEED_I=gi is not None and mode == FINAL, NEED_J=gj is not None and mode == FINAL,
        IDX64=idx64, BLOCK=block_w(w), WT=window_tile(r), num_warps=block_w(w) // 32,
    )
    return total


def lncc_forward(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
                 work: torch.Tensor, *, window: int, eps: float, nr: float = 0.0,
                 form: int = 0) -> torch.Tensor:
    """Σ_v m(v) cc(v) per item, [B] float32.

    Args:
        fixed, moving: float32 [B, 1, *S], contiguous. mask: float32 [B, 1, *S] or None.
        work: float64 [B, 5, *S] scratch (3D only; unused in 2D).
        eps, nr, form: the per-window formula (csrc/include/lncc.h): form 0 (mrus) uses eps;
            form 1 (MONAI) takes eps as the variances' floor dr and adds nr to cross².
    """
    geo = _geometry(fixed, window)
    b = geo[0]
    is3d = fixed.dim() == 5
    total = plan(geo, is3d)[0]
    partials = torch.empty(total, dtype=torch.float32, device=fixed.device)
    cc = dict(eps=eps, nr=nr, form=form)
    if is3d:
        _line(geo, False, COPY, i=fixed, j=moving, dst=work, wsum=True, from_ij=True)
        _line(geo, True, REDUCE, i=fixed, j=moving, src5=work, mask=mask, partials=partials,
              **cc)
    else:
        _line(geo, False, REDUCE, i=fixed, j=moving, mask=mask, partials=partials, wsum=True,
              from_ij=True, **cc)
    return partials.view(b, -1).sum(1)


def lncc_backward(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
                  scale: torch.Tensor, work: torch.Tensor, grad_fixed: torch.Tensor | None,
                  grad_moving: torch.Tensor | None, *, window: int, eps: float, nr: float = 0.0,
                  form: int = 0) -> None:
    """Writes d(Σ_b scale[b] Σ_v m cc)/d fixed into grad_fixed (and likewise grad_moving).

    Args:
        scale: float32 [B]. work: float64 [B, 5, *S] scratch (3D only).
        grad_fixed, grad_moving: float32 [B, 1, *S] or None.
        eps, nr, form: as :func:`lncc_forward`.
    """
    geo = _geometry(fixed, window)
    b, d, h, w, r, rd = geo
    coeff = torch.empty((b, NSUM, *fixed.shape[2:]), dtype=torch.float32, device=fixed.device)
    grads = dict(i=fixed, j=moving, gi=grad_fixed, gj=grad_moving)
    cc = dict(eps=eps, nr=nr, form=form)
    if fixed.dim() == 5:
        _line(geo, False, COPY, i=fixed, j=moving, dst=work, wsum=True, from_ij=True)
        _line(geo, True, COEFF, i=fixed, j=moving, src5=work, dst=coeff, mask=mask,
              scale=scale, **cc)
        _line(geo, False, COPY, src5=coeff, dst=work, wsum=True)
        _line(geo, True, FINAL, src5=work, **grads)
    else:
        _line(geo, False, COEFF, i=fixed, j=moving, dst=coeff, mask=mask, scale=scale,
              wsum=True, from_ij=True, **cc)
        _line(geo, False, FINAL, src5=coeff, wsum=True, **grads)
