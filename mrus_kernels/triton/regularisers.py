"""Triton kernels of the regularisers (math of csrc/include/regularisers.h, reproduced here).

One program per BLOCK voxels of one item (grid: voxel blocks × items). The forward writes
one partial sum per program, [B, n_blocks], which the caller adds in fixed order
(deterministic, no atomics); the backward writes each voxel's gradient once. u is read with
its stencil neighbours straight from memory (they are cache hits), nothing is materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GRAD_L2, HARMONIC = 0, 1
BLOCK = 256


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
def _interior(x0, x1, x2, n0, n1, n2, NDIM: tl.constexpr):
    inside = (x1 >= 1) & (x1 <= n1 - 2) & (x2 >= 1) & (x2 <= n2 - 2)
    if NDIM == 3:
        inside = inside & (x0 >= 1) & (x0 <= n0 - 2)
    return inside


@triton.jit
def _reg_kernel(
    u, scale, out, per_item, n0, n1, n2, w0, w1, w2,
    KIND: tl.constexpr, NDIM: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < per_item
    x2 = idx % n2
    x1 = (idx // n2) % n1
    x0 = (idx // (n1 * n2)) % n0
    s2 = 1
    s1 = n2
    s0 = n1 * n2
    off = b * per_item + idx
    if BACKWARD:
        sc = tl.load(scale + b).to(tl.float32)
        if KIND == 1:
            inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
            g = tl.where(inside, -2.0 * NDIM * _lap(u, off, inside, s0, s1, s2, NDIM), 0.0)
            m = ok & _interior(x0, x1 + 1, x2, n0, n1, n2, NDIM)
            g += tl.where(m, _lap(u, off + s1, m, s0, s1, s2, NDIM), 0.0)
            m = ok & _interior(x0, x1 - 1, x2, n0, n1, n2, NDIM)
            g += tl.where(m, _lap(u, off - s1, m, s0, s1, s2, NDIM), 0.0)
            m = ok & _interior(x0, x1, x2 + 1, n0, n1, n2, NDIM)
            g += tl.where(m, _lap(u, off + s2, m, s0, s1, s2, NDIM), 0.0)
            m = ok & _interior(x0, x1, x2 - 1, n0, n1, n2, NDIM)
            g += tl.where(m, _lap(u, off - s2, m, s0, s1, s2, NDIM), 0.0)
            if NDIM == 3:
                m = ok & _interior(x0 + 1, x1, x2, n0, n1, n2, NDIM)
                g += tl.where(m, _lap(u, off + s0, m, s0, s1, s2, NDIM), 0.0)
                m = ok & _interior(x0 - 1, x1, x2, n0, n1, n2, NDIM)
                g += tl.where(m, _lap(u, off - s0, m, s0, s1, s2, NDIM), 0.0)
            g = 2.0 * g
        else:
            c = _load(u, off, ok)
            g = tl.zeros([BLOCK], tl.float32)
            lo = ok & (x2 >= 1)
            hi = ok & (x2 <= n2 - 2)
            t = tl.where(lo, c - _load(u, off - s2, lo), 0.0) - tl.where(
                hi, _load(u, off + s2, hi) - c, 0.0
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
        tl.store(out + off, sc * g, mask=ok)
    else:
        if KIND == 1:
            inside = ok & _interior(x0, x1, x2, n0, n1, n2, NDIM)
            lap = _lap(u, off, inside, s0, s1, s2, NDIM)
            e = tl.where(inside, lap * lap, 0.0)
        else:
            c = _load(u, off, ok)
            hi = ok & (x2 <= n2 - 2)
            dd = tl.where(hi, _load(u, off + s2, hi) - c, 0.0)
            e = w2 * dd * dd
            hi = ok & (x1 <= n1 - 2)
            dd = tl.where(hi, _load(u, off + s1, hi) - c, 0.0)
            e += w1 * dd * dd
            if NDIM == 3:
                hi = ok & (x0 <= n0 - 2)
                dd = tl.where(hi, _load(u, off + s0, hi) - c, 0.0)
                e += w0 * dd * dd
        tl.store(out + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(e, 0))


def _launch(u: torch.Tensor, scale, out, kind: int, wt: list[float], backward: bool) -> None:
    ndim = u.dim() - 2
    n0, n1, n2 = (u.shape[2:] if ndim == 3 else (1, *u.shape[2:]))
    w0, w1, w2 = (wt if ndim == 3 else [0.0, *wt])
    per_item = u[0].numel()
    # The C channels of an item are stacked along axis 0: a stencil never crosses a channel
    # boundary because x0 is taken modulo n0 and the interior / difference masks stop at
    # the volume's faces.
    grid = (triton.cdiv(per_item, BLOCK), u.shape[0])
    _reg_kernel[grid](
        u, scale if scale is not None else u, out, per_item, n0, n1, n2, float(w0), float(w1),
        float(w2), KIND=kind, NDIM=ndim, BACKWARD=backward, BLOCK=BLOCK,
    )


def forward(u: torch.Tensor, kind: int, wt: list[float]) -> torch.Tensor:
    """Per-item energies [B] (float32) of contiguous float32 u [B, C, *S]."""
    partials = torch.empty((u.shape[0], triton.cdiv(u[0].numel(), BLOCK)), dtype=torch.float32,
                           device=u.device)
    _launch(u, None, partials, kind, wt, False)
    return partials.sum(1)


def backward(u: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, kind: int,
             wt: list[float]) -> None:
    """grad = d(Σ_b scale[b] E_b)/du, every element written."""
    _launch(u, scale, grad, kind, wt, True)
