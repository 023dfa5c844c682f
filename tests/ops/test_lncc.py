"""lncc / LNCCLoss: identities, every backend against a NumPy float64 truth and the float64
reference, gradients, raw-intensity accuracy, 64-bit offsets, determinism, torch.compile and
bad input; lncc_monai (MONAI's per-window form) against a NumPy float64 oracle and MONAI's
LocalNormalizedCrossCorrelationLoss.

The ``torch`` backend is the reference itself: its rows compare values with the NumPy truth
(direct window sums, independent of torch) and its gradients are checked by gradcheck, never
against ``reference`` (that would compare a function with itself)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mrus_kernels.triton._common as triton_common
from conftest import (
    COMPILE_WARNINGS,
    assert_close_verbose,
    backend_params,
    compile_two_sizes,
    poisoned_empty,
    rand,
)
from mrus_kernels import LNCCLoss, lncc, reference
from mrus_kernels.backends import call_reason
from mrus_kernels.lncc import lncc_monai

BACKENDS = backend_params(("torch", "cpu", "triton"))
# Shapes x windows: odd sizes, 2D and 3D, batch > 1 (Triton interpreted: keep them small).
CASES = [
    ((2, 1, 7, 9, 11), 3),
    ((1, 1, 7, 9, 11), 5),
    ((1, 1, 9, 10, 11), 9),
    ((2, 1, 11, 13), 9),
    ((1, 1, 6, 5), 1),
]
# float32 kernels sum in another order than the float64 reference and the variances cancel:
# the [B] values agree to ~1e-6, the gradients (differences of box sums) to ~1e-5 of their max.
F32_RTOL = 1e-4


def _ref(f, m, window, mask=None, eps=1e-5):
    return reference.lncc(f.double(), m.double(), window, eps,
                          mask.double() if mask is not None else None)


def _windows_np(x: np.ndarray, r: int) -> np.ndarray:
    """[B, *S, k**nd]: the (2r + 1)-wide window of every voxel (all axes but the first),
    zero outside the image."""
    nd = x.ndim - 1
    pad = np.pad(x, [(0, 0)] + [(r, r)] * nd)
    win = np.lib.stride_tricks.sliding_window_view(
        pad, (2 * r + 1,) * nd, axis=tuple(range(1, nd + 1)))
    return win.reshape(*x.shape, -1)


def _cc_np(f, m, window, eps=1e-5) -> np.ndarray:
    """Per-voxel cc [B, *S] in float64 NumPy (definition in mrus_kernels/lncc.py), from each
    window's values directly: its in-bounds voxels centred on their own mean, then
    Σ(I - Ī)(J - J̄) and Σ(I - Ī)². No running sums and no ΣI² − (ΣI)²/n cancellation, so
    flat windows give exactly 0 at any background (the raw-sum form in float64 leaves
    variances of ~1e-2 at a background of 3.7e5)."""
    i = f.detach().double().cpu().numpy()[:, 0]
    j = m.detach().double().cpu().numpy()[:, 0]
    b = max(i.shape[0], j.shape[0])
    i, j = np.broadcast_to(i, (b, *i.shape[1:])), np.broadcast_to(j, (b, *j.shape[1:]))
    r = window // 2
    inside = _windows_np(np.ones_like(i[:1]), r)
    n = inside.sum(-1, keepdims=True)
    wi, wj = _windows_np(i, r), _windows_np(j, r)
    ci = (wi - wi.sum(-1, keepdims=True) / n) * inside
    cj = (wj - wj.sum(-1, keepdims=True) / n) * inside
    cross = (ci * cj).sum(-1)
    vv = (ci * ci).sum(-1) * (cj * cj).sum(-1)
    return np.minimum(cross * cross, vv) / (vv + eps)


def _truth(f, m, window, mask=None, eps=1e-5) -> torch.Tensor:
    """lncc [B] in float64 from :func:`_cc_np`."""
    cc = _cc_np(f, m, window, eps)
    b = cc.shape[0]
    if mask is None:
        return torch.from_numpy(cc.reshape(b, -1).mean(1))
    w = np.broadcast_to(mask.detach().double().cpu().numpy()[:, 0], cc.shape).reshape(b, -1)
    msum = w.sum(1)
    num = (cc.reshape(b, -1) * w).sum(1)
    return torch.from_numpy(np.where(msum > 0, num / np.where(msum > 0, msum, 1.0), 0.0))


def test_numpy_truth_matches_definition_by_hand():
    # A 2D 3x4 image, window 3, checked against sums written out by hand at two voxels.
    f = torch.tensor([[1.0, 2.0, 0.5, 3.0], [2.0, 1.0, 4.0, 0.0], [1.5, 2.5, 1.0, 2.0]])
    m = torch.tensor([[0.5, 1.0, 2.0, 1.0], [1.0, 3.0, 0.5, 2.0], [2.0, 1.0, 1.5, 0.5]])
    cc = _cc_np(f[None, None], m[None, None], 3)[0]
    for (y, x) in ((0, 0), (1, 2)):
        ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
        a, b = f[ys, xs].double().flatten(), m[ys, xs].double().flatten()
        cross = ((a - a.mean()) * (b - b.mean())).sum()
        va, vb = ((a - a.mean()) ** 2).sum(), ((b - b.mean()) ** 2).sum()
        exp = min(cross.item() ** 2, (va * vb).item()) / ((va * vb).item() + 1e-5)
        assert abs(cc[y, x] - exp) <= 1e-12, (y, x, cc[y, x], exp)


def _check_backend(backend, shape, window, gen, mask=None, dtype=torch.float32):
    f = rand(gen, *shape, dtype=dtype).requires_grad_()
    m = rand(gen, *shape, dtype=dtype).requires_grad_()
    fd = f.detach().double().requires_grad_()
    md = m.detach().double().requires_grad_()
    with poisoned_empty():
        out = lncc(f, m, window=window, mask=mask, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else F32_RTOL
    assert_close_verbose(out, _truth(f, m, window, mask), atol=tol, rtol=tol, name="lncc")
    if backend == "torch":
        return  # its gradient is the reference's autograd: test_gradcheck_float64 checks it
    exp = _ref(fd, md, window, mask)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    with poisoned_empty():
        gf, gm = torch.autograd.grad(out, (f, m), g.to(dtype))
    ef, em = torch.autograd.grad(exp, (fd, md), g)
    assert_close_verbose(gf, ef, atol=tol, rtol=tol, name="d fixed")
    assert_close_verbose(gm, em, atol=tol, rtol=tol, name="d moving")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,window", CASES, ids=lambda v: str(v))
def test_backend_matches_reference(backend, shape, window, gen):
    if backend == "triton" and (shape, window) not in (CASES[0], CASES[3]):
        pytest.skip("interpreted Triton: the two smallest cases cover 2D and 3D")
    _check_backend(backend, shape, window, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_with_mask(backend, gen):
    shape = (2, 1, 5, 6, 7) if backend == "triton" else (2, 1, 7, 9, 11)
    mask = (torch.rand(1, 1, *shape[2:], generator=gen) > 0.4).float()
    _check_backend(backend, shape, 5, gen, mask=mask)
    weights = rand(gen, 2, 1, *shape[2:], lo=0.0, hi=2.0)
    _check_backend(backend, shape, 3, gen, mask=weights)


# ------------------------------------------------------------- raw intensities (issue 12)

def _scaled_pair(gen, shape, scale):
    """Correlated images at intensity `scale` (raw MR / CT range for 1e3 - 1e4)."""
    f = rand(gen, *shape, dtype=torch.float64)
    m = 0.6 * f + 0.4 * rand(gen, *shape, dtype=torch.float64)
    return (f * scale).float(), (m * scale).float()


# Backends that accumulate in float64 (all of them) lose only the float32 rounding of
# their outputs (~7e-8 of the largest value); float32 running sums were off by 2e-7 - 3e-6.
F64_ACC_RTOL = 5e-7
# Gradients of the backends that keep the coefficient maps in float32 (cuda, triton).
K32_GRAD_RTOL = 5e-5


def _assert_rel(name, got, exp, tol):
    top = exp.abs().max().item()
    err = (got.detach().double().cpu() - exp).abs().max().item()
    assert err <= tol * top, f"{name}: max |err| {err:g} > {tol:g} x max |expected| {top:g}"


def _check_scaled(backend, f, m, window, gen):
    """Value against the NumPy truth; gradients (not on torch: see the module docstring)
    against the float64 reference's autograd; both relative to their largest magnitude (the
    gradients shrink like 1/intensity, so an absolute tolerance would let anything pass)."""
    tol = F64_ACC_RTOL
    f, m = f.clone().requires_grad_(), m.clone().requires_grad_()
    with poisoned_empty():
        out = lncc(f, m, window=window, backend=backend)
    _assert_rel("lncc", out, _truth(f, m, window), tol)
    if backend == "torch":
        return
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    with poisoned_empty():
        gf, gm = torch.autograd.grad(out, (f, m), g.float().to(out.device))
    fd = f.detach().double().cpu().requires_grad_()
    md = m.detach().double().cpu().requires_grad_()
    ef, em = torch.autograd.grad(_ref(fd, md, window), (fd, md), g)
    _assert_rel("d fixed", gf, ef, tol)
    _assert_rel("d moving", gm, em, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e4], ids=["x1", "x1e3", "x1e4"])
@pytest.mark.parametrize("shape", [(2, 1, 6, 7, 9), (2, 1, 13, 11)], ids=["3d", "2d"])
def test_raw_intensities_match_float64(backend, scale, shape, gen):
    if backend == "triton" and shape[2:] == (6, 7, 9) and scale == 1e3:
        pytest.skip("interpreted Triton: x1 and x1e4 bracket x1e3 in 3D")
    f, m = _scaled_pair(gen, shape, scale)
    _check_scaled(backend, f, m, 5, gen)


def _grad_np(f, m, window, g, eps=1e-5):
    """(d/d fixed, d/d moving) of Σ_b g_b lncc_b (no mask), [B, *S] float64 NumPy: per window
    the derivative of its cc with respect to each of its voxels, from the centred values as
    in :func:`_cc_np` (∂cross/∂I(x) = J(x) − J̄, ∂var_I/∂I(x) = 2 (I(x) − Ī); the clamps take
    the reference's branches), scattered back onto the voxels. Independent of torch."""
    i = f.detach().double().cpu().numpy()[:, 0]
    j = m.detach().double().cpu().numpy()[:, 0]
    nd, r = i.ndim - 1, window // 2
    inside = _windows_np(np.ones_like(i[:1]), r)
    n = inside.sum(-1, keepdims=True)
    wi, wj = _windows_np(i, r), _windows_np(j, r)
    ci = (wi - wi.sum(-1, keepdims=True) / n) * inside
    cj = (wj - wj.sum(-1, keepdims=True) / n) * inside
    cross = (ci * cj).sum(-1, keepdims=True)
    vi, vj = (ci * ci).sum(-1, keepdims=True), (cj * cj).sum(-1, keepdims=True)
    vv = vi * vj
    den = vv + eps
    clamped = cross * cross > vv  # cc = vv / (vv + eps) there
    dcross = np.where(clamped, 0.0, 2 * cross / den)
    dvv = np.where(clamped, eps / den**2, -cross * cross / den**2)
    w = np.asarray(g, dtype=np.float64).reshape(-1, *([1] * (nd + 1))) / i[0].size
    out = []
    for d in (w * (dcross * cj + 2 * dvv * vj * ci), w * (dcross * ci + 2 * dvv * vi * cj)):
        acc = np.zeros((i.shape[0], *(s + 2 * r for s in i.shape[1:])))
        for k, off in enumerate(np.ndindex(*(2 * r + 1,) * nd)):
            acc[(slice(None), *(slice(o, o + s) for o, s in zip(off, i.shape[1:])))] += d[..., k]
        out.append(torch.from_numpy(acc[(slice(None), *(slice(r, r + s) for s in i.shape[1:]))]))
    return out[0][:, None], out[1][:, None]


def test_numpy_gradient_truth_matches_float64_autograd(gen):
    # The float64 reference at intensities ~1 (no cancellation to speak of) checks _grad_np.
    for shape, window in (((2, 1, 5, 6, 7), 3), ((1, 1, 9, 8), 5)):
        f = rand(gen, *shape, dtype=torch.float64).requires_grad_()
        m = rand(gen, *shape, dtype=torch.float64).requires_grad_()
        g = torch.randn(shape[0], generator=gen, dtype=torch.float64)
        ef, em = torch.autograd.grad(_ref(f, m, window), (f, m), g)
        tf, tm = _grad_np(f, m, window, g)
        _assert_rel("d fixed", tf, ef, 1e-10)
        _assert_rel("d moving", tm, em, 1e-10)


# ------------------------------------------------------- intensity offsets (issue 21, item 1)


def _box_np(x: np.ndarray, r: int) -> np.ndarray:
    """In-bounds box sums of half-width r over all axes but the first, float64, by
    differences of cumulative sums along each axis (not the convolutions of the reference,
    not the running sums of the kernels)."""
    for ax in range(1, x.ndim):
        n = x.shape[ax]
        c = np.cumsum(x, axis=ax)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=ax)), c], axis=ax)
        hi, lo = np.minimum(np.arange(n) + r + 1, n), np.maximum(np.arange(n) - r, 0)
        x = np.take(c, hi, axis=ax) - np.take(c, lo, axis=ax)
    return x


