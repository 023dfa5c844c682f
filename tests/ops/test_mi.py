"""Tests of ``mutual_information``, ``nmi``, ``joint_histogram`` and their losses: every
backend against a float64 reference of the definition, float64 gradcheck, identities, the
scikit-learn cross-check on hard bins, masks, NaN rules, determinism, ``torch.compile``,
memory (GPU) and every validation message.

Definition pinned here (mrus_kernels/mi.py): per item, K bins over [lo, hi] (value_range, or
the item's min and max over mask > 0), w = (hi - lo) / K, centres lo + (k + 1/2) w, values
clamped; W_k = phi((x - c_k) / w) normalised over k (Gaussian with sigma in bin widths, or
cubic B-spline); P = sum m W_a(f) W_b(g) / sum m; MI = sum P log(P / (p_a p_b)), H = -sum p
log p with P and p clamped at eps; NMI = (H_f + H_g) / H_fg.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
from unittest import mock

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from conftest import (
    DTYPE_IDS,
    TOLERANCES,
    assert_close_verbose,
    backend_params,
    poisoned_empty,
    rand,
    require_backend,
    spy_launches,
)
from mrus_kernels import (
    BackendUnavailableError,
    MutualInformationLoss,
    NMILoss,
    joint_histogram,
    mutual_information,
    nmi,
    reference,
    warp,
)

mi_module = importlib.import_module("mrus_kernels.mi")
try:  # the Triton kernels' module, for the tests that launch its helpers directly
    triton_mi = importlib.import_module("mrus_kernels.triton.mi")
except ImportError:  # pragma: no cover - triton not installed
    triton_mi = None

BACKENDS = backend_params(("torch", "cpu", "triton"))
FIXED_RANGES = ((0.0, 2.0), (-2.0, 2.0))
# The torch backend runs mrus_kernels.reference itself: comparing it with the reference is
# no test. Its rows are compared with NumPy float64 Parzen sums instead
# (test_torch_backend_vs_numpy_float64) and keep the identity / scikit-learn / gradcheck
# tests below.
KERNEL_BACKENDS = backend_params(("cpu", "triton"))
KERNELS = ("gaussian", "bspline")


def _pair(gen, shape, dtype=torch.float32, device="cpu"):
    """A fixed image and a non-linearly related, noisy moving image (MI clearly > 0)."""
    f = rand(gen, *shape, dtype=torch.float64)
    g = torch.sin(3 * f) + 0.2 * rand(gen, *shape, dtype=torch.float64)
    return f.to(device, dtype), g.to(device, dtype)


def _mask(gen, shape, device="cpu"):
    return (rand(gen, *shape, lo=0.0, hi=1.0) > 0.3).to(device)


def _ref_all(f, g, bins, kernel, sigma=0.5, value_range=None, mask=None):
    """Float64 reference: P, MI, NMI and gradients of (MI + NMI).sum() w.r.t. f and g."""
    f64 = f.detach().double().cpu().requires_grad_()
    g64 = g.detach().double().cpu().requires_grad_()
    m = None if mask is None else mask.cpu()
    p = reference.joint_histogram(f64, g64, bins, kernel, sigma, value_range, m)
    mi, h_f, h_g, h_fg = reference._entropies(p, 1e-10)
    nm = (h_f + h_g) / h_fg
    (mi.sum() + nm.sum()).backward()
    return p.detach(), mi.detach(), nm.detach(), f64.grad, g64.grad


def _ours_all(f, g, bins, kernel, backend, sigma=0.5, value_range=None, mask=None):
    fr, gr = f.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    kw = dict(bins=bins, kernel=kernel, sigma=sigma, value_range=value_range, mask=mask,
              backend=backend)
    p = joint_histogram(fr, gr, **kw)
    mi = mutual_information(fr, gr, **kw)
    nm = nmi(fr, gr, **kw)
    (mi.sum() + nm.sum()).backward()
    return p.detach(), mi.detach(), nm.detach(), fr.grad, gr.grad


def _compare(ours, ref, dtype, name):
    for what, a, e in zip(("P", "MI", "NMI", "d fixed", "d moving"), ours, ref):
        half = dtype in (torch.float16, torch.bfloat16)
        assert a.dtype == (torch.float32 if what == "P" and half else dtype), what
        assert_close_verbose(a.cpu(), e, dtype, name=f"{name} {what}")


# =========================================================================== vs reference


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(2, 1, 7, 9, 11), (3, 1, 13, 10)], ids=["3d", "2d"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_backends_vs_reference(backend, kernel, dtype, shape, masked, gen):
    """P, MI, NMI and both gradients of every backend against the float64 reference, per-item
    ranges, batch > 1, odd sizes, outputs poisoned before the kernels write."""
    require_backend(backend, "cpu", dtype)
    f, g = _pair(gen, shape, dtype)
    mask = _mask(gen, shape) if masked else None
    bins = 20 if kernel == "gaussian" else 12
    ref = _ref_all(f, g, bins, kernel, mask=mask)
    with poisoned_empty():
        ours = _ours_all(f, g, bins, kernel, backend, mask=mask)
    _compare(ours, ref, dtype, f"{backend} {kernel}")


# =========================================================================== NumPy truth


def _np_weights(x, lo, hi, bins, kernel, sigma):
    """Parzen weights [n, K] of values x (float64 NumPy), written from the definition."""
    width = max((hi - lo) / bins, 1e-12)
    centres = lo + (np.arange(bins) + 0.5) * width
    t = (np.clip(x, lo, hi)[:, None] - centres[None, :]) / width
    if kernel == "gaussian":
        z = -(t**2) / (2 * sigma**2)
        phi = np.exp(z - z.max(1, keepdims=True))
    else:
        a = np.abs(t)
        phi = np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    return phi / phi.sum(1, keepdims=True)


def _np_joint(f, g, bins, kernel, sigma, value_range=None, mask=None):
    """Joint histogram [B, K, K] per item in float64 NumPy: masked-out voxels are dropped
    (not replaced), ranges from the kept voxels, P = sum m W_a(f) W_b(g) / sum m."""
    f, g = f.double().numpy(), g.double().numpy()
    out = []
    for b in range(max(f.shape[0], g.shape[0])):
        x = f[b if f.shape[0] > 1 else 0].ravel()
        y = g[b if g.shape[0] > 1 else 0].ravel()
        w = np.ones_like(x) if mask is None else mask[b].double().numpy().ravel()
        keep = w > 0
        x, y, w = x[keep], y[keep], w[keep]
        if value_range is None:
            rx, ry = (x.min(), x.max()), (y.min(), y.max())
        elif isinstance(value_range[0], tuple):
            rx, ry = value_range
        else:
            rx = ry = value_range
        wx = _np_weights(x, *rx, bins, kernel, sigma)
        wy = _np_weights(y, *ry, bins, kernel, sigma)
        out.append((wx * w[:, None]).T @ wy / w.sum())
    return np.stack(out)


def _np_entropies(p, eps=1e-10):
    """(MI, H_f, H_g, H_fg) [B] of joint histograms p [B, K, K], P and p clamped at eps."""
    pc = np.maximum(p, eps)
    pa = np.maximum(p.sum(2), eps)
    pb = np.maximum(p.sum(1), eps)
    mi = (pc * (np.log(pc) - np.log(pa)[:, :, None] - np.log(pb)[:, None, :])).sum((1, 2))
    h_f = -(pa * np.log(pa)).sum(1)
    h_g = -(pb * np.log(pb)).sum(1)
    h_fg = -(pc * np.log(pc)).sum((1, 2))
    return mi, h_f, h_g, h_fg


def _np_mi_nmi(p, eps=1e-10):
    mi, h_f, h_g, h_fg = _np_entropies(p, eps)
    return mi, (h_f + h_g) / h_fg


# (kernel, sigma, value_range): per-item ranges, fixed ranges that clamp some voxels, narrow
# and wide Gaussian windows.
NUMPY_CASES = [
    ("gaussian", 0.5, None), ("bspline", 0.5, None), ("gaussian", 0.05, ((0.6, 1.4), (-1.0, 1.0))),
    ("gaussian", 1.0, (0.0, 1.2)), ("gaussian", 3.0, ((0.6, 1.4), (-1.0, 1.0))),
    ("bspline", 0.5, ((0.6, 1.4), (-1.0, 1.0))),
]


@pytest.mark.parametrize(("kernel", "sigma", "value_range"), NUMPY_CASES,
                         ids=[f"{k}-{s}-{'fixed' if r else 'item'}" for k, s, r in NUMPY_CASES])
@pytest.mark.parametrize("shape", [(2, 1, 7, 9, 11), (3, 1, 13, 10)], ids=["3d", "2d"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_torch_backend_vs_numpy_float64(kernel, sigma, value_range, shape, masked, gen):
    """The torch backend (the reference the other backends are tested against) against an
    independent float64 NumPy evaluation of the definition: P, MI and NMI. Its gradients are
    checked against finite differences in test_gradcheck_float64."""
    f, g = _pair(gen, shape, torch.float64)
    mask = _mask(gen, shape) if masked else None
    kw = dict(bins=12, kernel=kernel, sigma=sigma, value_range=value_range, mask=mask,
              backend="torch")
    p = _np_joint(f, g, 12, kernel, sigma, value_range, mask)
    mi, nm = _np_mi_nmi(p)
    assert_close_verbose(joint_histogram(f, g, **kw), torch.from_numpy(p), torch.float64,
                         name="P")
    assert_close_verbose(mutual_information(f, g, **kw), torch.from_numpy(mi), torch.float64,
                         name="MI")
    assert_close_verbose(nmi(f, g, **kw), torch.from_numpy(nm), torch.float64, name="NMI")


# (kernel, sigma): Gaussian windows of 7 bins (one vector; 0.59 is the widest one vector
# takes), 9 and 15 bins (two vectors; 1.2 is the widest the vector kernels take), 21 bins
# (portable loop only), a tiny sigma, and the B-spline.
CPU_LOOP_KERNELS = [("gaussian", 0.5), ("gaussian", 0.59), ("gaussian", 0.7),
                    ("gaussian", 1.2), ("gaussian", 1.8), ("gaussian", 0.1),
                    ("bspline", 0.5)]


@pytest.mark.parametrize(("kernel", "sigma"), CPU_LOOP_KERNELS,
                         ids=[f"{k}-{s}" for k, s in CPU_LOOP_KERNELS])
def test_cpu_loops_vs_reference(cpu_loops, kernel, sigma, gen):
    """The cpu backend's float32 loops, vector and portable: P, MI, NMI and both gradients
    against the reference, with a voxel count that is not a multiple of the vector width,
    per-item ranges (one clamping), a mask, and values at the range ends and outside it."""
    require_backend("cpu", "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 9, 7, 11))
    f[0, 0, 0, 0, :3] = torch.tensor([0.0, 1.0, 1.5])  # range ends, then outside it
    g[1, 0, 2, 2, :2] = torch.tensor([-5.0, 5.0])
    vr = ((0.0, 1.0), (-1.0, 1.5))
    mask = _mask(gen, f.shape)
    ref = _ref_all(f, g, 13, kernel, sigma=sigma, value_range=vr, mask=mask)
    with poisoned_empty():
        ours = _ours_all(f, g, 13, kernel, "cpu", sigma=sigma, value_range=vr, mask=mask)
    scale = max(1.0, 0.05 / sigma**2)  # as test_sigma_and_fixed_ranges
    for what, a, e in zip(("P", "MI", "NMI", "d fixed", "d moving"), ours, ref):
        assert_close_verbose(a, e, torch.float32, atol=TOLERANCES[torch.float32][0] * scale,
                             rtol=TOLERANCES[torch.float32][1] * scale, name=f"{cpu_loops} {what}")


@pytest.mark.parametrize("where", ["fixed", "moving", "mask"])
def test_cpu_loops_nan(cpu_loops, where, gen):
    """Both cpu loops: a NaN value (or mask) makes the item's MI and its gradients NaN, a NaN
    under a zero mask changes nothing (its gradient is 0), the other item stays finite."""
    require_backend("cpu", "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 5, 13))
    mask = torch.ones_like(f)
    mask[0, 0, 4, 12] = 0.0
    f[0, 0, 4, 12] = float("nan")  # masked out: does not count
    clean = mutual_information(f, g, mask=mask, backend="cpu")
    target = {"fixed": f, "moving": g, "mask": mask}[where]
    target[0, 0, 1, 9] = float("nan")
    fr, gr = f.clone().requires_grad_(), g.clone().requires_grad_()
    value = mutual_information(fr, gr, mask=mask, backend="cpu")
    value.sum().backward()
    assert bool(value[0].isnan()) and torch.equal(value[1], clean[1])
    assert bool(fr.grad[1].isfinite().all()) and bool(gr.grad[1].isfinite().all())
    assert bool(fr.grad[0].isnan().any()) and bool(gr.grad[0].isnan().any())
    # A masked-out voxel gets exactly 0, even in an item whose histogram is NaN.
    assert fr.grad[0, 0, 4, 12] == 0 and gr.grad[0, 0, 4, 12] == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sigma", [0.05, 1.0, 3.0])
def test_sigma_and_fixed_ranges(backend, sigma, gen):
    """Narrow and wide Gaussian windows (the truncated window of the C++ kernels must hold
    to tolerance at both ends), with a fixed range per image that clamps some voxels."""
    dtype = torch.float32
    require_backend(backend, "cpu", dtype)
    f, g = _pair(gen, (2, 1, 6, 7, 8), dtype)
    vr = ((0.6, 1.4), (-1.0, 1.0))
    ref = _ref_all(f, g, 16, "gaussian", sigma=sigma, value_range=vr)
    ours = _ours_all(f, g, 16, "gaussian", backend, sigma=sigma, value_range=vr)
    # In float32 the rounding of the bin coordinate s (~1e-7 relative) is amplified by
    # 1 / sigma^2 in the weights' exponent: the tolerance scales with it below sigma ~ 0.2.
    scale = max(1.0, 0.05 / sigma**2)
    for what, a, e in zip(("P", "MI", "NMI", "d fixed", "d moving"), ours, ref):
        assert_close_verbose(a, e, dtype, atol=TOLERANCES[dtype][0] * scale,
                             rtol=TOLERANCES[dtype][1] * scale, name=f"{backend} {what}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=DTYPE_IDS.get)
def test_half_dtypes(backend, dtype, gen):
    require_backend(backend, "cpu", dtype)
    f, g = _pair(gen, (2, 1, 9, 10), dtype)
    ref = _ref_all(f, g, 16, "gaussian")
    ours = _ours_all(f, g, 16, "gaussian", backend)
    _compare(ours, ref, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_and_broadcast(backend, gen):
    """A transposed (non-contiguous) fixed image of batch 1 against a batch-3 moving image:
    the same as the contiguous, expanded inputs; the broadcast gradient sums over the batch."""
    require_backend(backend, "cpu", torch.float32)
    base, g = _pair(gen, (1, 1, 9, 7), torch.float32)
    g = torch.cat([g, g.flip(-1), g * 2], 0)
    f_view = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not f_view.is_contiguous()
    ours = _ours_all(f_view, g, 16, "gaussian", backend)
    ref = _ref_all(base.expand(3, -1, -1, -1), g, 16, "gaussian")
    assert ours[3].shape == (1, 1, 9, 7)
    assert_close_verbose(ours[1], ref[1], torch.float32, name="MI")
    assert_close_verbose(ours[3], ref[3].sum(0, keepdim=True), torch.float32, name="d fixed")
    assert_close_verbose(ours[4], ref[4], torch.float32, name="d moving")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_only_where_needed(backend, gen):
    """Only the image that requires grad gets one (either image may be the fixed one)."""
    require_backend(backend, "cpu", torch.float32)
    f, g = _pair(gen, (1, 1, 8, 9))
    ref = _ref_all(f, g, 16, "bspline")
    for which in (0, 1):
        a, b = f.clone(), g.clone()
        (a, b)[which].requires_grad_()
        (mutual_information(a, b, bins=16, kernel="bspline", backend=backend)
         + nmi(a, b, bins=16, kernel="bspline", backend=backend)).sum().backward()
        assert (a, b)[1 - which].grad is None
        assert_close_verbose(
            (a, b)[which].grad, ref[3 + which], torch.float32, name=f"grad {which}"
        )


# =========================================================================== Triton launches


def test_triton_tf32_split_is_exact_in_tf32(gen):
    """The premise of the 3xTF32 products: hi and lo are exactly representable in TF32
    (the tensor cores then multiply them without rounding, as the interpreter's float32
    matmul does) and hi + lo recovers x to 2**-21 relative; one TF32 product alone keeps
    only ~2**-11 (the histogram would lose ~1e-4 relative)."""
    if triton_mi is None:
        pytest.skip("triton is not installed")
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(x_ptr, hi_ptr, lo_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        hi, lo = triton_mi._split(tl.load(x_ptr + offs))
        tl.store(hi_ptr + offs, hi)
        tl.store(lo_ptr + offs, lo)

    x = torch.cat([torch.rand(996, generator=gen), torch.rand(24, generator=gen) * 1e-20,
                   torch.tensor([1.0, 0.0, 2.0**-30, 0.999999])])
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    split_kernel[(1,)](x, hi, lo, BLOCK=x.numel())
    for part in (hi, lo):
        assert bool((part.view(torch.int32) & 0x1FFF == 0).all()), "not exact in TF32"
    err = (hi.double() + lo.double() - x.double()).abs()
    assert bool((err <= 2.0**-21 * x.double().abs()).all()), float((err / x.double()).max())
    assert float(((hi.double() - x.double()).abs() / x.double().clamp_min(1e-30)).max()) > 1e-4


@pytest.mark.parametrize("bins", [7, 20, 50, 100], ids=lambda k: f"K{k}")
def test_triton_every_bin_cap(bins, gen):
    """Each padded bin count of the Triton kernels (KP = 16, 32, 64, 128; at 128 a backward
    needing both gradients runs as two launches) against the float64 reference."""
    require_backend("triton", "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 5, 7), torch.float32)
    mask = _mask(gen, (2, 1, 5, 7))
    ref = _ref_all(f, g, bins, "gaussian", sigma=0.7, mask=mask)
    with poisoned_empty():
        ours = _ours_all(f, g, bins, "gaussian", "triton", sigma=0.7, mask=mask)
    _compare(ours, ref, torch.float32, f"triton K={bins}")


def test_triton_batch_is_on_grid_axis_0(monkeypatch, gen):
    """The batch shares grid axis 0 with an item's programs (axes 1 and 2 take at most
    65535 programs on CUDA): with that limit lowered below the batch size, every launch
    still fits, and the results match the reference."""
    require_backend("triton", "cpu", torch.float32)
    from mrus_kernels.triton import _common

    monkeypatch.setattr(_common, "MAX_GRID_YZ", 2)
    calls = spy_launches(monkeypatch, triton_mi, "_mi_fwd_kernel", "_mi_bwd_kernel")
    f, g = _pair(gen, (5, 1, 6, 7), torch.float32)
    ours = _ours_all(f, g, 12, "bspline", "triton")
    assert {name for name, _, _ in calls} == {"_mi_fwd_kernel", "_mi_bwd_kernel"}
    for name, grid, _ in calls:
        assert all(n <= _common.MAX_GRID_YZ for n in grid[1:]), (name, grid)
    _compare(ours, _ref_all(f, g, 12, "bspline"), torch.float32, "batch 5")


def test_triton_grid_limit_raises(monkeypatch, gen):
    """More programs than grid axis 0 takes: a ValueError that names the axis and the
    limit, not a launch failure."""
    require_backend("triton", "cpu", torch.float32)
    from mrus_kernels.triton import _common

    monkeypatch.setattr(_common, "MAX_GRID_X", 3)
    f, g = _pair(gen, (4, 1, 6, 7), torch.float32)
    with pytest.raises(ValueError, match=r"mi \(triton\): B \* blocks per item needs 4 "
                                         r"programs on grid axis 0, at most 3"):
        mutual_information(f, g, backend="triton")


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_idx64_variants(monkeypatch, kernel, masked, gen):
    """The 64-bit offset variants (IDX64, chosen at call time from
    _common.IDX64_THRESHOLD) against the float64 reference at a small size."""
    require_backend("triton", "cpu", torch.float32)
    from mrus_kernels.triton import _common

    monkeypatch.setattr(_common, "IDX64_THRESHOLD", 100)
    calls = spy_launches(monkeypatch, triton_mi, "_mi_fwd_kernel", "_mi_bwd_kernel")
    f, g = _pair(gen, (2, 1, 7, 9), torch.float32)
    mask = _mask(gen, f.shape) if masked else None
    with poisoned_empty():
        ours = _ours_all(f, g, 12, kernel, "triton", mask=mask)
    assert calls and all(kw["IDX64"] for _, _, kw in calls), calls
    _compare(ours, _ref_all(f, g, 12, kernel, mask=mask), torch.float32, "IDX64")


# =========================================================================== gradcheck


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("what", ["mi", "nmi"])
def test_gradcheck_float64(backend, kernel, what, gen):
    """Analytic gradients to both images against finite differences (fixed range, values
    strictly inside it: the range is a constant, so the clamp has no kink here)."""
    f, g = _pair(gen, (2, 1, 4, 5), torch.float64)
    fn = mutual_information if what == "mi" else nmi
    vr = ((0.4, 1.6), (-1.2, 1.4))

    def func(a, b):
        return fn(a, b, bins=6, kernel=kernel, value_range=vr, backend=backend)

    assert torch.autograd.gradcheck(
        func, (f.requires_grad_(), g.requires_grad_()), eps=1e-6, atol=1e-7, rtol=1e-5
    )


# =========================================================================== identities


def _entropy_of_labels(labels: np.ndarray) -> float:
    p = np.bincount(labels) / labels.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mi_with_itself_is_entropy(backend, gen):
    """MI(x, x) = H(x). The Parzen window blurs the joint histogram off the diagonal, so at
    sigma = 0.5 MI(x, x) < H(x); the identity holds as sigma -> 0. Values at the bin centres
    with sigma = 0.05 (a neighbour bin weighs exp(-200)) give it to float tolerance, with H
    the entropy of the hard bin counts; for continuous values MI(x, x) <= H(x) at every sigma
    and the gap shrinks as sigma does."""
    require_backend(backend, "cpu", torch.float64)
    bins = 12
    labels = torch.randint(0, bins, (2, 1, 9, 11), generator=gen)
    # The bin centres of the fixed range [0, 1].
    x = ((labels.double() + 0.5) / bins)
    # eps = 1e-15: each of the K^2 - K empty cells, clamped at eps, adds about eps * log(eps)
    # to MI (3e-7 in all at the default 1e-10).
    mi = mutual_information(x, x, bins=bins, sigma=0.05, value_range=(0.0, 1.0), eps=1e-15,
                            backend=backend)
    h = torch.tensor([_entropy_of_labels(labels[i].flatten().numpy()) for i in range(2)],
                     dtype=torch.float64)
    assert_close_verbose(mi, h, torch.float64, atol=1e-9, rtol=1e-9, name="MI(x, x) vs H(x)")

    c = rand(gen, 1, 1, 16, 16, dtype=torch.float64)
    h_c = reference._entropies(
        joint_histogram(c, c, bins=bins, sigma=0.02, backend=backend), 1e-10
    )[1]
    gaps = []
    for sigma in (0.5, 0.2, 0.05, 0.02):
        p = joint_histogram(c, c, bins=bins, sigma=sigma, backend=backend)
        mi_c, h_f, _, _ = reference._entropies(p, 1e-10)
        assert float(mi_c) <= float(h_f) + 1e-12
        gaps.append(float(h_c) - float(mi_c))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.05 * float(h_c), gaps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_symmetry_and_affine_invariance(backend, kernel, gen):
    """MI(f, g) = MI(g, f); MI(x, a x + b) = MI(x, x) for a > 0 with per-item ranges (the bins
    move with the values: the same histogram up to rounding); NMI in [1, 2]."""
    require_backend(backend, "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 10, 12))
    kw = dict(bins=16, kernel=kernel, backend=backend)
    assert_close_verbose(mutual_information(g, f, **kw), mutual_information(f, g, **kw),
                         torch.float32, name="swap")
    mi_xx = mutual_information(f, f, **kw)
    for a, b in ((2.5, -3.0), (0.1, 7.0)):
        assert_close_verbose(mutual_information(f, a * f + b, **kw), mi_xx, torch.float32,
                             atol=1e-4, name=f"a={a}")
    for x, y in ((f, g), (f, f), (f, rand(gen, 2, 1, 10, 12))):
        value = nmi(x, y, **kw)
        assert bool(((value >= 1 - 1e-6) & (value <= 2 + 1e-6)).all()), value


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_independent_noise_has_no_information(backend, gen):
    """MI(x, independent noise) -> 0 at large N (bias about (K - 1)^2 / (2N) nats)."""
    f = rand(gen, 1, 1, 256, 256)
    g = rand(gen, 1, 1, 256, 256)
    value = float(mutual_information(f, g, bins=16, backend=backend))
    assert 0 <= value < 0.01, value
    assert float(mutual_information(f, f, bins=16, backend=backend)) > 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_sigma_matches_sklearn_on_hard_bins(backend, gen):
    """With a very small Gaussian sigma, MI tends to scikit-learn's mutual_info_score (nats)
    of the hard-binned data. Only voxels within a few sigma of a bin edge differ."""
    require_backend(backend, "cpu", torch.float64 if backend != "triton" else torch.float32)
    dtype = torch.float32 if backend == "triton" else torch.float64
    f, g = _pair(gen, (1, 1, 24, 24), torch.float64)
    bins = 8
    value = float(mutual_information(f.to(dtype), g.to(dtype), bins=bins, sigma=0.002,
                                     backend=backend))

    def hard(x):
        lo, hi = x.min(), x.max()
        return ((x - lo) / ((hi - lo) / bins)).floor().clamp(0, bins - 1).long().flatten().numpy()

    expected = mutual_info_score(hard(f), hard(g))
    assert abs(value - expected) <= 2e-3, (value, expected)


# =========================================================================== masks, NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_changes_nothing(backend, gen):
    """Values where the mask is 0 (huge, negative, NaN) change neither the result (range
    included) nor the gradient inside; the gradient outside is 0."""
    require_backend(backend, "cpu", torch.float32)
    shape = (2, 1, 8, 9)
    f, g = _pair(gen, shape)
    mask = _mask(gen, shape)
    f2, g2 = f.clone(), g.clone()
    f2[~mask] = 1e6
    g2[~mask] = float("nan")
    clean = _ours_all(f, g, 16, "gaussian", backend, mask=mask)
    dirty = _ours_all(f2, g2, 16, "gaussian", backend, mask=mask)
    for name, a, e in zip(("P", "MI", "NMI"), dirty[:3], clean[:3]):
        assert_close_verbose(a, e, torch.float32, name=name)
    for a, e in zip(dirty[3:], clean[3:]):
        assert_close_verbose(a[mask], e[mask], torch.float32, name="grad inside")
        assert bool((a[~mask] == 0).all())
    # A float mask weights voxels: all-ones equals no mask.
    ones = _ours_all(f, g, 16, "gaussian", backend, mask=torch.ones(shape))
    plain = _ours_all(f, g, 16, "gaussian", backend)
    assert_close_verbose(ones[1], plain[1], torch.float32, name="ones mask")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mask(backend, gen):
    """Eager: ValueError naming the item. Where validation cannot sync (torch.compile, CUDA
    graphs) the item gets P = 0: finite MI and NMI, zero gradients, no NaN."""
    require_backend(backend, "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 6, 7))
    mask = _mask(gen, (2, 1, 6, 7))
    mask[1] = False
    with pytest.raises(ValueError, match=r"mutual_information: mask selects no voxel .* \[1\]"):
        mutual_information(f, g, mask=mask, backend=backend)
    if backend == "torch":
        return  # the oracle follows the definition literally (0 / 0)
    fr, gr = f.clone().requires_grad_(), g.clone().requires_grad_()
    with mock.patch.object(mi_module, "capturing", return_value=True):
        value = mutual_information(fr, gr, mask=mask, backend=backend)
        value2 = nmi(f, g, mask=mask, backend=backend)
    assert bool(torch.isfinite(value).all()) and bool(torch.isfinite(value2).all())
    value.sum().backward()
    assert bool((fr.grad[1] == 0).all()) and bool((gr.grad[1] == 0).all())
    assert bool(torch.isfinite(fr.grad).all())
    ref = mutual_information(f[:1], g[:1], mask=mask[:1], backend=backend)
    assert_close_verbose(value[:1].detach(), ref, torch.float32, name="item 0 unaffected")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["fixed", "moving", "range"])
def test_nan_in_nan_out(backend, where, gen):
    """A NaN voxel (or a NaN in a per-item range) makes that item's MI NaN, the other item's
    stays finite."""
    require_backend(backend, "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 6, 7))
    if where == "fixed":
        f[0, 0, 2, 3] = float("nan")
        vr = (0.0, 2.0) if backend == "triton" else None
    elif where == "moving":
        g[0, 0, 1, 1] = float("nan")
        vr = ((0.0, 2.0), (-2.0, 2.0))
    else:
        f[0, 0, 0, 0] = float("nan")
        vr = None
    value = mutual_information(f, g, value_range=vr, backend=backend)
    assert bool(value[0].isnan()) and bool(torch.isfinite(value[1]))


# Every backend, CPU loops both ways, and the GPU rows (cuda marker): (backend, device).
ALL_BACKEND_ROWS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cpu", "cpu", id="cpu-vector"),
    pytest.param("cpu-portable", "cpu", id="cpu-portable"),
    pytest.param("triton", "cpu", id="triton"),
    pytest.param("cuda", "cuda", marks=pytest.mark.cuda, id="cuda"),
    pytest.param("triton", "cuda", marks=pytest.mark.cuda, id="triton-cuda"),
]


@contextlib.contextmanager
def _backend_row(backend, device):
    """The backend name to pass, with the cpu loops chosen; skips where it cannot run."""
    name = "cpu" if backend == "cpu-portable" else backend
    require_backend(name, device, torch.float32)
    if name != "cpu":
        yield name
        return
    from mrus_kernels import _ext

    _ext.C.set_cpu_simd(backend == "cpu")
    try:
        yield name
    finally:
        _ext.C.set_cpu_simd(True)


NUMPY_INF_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)
# Where the non-finite value sits; (f, g) of _pair lie inside these fixed ranges.
NAN_CASES = {
    "fixed": (("f", (0, 0, 2, 3)), FIXED_RANGES),
    "moving": (("g", (0, 0, 4, 6)), FIXED_RANGES),
    "fixed-first-voxel": (("f", (0, 0, 0, 0)), FIXED_RANGES),
    "moving-last-voxel": (("g", (0, 0, 5, 8)), FIXED_RANGES),
    "mask-weight": (("m", (0, 0, 3, 3)), FIXED_RANGES),
    "item-range": (("f", (0, 0, 1, 5)), None),
}


@pytest.mark.parametrize(("backend", "device"), ALL_BACKEND_ROWS)
@pytest.mark.parametrize("where", list(NAN_CASES))
def test_nan_poisons_the_whole_item_histogram(backend, device, where, gen):
    """One rule on every backend (mrus_kernels/mi.py): a NaN value, mask weight or item
    range that counts makes every entry of its item's joint histogram NaN (not one entry,
    nor the row or column a NaN weight meets) and leaves the other item as it would be
    alone, gradients included; voxels with mask 0 get exactly 0 gradient; the kernels give
    the offending voxel a NaN gradient."""
    with _backend_row(backend, device) as name:
        f, g = _pair(gen, (2, 1, 6, 9), torch.float32, device)
        mask = _mask(gen, (2, 1, 6, 9), device).float()
        (which, at), vr = NAN_CASES[where]
        mask[at] = 1.0
        {"f": f, "g": g, "m": mask}[which][at] = float("nan")
        kw = dict(bins=8, value_range=vr, mask=mask, backend=name)
        p = joint_histogram(f, g, **kw)
        assert bool(p[0].isnan().all()), p[0]
        fr, gr = f.clone().requires_grad_(), g.clone().requires_grad_()
        (mutual_information(fr, gr, **kw) + nmi(fr, gr, **kw)).sum().backward()
        ref = _ref_all(f[1:], g[1:], 8, "gaussian", value_range=vr, mask=mask[1:])
        assert_close_verbose(p[1:], ref[0], torch.float32, name="item 1 P")
        assert_close_verbose(fr.grad[1:], ref[3], torch.float32, name="item 1 d fixed")
        assert_close_verbose(gr.grad[1:], ref[4], torch.float32, name="item 1 d moving")
        out = mask[0] == 0
        for grad in (fr.grad, gr.grad):
            assert bool((grad[0][out] == 0).all()), "masked-out voxels must get exactly 0"
            if name != "torch" and which != "m":
                assert bool(grad[0][at[1:]].isnan()), "the offending voxel's gradient"


@pytest.mark.parametrize(("backend", "device"), ALL_BACKEND_ROWS)
def test_non_finite_values_that_do_not_count(backend, device, gen):
    """A NaN under mask 0 changes nothing; an infinite value under a fixed range is clamped
    to the range end and counts there (as torch.clamp does), on every backend."""
    with _backend_row(backend, device) as name:
        f, g = _pair(gen, (2, 1, 6, 9), torch.float32, device)
        mask = torch.ones_like(f)
        mask[0, 0, 2, 2] = 0.0
        f[0, 0, 2, 2] = float("nan")
        g[1, 0, 3, 3] = float("inf")
        f[1, 0, 4, 4] = float("-inf")
        p = joint_histogram(f, g, bins=8, value_range=FIXED_RANGES, mask=mask, backend=name)
        ref = reference.joint_histogram(f.double().cpu(), g.double().cpu(), 8,
                                        value_range=FIXED_RANGES, mask=mask.cpu())
        assert_close_verbose(p, ref, torch.float32, name="P")


# NumPy's warnings on inf - inf and inf / inf in the Triton interpreter (not on a GPU).
@NUMPY_INF_WARNINGS
@pytest.mark.parametrize(("backend", "device"), ALL_BACKEND_ROWS)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+inf", "-inf"])
def test_infinite_value_poisons_its_item_under_its_own_range(backend, device, sign, gen):
    """An infinite value that counts, with the item's own range (so the range is infinite),
    makes every entry of that item's joint_histogram NaN on every backend (the reference's
    arithmetic); the other item is as it would be alone."""
    with _backend_row(backend, device) as name:
        f, g = _pair(gen, (2, 1, 6, 9), torch.float32, device)
        f[0, 0, 3, 4] = sign * float("inf")
        p = joint_histogram(f, g, bins=8, backend=name)
        assert bool(p[0].isnan().all()), p[0]
        expected = reference.joint_histogram(f[1:].double().cpu(), g[1:].double().cpu(), 8)
        assert_close_verbose(p[1:], expected, torch.float32, name="item 1 P")
        assert bool(reference.joint_histogram(f.double().cpu(), g.double().cpu(), 8)[0]
                    .isnan().all()), "the reference's own rule"


# NumPy's warnings on inf - inf and inf / inf in the Triton interpreter (not on a GPU).
@NUMPY_INF_WARNINGS
@pytest.mark.parametrize(("backend", "device"), ALL_BACKEND_ROWS)
def test_range_wider_than_the_dtype_poisons_its_item(backend, device, gen):
    """Values so spread that hi - lo overflows the working dtype (float32: +-3e38) give an
    infinite bin width: that item is NaN on every backend (documented in mrus_kernels/mi.py),
    the other item is unaffected."""
    with _backend_row(backend, device) as name:
        f, g = _pair(gen, (2, 1, 6, 9), torch.float32, device)
        f[0, 0, 0, 0], f[0, 0, 5, 8] = 3e38, -3e38
        p = joint_histogram(f, g, bins=8, backend=name)
        value = mutual_information(f, g, bins=8, backend=name)
        assert bool(p[0].isnan().all()) and bool(value[0].isnan()), (p[0], value)
        expected = reference.joint_histogram(f[1:].double().cpu(), g[1:].double().cpu(), 8)
        assert_close_verbose(p[1:], expected, torch.float32, name="item 1 P")


def test_constant_image_is_finite(gen):
    """A constant image (zero-width per-item range) has entropy 0 and MI 0, finite."""
    f = torch.full((1, 1, 6, 7), 3.0)
    g = rand(gen, 1, 1, 6, 7)
    for backend in ("torch", "cpu"):
        value = mutual_information(f, g, backend=backend)
        assert bool(torch.isfinite(value).all()) and abs(float(value)) < 1e-6


# =========================================================================== masks, parameters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [mutual_information, nmi, joint_histogram],
                         ids=lambda fn: fn.__name__)
def test_mask_requiring_grad_is_refused(backend, fn, gen):
    """The mask is not differentiable: a mask that requires grad raises at the call, on every
    backend, before any kernel runs (the torch backend used to give it a gradient and the
    kernel backends failed at backward)."""
    require_backend(backend, "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 6, 7))
    mask = _mask(gen, (2, 1, 6, 7)).float().requires_grad_()
    with pytest.raises(ValueError, match=rf"{fn.__name__}: mask must not require grad .*"
                                         r"pass mask.detach\(\)"):
        fn(f.requires_grad_(), g, mask=mask, backend=backend)
    fn(f, g, mask=mask.detach(), backend=backend)  # the advertised way out works


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-0.5, float("inf"), -float("inf")])
def test_negative_or_infinite_mask_weight_is_refused(backend, bad, gen):
    """One weight < 0 or infinite: ValueError naming mask and the item, on every backend
    (before, torch and the kernels returned different numbers or NaN)."""
    require_backend(backend, "cpu", torch.float32)
    f, g = _pair(gen, (3, 1, 6, 7))
    mask = rand(gen, 3, 1, 6, 7, lo=0.1, hi=2.0)
    mask[2, 0, 4, 5] = bad
    with pytest.raises(ValueError, match=r"mutual_information: mask weights must be finite and "
                                         r">= 0, .* batch item\(s\) \[2\]"):
        mutual_information(f, g, mask=mask, backend=backend)


def test_mask_checks_take_one_host_sync(gen):
    """Eager validation of a mask (weights >= 0 and finite, no empty item) reads the device
    once for all its checks: one tolist(), no item() / bool() of a tensor."""
    f, g = _pair(gen, (2, 1, 6, 7))
    mask = rand(gen, 2, 1, 6, 7, lo=0.0, hi=1.0)
    reads = []
    real = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__")}

    def spy(name):
        def read(self, *args):
            reads.append(name)
            return real[name](self, *args)
        return read

    with contextlib.ExitStack() as stack:
        for name in real:
            stack.enter_context(mock.patch.object(torch.Tensor, name, spy(name)))
        mi_module._validate("mi", f, g, 8, "gaussian", 0.5, None, mask, 1e-10, None)
    assert reads == ["tolist"], reads


# Mask scales that overflow (float32: 1e38 x N) or flush to 0 (a float64 mask cast to
# float32) unless each item's weights are brought near 1 first.
MASK_SCALES = [
    pytest.param(1e38, torch.float32, id="1e38-f32"),
    pytest.param(1e300, torch.float64, id="1e300-f64"),
    pytest.param(1e-300, torch.float64, id="1e-300-f64"),
    pytest.param(1e-40, torch.float32, id="denormal-f32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "mask_dtype"), MASK_SCALES)
def test_mask_weight_scale_does_not_matter(backend, scale, mask_dtype, gen):
    """P only depends on the mask up to a factor: huge or tiny weights give the float64
    reference's result for the unscaled mask, values and gradients, on every backend (they
    used to give P = 0, MI ~ 0, or NaN)."""
    require_backend(backend, "cpu", torch.float32)
    shape = (2, 1, 7, 8)
    f, g = _pair(gen, shape)
    weights = rand(gen, *shape, lo=0.0, hi=1.0, dtype=torch.float64)
    weights[weights < 0.3] = 0.0
    ref = _ref_all(f, g, 12, "gaussian", mask=weights)
    ours = _ours_all(f, g, 12, "gaussian", backend, mask=(weights * scale).to(mask_dtype))
    _compare(ours, ref, torch.float32, f"{backend} mask x {scale:g}")


def _edge_pair(gen, shape):
    """Values on a 1/4 grid in [0, 8] (a quarter of them exactly on a bin edge of
    value_range (0, 8) with 8 bins, where the hard-binning limit splits 1/2 : 1/2 and the
    gradient peaks at ~1/sigma^2) mixed with random values."""
    grid = torch.randint(0, 33, shape, generator=gen).double() / 4
    f = torch.where(rand(gen, *shape, lo=0.0, hi=1.0, dtype=torch.float64) < 0.5, grid,
                    rand(gen, *shape, lo=0.0, hi=8.0, dtype=torch.float64))
    g = (f + 2 * torch.sin(f)).clamp(0, 8)
    return f, g


SIGMA_ROWS = [
    pytest.param("torch", torch.float32, id="torch-f32"),
    pytest.param("torch", torch.float64, id="torch-f64"),
    pytest.param("cpu", torch.float32, id="cpu-f32"),
    pytest.param("cpu", torch.float64, id="cpu-f64"),
    pytest.param("triton", torch.float32, id="triton-f32"),
]


@pytest.mark.parametrize(("backend", "dtype"), SIGMA_ROWS)
@pytest.mark.parametrize("bound", ["min", "max"])
def test_sigma_bounds(backend, dtype, bound, gen):
    """sigma is accepted in [SIGMA_MIN, SIGMA_MAX] bin widths. At either bound every backend
    and dtype is finite and equals the float64 reference, values and gradients, with values
    exactly on bin edges; just outside, ValueError naming sigma and the range. (Below, float32
    results or gradients used to turn NaN from sigma ~ 1e-19 and float64 from ~1e-170; the
    Triton launcher raised ZeroDivisionError.)"""
    require_backend(backend, "cpu", dtype)
    sigma = mi_module.SIGMA_MIN if bound == "min" else mi_module.SIGMA_MAX
    f, g = _edge_pair(gen, (2, 1, 9, 10))
    f, g = f.to(dtype), g.to(dtype)
    vr = (0.0, 8.0)
    ref = _ref_all(f, g, 8, "gaussian", sigma=sigma, value_range=vr)
    ours = _ours_all(f, g, 8, "gaussian", backend, sigma=sigma, value_range=vr)
    for what, a in zip(("P", "MI", "NMI", "d fixed", "d moving"), ours, strict=True):
        assert bool(torch.isfinite(a).all()), what
    if bound == "min":
        assert float(ref[3].abs().max()) > 1e9, "the edge voxels' gradient peaks"
    _compare(ours, ref, dtype, f"{backend} sigma={sigma:g}")
    # Just outside, and the values that used to give NaN or raise ZeroDivisionError /
    # OverflowError (the latter even for the B-spline, which ignores sigma).
    outside = (sigma * 0.99, 1e-20, 1e-170) if bound == "min" else (sigma * 1.01, 1e200)
    for kernel, value in itertools.product(KERNELS, outside):
        with pytest.raises(ValueError, match=r"nmi: sigma must be in \[1e-06, 1e\+06\] bin "
                                             r"widths, got"):
            nmi(f, g, sigma=value, kernel=kernel, backend=backend)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_float64_accepts_what_float32_cannot_hold(backend, gen):
    """eps and value_range are checked against the working dtype: float64 takes an eps of
    1e-300 and a range of (0, 1e39) that float32 refuses, and computes them correctly."""
    require_backend(backend, "cpu", torch.float64)
    f, g = _pair(gen, (2, 1, 6, 7), torch.float64)
    value = mutual_information(f * 1e38, g * 1e38, value_range=(-1e39, 1e39), eps=1e-300,
                               backend=backend)
    expected = reference.mutual_information(f * 1e38, g * 1e38, value_range=(-1e39, 1e39),
                                            eps=1e-300)
    assert_close_verbose(value, expected, torch.float64, name="MI")
    with pytest.raises(ValueError, match="eps must be in"):
        mutual_information(f.float(), g.float(), eps=1e-300, backend=backend)


# =========================================================================== determinism


def test_cpu_bitwise_repeatable_across_thread_counts(gen):
    """The CPU chunking depends on N, B and K only: bitwise equal for 1 and 2 threads."""
    require_backend("cpu", "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 40, 41, 7))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            fr = f.clone().requires_grad_()
            p = joint_histogram(fr, g, backend="cpu")
            mutual_information(fr, g, backend="cpu").sum().backward()
            results.append((p, fr.grad))
    finally:
        torch.set_num_threads(threads)
    for p, grad in results[1:]:
        assert torch.equal(p, results[0][0]) and torch.equal(grad, results[0][1])


# =========================================================================== losses


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_losses(backend, gen):
    f, g = _pair(gen, (2, 1, 8, 9))
    mask = _mask(gen, (2, 1, 8, 9))
    kw = dict(bins=16, kernel="bspline", backend=backend)
    mi_v = mutual_information(f, g, mask=mask, **kw)
    nmi_v = nmi(f, g, mask=mask, **kw)
    assert_close_verbose(MutualInformationLoss(**kw)(f, g, mask), -mi_v.mean(), name="MI loss")
    assert_close_verbose(NMILoss(**kw)(f, g, mask), -nmi_v.mean(), name="NMI loss")
    barrier = NMILoss(barrier=2.0, **kw)
    assert_close_verbose(barrier(f, g, mask), -torch.log(2.0 - (1.0 - mi_v)).mean(),
                         name="barrier")
    assert "barrier=2.0, form='released', margin=0.1" in repr(barrier)
    fr = f.clone().requires_grad_()
    barrier(fr, g).backward()
    assert bool(torch.isfinite(fr.grad).all()) and float(fr.grad.abs().max()) > 0


# =========================================================================== barrier loss

FORMS = ("released", "paper")
BARRIER = 5.0  # INNReg's b


def _inverted_pair(size=48):
    """A smooth random 2D image in [0, 1] and its inverted contrast 1 - x: the
    multi-modal pair, aligned at shift 0 (a fixed seed: the tests below scan shifts)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, 7, 7, generator=g, dtype=torch.float64)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                            align_corners=True)
    image = ((image - image.min()) / (image.max() - image.min())).float()
    return image, 1.0 - image