def _lncc_sums_np(f, m, window, g, eps=1e-5):
    """(lncc [B], d/d fixed, d/d moving) of Σ_b g_b lncc_b (no mask), float64 NumPy from the
    five box sums of each item centred on its own (float64) mean, for sizes where the
    per-window arrays of :func:`_cc_np` / :func:`_grad_np` do not fit (729 values per voxel
    at window 9). The gradient is the adjoint of the sums: with K_S = w ∂cc/∂S per window,
    ∂L/∂I = box(K_ΣI) + 2 I box(K_ΣI²) + J box(K_ΣIJ) (the in-bounds box is symmetric).
    Clamps take the reference's branches (cross² > var_I var_J; var < 0 before its clamp)."""
    i = f.detach().double().cpu().numpy()[:, 0]
    j = m.detach().double().cpu().numpy()[:, 0]
    axes = tuple(range(1, i.ndim))
    i, j = i - i.mean(axes, keepdims=True), j - j.mean(axes, keepdims=True)
    r = window // 2
    n = _box_np(np.ones_like(i[:1]), r)
    si, sj = _box_np(i, r), _box_np(j, r)
    sii, sjj, sij = _box_np(i * i, r), _box_np(j * j, r), _box_np(i * j, r)
    cross = sij - si * sj / n
    ri, rj = sii - si * si / n, sjj - sj * sj / n
    vi, vj = np.maximum(ri, 0), np.maximum(rj, 0)
    vv = vi * vj
    den = vv + eps
    clamped = cross * cross > vv
    cc = np.where(clamped, vv, cross * cross) / den
    b = cc.shape[0]
    w = np.asarray(g, dtype=np.float64).reshape(-1, *([1] * len(axes))) / i[0].size
    dcross = w * np.where(clamped, 0.0, 2 * cross / den)
    dvv = w * np.where(clamped, eps / den**2, -cross * cross / den**2)
    grads = []
    for a, other, sa, sb, vb, ra in ((i, j, si, sj, vj, ri), (j, i, sj, si, vi, rj)):
        dva = dvv * vb * (ra >= 0)
        k_s = -dcross * sb / n - 2 * dva * sa / n
        grads.append(torch.from_numpy(
            _box_np(k_s, r) + 2 * a * _box_np(dva, r) + other * _box_np(dcross, r))[:, None])
    return torch.from_numpy(cc.reshape(b, -1).mean(1)), grads[0], grads[1]


def test_numpy_sums_truth_matches_window_truth(gen):
    # _lncc_sums_np against the per-window truths (no sums), at an offset and with a region
    # flat in both images (a background: variances that cancel to ~0, clamps).
    for shape, window in (((2, 1, 5, 6, 7), 3), ((1, 1, 9, 8), 5), ((2, 1, 7, 9, 11), 5)):
        f = 1000 + 100 * rand(gen, *shape, dtype=torch.float64)
        m = -500 + 100 * rand(gen, *shape, dtype=torch.float64)
        f[..., :4, :5], m[..., :4, :5] = 1000.0, -500.0
        g = torch.randn(shape[0], generator=gen, dtype=torch.float64)
        value, gf, gm = _lncc_sums_np(f, m, window, g)
        tf, tm = _grad_np(f, m, window, g)
        assert (value - _truth(f, m, window)).abs().max().item() <= 1e-12
        _assert_rel("d fixed", gf, tf, 1e-10)
        _assert_rel("d moving", gm, tm, 1e-10)