def _shifted(image, shift):
    """image(x + shift) with a constant displacement shift = (dy, dx), border padding."""
    ddf = shift.reshape(1, 2, 1, 1).expand(1, 2, *image.shape[2:])
    return warp(image, ddf, padding="border")


def _old_barrier(fixed, moving):
    """The barrier loss as it was: -log(b - NMI), NMI growing with alignment."""
    return -torch.log(BARRIER - nmi(fixed, moving)).mean()


def _descend(loss_fn, start=(0.0, 4.0), steps=60, lr=0.5):
    """Normalised gradient descent on a constant shift: s -= lr_i g / |g|, lr_i falling
    linearly to 0 (the step size does not depend on the loss's scale, so the forms'
    very different gradient magnitudes need no tuning; the direction is the test)."""
    fixed, moving = _inverted_pair()
    s = torch.tensor(start, dtype=torch.float64)
    for i in range(steps):
        leaf = s.clone().float().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(fixed, _shifted(moving, leaf)), leaf)
        assert bool(torch.isfinite(grad).all()), (i, s, grad)
        s = s - lr * (1 - i / steps) * grad.double() / grad.double().norm().clamp_min(1e-30)
    return s


@pytest.mark.parametrize("form", FORMS)
def test_barrier_rises_with_misalignment(form):
    """On an inverted-contrast pair the barrier loss grows with the shift (0..8 px): it
    measures dissimilarity. The old -log(b - NMI) fell instead (asserted below, so this
    test fails on it)."""
    fixed, moving = _inverted_pair()
    loss = NMILoss(barrier=BARRIER, form=form)
    shifts = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)
    values, old = [], []
    for dx in shifts:
        moved = _shifted(moving, torch.tensor([0.0, dx]))
        values.append(float(loss(fixed, moved)))
        old.append(float(_old_barrier(fixed, moved)))
    assert all(math.isfinite(v) for v in values), values
    assert all(a < b for a, b in itertools.pairwise(values)), (form, values)
    assert all(a > b for a, b in itertools.pairwise(old)), old


@pytest.mark.parametrize("form", FORMS)
def test_barrier_descent_on_a_shift_converges(form):
    """Descent on a shift from 4 px ends at the alignment (|s| < 0.1 px) with either form;
    with the old formula it walks away (to ~9 px on this pair)."""
    s = _descend(NMILoss(barrier=BARRIER, form=form))
    assert float(s.norm()) < 0.1, (form, s)


def test_old_barrier_descent_diverges():
    """The defect the barrier tests catch: descent on -log(b - NMI) leaves the alignment."""
    s = _descend(_old_barrier)
    assert float(s.norm()) > 6.0, s


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_barrier_values_vs_formulas(backend, masked, gen):
    """Both forms against float64 NumPy: released -log(b - (1 - MI)), paper -log(b - I)
    with I = (H_f + H_g) / MI, and the paper form's tangent beyond b - margin."""
    f, g = _pair(gen, (3, 1, 9, 11), torch.float64)
    mask = _mask(gen, (3, 1, 9, 11)) if masked else None
    kw = dict(bins=12, kernel="gaussian", sigma=0.5, backend=backend)
    mi, h_f, h_g, _ = (torch.from_numpy(a) for a in _np_entropies(
        _np_joint(f, g, 12, "gaussian", 0.5, mask=mask)))
    released = NMILoss(barrier=BARRIER, **kw)
    assert_close_verbose(released.dissimilarity(f, g, mask), 1.0 - mi, torch.float64, name="d")
    assert_close_verbose(released(f, g, mask), -torch.log(BARRIER - (1.0 - mi)).mean(),
                         torch.float64, name="released")
    i_nmi = (h_f + h_g) / mi
    # The knot b - margin between the items' I: some inside the barrier, some past it.
    lo, hi = float(i_nmi.min()), float(i_nmi.max())
    b, margin = (lo + hi) / 2, (hi - lo) / 4
    assert float(i_nmi.min()) < b - margin < float(i_nmi.max()), (i_nmi, b)
    knot = b - margin
    want = torch.where(i_nmi <= knot, -torch.log(b - i_nmi.clamp_max(knot)),
                       -math.log(margin) + (i_nmi - knot) / margin)
    paper = NMILoss(barrier=b, form="paper", margin=margin, **kw)
    assert_close_verbose(paper.dissimilarity(f, g, mask), i_nmi, torch.float64, name="I")
    assert_close_verbose(paper(f, g, mask), want.mean(), torch.float64, name="paper")
    assert float(i_nmi.min()) >= 2.0  # MI <= min(H_f, H_g)