def _offset_pair(offset: float, shape=(32, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images [1, 1, *shape] float64: offset + 50·(smooth pattern) + uniform noise in
    [0, 20) (independent per image). lncc ≈ 0.963 at window 9 and 32³, any offset."""
    g = torch.Generator().manual_seed(21)
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape),
                             indexing="ij")
    p = torch.sin(2 * np.pi * x / 16) * torch.cos(2 * np.pi * y / 13)
    p = 50 * (p + torch.sin(2 * np.pi * (z - 0.5 * x) / 11))
    f = p + 20 * torch.rand(shape, generator=g, dtype=torch.float64)
    m = p + 20 * torch.rand(shape, generator=g, dtype=torch.float64)
    return (f + offset)[None, None], (m + offset)[None, None]


# MR tissue (1e3), a bright MR scale (1e4) and CT air (-1024).
OFFSETS = [0.0, 1e3, 1e4, -1024.0]
OFFSET_TOL = 1e-4


def _check_offset(backend, offset, shape, device="cpu"):
    """float32 lncc and gradients of the offset images against float64 (NumPy, the same
    float32 values); the value also against the float64 images without offset."""
    f64, m64 = _offset_pair(offset, shape)
    f = f64.float().to(device).requires_grad_()
    m = m64.float().to(device).requires_grad_()
    with poisoned_empty():
        out = lncc(f, m, window=9, backend=backend)
        gf, gm = torch.autograd.grad(out, (f, m), torch.full_like(out, 1.5))
    value, tf, tm = _lncc_sums_np(f, m, 9, [1.5])
    err = (out.detach().double().cpu() - value).abs().max().item()
    assert err <= OFFSET_TOL, f"lncc {out.item():.7f}, float64 {value.item():.7f} ({err:.2e})"
    base = _lncc_sums_np(*_offset_pair(0.0, shape), 9, [1.5])[0]
    err0 = (out.detach().double().cpu() - base).abs().max().item()
    assert err0 <= OFFSET_TOL, f"lncc {out.item():.7f}, at offset 0 {base.item():.7f}"
    # Gradients relative to their largest magnitude (it does not change with the offset).
    _assert_rel("d fixed", gf, tf, OFFSET_TOL)
    _assert_rel("d moving", gm, tm, OFFSET_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda v: f"{v:g}")
def test_intensity_offset_float32_matches_float64(backend, offset):
    # Measured (max errors; value, gradients relative): torch and cpu 1e-8, 3e-8 at every
    # offset, triton 6e-9, 5e-8; float32 box sums of uncentred images (the torch backend
    # before) were 2.2e-3 off at 1e4 (0.9608 for 0.9631) and their gradients 1.2e-3 at 1e3.
    if backend == "triton" and offset in (0.0, 1e3):
        pytest.skip("interpreted Triton (~50 s a case): 1e4 and -1024 bracket 0 and 1e3")
    # Interpreted Triton takes ~2.5 min at 32³: a smaller volume there, still window 9.
    shape = (14, 15, 16) if backend == "triton" else (32, 32, 32)
    _check_offset(backend, offset, shape)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda v: f"{v:g}")
def test_gpu_intensity_offset_float32_matches_float64(gpu_backend, offset):
    _check_offset(gpu_backend, offset, (32, 32, 32), device="cuda")


# Small enough for interpreted Triton (~15 s a case), large enough to catch float32 running
# sums (test_flat_background_case_catches_float32_running_sums).
FLAT_SHAPE, FLAT_RADIUS, FLAT_WINDOW = (12, 14, 16), 3.5, 5


def _sphere_volume(scale=1.0, background=0.0, shape=FLAT_SHAPE, radius=FLAT_RADIUS,
                   window=FLAT_WINDOW):
    """A sphere of contrast ~scale (noisy) on a flat background of intensity `background`,
    fixed and moving, [1, 1, *shape] float32, and the mask of voxels whose whole window lies
    in the background."""
    g = torch.Generator().manual_seed(12)
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape),
                                indexing="ij")
    c = [0.45 * n for n in shape]
    sphere = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius ** 2
    f = torch.zeros(shape, dtype=torch.float64)
    m = torch.zeros(shape, dtype=torch.float64)
    k = int(sphere.sum())
    f[sphere] = 1.0 + 0.2 * torch.rand(k, generator=g, dtype=torch.float64)
    m[sphere] = 0.5 * f[sphere] + 0.6 + 0.2 * torch.rand(k, generator=g, dtype=torch.float64)
    near = torch.nn.functional.max_pool3d(sphere.double()[None, None], window, 1, window // 2)
    flat = near[0, 0] == 0
    # Many windows downstream of the sphere on every axis (the sphere sits before the centre).
    assert int(flat.sum()) > 1000
    return ((f * scale + background).float()[None, None],
            (m * scale + background).float()[None, None], flat)


# (background, sphere contrast): raw MR / CT intensities. A non-zero background is what
# breaks sums of I² stored or combined in float32 (the zero background only shows float32
# running sums); 3.7e5 is where even float64 raw sums leave flat variances above eps.
FLAT_CASES = [(0.0, 1e3), (0.0, 1e4), (370.0, 1e3), (370.0, 1e4), (3.7e5, 1e3), (3.7e5, 1e4)]
# Interpreted Triton: the two non-zero backgrounds (they catch float32 running sums too).
FLAT_CASES_TRITON = [(370.0, 1e3), (3.7e5, 1e4)]
FLAT_IDS = lambda v: f"{v:g}"  # noqa: E731


def _check_flat(backend, background, scale, device="cpu"):
    """Flat-background windows give cc <= 1e-6; lncc and its gradients match the NumPy
    float64 truth relative to their largest magnitude."""
    f, m, flat = _sphere_volume(scale, background)
    f, m = f.to(device).requires_grad_(), m.to(device).requires_grad_()
    mask = flat.float()[None, None].to(device)
    with poisoned_empty():
        out = lncc(f, m, window=FLAT_WINDOW, mask=mask, backend=backend)  # mean cc, flat windows
    assert 0.0 <= out.item() <= 1e-6, f"mean cc over flat-background windows: {out.item():g}"
    with poisoned_empty():
        whole = lncc(f, m, window=FLAT_WINDOW, backend=backend)
        gf, gm = torch.autograd.grad(whole, (f, m), torch.full_like(whole, 1.5))
    _assert_rel("lncc", whole, _truth(f, m, FLAT_WINDOW), F64_ACC_RTOL)
    # torch and cpu keep everything in float64 (measured <= 6e-8); cuda and triton store the
    # coefficient maps in float32 and ∂L/∂I = box(K0) + 2I box(K2) + J box(K4) cancels at the
    # sphere's rim (measured 1.7e-5 on triton at background 370).
    gtol = F64_ACC_RTOL if backend in ("torch", "cpu") else K32_GRAD_RTOL
    tf, tm = _grad_np(f, m, FLAT_WINDOW, [1.5])
    _assert_rel("d fixed", gf, tf, gtol)
    _assert_rel("d moving", gm, tm, gtol)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("background,scale", FLAT_CASES, ids=FLAT_IDS)
def test_flat_background_windows_stay_zero(backend, background, scale):
    _check_flat(backend, background, scale)


@pytest.mark.parametrize("backend", backend_params(("triton",)))
@pytest.mark.parametrize("background,scale", FLAT_CASES_TRITON, ids=FLAT_IDS)
def test_flat_background_windows_stay_zero_triton(backend, background, scale):
    _check_flat(backend, background, scale)


def _box_running_f32(x: np.ndarray, r: int) -> np.ndarray:
    """Box sums over all axes but the first by float32 running sums (add the voxel entering
    the window, subtract the one leaving it), the scheme the GPU kernels used to run."""
    x = x.astype(np.float32)
    for ax in range(1, x.ndim):
        x = np.moveaxis(x, ax, 0)
        out, acc = np.empty_like(x), x[: r + 1].sum(0, dtype=np.float32)
        out[0] = acc
        for k in range(1, x.shape[0]):
            if k + r < x.shape[0]:
                acc = acc + x[k + r]
            if k - r - 1 >= 0:
                acc = acc - x[k - r - 1]
            out[k] = acc
        x = np.moveaxis(out, 0, ax)
    return x


@pytest.mark.parametrize("background,scale", FLAT_CASES, ids=FLAT_IDS)
def test_flat_background_case_catches_float32_running_sums(background, scale):
    # The flat-background test runs at a small size (interpreted Triton): this shows it is
    # still large enough to catch float32 running sums and float32 cc, even on inputs
    # centred on their mean as the launchers pass them to the kernels.
    f, m, flat = _sphere_volume(scale, background)
    i = (f - f.mean()).numpy()[:, 0]
    j = (m - m.mean()).numpy()[:, 0]
    r = FLAT_WINDOW // 2
    n = _box_running_f32(np.ones_like(i), r)
    si, sj = _box_running_f32(i, r), _box_running_f32(j, r)
    sii, sjj, sij = (_box_running_f32(v, r) for v in (i * i, j * j, i * j))
    cross = sij - si * sj / n
    vv = np.maximum(sii - si * si / n, 0) * np.maximum(sjj - sj * sj / n, 0)
    cc = np.minimum(cross * cross, vv) / (vv + np.float32(1e-5))
    assert cc.dtype == np.float32
    assert cc[0][flat.numpy()].mean() > 1e-2  # the test's bound is 1e-6


# ------------------------------------------------------------------ triton launch limits


@pytest.mark.parametrize("backend", backend_params(("triton",)))
@pytest.mark.parametrize("shape,window", [((2, 1, 5, 6, 7), 3), ((2, 1, 9, 11), 5)],
                         ids=["3d", "2d"])
def test_triton_idx64_variant(backend, shape, window, gen, monkeypatch):
    # A threshold below 5 B |S| makes every pass take its 64-bit-offset variant.
    monkeypatch.setattr(triton_common, "IDX64_THRESHOLD", 100)
    seen = []
    real = triton_common.needs_idx64

    def spy(*reach):
        seen.append(real(*reach))
        return seen[-1]

    monkeypatch.setattr(triton_common, "needs_idx64", spy)
    mask = rand(gen, 1, 1, *shape[2:], lo=0.0, hi=1.0)
    _check_backend(backend, shape, window, gen, mask=mask)
    assert seen and all(seen), seen


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_triton_grid_limit_is_a_value_error(backend, gen, monkeypatch):
    monkeypatch.setattr(triton_common, "MAX_GRID_X", 3)
    f, m = rand(gen, 2, 1, 5, 6, 7), rand(gen, 2, 1, 5, 6, 7)
    with pytest.raises(ValueError, match=r"lncc \(triton\): .* programs on grid axis 0"):
        lncc(f, m, window=3, backend=backend)


@pytest.mark.parametrize("shape,window", CASES[:4], ids=lambda v: str(v))
def test_cpu_float64_exact(shape, window, gen):
    _check_backend("cpu", shape, window, gen, dtype=torch.float64)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_gradcheck_float64(backend, gen):
    f = rand(gen, 1, 1, 5, 4, 6, dtype=torch.float64).requires_grad_()
    m = rand(gen, 1, 1, 5, 4, 6, dtype=torch.float64).requires_grad_()
    mask = rand(gen, 1, 1, 5, 4, 6, dtype=torch.float64, lo=0.0, hi=1.0)
    assert torch.autograd.gradcheck(lambda a, b: lncc(a, b, window=3, backend=backend), (f, m))
    assert torch.autograd.gradcheck(
        lambda a, b: lncc(a, b, window=3, mask=mask, backend=backend), (f, m))
    f2 = rand(gen, 2, 1, 6, 7, dtype=torch.float64).requires_grad_()
    m2 = rand(gen, 1, 1, 6, 7, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lncc(a, b, window=3, backend=backend), (f2, m2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identities(backend, gen):
    x = rand(gen, 2, 1, 5, 6, 7) if backend == "triton" else rand(gen, 2, 1, 7, 9, 11)
    ones = torch.ones(2, dtype=torch.float64)
    assert_close_verbose(
        lncc(x, x, window=5, backend=backend), ones, atol=1e-5, rtol=0, name="self"
    )
    for a, b in ((3.0, 1.0), (-0.5, 2.0)):
        out = lncc(x, a * x + b, window=5, backend=backend)  # borders included
        assert_close_verbose(out, ones, atol=1e-4, rtol=0, name=f"affine {a}, {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.3, 1000.0])
def test_constant_image_is_finite_and_bounded(backend, value, gen):
    c = torch.full((1, 1, 5, 6, 7), value).requires_grad_()
    x = rand(gen, 1, 1, 5, 6, 7, lo=value, hi=value * 1.01).requires_grad_()
    for a, b in ((c, c), (c, x)) if backend == "triton" else ((c, c), (c, x), (x, x)):
        out = lncc(a, b, window=5, backend=backend)
        assert (
            bool(torch.isfinite(out).all()) and bool((out >= 0).all()) and bool((out <= 1).all())
        ), out
        ga, gb = torch.autograd.grad(out.sum(), (a, b))
        assert bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all())


def test_per_voxel_cc_within_unit_interval_float32():
    # Large constant intensities: rounding makes cross² exceed var_I var_J; the clamp holds.
    x = torch.full((1, 1, 9, 9, 9), 1234.5)
    x[0, 0, 4, 4, 4] += 1e-3
    for backend in ("torch", "cpu"):
        out = lncc(x, x * 1.0001, window=9, backend=backend)
        assert bool((out >= 0).all()) and bool((out <= 1).all()), (backend, out)


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
def test_nan_in_nan_out(backend, gen):
    f = rand(gen, 2, 1, 5, 6, 7)
    f[1, 0, 3, 3, 3] = float("nan")
    out = lncc(f, rand(gen, 2, 1, 5, 6, 7), window=3, backend=backend)
    assert bool(torch.isfinite(out[0])) and bool(out[1].isnan())


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_broadcast_noncontiguous_and_half(backend, gen):
    f = rand(gen, 1, 1, 11, 9, 7).transpose(2, 4)  # non-contiguous [1, 1, 7, 9, 11]
    m = rand(gen, 3, 1, 7, 9, 11)
    exp = _ref(f, m, 5)
    assert_close_verbose(lncc(f, m, window=5, backend=backend), exp, atol=F32_RTOL, rtol=F32_RTOL)
    for dtype in (torch.float16, torch.bfloat16):
        out = lncc(f.to(dtype), m.to(dtype), window=5, backend=backend)
        assert out.dtype == dtype
        assert_close_verbose(out, _ref(f.to(dtype), m.to(dtype), 5), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mask_gives_zero(backend, gen):
    f, m = rand(gen, 2, 1, 5, 6, 7), rand(gen, 2, 1, 5, 6, 7)
    mask = torch.zeros(2, 1, 5, 6, 7, dtype=torch.bool)
    mask[0, 0, 2, 3, 4] = True
    out = lncc(f, m, window=3, mask=mask, backend=backend)
    assert out[1].item() == 0.0 and bool(torch.isfinite(out).all())
    assert_close_verbose(out, _truth(f, m, 3, mask.float()), atol=F32_RTOL, rtol=F32_RTOL)


def test_deterministic_cpu(gen):
    f = rand(gen, 2, 1, 9, 10, 11).requires_grad_()
    m = rand(gen, 2, 1, 9, 10, 11)
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = lncc(f, m, window=5, backend="cpu")
            (g,) = torch.autograd.grad(out.sum(), f)
        finally:
            torch.set_num_threads(old)
        runs.append((out, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_loss_module(gen):
    f, m = rand(gen, 2, 1, 7, 8, 9), rand(gen, 2, 1, 7, 8, 9).requires_grad_()
    loss_fn = LNCCLoss(window=5, backend="cpu")
    loss = loss_fn(f, m)
    exp = -_ref(f, m, 5).mean()
    assert_close_verbose(loss, exp, atol=F32_RTOL, rtol=F32_RTOL)
    loss.backward()
    assert m.grad is not None and bool(torch.isfinite(m.grad).all())
    assert "window=5" in repr(loss_fn)
    with pytest.raises(ValueError, match="LNCCLoss: window must be an odd integer"):
        LNCCLoss(window=4)


def test_torch_compile_fullgraph(gen):
    if call_reason("cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("cpu backend not built")
    f, m = rand(gen, 1, 1, 7, 8, 9), rand(gen, 1, 1, 7, 8, 9).requires_grad_()

    def fn(a, b):
        return lncc(a, b, window=3, backend="cpu").sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(f, m)
    (g,) = torch.autograd.grad(out, m)
    (ge,) = torch.autograd.grad(fn(f, m), m)
    assert_close_verbose(out, fn(f, m).detach())
    assert_close_verbose(g, ge)




@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic_shapes(backend, gen):
    # Training on random crops compiles with dynamic shapes; eps is an argument, so dynamo
    # may hand validation a symbolic float (math.isfinite on it broke fullgraph before).
    def fn(a, b, mask, eps):
        return lncc(a, b, window=3, eps=eps, mask=mask, backend=backend)

    torch._dynamo.reset()
    # No on-disk graph caches: an entry compiled by other code for the same graph brings its
    # own shape guards along (a size-order guard from an older validation recompiled here).
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            _compile_two_sizes(fn, backend, gen)
    finally:
        torch._dynamo.reset()


def _compile_two_sizes(fn, backend, gen):
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    shapes = ((2, 1, 5, 6, 7), (2, 1, 6, 5, 8)) if backend == "triton" else (
        (2, 1, 7, 8, 9), (2, 1, 9, 6, 11))
    for k, shape in enumerate(shapes):
        f = rand(gen, *shape).requires_grad_()
        m = rand(gen, *shape).requires_grad_()
        mask = rand(gen, 1, 1, *shape[2:], lo=0.0, hi=1.0)
        # The second size must reuse the first graph (symbolic sizes), not recompile.
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            out = compiled(f, m, mask, 2e-5)
        gf, gm = torch.autograd.grad(out, (f, m), torch.tensor([1.0, -0.5]))
        exp = fn(f, m, mask, 2e-5)
        ef, em = torch.autograd.grad(exp, (f, m), torch.tensor([1.0, -0.5]))
        assert_close_verbose(out, exp, atol=1e-6, rtol=1e-6, name=f"lncc {shape}")
        assert_close_verbose(gf, ef, atol=1e-6, rtol=1e-6, name=f"d fixed {shape}")
        assert_close_verbose(gm, em, atol=1e-6, rtol=1e-6, name=f"d moving {shape}")
        assert_close_verbose(out, _truth(f, m, 3, mask, eps=2e-5), atol=F32_RTOL, rtol=F32_RTOL)


@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_mask_weights_raise(backend, gen):
    f, m = rand(gen, 2, 1, 5, 6, 7), rand(gen, 2, 1, 5, 6, 7)
    mask = rand(gen, 2, 1, 5, 6, 7, lo=0.0, hi=1.0)
    mask[1, 0, 2, 3, 4] = -0.25
    msg = r"lncc: mask weights must be finite and >= 0, got a negative or infinite weight in"
    with pytest.raises(ValueError, match=msg + r" batch item\(s\) \[1\]"):
        lncc(f, m, window=3, mask=mask, backend=backend)
    inf = mask.abs()
    inf[0, 0, 1, 1, 1] = float("inf")  # lncc would be inf / inf
    with pytest.raises(ValueError, match=msg + r" batch item\(s\) \[0\]"):
        lncc(f, m, window=3, mask=inf, backend=backend)
    # Under torch.compile the check cannot sync with the host: an assert in the graph fails
    # when it runs (a RuntimeError on CPU tensors) instead of returning a value.
    torch._dynamo.reset()
    try:
        compiled = torch.compile(
            lambda a, b, w: lncc(a, b, window=3, mask=w, backend=backend), fullgraph=True)
        with pytest.raises(RuntimeError, match="lncc: mask weights must be >= 0"):
            compiled(f, m, mask)
        mask[1, 0, 2, 3, 4] = 0.0
        assert_close_verbose(compiled(f, m, mask), _truth(f, m, 3, mask), atol=F32_RTOL,
                             rtol=F32_RTOL)
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e4], ids=["x1", "x1e3", "x1e4"])
@pytest.mark.parametrize("shape", [(2, 1, 17, 20, 23), (3, 1, 61, 45), (1, 1, 40, 300)],
                         ids=["3d", "2d", "2d-long"])
def test_gpu_raw_intensities_match_float64(gpu_backend, scale, shape, gen):
    f, m = _scaled_pair(gen, shape, scale)
    _check_scaled(gpu_backend, f.cuda(), m.cuda(), 9, gen)


@pytest.mark.cuda
@pytest.mark.parametrize("background,scale", FLAT_CASES, ids=FLAT_IDS)
def test_gpu_flat_background_windows_stay_zero(gpu_backend, background, scale):
    _check_flat(gpu_backend, background, scale, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("shape,window", CASES[:4], ids=lambda v: str(v))
def test_gpu_backends(gpu_backend, shape, window, gen):
    f = rand(gen, *shape, device="cuda").requires_grad_()
    m = rand(gen, *shape, device="cuda").requires_grad_()
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.3).float().cuda()
    for mk in (None, mask):
        with poisoned_empty():
            out = lncc(f, m, window=window, mask=mk, backend=gpu_backend)
            gf, gm = torch.autograd.grad(out.sum(), (f, m))
        fd, md = f.detach().double().requires_grad_(), m.detach().double().requires_grad_()
        exp = _ref(fd, md, window, mk)
        ef, em = torch.autograd.grad(exp.sum(), (fd, md))
        assert_close_verbose(out, exp, atol=F32_RTOL, rtol=F32_RTOL)
        assert_close_verbose(gf, ef, atol=F32_RTOL, rtol=F32_RTOL)
        assert_close_verbose(gm, em, atol=F32_RTOL, rtol=F32_RTOL)


# ------------------------------------------------------------------------------ bad input

X = torch.rand(1, 1, 7, 8, 9)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(window=4), ValueError, "window must be an odd integer >= 1, got 4"),
        (dict(window=0), ValueError, "window must be an odd integer >= 1, got 0"),
        (dict(window=9), ValueError, r"window \(9\) must not exceed any spatial size"),
        (dict(window=3.0), TypeError, "window must be an int, got float"),
        (dict(eps=0.0), ValueError, "eps must be a finite float > 0"),
        (dict(eps=-1e-5), ValueError, "eps must be a finite float > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite float > 0"),
        (dict(eps=float("inf")), ValueError, "eps must be a finite float > 0"),
        (dict(eps=1e300), ValueError,
         r"eps must be a finite float > 0 within float32's normal range \[1.17549e-38, "
         r"3.40282e\+38\], got 1e\+300"),
        (dict(eps=1e-40), ValueError, r"eps .* within float32's normal range .* got 1e-40"),
        (dict(mask=torch.full((1, 1, 7, 8, 9), -1.0)), ValueError,
         r"mask weights must be finite and >= 0"),
        (dict(eps="x"), TypeError, "eps must be a float, got str"),
        (dict(moving=torch.rand(1, 1, 7, 8, 10)), ValueError,
         "same channel count and spatial shape"),
        (dict(fixed=torch.rand(1, 2, 7, 8, 9), moving=torch.rand(1, 2, 7, 8, 9)), ValueError,
         "must have one channel"),
        (dict(fixed=torch.rand(7, 8, 9)), ValueError, r"fixed must be \[B, C, H, W\]"),
        (dict(fixed=X.numpy()), TypeError, "fixed must be a torch.Tensor, got ndarray"),
        (dict(moving=X.long()), TypeError, "moving must be a floating-point tensor"),
        (dict(moving=X.double()), TypeError, "fixed and moving must have the same dtype"),
        (dict(fixed=torch.rand(2, 1, 7, 8, 9), moving=torch.rand(3, 1, 7, 8, 9)), ValueError,
         "batch sizes must match or one must be 1"),
        (dict(mask=torch.ones(1, 1, 7, 8)), ValueError, r"mask must be \[B or 1, 1, \*S\]"),
        (dict(mask=torch.ones(1, 1, 7, 8, 9, dtype=torch.int32)), TypeError,
         "mask must be bool or floating point"),
        (dict(mask=torch.ones(1, 1, 7, 8, 9, requires_grad=True)), ValueError,
         "mask must not require grad"),
        (dict(mask=torch.ones(2, 1, 7, 8, 9), fixed=torch.rand(3, 1, 7, 8, 9),
              moving=torch.rand(3, 1, 7, 8, 9)), ValueError, "batch sizes must match"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(fixed=X, moving=X.clone(), window=3)
    args.update(kwargs)
    fixed, moving = args.pop("fixed"), args.pop("moving")
    with pytest.raises(exc, match=match):
        lncc(fixed, moving, **args)


# --------------------------------------------------------------- MONAI's form (lncc_monai)


def _monai_np(f, m, window, nr=0.0, dr=1e-5, mask=None, g=None):
    """(lncc_monai [B], d/d fixed [B, 1, *S], d/d moving) of Σ_b g_b lncc_monai_b (g = 1
    when None), float64 NumPy, independent of torch: box sums of the in-bounds windows by
    differences of cumulative sums (:func:`_box_np`), then per window
    cc = (cross² + nr) / (max(var_I, dr) max(var_J, dr)) with raw variances. Each item is
    centred on its own float64 mean first (cc does not change; float64 stays exact at
    intensity offsets). Gradients: ∂cc/∂(cross, var_I, var_J) per window (torch.maximum's
    subgradient: 1 above dr, 1/2 on a tie, 0 below) pushed back through the sums
    (∂cross/∂I(x) = J(x) − ΣJ/n, ∂var_I/∂I(x) = 2 (I(x) − ΣI/n) for every window holding x:
    box sums again, the in-bounds box being symmetric). Gradients are per broadcast item."""
    i = f.detach().double().cpu().numpy()[:, 0]
    j = m.detach().double().cpu().numpy()[:, 0]
    b = max(i.shape[0], j.shape[0])
    axes = tuple(range(1, i.ndim))
    i = np.broadcast_to(i - i.mean(axes, keepdims=True), (b, *i.shape[1:]))
    j = np.broadcast_to(j - j.mean(axes, keepdims=True), (b, *j.shape[1:]))
    r = window // 2
    # A window of one voxel is the voxel (cumulative-sum differences would round it).
    box = (lambda x: x) if r == 0 else (lambda x: _box_np(x, r))
    n = box(np.ones_like(i[:1]))
    si, sj = box(i), box(j)
    sii, sjj, sij = box(i * i), box(j * j), box(i * j)
    cross = sij - si * sj / n
    ri, rj = sii - si * si / n, sjj - sj * sj / n
    vi, vj = np.maximum(ri, dr), np.maximum(rj, dr)
    cc = (cross * cross + nr) / (vi * vj)
    if mask is None:
        wm = np.ones_like(cc)
    else:
        wm = np.broadcast_to(mask.detach().double().cpu().numpy()[:, 0], cc.shape)
    msum = wm.reshape(b, -1).sum(1)
    value = np.where(msum > 0, (cc * wm).reshape(b, -1).sum(1) / np.where(msum > 0, msum, 1), 0)
    gb = np.ones(b) if g is None else np.broadcast_to(np.asarray(g, dtype=np.float64), (b,))
    w = wm * (gb / np.where(msum > 0, msum, 1)).reshape(-1, *([1] * len(axes)))
    dcross = w * 2 * cross / (vi * vj)
    grads = []
    for a, other, sa, sb, ra, va in ((i, j, si, sj, ri, vi), (j, i, sj, si, rj, vj)):
        gate = np.where(ra > dr, 1.0, np.where(ra == dr, 0.5, 0.0))
        dva = -w * gate * cc / va
        grads.append(torch.from_numpy(
            other * box(dcross) - box(dcross * sb / n)
            + 2 * a * box(dva) - 2 * box(dva * sa / n))[:, None])
    return torch.from_numpy(value), grads[0], grads[1]


def _monai_cc_by_hand(a, b, nr, dr):
    """cc of one window (flat tensors) written out: MONAI's formula on its values."""
    a, b = a.double(), b.double()
    n = a.numel()
    cross = (a * b).sum() - a.sum() * b.sum() / n
    va = max((a * a).sum().item() - a.sum().item() ** 2 / n, dr)
    vb = max((b * b).sum().item() - b.sum().item() ** 2 / n, dr)
    return (cross.item() ** 2 + nr) / (va * vb)


def test_monai_oracle_matches_definition_by_hand():
    # 2D 4x5, window 3: corner (4 in-bounds voxels), edge and interior voxels, each picked by
    # a one-hot mask; the top-left 2x3 block of `moving` is flat (variance 0 < dr: floored).
    f = torch.tensor([[1.0, 2.0, 0.5, 3.0, 1.0], [2.0, 1.0, 4.0, 0.0, 2.5],
                      [1.5, 2.5, 1.0, 2.0, 0.5], [0.5, 1.0, 3.0, 1.5, 2.0]])
    m = torch.tensor([[2.0, 2.0, 2.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 1.0],
                      [2.0, 1.0, 1.5, 0.5, 3.0], [1.0, 0.5, 2.0, 2.5, 1.5]])
    nr, dr = 1e-3, 1e-2
    cc = np.zeros((4, 5))
    for y in range(4):
        for x in range(5):
            ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
            cc[y, x] = _monai_cc_by_hand(f[ys, xs].flatten(), m[ys, xs].flatten(), nr, dr)
            one = torch.zeros(1, 1, 4, 5)
            one[0, 0, y, x] = 1.0
            got = _monai_np(f[None, None], m[None, None], 3, nr, dr, one)[0].item()
            assert abs(got - cc[y, x]) <= 1e-12 * abs(cc[y, x]), (y, x, got, cc[y, x])
    # The corner's moving window is flat: cross = 0, var_J floored.
    a = f[:2, :2].double().flatten()
    var_f = (a * a).sum().item() - a.sum().item() ** 2 / 4
    assert cc[0, 0] == pytest.approx(nr / (var_f * dr), rel=1e-12)
    value = _monai_np(f[None, None], m[None, None], 3, nr, dr)[0].item()
    assert abs(value - cc.mean()) <= 1e-12 * cc.mean(), (value, cc.mean())


def test_monai_oracle_gradient_matches_finite_differences(gen):
    # Central differences of the oracle's value (NumPy only); flat patches (floored
    # variances) in both images, a mask, nr > 0 and a broadcast batch.
    f = rand(gen, 1, 1, 5, 6, dtype=torch.float64)
    m = rand(gen, 2, 1, 5, 6, dtype=torch.float64)
    f[..., :3, :3] = 0.7
    m[..., 2:, 3:] = 1.2
    mask = rand(gen, 1, 1, 5, 6, dtype=torch.float64, lo=0.0, hi=1.0)
    g = np.array([1.0, -0.5])
    for window, nr, dr in ((3, 1e-4, 1e-3), (5, 0.0, 1e-5)):
        _, gf, gm = _monai_np(f, m, window, nr, dr, mask, g)
        for x, grad in ((f, gf.sum(0, keepdim=True)), (m, gm)):
            num = torch.zeros_like(x)
            h = 1e-6
            for k in range(x.numel()):
                xp, xm = x.clone(), x.clone()
                xp.view(-1)[k] += h
                xm.view(-1)[k] -= h
                pp, pm = ((xp, m), (xm, m)) if x is f else ((f, xp), (f, xm))
                vp = (_monai_np(*pp, window, nr, dr, mask)[0].numpy() * g).sum()
                vm = (_monai_np(*pm, window, nr, dr, mask)[0].numpy() * g).sum()
                num.view(-1)[k] = (vp - vm) / (2 * h)
            _assert_rel("d input", grad, num, 1e-6)


def _check_monai(backend, f, m, window, nr, dr, mask=None, *, tol, gen):
    """lncc_monai and its gradients on `backend` against :func:`_monai_np` (values and
    gradients relative to their largest magnitude; gradients of a batch-1 input summed over
    the broadcast items)."""
    f, m = f.clone().requires_grad_(), m.clone().requires_grad_()
    with poisoned_empty():
        out = lncc_monai(f, m, window=window, smooth_nr=nr, smooth_dr=dr, mask=mask,
                         backend=backend)
    assert out.dtype == f.dtype and out.shape == (max(f.shape[0], m.shape[0]),)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    value, tf, tm = _monai_np(f, m, window, nr, dr, mask, g.numpy())
    value = _monai_np(f, m, window, nr, dr, mask)[0]
    _assert_rel("lncc_monai", out, value, tol)
    with poisoned_empty():
        gf, gm = torch.autograd.grad(out, (f, m), g.to(out.dtype).to(out.device))
    _assert_rel("d fixed", gf, tf.sum(0, keepdim=True) if f.shape[0] == 1 else tf, tol)
    _assert_rel("d moving", gm, tm.sum(0, keepdim=True) if m.shape[0] == 1 else tm, tol)
    return out


# name: ((shape, window) on torch and cpu, (shape, window) on interpreted Triton or None).
MONAI_CASES = {
    "3d-w3": (((2, 1, 7, 9, 11), 3), ((2, 1, 5, 6, 7), 3)),
    "3d-w9": (((1, 1, 9, 10, 11), 9), None),
    "2d-w9": (((2, 1, 11, 13), 9), ((2, 1, 9, 11), 5)),
    "2d-w1": (((1, 1, 6, 5), 1), None),
}
# (smooth_nr, smooth_dr): MONAI's defaults, and a numerator term with a coarse floor.
MONAI_SMOOTH = [(0.0, 1e-5), (1e-4, 1e-2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MONAI_CASES))
@pytest.mark.parametrize("nr,dr", MONAI_SMOOTH, ids=["defaults", "nr-dr"])
def test_lncc_monai_matches_oracle(backend, case, nr, dr, gen):
    full, small = MONAI_CASES[case]
    if backend == "triton" and (small is None or (case == "3d-w3") != (dr == 1e-5)):
        pytest.skip("interpreted Triton: a small 3D case (defaults), a small 2D one (nr, dr)")
    shape, window = small if backend == "triton" else full
    f, m = rand(gen, *shape), rand(gen, *shape)
    _check_monai(backend, f, m, window, nr, dr, tol=F32_RTOL, gen=gen)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_lncc_monai_float64_exact(backend, gen):
    f = rand(gen, 2, 1, 7, 9, 11, dtype=torch.float64)
    m = rand(gen, 2, 1, 7, 9, 11, dtype=torch.float64)
    _check_monai(backend, f, m, 5, 1e-4, 1e-2, tol=1e-10, gen=gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lncc_monai_masks_and_broadcast(backend, gen):
    shape = (4, 5, 6) if backend == "triton" else (7, 9, 11)
    f, m = rand(gen, 1, 1, *shape), rand(gen, 2, 1, *shape)
    binary = (torch.rand(1, 1, *shape, generator=gen) > 0.4).float()
    weights = rand(gen, 2, 1, *shape, lo=0.0, hi=2.0)
    for mask in (binary.bool(), weights):
        _check_monai(backend, f, m, 3, 1e-5, 1e-3, mask, tol=F32_RTOL, gen=gen)
    empty = torch.zeros(2, 1, *shape)
    empty[0, 0, 1, 2, 3] = 1.0
    out = lncc_monai(f, m, window=3, mask=empty, backend=backend)
    assert out[1].item() == 0.0 and bool(torch.isfinite(out).all())
    assert_close_verbose(out, _monai_np(f, m, 3, 0.0, 1e-5, empty)[0], atol=F32_RTOL, rtol=0)


def _floored_pair(gen, shape):
    """[1, 1, *shape] float32 images whose windows (3 wide) span every case of the floor dr =
    1e-5: the first third along D flat in both (raw variance 0), the next 3 slices faint
    noise (raw variance ~1e-8 n), the rest full contrast; and the mask of the windows wholly
    inside the flat slab."""
    f = rand(gen, 1, 1, *shape, dtype=torch.float64)
    m = 0.5 * f + 0.5 * rand(gen, 1, 1, *shape, dtype=torch.float64)
    d = shape[0] // 3
    f[:, :, :d], m[:, :, :d] = 0.8, 1.1
    faint = (slice(None), slice(None), slice(d, d + 3))
    f[faint] = 0.8 + 1e-4 * rand(gen, *f[faint].shape, dtype=torch.float64)
    m[faint] = 1.1 + 1e-4 * rand(gen, *m[faint].shape, dtype=torch.float64)
    flat = torch.zeros(1, 1, *shape)
    flat[:, :, : d - 1] = 1.0
    return f.float(), m.float(), flat


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nr", [0.0, 1e-12], ids=["nr0", "nr1e-12"])
def test_lncc_monai_floored_and_flat_windows(backend, nr, gen):
    if backend == "triton" and nr == 0.0:
        pytest.skip("interpreted Triton: nr > 0 covers the floor (and its flat windows)")
    shape = (8, 5, 6) if backend == "triton" else (10, 9, 11)
    f, m, flat = _floored_pair(gen, shape)
    dr = 1e-5
    # The test exercises the floor: about half the windows lie below it (flat or faint).
    i = f.double().numpy()[:, 0]
    raw = _box_np(i * i, 1) - _box_np(i, 1) ** 2 / _box_np(np.ones_like(i), 1)
    assert (raw < dr).mean() > 0.3 and (raw > dr).mean() > 0.3
    _check_monai(backend, f, m, 3, nr, dr, tol=F32_RTOL, gen=gen)
    # Flat windows: cross = 0 and both variances floored, cc = nr / dr² (Triton takes dr as
    # a float32: 3e-8 relative).
    on_flat = lncc_monai(f, m, window=3, smooth_nr=nr, smooth_dr=dr, mask=flat, backend=backend)
    exp = nr / dr ** 2
    assert abs(on_flat.item() - exp) <= 1e-6 * exp + 1e-12, (on_flat.item(), exp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e4, -1024.0], ids=lambda v: f"{v:g}")
def test_lncc_monai_intensity_offset(backend, offset, gen):
    if backend == "triton" and offset < 0:
        pytest.skip("interpreted Triton: 1e4 only")
    # float32 at MR / CT offsets against float64 (the same float32 values) and against the
    # images without offset: the centring keeps the raw variances accurate.
    shape = (8, 9, 10) if backend == "triton" else (14, 15, 16)
    f64, m64 = _offset_pair(offset, shape)
    f, m = f64.float(), m64.float()
    out = _check_monai(backend, f, m, 5, 0.0, 1e-5, tol=OFFSET_TOL, gen=gen)
    base = _monai_np(*_offset_pair(0.0, shape), 5)[0]
    assert abs(out.item() - base.item()) <= OFFSET_TOL, (out.item(), base.item())


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_lncc_monai_gradcheck_float64(backend, gen):
    f = rand(gen, 1, 1, 4, 3, 5, dtype=torch.float64).requires_grad_()
    m = rand(gen, 2, 1, 4, 3, 5, dtype=torch.float64).requires_grad_()
    mask = rand(gen, 1, 1, 4, 3, 5, dtype=torch.float64, lo=0.0, hi=1.0)
    # torch: autograd of the reference (the oracle tests check it too); its 2D case only.
    for kw in (dict(), dict(smooth_nr=1e-3, smooth_dr=1e-2, mask=mask)) if backend == "cpu" else ():
        assert torch.autograd.gradcheck(
            lambda a, b: lncc_monai(a, b, window=3, backend=backend, **kw), (f, m))  # noqa: B023
    f2 = rand(gen, 2, 1, 6, 7, dtype=torch.float64).requires_grad_()
    m2 = rand(gen, 2, 1, 6, 7, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: lncc_monai(a, b, window=5, smooth_nr=1e-4, backend=backend), (f2, m2))


def test_lncc_monai_double_backward_cpu(gen):
    # The kernels' gradient differentiated again (through the reference of the same form).
    if call_reason("cpu", torch.device("cpu"), torch.float64) is not None:
        pytest.skip("cpu backend not built")
    f = rand(gen, 1, 1, 4, 5, 4, dtype=torch.float64).requires_grad_()
    m = rand(gen, 1, 1, 4, 5, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a, b: lncc_monai(a, b, window=3, smooth_nr=1e-3, smooth_dr=1e-2, backend="cpu"),
        (f, m))


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_lncc_and_lncc_monai_differ_only_where_their_forms_do(backend, gen):
    # Same images: on full-contrast windows the two forms agree (cross² / (vv + eps) against
    # cross² / vv, vv >> eps); on flat windows lncc gives 0, lncc_monai nr / dr².
    f, m, flat = _floored_pair(gen, (10, 9, 11))
    contrast = torch.zeros_like(flat)
    contrast[:, :, 10 // 3 + 4:] = 1.0  # windows clear of the faint slices
    a = lncc(f, m, window=3, mask=contrast, backend=backend)
    b = lncc_monai(f, m, window=3, mask=contrast, backend=backend)
    # eps / vv ~ 1e-5 on these windows.
    assert abs(a.item() - b.item()) <= 1e-4 * b.item() and b.item() > 0.1, (a, b)
    assert lncc(f, m, window=3, mask=flat, backend=backend).item() == 0.0
    on_flat = lncc_monai(f, m, window=3, smooth_nr=1e-12, mask=flat, backend=backend).item()
    assert on_flat == pytest.approx(1e-2, rel=1e-7)  # float32 output


@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_lncc_monai_torch_compile_dynamic(backend, gen):
    def fn(a, b, mask):
        return (lncc_monai(a, b, window=3, smooth_nr=1e-4, smooth_dr=1e-3, mask=mask,
                           backend=backend),)

    def make(shape):
        return (rand(gen, 2, 1, *shape).requires_grad_(), rand(gen, 2, 1, *shape).requires_grad_(),
                rand(gen, 1, 1, *shape, lo=0.0, hi=1.0))

    compile_two_sizes(fn, make, [(7, 8, 9), (9, 6, 11)], ["lncc_monai", "d fixed", "d moving"],
                      atol=1e-6, rtol=1e-6)


def _pad(x, r):
    return torch.nn.functional.pad(x, [r, r] * (x.dim() - 2))


MONAI_CLASS_CASES = [((2, 1, 6, 7, 5), 3, 0.0, 1e-5), ((2, 1, 9, 8), 5, 1e-4, 1e-3)]
MONAI_CLASS_IDS = ["3d-defaults", "2d-nr-dr"]


def _check_monai_class(backend, dtype, shape, window, nr, dr, gen, device="cpu"):
    """-mean lncc_monai of the zero-padded images (mask of ones on the original voxels)
    against MONAI's LocalNormalizedCrossCorrelationLoss(reduction="mean"), value and
    gradients."""
    monai = pytest.importorskip(
        "monai", reason="MONAI's LocalNormalizedCrossCorrelationLoss: pip install -e .[compat]")
    nd = len(shape) - 2
    loss = monai.losses.LocalNormalizedCrossCorrelationLoss(
        spatial_dims=nd, kernel_size=window, smooth_nr=nr, smooth_dr=dr).to(device)
    pred = rand(gen, *shape, dtype=dtype, device=device)
    target = rand(gen, *shape, dtype=dtype, device=device)
    if dtype == torch.float64:
        # A flat patch (floored variances; MONAI's float32 box sums of it round to cross ~3e-6
        # and its float32 gradients there are rounding noise, so float64 only).
        target[..., : window + 1, : window + 1] = 1.0
    pred.requires_grad_()
    target.requires_grad_()
    exp = loss(pred, target)
    ep, et = torch.autograd.grad(exp, (pred, target))
    # MONAI zero-pads its windows and divides by the whole window: the padded images with a
    # mask of ones on the original voxels (every window they see is whole).
    r = window // 2
    mask = _pad(torch.ones(1, 1, *shape[2:], dtype=dtype, device=device), r)
    got = -lncc_monai(_pad(target, r), _pad(pred, r), window=window, smooth_nr=nr,
                      smooth_dr=dr, mask=mask, backend=backend).mean()
    gp, gt = torch.autograd.grad(got, (pred, target))
    # float32: MONAI's own float32 box sums of uncentred images round at ~1e-6.
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert abs(got.item() - exp.item()) <= tol * abs(exp.item()), (got.item(), exp.item())
    _assert_rel("d pred", gp, ep.double().cpu(), 10 * tol)
    _assert_rel("d target", gt, et.double().cpu(), 10 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,window,nr,dr", MONAI_CLASS_CASES, ids=MONAI_CLASS_IDS)
def test_lncc_monai_matches_monai_class(backend, dtype, shape, window, nr, dr, gen):
    if backend == "triton" and (dtype == torch.float64 or len(shape) == 5):
        pytest.skip("interpreted Triton: float32 (all it takes), the 2D case")
    _check_monai_class(backend, dtype, shape, window, nr, dr, gen)


@pytest.mark.cuda
@pytest.mark.parametrize("shape,window,nr,dr", MONAI_CLASS_CASES, ids=MONAI_CLASS_IDS)
def test_gpu_lncc_monai_matches_monai_class(gpu_backend, shape, window, nr, dr, gen):
    _check_monai_class(gpu_backend, torch.float32, shape, window, nr, dr, gen, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("shape,window", [((2, 1, 17, 20, 23), 9), ((3, 1, 61, 45), 5),
                                          ((1, 1, 40, 300), 3), ((1, 1, 6, 5), 1)],
                         ids=["3d", "2d", "2d-long", "2d-w1"])
def test_gpu_lncc_monai_matches_oracle(gpu_backend, shape, window, gen):
    f, m = rand(gen, *shape, device="cuda"), rand(gen, *shape, device="cuda")
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.3).float().cuda()
    for nr, dr in MONAI_SMOOTH:
        for mk in (None, mask):
            _check_monai(gpu_backend, f, m, window, nr, dr, mk, tol=F32_RTOL, gen=gen)


@pytest.mark.cuda
@pytest.mark.parametrize("nr", [0.0, 1e-12], ids=["nr0", "nr1e-12"])
def test_gpu_lncc_monai_floored_windows_and_offsets(gpu_backend, nr, gen):
    f, m, flat = _floored_pair(gen, (12, 14, 16))
    f, m, flat = f.cuda(), m.cuda(), flat.cuda()
    _check_monai(gpu_backend, f, m, 3, nr, 1e-5, tol=F32_RTOL, gen=gen)
    on_flat = lncc_monai(f, m, window=3, smooth_nr=nr, mask=flat, backend=gpu_backend).item()
    assert abs(on_flat - nr / 1e-10) <= 1e-6 * nr / 1e-10 + 1e-12, on_flat
    for offset in (1e4, -1024.0):
        f64, m64 = _offset_pair(offset, (32, 32, 32))
        out = _check_monai(gpu_backend, f64.float().cuda(), m64.float().cuda(), 9, nr, 1e-5,
                           tol=OFFSET_TOL, gen=gen)
        base = _monai_np(*_offset_pair(0.0, (32, 32, 32)), 9, nr, 1e-5)[0]
        assert abs(out.item() - base.item()) <= OFFSET_TOL, (offset, out.item(), base.item())


BAD_MONAI = [
    (dict(smooth_dr=0.0), ValueError, r"lncc_monai: smooth_dr must be a finite float > 0"),
    (dict(smooth_dr=-1e-5), ValueError, r"lncc_monai: smooth_dr must be a finite float > 0"),
    (dict(smooth_dr=float("nan")), ValueError, r"lncc_monai: smooth_dr must be a finite"),
    (dict(smooth_dr=float("inf")), ValueError, r"lncc_monai: smooth_dr must be a finite"),
    (dict(smooth_dr=1e-40), ValueError,
     r"smooth_dr must be a finite float > 0 within float32's normal range .* got 1e-40"),
    (dict(smooth_dr=1e300), ValueError, r"smooth_dr .* float32's normal range .* got 1e\+300"),
    (dict(smooth_dr="x"), TypeError, r"lncc_monai: smooth_dr must be a float, got str"),
    (dict(smooth_nr=-1e-9), ValueError, r"lncc_monai: smooth_nr must be a finite float >= 0"),
    (dict(smooth_nr=float("nan")), ValueError, r"smooth_nr must be a finite float >= 0"),
    (dict(smooth_nr=float("inf")), ValueError, r"smooth_nr must be a finite float >= 0"),
    (dict(smooth_nr=1e39), ValueError, r"smooth_nr .* \(at most 3.40282e\+38\), got 1e\+39"),
    (dict(smooth_nr=True), TypeError, r"lncc_monai: smooth_nr must be a float, got bool"),
    (dict(window=4), ValueError, r"lncc_monai: window must be an odd integer >= 1, got 4"),
    (dict(mask=torch.full((1, 1, 7, 8, 9), -1.0)), ValueError,
     r"lncc_monai: mask weights must be finite and >= 0"),
    (dict(moving=torch.rand(1, 1, 7, 8, 10)), ValueError,
     r"lncc_monai: fixed and moving must have the same channel count"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_MONAI)
def test_lncc_monai_bad_input(kwargs, exc, match):
    args = dict(fixed=X, moving=X.clone(), window=3)
    args.update(kwargs)
    fixed, moving = args.pop("fixed"), args.pop("moving")
    with pytest.raises(exc, match=match):
        lncc_monai(fixed, moving, **args)


def test_lncc_monai_window_is_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        lncc_monai(X, X, 3)