def test_extended_log_barrier_is_c1_and_pushes_down():
    """-log(b - d) up to the knot b - margin, its tangent beyond: value and slope match at
    the knot, the slope is 1 / margin > 0 beyond it, finite far past b, NaN stays NaN."""
    b, margin = 5.0, 0.1
    knot = b - margin
    d = torch.tensor([2.0, 4.0, knot - 1e-9, knot, knot + 1e-9, 5.0, 7.0, 1e30, float("nan")],
                     dtype=torch.float64, requires_grad=True)
    value = mi_module.extended_log_barrier(d, b, margin)
    (grad,) = torch.autograd.grad(value.sum(), d)
    value = value.detach()
    dd = d.detach()
    want = torch.where(dd <= knot, -torch.log(b - dd.clamp_max(knot)),
                       -math.log(margin) + (dd - knot) / margin)
    want_grad = torch.where(dd <= knot, 1.0 / (b - dd.clamp_max(knot)),
                            torch.full_like(dd, 1 / margin))
    assert_close_verbose(value[:-1], want[:-1], torch.float64, name="value")
    assert_close_verbose(grad[:-1], want_grad[:-1], torch.float64, name="slope")
    assert abs(float(value[2] - value[4])) <= 1e-7 and abs(float(grad[2] - grad[4])) <= 1e-6
    assert bool(torch.isfinite(value[:-1]).all()) and bool(value[-1].isnan())


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_paper_barrier_beyond_the_barrier_is_finite(backend, gen):
    """Images with almost no shared information (I far beyond b) and a constant image
    (MI = 0): the paper form's loss and gradients are finite, and the gradient lowers I."""
    f = rand(gen, 2, 1, 32, 32)
    g = rand(gen, 2, 1, 32, 32).requires_grad_()
    loss = NMILoss(barrier=BARRIER, form="paper", bins=16, backend=backend)
    i_before = loss.dissimilarity(f, g.detach())
    assert float(i_before.min()) > 10 * BARRIER, i_before
    value = loss(f, g)
    value.backward()
    assert math.isfinite(value.item()) and bool(torch.isfinite(g.grad).all())
    assert float(g.grad.abs().max()) > 0
    # A small step against the gradient lowers I (the tangent pushes d down).
    step = 1e-3 / float(g.grad.abs().max())
    i_after = loss.dissimilarity(f, (g - step * g.grad).detach())
    assert float(i_after.sum()) < float(i_before.sum()), (i_before, i_after)
    constant = torch.full((1, 1, 8, 9), 0.7)
    moving = rand(gen, 1, 1, 8, 9).requires_grad_()
    value = loss(constant, moving)
    value.backward()
    assert math.isfinite(value.item()) and bool(torch.isfinite(moving.grad).all())


@pytest.mark.parametrize("form", FORMS)
def test_barrier_nan_and_half(form, gen):
    """NaN in an item makes the loss NaN (as nmi); half inputs compute in float32."""
    f, g = _pair(gen, (2, 1, 12, 13))
    loss = NMILoss(barrier=BARRIER, form=form, bins=16)
    want = loss(f, g)
    half = loss(f.half(), g.half())
    assert half.dtype == torch.float16
    assert abs(float(half) - float(want)) <= 1e-2 * max(1.0, abs(float(want)))
    f[1, 0, 3, 4] = float("nan")
    assert bool(loss(f, g).isnan())


# =========================================================================== torch.compile


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(gen):
    """The histogram op under torch.compile(fullgraph=True): no graph break (no host sync),
    forward and backward as in eager mode."""
    require_backend("cpu", "cpu", torch.float32)
    f, g = _pair(gen, (2, 1, 6, 7, 8))
    mask = _mask(gen, (2, 1, 6, 7, 8))

    def loss(a, b):
        return (NMILoss(barrier=2.5, backend="cpu")(a, b, mask)
                + NMILoss(barrier=5.0, form="paper", margin=0.5, backend="cpu")(a, b, mask))

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True)
        results = []
        for fn in (loss, compiled):
            a, b = f.clone().requires_grad_(), g.clone().requires_grad_()
            value = fn(a, b)
            value.backward()
            results.append((value.detach(), a.grad, b.grad))
    finally:
        torch._dynamo.reset()
    for name, eager, comp in zip(("loss", "d fixed", "d moving"), *results):
        assert_close_verbose(comp, eager, torch.float32, name=name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
# Dynamo's note on backends.py's cached Triton import check (a constant per process).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic_shapes(backend, gen):
    """mutual_information, nmi, joint_histogram and both loss modules under
    torch.compile(fullgraph=True, dynamic=True) (training on varying crop sizes): two sizes
    in a row through one graph, values and gradients as in eager mode. Validation used to
    call math.isfinite, which dynamo cannot trace."""
    require_backend(backend, "cpu", torch.float32)

    def all_ops(a, b, m):
        kw = dict(bins=12, backend=backend)
        return (
            mutual_information(a, b, mask=m, sigma=0.4, **kw),
            nmi(a, b, mask=m, value_range=FIXED_RANGES, **kw),
            joint_histogram(a, b, mask=m, kernel="bspline", **kw),
            MutualInformationLoss(**kw)(a, b, m),
            NMILoss(barrier=2.5, **kw)(a, b, m),
        )

    def run(fn, f, g, m):
        a, b = f.clone().requires_grad_(), g.clone().requires_grad_()
        outs = fn(a, b, m)
        sum(o.sum() for o in outs).backward()
        return [o.detach() for o in outs] + [a.grad, b.grad]

    torch._dynamo.reset()
    try:
        compiled = torch.compile(all_ops, fullgraph=True, dynamic=True)
        for i, shape in enumerate([(2, 1, 6, 7, 8), (2, 1, 9, 5, 7)]):
            f, g = _pair(gen, shape)
            m = _mask(gen, shape).float()
            # The second size must reuse the first graph (dynamic shapes, no recompile).
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = run(compiled, f, g, m)
            want = run(all_ops, f, g, m)
            names = ("MI", "NMI", "P", "MI loss", "NMI loss", "d fixed", "d moving")
            for name, a, e in zip(names, got, want, strict=True):
                assert_close_verbose(a, e, torch.float32, name=f"{shape} {name}")
        # Negative weights, where eager raises ValueError: an assert in the graph.
        m[0, 0, 1, 1, 1] = -1.0
        with pytest.raises(RuntimeError, match="mask weights must be >= 0"):
            compiled(f, g, m)
    finally:
        torch._dynamo.reset()


# =========================================================================== dispatch


def test_gpu_limits_and_auto_fallback():
    """The GPU kernels' limits give a reason; auto then picks the next backend."""
    radius = mi_module.gaussian_radius(0.5, torch.float32)
    assert mi_module._limit_reason("cuda", 32, "gaussian", radius) is None
    assert "bins <= 64" in mi_module._limit_reason("cuda", 100, "gaussian", radius)
    big = mi_module.gaussian_radius(5.0, torch.float32)
    assert "sigma is too large" in mi_module._limit_reason("cuda", 64, "gaussian", big)
    assert mi_module._limit_reason("cuda", 64, "bspline", big) is None
    assert "bins <= 128" in mi_module._limit_reason("triton", 200, "gaussian", radius)
    x = torch.zeros(1)
    with mock.patch.object(mi_module, "resolve", return_value="cuda"), \
            mock.patch.object(mi_module, "call_reason", return_value=None):
        assert mi_module._resolve("mi", None, x, 100, "gaussian", radius) == "triton"
        assert mi_module._resolve("mi", None, x, 200, "gaussian", radius) == "torch"
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
            mi_module._resolve("mi", "cuda", x, 100, "gaussian", radius)


def test_explicit_unavailable_backend_raises():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        mutual_information(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), backend="cuda")


# =========================================================================== bad input


def _bad_calls():
    x = torch.rand(2, 1, 5, 6)
    return [
        (dict(fixed=[1.0]), TypeError, "fixed must be a torch.Tensor, got list"),
        (dict(moving=x.long()), TypeError, "moving must be a floating-point tensor"),
        (dict(fixed=torch.rand(2, 5, 6)), ValueError, r"fixed must be \[B, 1, H, W\]"),
        (dict(fixed=torch.rand(2, 2, 5, 6)), ValueError, r"fixed must be \[B, 1, H, W\]"),
        (dict(moving=torch.rand(2, 1, 0, 6)), ValueError, "moving must not be empty"),
        (dict(moving=torch.rand(2, 1, 5, 7)), ValueError,
         "fixed and moving must have the same spatial shape"),
        (dict(moving=torch.rand(3, 1, 5, 6)), ValueError,
         "fixed and moving batch sizes must match or one must be 1, got 2 and 3"),
        (dict(moving=x.double()), TypeError, "fixed and moving must have the same dtype"),
        (dict(bins=1), ValueError, "bins must be >= 2, got 1"),
        (dict(bins=8.0), TypeError, "bins must be an int, got float"),
        (dict(kernel="box"), ValueError, "kernel must be 'gaussian' or 'bspline', got 'box'"),
        (dict(sigma=0.0), ValueError, r"sigma must be in \[1e-06, 1e\+06\] bin widths, got 0.0"),
        (dict(sigma=float("nan")), ValueError, r"sigma must be in \[1e-06, 1e\+06\]"),
        (dict(sigma=1e200, kernel="bspline"), ValueError,
         r"sigma must be in \[1e-06, 1e\+06\] bin widths, got 1e\+200"),
        (dict(sigma="wide"), TypeError, "sigma must be a real number, got str"),
        (dict(eps=-1.0), ValueError, r"eps must be in \[1.175e-38, 1\] for torch.float32 work"),
        (dict(eps=1e300), ValueError, r"eps must be in \[1.175e-38, 1\] .*, got 1e\+300"),
        (dict(eps=1e-39), ValueError, r"eps must be in \[1.175e-38, 1\] .*, got 1e-39"),
        (dict(value_range=(0.0, 1e39)), ValueError,
         r"value_range bounds must be within \+-1.7e\+38 for torch.float32 work"),
        (dict(value_range=(1e8, 1e8 + 1)), ValueError,
         r"value_range bounds must stay distinct in torch.float32"),
        (dict(value_range=(1.0, 1.0)), ValueError,
         "value_range must have finite bounds with lo < hi"),
        (dict(value_range=(0.0, float("inf"))), ValueError,
         r"value_range must have finite bounds with lo < hi, got \(0.0, inf\)"),
        (dict(value_range=(0.0,)), ValueError, r"value_range must be None, \(lo, hi\)"),
        (dict(value_range=((0.0, 1.0), (2.0, 1.0))), ValueError,
         "value_range must have finite bounds"),
        (dict(value_range=("a", "b")), ValueError, "value_range must be None"),
        (dict(mask=torch.ones(2, 1, 5, 7)), ValueError, r"mask must be \[B or 1, 1, \*S\]"),
        (dict(mask=torch.ones(3, 1, 5, 6)), ValueError, r"mask must be \[B or 1, 1, \*S\]"),
        (dict(mask=torch.ones(2, 1, 5, 6, dtype=torch.complex64)), TypeError,
         "mask must be a bool"),
        (dict(mask="all"), TypeError, "mask must be a torch.Tensor"),
        (dict(mask=torch.zeros(2, 1, 5, 6)), ValueError, r"mask selects no voxel .* \[0, 1\]"),
        (dict(mask=torch.ones(2, 1, 5, 6).index_put_((torch.tensor([1]),), torch.tensor(-1.0))),
         ValueError, r"mask weights must be finite and >= 0, .* batch item\(s\) \[1\]"),
        (dict(mask=torch.full((1, 1, 5, 6), float("inf"))), ValueError,
         r"mask weights must be finite and >= 0, .* \[0\]"),
        (dict(mask=-torch.ones(2, 1, 5, 6, dtype=torch.int32)), ValueError,
         r"mask weights must be finite and >= 0, .* \[0, 1\]"),
        (dict(mask=torch.ones(2, 1, 5, 6, requires_grad=True)), ValueError,
         r"mask must not require grad \(\w+ is not differentiable in it\); pass mask.detach\(\)"),
        (dict(deterministic="yes"), TypeError, "deterministic must be None, True or False"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ]


_BAD_CASES = [
    pytest.param(fn, i, id=f"{fn.__name__}-{i}")
    for fn in (mutual_information, nmi, joint_histogram)
    for i, (change, _, _) in enumerate(_bad_calls())
    if not (fn is joint_histogram and "eps" in change)  # joint_histogram takes no eps
]


@pytest.mark.parametrize(("fn", "case"), _BAD_CASES)
def test_bad_input(fn, case):
    change, exc, message = _bad_calls()[case]
    args = dict(fixed=torch.rand(2, 1, 5, 6), moving=torch.rand(2, 1, 5, 6))
    args.update(change)
    fixed, moving = args.pop("fixed"), args.pop("moving")
    with pytest.raises(exc, match=f"{fn.__name__}: {message}"):
        fn(fixed, moving, **args)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="MutualInformationLoss: bins must be >= 2"):
        MutualInformationLoss(bins=1)
    with pytest.raises(TypeError, match="NMILoss: bins must be an int"):
        NMILoss(bins="32")
    with pytest.raises(ValueError, match="NMILoss: kernel must be"):
        NMILoss(kernel="parzen")
    with pytest.raises(TypeError, match="NMILoss: barrier must be a real number, got str"):
        NMILoss(barrier="2")
    with pytest.raises(ValueError, match="NMILoss: barrier must be a finite number"):
        NMILoss(barrier=float("nan"))
    with pytest.raises(ValueError, match="MutualInformationLoss: value_range must"):
        MutualInformationLoss(value_range=(2.0, 1.0))
    with pytest.raises(TypeError, match="NMILoss: deterministic must be"):
        NMILoss(deterministic=1)
    with pytest.raises(ValueError, match=r"MutualInformationLoss: sigma must be in \[1e-06"):
        MutualInformationLoss(sigma=1e-9)
    with pytest.raises(ValueError, match=r"NMILoss: sigma must be in .*, got 1e\+200"):
        NMILoss(kernel="bspline", sigma=1e200)
    with pytest.raises(ValueError, match=r"NMILoss: eps must be in \(0, 1\], got 2.0"):
        NMILoss(eps=2.0)
    with pytest.raises(ValueError, match="NMILoss: barrier must be a finite number, got inf"):
        NMILoss(barrier=float("inf"))
    with pytest.raises(ValueError, match="NMILoss: form must be 'released' or 'paper', got 'nmi'"):
        NMILoss(barrier=5.0, form="nmi")
    with pytest.raises(TypeError, match="NMILoss: margin must be a real number, got str"):
        NMILoss(barrier=5.0, margin="0.1")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="NMILoss: margin must be a finite number > 0"):
            NMILoss(barrier=5.0, margin=bad)


# =========================================================================== GPU


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("bins", [7, 32, 64])
def test_gpu_vs_reference(gpu_backend, kernel, masked, bins, gen):
    shape = (2, 1, 13, 17, 19)
    f, g = _pair(gen, shape, torch.float32, "cuda")
    mask = _mask(gen, shape, "cuda") if masked else None
    ref = _ref_all(f, g, bins, kernel, mask=mask)
    with poisoned_empty():
        ours = _ours_all(f, g, bins, kernel, gpu_backend, mask=mask)
    _compare(ours, ref, torch.float32, f"{gpu_backend} {kernel}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=DTYPE_IDS.get)
def test_gpu_half(gpu_backend, dtype, gen):
    f, g = _pair(gen, (2, 1, 33, 35), dtype, "cuda")
    _compare(_ours_all(f, g, 32, "gaussian", gpu_backend), _ref_all(f, g, 32, "gaussian"),
             dtype, gpu_backend)


@pytest.mark.cuda
def test_gpu_bitwise_repeatable_and_nan(gpu_backend, gen):
    f, g = _pair(gen, (2, 1, 40, 50, 60), torch.float32, "cuda")
    runs = []
    for _ in range(3):
        fr = f.clone().requires_grad_()
        mutual_information(fr, g, backend=gpu_backend).sum().backward()
        runs.append((joint_histogram(f, g, backend=gpu_backend), fr.grad))
    for p, grad in runs[1:]:
        assert torch.equal(p, runs[0][0]) and torch.equal(grad, runs[0][1])
    f[0, 0, 1, 2, 3] = float("nan")
    value = mutual_information(f, g, backend=gpu_backend)
    assert bool(value[0].isnan()) and bool(torch.isfinite(value[1]))


@pytest.mark.cuda
def test_gpu_peak_memory_does_not_grow_with_voxels(gpu_backend, gen):
    """Peak extra memory of forward + backward, minus the inputs' gradient tensors (and the
    per-block partial histograms, whose count is capped) is the same at 4M and 16M voxels."""
    extras = []
    for shape in ((1, 1, 64, 256, 256), (1, 1, 256, 256, 256)):
        f, g = _pair(gen, shape, torch.float32, "cuda")
        f.requires_grad_()
        g.requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mutual_information(f, g, backend=gpu_backend).sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - f.grad.nbytes - g.grad.nbytes
        extras.append(extra)
        del f, g
    assert extras[1] <= extras[0] + (1 << 20), extras
    assert extras[1] <= 100 << 20, extras


@pytest.mark.cuda
def test_gpu_batch_beyond_grid_axis_y(gpu_backend, gen):
    """70,000 items (more than grid axis y takes): the batch is on grid axis x."""
    f, g = _pair(gen, (70000, 1, 2, 3), torch.float32, "cuda")
    fr = f.clone().requires_grad_()
    value = mutual_information(fr, g, bins=8, backend=gpu_backend)
    value.sum().backward()
    ref = _ref_all(f, g, 8, "gaussian")
    assert_close_verbose(value.detach().cpu(), ref[1], torch.float32, name="MI")
    assert_close_verbose(fr.grad.cpu(), ref[3], torch.float32, name="d fixed")
