"""Tests of ``jacobian_det`` and ``folding_fraction``: every kernel backend against the
reference, the reference (backend "torch") against an independent NumPy float64 determinant
(``np.gradient``), gradients (gradcheck, the gather backward against autograd), identities
(affine maps, planted folds, smooth fields), folding counts exact outside the arithmetic's
error band, spacing, NaN locality, the Triton launchers' 64-bit variants and grid limits,
the module, ``torch.compile`` and every validation message.

Definition pinned here: det(I + ∇u) of the map x + u(x), u [B, ndim, *S] with component i
along spatial axis i; d u_i / d x_j by central differences inside, one-sided at the borders,
0 along an axis of size 1, divided by the spacing of axis j.
"""

from __future__ import annotations

import importlib
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch

import mrus_kernels
from conftest import (
    ALL_DTYPES,
    DTYPE_IDS,
    assert_close_verbose,
    backend_params,
    backend_reason,
    bad_input_test,
    poisoned_empty,
    raises_before_dispatch,
    randn,
    require_backend,
    skip_without_float64,
    spy_launches,
)
from mrus_kernels import (
    BackendUnavailableError,
    JacobianDet,
    folding_fraction,
    jacobian_det,
    reference,
)

jacobian_module = importlib.import_module("mrus_kernels.jacobian")

BACKENDS = backend_params(("torch", "cpu", "triton"))
FAST_BACKENDS = backend_params(("torch", "cpu"))
KERNEL_BACKENDS = backend_params(("cpu", "triton"))

# Odd sizes, batch 2; the Triton interpreter gets smaller volumes.
SHAPES = {2: (2, 2, 13, 11), 3: (2, 3, 7, 9, 11)}
TRITON_SHAPES = {2: (2, 2, 9, 10), 3: (2, 3, 5, 6, 7)}
SPACINGS = {2: (0.8, 1.7), 3: (1.5, 0.7, 2.5)}


def _shape(backend: str, ndim: int) -> tuple[int, ...]:
    return (TRITON_SHAPES if backend == "triton" else SHAPES)[ndim]


def _field(gen, shape, dtype=torch.float32, device="cpu", scale=0.6):
    """A rough random displacement: N(0, scale²), so that some voxels fold."""
    return randn(gen, *shape, dtype=dtype, device=device, scale=scale)


def _numpy_jacobian(u: torch.Tensor, spacing=None) -> np.ndarray:
    """I + ∇u in float64 with NumPy's gradient (central inside, one-sided at the borders,
    0 along an axis of size 1): [B, *S, ndim, ndim]."""
    a = u.detach().cpu().double().numpy()
    ndim = a.shape[1]
    h = spacing or (1.0,) * ndim
    jac = np.zeros((a.shape[0], ndim, ndim, *a.shape[2:]))
    for i in range(ndim):
        for j in range(ndim):
            if a.shape[2 + j] > 1:
                jac[:, i, j] = np.gradient(a[:, i], h[j], axis=1 + j, edge_order=1)
            jac[:, i, j] += i == j
    return np.moveaxis(jac, (1, 2), (-2, -1))


def _numpy_det(u: torch.Tensor, spacing=None) -> torch.Tensor:
    """det(I + ∇u), float64, from :func:`_numpy_jacobian` and np.linalg.det: [B, *S]."""
    with np.errstate(invalid="ignore"):  # NaN in, NaN out
        return torch.from_numpy(np.linalg.det(_numpy_jacobian(u, spacing)))


def _expected_det(backend: str, u: torch.Tensor, spacing=None) -> torch.Tensor:
    """What `backend` must give: the reference for the kernels; for "torch", which is the
    reference, the independent NumPy determinant (in u's dtype, as the op returns)."""
    if backend == "torch":
        return _numpy_det(u, spacing).to(u.dtype)
    return reference.jacobian_det(u, spacing)


def _det_error_bound(jac: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Bound on |computed det - exact det| per voxel for input u of `dtype`, the exact det
    taken on that (already rounded) input: each entry of J carries a few rounding errors of
    the compute type (float32, float64 for float64) and the products and sums of the
    determinant add a few more, each relative to a term of the permanent of |J|; 16 units
    of that covers them. A float16 result also flushes |det| < 2**-25 to 0."""
    eps = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    a = np.abs(jac)
    if jac.shape[-1] == 2:
        perm = a[..., 0, 0] * a[..., 1, 1] + a[..., 0, 1] * a[..., 1, 0]
    else:
        perm = sum(
            a[..., 0, p[0]] * a[..., 1, p[1]] * a[..., 2, p[2]]
            for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
        )
    return 16 * eps * perm + (2.0**-24 if dtype == torch.float16 else 0.0)


def assert_folding_exact_outside_band(frac, det, u, spacing=None, max_band=None):
    """The backend's det classifies every voxel farther than the error bound from 0 as the
    float64 determinant does, and its folding fraction counts exactly its own folded voxels:
    only voxels inside the band may differ from the float64 count (none when the band is
    empty, as it is for nearly every random field). `max_band` bounds how many voxels per
    item the band may hold (the test is then a near-exact count)."""
    jac = _numpy_jacobian(u, spacing)
    exact = _numpy_det(u, spacing)
    bound = torch.from_numpy(_det_error_bound(jac, u.dtype))
    sure_fold, sure_ok = exact <= -bound, exact > bound
    folded = det.detach().cpu() <= 0
    assert bool(folded[sure_fold].all()), "a voxel with det <= -bound is not folded"
    assert not bool(folded[sure_ok].any()), "a voxel with det > bound is counted folded"
    n = math.prod(u.shape[2:])
    own = folded.flatten(1).sum(1, dtype=frac.dtype) / n
    assert torch.equal(frac.cpu(), own), f"fraction {frac} != its det's count {own}"
    band = (~sure_fold & ~sure_ok).flatten(1).sum(1)
    if max_band is not None:
        assert int(band.max()) <= max_band, f"{band.tolist()} voxels in the error band"


# =========================================================================== backends vs ref


@pytest.mark.parametrize("spacing", [False, True], ids=["voxels", "spacing"])
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(backend, dtype, ndim, spacing, gen):
    skip_without_float64(backend, dtype)
    u = _field(gen, _shape(backend, ndim), dtype)
    sp = SPACINGS[ndim] if spacing else None
    expected = _expected_det(backend, u, sp)
    with poisoned_empty():
        det = jacobian_det(u, spacing=sp, backend=backend)
    assert det.dtype == dtype and det.shape == (u.shape[0], *u.shape[2:])
    assert_close_verbose(det, expected, dtype, name=f"{backend} jacobian_det")


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_matches_reference(backend, dtype, ndim, gen):
    """The gather backward against the reference's autograd."""
    skip_without_float64(backend, dtype)
    shape = _shape(backend, ndim)
    u = _field(gen, shape, dtype)
    grad = randn(gen, shape[0], *shape[2:], dtype=dtype)
    sp = SPACINGS[ndim]
    ref = u.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.jacobian_det(ref, sp), ref, grad)
    ours = u.clone().requires_grad_()
    with poisoned_empty():
        (actual,) = torch.autograd.grad(jacobian_det(ours, spacing=sp, backend=backend), ours, grad)
    assert actual.dtype == dtype
    assert_close_verbose(actual, expected, dtype, name=f"{backend} d u")


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_numpy_gradient(backend, ndim, gen):
    """Independent cross-check: np.gradient (edge_order=1) and np.linalg.det."""
    u = _field(gen, SHAPES[ndim], torch.float64)
    for sp in (None, SPACINGS[ndim]):
        det = jacobian_det(u, spacing=sp, backend=backend)
        assert_close_verbose(det, _numpy_det(u, sp or (1.0,) * ndim), torch.float64)


@pytest.mark.parametrize("spacing", [None, (1.3, 0.6, 2.0)], ids=["voxels", "spacing"])
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck(backend, ndim, spacing, gen):
    spatial = (3, 4, 5) if ndim == 3 else (4, 5)
    u = _field(gen, (2, ndim, *spatial), torch.float64).requires_grad_()
    sp = spacing[:ndim] if spacing else None
    assert torch.autograd.gradcheck(lambda x: jacobian_det(x, spacing=sp, backend=backend), (u,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_items_are_independent(backend, gen):
    u = _field(gen, (3, 3, 4, 5, 6))
    det = jacobian_det(u, backend=backend)
    for b in range(3):
        assert torch.equal(det[b : b + 1], jacobian_det(u[b : b + 1], backend=backend)), b


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_input(backend, ndim, gen):
    spatial = (5, 6, 4)[:ndim]
    wide = _field(gen, (2, ndim, *spatial[:-1], 2 * spatial[-1]))
    u = wide[..., ::2]
    assert not u.is_contiguous()
    grad = randn(gen, 2, *spatial)
    ours = wide.clone().requires_grad_()
    view = ours[..., ::2]
    with poisoned_empty():
        det = jacobian_det(view, backend=backend)
        (gu,) = torch.autograd.grad(det, ours, grad)
    assert torch.equal(det, jacobian_det(u.contiguous(), backend=backend))
    assert_close_verbose(det, reference.jacobian_det(u.contiguous()), torch.float32)
    ref = wide.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.jacobian_det(ref[..., ::2]), ref, grad)
    assert_close_verbose(gu, expected, torch.float32)
    assert torch.equal(gu[..., 1::2], torch.zeros_like(gu[..., 1::2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(1, 3, 1, 5, 6), (2, 3, 2, 1, 3), (1, 2, 1, 1), (1, 2, 2, 7), (1, 3, 1, 1, 1)],
    ids=["depth1", "2-1-3", "2d-1x1", "2d-2x7", "3d-1x1x1"],
)
def test_small_and_size_one_axes(backend, shape, gen):
    """Size 1: no derivative along that axis (J row/column of the identity); size 2: both
    voxels take the one-sided difference. The torch row (the reference itself) is checked
    against NumPy and its gradient by gradcheck."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    u = _field(gen, shape, dtype)
    if backend == "torch":
        assert_close_verbose(jacobian_det(u, backend="torch"), _numpy_det(u), dtype)
        x = u.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda v: jacobian_det(v, backend="torch"), (x,))
        return
    grad = randn(gen, shape[0], *shape[2:], dtype=dtype)
    ours, ref = u.clone().requires_grad_(), u.clone().requires_grad_()
    with poisoned_empty():
        det = jacobian_det(ours, backend=backend)
        (g1,) = torch.autograd.grad(det, ours, grad)
    expected = reference.jacobian_det(ref)
    assert_close_verbose(det, expected, dtype)
    (g2,) = torch.autograd.grad(expected, ref, grad)
    assert_close_verbose(g1, g2, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_is_deterministic(backend, gen):
    """Single writer per element: bitwise the same on every run, and right (float64).

    Under TRITON_INTERPRET=1 the programs run one after another in a fixed order, so two
    Triton runs agree bitwise whatever the kernel does: that part is GPU-only
    (test_gpu_large_and_deterministic runs it on CUDA tensors)."""
    shape = _shape(backend, 3)
    u = _field(gen, shape).requires_grad_()
    grad = randn(gen, shape[0], *shape[2:])
    runs = [torch.autograd.grad(jacobian_det(u, backend=backend), u, grad)[0] for _ in range(2)]
    ref = u.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.jacobian_det(ref), ref, grad.double())
    assert_close_verbose(runs[0], expected.float(), torch.float32)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("bitwise determinism cannot fail under the Triton interpreter (programs "
                    "run serially); checked on a GPU by test_gpu_large_and_deterministic")
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_without_requires_grad(backend, gen):
    u = _field(gen, (1, 2, 5, 6))
    with mock.patch.object(jacobian_module, "launch_backward") as spy:
        det = jacobian_det(u, backend=backend)
    assert not det.requires_grad
    spy.assert_not_called()


# =========================================================================== triton launchers

TRITON_KERNELS = ("_jacobian_fwd_kernel", "_jacobian_cof_kernel", "_jacobian_adj_kernel")


def _triton_modules():
    require_backend("triton", "cpu", torch.float32)
    from mrus_kernels.triton import _common
    from mrus_kernels.triton import jacobian as triton_jacobian

    return _common, triton_jacobian


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ndim", (2, 3))
def test_triton_idx64_variants_match_reference(ndim, dtype, monkeypatch, gen):
    """With _common.IDX64_THRESHOLD lowered, every kernel launches its 64-bit-offset variant
    (read at call time) and forward and backward still match the reference."""
    _common, triton_jacobian = _triton_modules()
    monkeypatch.setattr(_common, "IDX64_THRESHOLD", 100)
    calls = spy_launches(monkeypatch, triton_jacobian, *TRITON_KERNELS)
    shape = _shape("triton", ndim)
    u = _field(gen, shape, dtype)
    grad = randn(gen, shape[0], *shape[2:], dtype=dtype)
    sp = SPACINGS[ndim]
    ours, ref = u.clone().requires_grad_(), u.clone().requires_grad_()
    with poisoned_empty():
        det = jacobian_det(ours, spacing=sp, backend="triton")
        (gu,) = torch.autograd.grad(det, ours, grad)
    expected = reference.jacobian_det(ref, sp)
    (expected_grad,) = torch.autograd.grad(expected, ref, grad)
    assert_close_verbose(det, expected, dtype)
    assert_close_verbose(gu, expected_grad, dtype)
    assert sorted({name for name, _, _ in calls}) == sorted(TRITON_KERNELS)
    assert all(meta["IDX64"] is True for _, _, meta in calls), calls


def test_triton_batch_fits_grid_limits(monkeypatch, gen):
    """The batch does not sit on grid axis 1 or 2 (65535 programs): with that limit lowered
    to 1, a batch of 3 still launches within it and gives the reference's values."""
    _common, triton_jacobian = _triton_modules()
    monkeypatch.setattr(_common, "MAX_GRID_YZ", 1)
    calls = spy_launches(monkeypatch, triton_jacobian, *TRITON_KERNELS)
    u = _field(gen, (3, 2, 5, 6))
    grad = randn(gen, 3, 5, 6)
    ours, ref = u.clone().requires_grad_(), u.clone().requires_grad_()
    det = jacobian_det(ours, backend="triton")
    (gu,) = torch.autograd.grad(det, ours, grad)
    expected = reference.jacobian_det(ref)
    assert_close_verbose(det, expected, torch.float32)
    assert_close_verbose(gu, torch.autograd.grad(expected, ref, grad)[0], torch.float32)
    assert len(calls) == 3
    for name, grid, _ in calls:
        assert grid[0] <= _common.MAX_GRID_X and all(n <= 1 for n in grid[1:]), (name, grid)


def test_triton_grid_overflow_raises(monkeypatch):
    """More programs than grid axis 0 takes: a ValueError naming the operator and the axis
    (was an assert, gone under python -O)."""
    _common, _ = _triton_modules()
    monkeypatch.setattr(_common, "MAX_GRID_X", 2)
    u = torch.zeros(3, 2, 5, 6)
    with pytest.raises(ValueError, match=r"jacobian_det \(triton\): B \* voxel blocks needs 3 "
                                         r"programs on grid axis 0, at most 2 fit"):
        jacobian_det(u, backend="triton")


# =========================================================================== identities


def _affine_field(matrix: torch.Tensor, shift: torch.Tensor, spatial, spacing=None):
    """u(x) = (A - I) x_phys + t on the voxel grid, x_phys = spacing * index: [1, ndim, *S]."""
    ndim = len(spatial)
    h = spacing or (1.0,) * ndim
    axes = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64) * h[i] for i, n in enumerate(spatial)],
        indexing="ij",
    )
    x = torch.stack(axes)
    lin = matrix - torch.eye(ndim, dtype=torch.float64)
    return (torch.einsum("ij,j...->i...", lin, x) + shift.view(ndim, *[1] * ndim))[None]


@pytest.mark.parametrize("spacing", [False, True], ids=["voxels", "spacing"])
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_map_has_constant_determinant(backend, ndim, spacing, gen):
    """Finite differences of a linear field are exact, at the borders too: det = det(A)."""
    matrix = torch.eye(ndim, dtype=torch.float64) + 0.3 * torch.randn(
        ndim, ndim, generator=gen, dtype=torch.float64
    )
    shift = torch.randn(ndim, generator=gen, dtype=torch.float64)
    spatial = (5, 6, 7)[:ndim]
    sp = SPACINGS[ndim] if spacing else None
    dtype = torch.float32 if backend == "triton" else torch.float64
    u = _affine_field(matrix, shift, spatial, sp).to(dtype)
    det = jacobian_det(u, spacing=sp, backend=backend)
    expected = torch.full_like(det, torch.linalg.det(matrix).item())
    assert_close_verbose(det, expected, dtype, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reflection_folds_everywhere(backend):
    """u = -2 x along axis 0 (x -> -x): det = -1 at every voxel, folding fraction 1."""
    matrix = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    u = _affine_field(matrix, torch.zeros(3, dtype=torch.float64), (4, 5, 6)).float()
    assert torch.equal(jacobian_det(u, backend=backend), torch.full((1, 4, 5, 6), -1.0))
    assert torch.equal(folding_fraction(u, backend=backend), torch.ones(1))


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_field_has_unit_determinant(backend, ndim):
    u = torch.zeros(2, ndim, *(4, 5, 6)[:ndim])
    assert torch.equal(jacobian_det(u, backend=backend), torch.ones(2, *(4, 5, 6)[:ndim]))
    assert torch.equal(folding_fraction(u, backend=backend), torch.zeros(2))


def _planted_fold(ndim: int, spatial, centre, amplitude: float = 4.0, width: float = 1.5):
    """A Gaussian bump of u_0 along axis 0: d u_0 / d x_0 reaches about -amplitude / width
    · e^-1/2 < -1 on the bump's far side, so the map folds there and only there."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    r2 = sum((x - c) ** 2 for x, c in zip(axes, centre))
    u = torch.zeros(1, ndim, *spatial, dtype=torch.float64)
    u[0, 0] = amplitude * torch.exp(-r2 / (2 * width**2))
    return u


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_fold(backend, ndim, gen):
    """A planted fold in item 0, a smooth small field in item 1: fractions > 0 and == 0,
    and the folded voxels lie around the bump."""
    spatial = (12, 13, 11)[:ndim] if backend != "triton" else (9, 10, 8)[:ndim]
    centre = [n // 2 for n in spatial]
    dtype = torch.float32
    folded = _planted_fold(ndim, spatial, centre)
    smooth = 0.05 * torch.sin(
        torch.arange(math.prod(spatial), dtype=torch.float64).reshape(1, 1, *spatial) / 7
    ).expand(1, ndim, *spatial)
    u = torch.cat([folded, smooth]).to(dtype)
    frac = folding_fraction(u, backend=backend)
    det = jacobian_det(u, backend=backend)
    assert frac.dtype == torch.float32 and frac.shape == (2,)
    assert_folding_exact_outside_band(frac, det, u, max_band=0)
    count = int((det[0] <= 0).sum())
    assert count > 0 and frac[0].item() == pytest.approx(count / math.prod(spatial), rel=1e-6)
    assert frac[1].item() == 0.0 and bool((det[1] > 0.5).all())
    where = (det[0] <= 0).nonzero().double()
    dist = (where - torch.tensor(centre, dtype=torch.float64)).norm(dim=1)
    assert float(dist.max()) <= 4.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_smooth_small_field_does_not_fold(backend, gen):
    """A smooth random field with |∇u| < 1/ndim has det > 0 everywhere."""
    coarse = randn(gen, 2, 3, 3, 3, 3, dtype=torch.float64)
    u = torch.nn.functional.interpolate(coarse, size=(8, 9, 7), mode="trilinear",
                                        align_corners=True)
    u = 0.3 * u / u.abs().amax()  # differences at most 0.3 * 2 / 3 per voxel
    frac = folding_fraction(u.float(), backend=backend)
    assert torch.equal(frac, torch.zeros(2))
    assert bool((jacobian_det(u.float(), backend=backend) > 0).all())


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_folding_fraction_exact_outside_error_band(backend, dtype, ndim, gen):
    """The count of folded voxels against NumPy float64 on the same (rounded) input: exact
    for every voxel whose determinant lies farther from 0 than the arithmetic's error bound
    (float32, or float64 for float64 input; float16's flush to 0), in every dtype."""
    skip_without_float64(backend, dtype)
    u = _field(gen, _shape(backend, ndim), dtype, scale=0.8)
    sp = (1.0, 2.0, 0.5)[:ndim]
    frac = folding_fraction(u, spacing=sp, backend=backend)
    det = jacobian_det(u, spacing=sp, backend=backend)
    assert frac.dtype == torch.promote_types(dtype, torch.float32)
    exact = _numpy_det(u, sp)
    assert bool((exact <= 0).flatten(1).any(1).all()) and bool((exact > 0).any())  # some folds
    assert_folding_exact_outside_band(frac, det, u, sp, max_band=1)


def test_folding_fraction_is_not_differentiable(gen):
    u = _field(gen, (1, 2, 5, 6)).requires_grad_()
    assert not folding_fraction(u).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_stencil(backend, gen):
    """A NaN displacement makes det NaN only where the differences read it: the voxel itself
    (at a border) and its neighbours along each axis."""
    u = _field(gen, (1, 3, 5, 6, 7), scale=0.2)
    u[0, 1, 2, 3, 4] = float("nan")
    det = jacobian_det(u, backend=backend)
    expected = _expected_det(backend, u)
    assert torch.equal(det.isnan(), expected.isnan())
    assert int(det.isnan().sum()) == 6  # 2 neighbours along each axis (interior voxel)
    assert_close_verbose(det, expected, torch.float32)
    assert folding_fraction(u, backend=backend).isfinite().all()


# =========================================================================== spacing


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_spacing_forms(backend, gen):
    u = _field(gen, (1, 3, 4, 5, 6), torch.float64)
    scalar = jacobian_det(u, spacing=2.0, backend=backend)
    assert torch.equal(scalar, jacobian_det(u, spacing=(2.0, 2.0, 2.0), backend=backend))
    assert torch.equal(scalar, jacobian_det(u, spacing=[2, 2, 2], backend=backend))
    unit = jacobian_det(u, spacing=1, backend=backend)
    assert torch.equal(unit, jacobian_det(u, backend=backend))
    # u scaled with the spacing is the same map in physical units
    assert_close_verbose(jacobian_det(2.0 * u, spacing=2.0, backend=backend),
                         jacobian_det(u, backend=backend), torch.float64)


# =========================================================================== module, compile


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_module(backend, gen):
    u = _field(gen, (2, 3, 4, 5, 6)).requires_grad_()
    layer = JacobianDet(spacing=(1.0, 2.0, 0.5), backend=backend)
    assert list(layer.parameters()) == []
    assert "spacing=(1.0, 2.0, 0.5)" in repr(layer)
    det = layer(u)
    assert torch.equal(det, jacobian_det(u, spacing=(1.0, 2.0, 0.5), backend=backend))
    det.sum().backward()
    assert u.grad is not None
    assert JacobianDet(spacing=(1.0, 2.0))(u[:, :2, 0]).shape == (2, 5, 6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(gen):
    """jacobian_det (forward and backward) and folding_fraction under
    torch.compile(fullgraph=True), as in eager mode."""
    require_backend("cpu", "cpu", torch.float32)
    u = _field(gen, (2, 3, 5, 6, 7))

    def loss(u):
        det = jacobian_det(u, spacing=(1.0, 1.5, 0.5), backend="cpu")
        frac = folding_fraction(u, backend="cpu")
        return det, frac, (torch.relu(-det) ** 2).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True)
        results = []
        for fn in (loss, compiled):
            x = u.clone().requires_grad_()
            det, frac, total = fn(x)
            total.backward()
            results.append((det.detach(), frac, x.grad))
    finally:
        torch._dynamo.reset()
    assert float(results[0][1].max()) > 0  # the loss has folds to act on
    for name, eager, comp in zip(("det", "fraction", "d u"), *results):
        assert_close_verbose(comp, eager, torch.float32, name=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic(backend, gen):
    """jacobian_det and folding_fraction with a variable spacing under
    torch.compile(fullgraph=True, dynamic=True): two input sizes in a row, two spacings each
    (a number, then a tuple), values and gradient as in eager mode. The spacing check
    called math.isfinite, which dynamo cannot trace."""

    def fn(u, h):
        det = jacobian_det(u, spacing=h, backend=backend)
        frac = folding_fraction(u, spacing=h, backend=backend)
        return det, frac, (torch.relu(-det) ** 2).sum()

    torch._dynamo.reset()
    try:
        # Inductor for the kernel backends; aot_eager (the same dynamo and AOTAutograd
        # tracing, no C++ code generation) for the torch backend's many ops, to keep
        # the test short.
        compiler = "aot_eager" if backend == "torch" else "inductor"
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=compiler)
        for shape in ((2, 3, 5, 6, 7), (3, 3, 6, 4, 5)):
            u = _field(gen, shape)
            for h in (0.7, (1.3, 0.6, 2.0)):
                results = []
                for f in (fn, compiled):
                    x = u.clone().requires_grad_()
                    det, frac, total = f(x, h)
                    results.append((det.detach(), frac, *torch.autograd.grad(total, x)))
                assert float(results[0][1].max()) > 0  # folds for the loss to act on
                for name, eager, comp in zip(("det", "fraction", "d u"), *results):
                    assert_close_verbose(comp, eager, torch.float32, name=f"{shape} {h} {name}")
    finally:
        torch._dynamo.reset()


def test_fake_impls_give_shapes():
    """The fake implementations (used by torch.compile) give the kernels' shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u = torch.empty(2, 3, 4, 5, 6)
        det = torch.ops.mrus.jacobian_det(u, [1.0, 1.0, 1.0], "cpu")
        grad = torch.ops.mrus.jacobian_det_backward(det, u, [1.0, 1.0, 1.0], "cpu")
    assert det.shape == (2, 4, 5, 6) and grad.shape == (2, 3, 4, 5, 6)


# =========================================================================== dispatch, bad input


@pytest.mark.parametrize("backend", backend_params(("triton", "cuda")))
def test_gpu_backends_reject_float64(backend, gen):
    u = _field(gen, (1, 2, 4, 5), torch.float64)
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}'.*float64"):
        jacobian_det(u, backend=backend)


def test_explicit_unavailable_backend_raises():
    u = torch.zeros(1, 2, 4, 5)
    if backend_reason("cuda", "cpu") is None:  # pragma: no cover - never on CPU tensors
        pytest.fail("the cuda backend should not serve CPU tensors")
    with pytest.raises(BackendUnavailableError,
                       match=r"jacobian_det: backend 'cuda' cannot serve this call: \w"):
        jacobian_det(u, backend="cuda")
    with pytest.raises(BackendUnavailableError,
                       match=r"folding_fraction: backend 'cuda' cannot serve this call: \w"):
        folding_fraction(u, backend="cuda")


U2 = torch.zeros(1, 2, 4, 5)
U3 = torch.zeros(1, 3, 3, 4, 5)

BAD_INPUTS = {
    "not-tensor": (lambda: jacobian_det(np.zeros((1, 2, 4, 5))), TypeError,
                   r"jacobian_det: u must be a torch\.Tensor, got ndarray"),
    "int": (lambda: jacobian_det(U2.long()), TypeError,
            r"jacobian_det: u must be a floating-point tensor .*got torch\.int64"),
    "bool": (lambda: folding_fraction(U2.bool()), TypeError,
             r"folding_fraction: u must be a floating-point tensor .*got torch\.bool"),
    "rank-3": (lambda: jacobian_det(torch.zeros(2, 4, 5)), ValueError,
               (r"jacobian_det: u must be \[B, ndim, H, W\] \(2D\) or \[B, ndim, D, H, W\] "
                r"\(3D\), got shape \(2, 4, 5\)")),
    "rank-6": (lambda: folding_fraction(torch.zeros(1, 4, 2, 3, 4, 5)), ValueError,
               r"folding_fraction: u must be .*got shape \(1, 4, 2, 3, 4, 5\)"),
    "channels-3d": (lambda: jacobian_det(torch.zeros(1, 2, 3, 4, 5)), ValueError,
                    (r"jacobian_det: u must have 3 channels \(one per spatial axis\) for a 3D "
                     r"field, got 2 \(shape \(1, 2, 3, 4, 5\)\)")),
    "channels-2d": (lambda: folding_fraction(torch.zeros(1, 1, 4, 5)), ValueError,
                    r"folding_fraction: u must have 2 channels .*got 1"),
    "empty": (lambda: jacobian_det(torch.zeros(1, 2, 0, 5)), ValueError,
              r"jacobian_det: u must not be empty, got shape \(1, 2, 0, 5\)"),
    "spacing-len": (lambda: jacobian_det(U3, spacing=(1.0, 2.0)), ValueError,
                    (r"jacobian_det: spacing must be None, a number or 3 numbers \(one per "
                     r"spatial axis\) in \[1e-12, 1e\+12\], got \(1\.0, 2\.0\)")),
    "spacing-zero": (lambda: jacobian_det(U2, spacing=(1.0, 0.0)), ValueError,
                     r"jacobian_det: spacing must be .* 2 numbers .*got \(1\.0, 0\.0\)"),
    "spacing-negative": (lambda: folding_fraction(U2, spacing=-1.0), ValueError,
                         r"folding_fraction: spacing must be .*got -1\.0"),
    "spacing-nan": (lambda: jacobian_det(U2, spacing=(1.0, float("nan"))), ValueError,
                    r"jacobian_det: spacing must be .*got \(1\.0, nan\)"),
    "spacing-inf": (lambda: jacobian_det(U2, spacing=math.inf), ValueError,
                    r"jacobian_det: spacing must be .*got inf"),
    # 1/h must be a finite normal float32: 1e-200 gave a NaN determinant, 1e200 ignored u.
    "spacing-tiny": (lambda: jacobian_det(U2, spacing=1e-200), ValueError,
                     r"jacobian_det: spacing must be .* in \[1e-12, 1e\+12\], got 1e-200"),
    "spacing-huge": (lambda: folding_fraction(U2, spacing=(1.0, 1e200)), ValueError,
                     r"folding_fraction: spacing must be .*got \(1\.0, 1e\+200\)"),
    "spacing-small": (lambda: jacobian_det(U3, spacing=(1.0, 1.0, 9e-13)), ValueError,
                      r"jacobian_det: spacing must be .*got \(1\.0, 1\.0, 9e-13\)"),
    "spacing-str": (lambda: jacobian_det(U2, spacing="1"), TypeError,
                    r"jacobian_det: spacing must be None, a number .*got str"),
    "spacing-bool": (lambda: jacobian_det(U2, spacing=True), TypeError,
                     r"jacobian_det: spacing must be .*got bool"),
    "spacing-tensor": (lambda: jacobian_det(U2, spacing=torch.ones(2)), TypeError,
                       r"jacobian_det: spacing must be .*got Tensor"),
    "spacing-items": (lambda: jacobian_det(U2, spacing=(1.0, "2")), ValueError,
                      r"jacobian_det: spacing must be .*got \(1\.0, '2'\)"),
    "backend": (lambda: jacobian_det(U2, backend="gpu"), ValueError,
                r"jacobian_det: backend must be one of torch, cpu, triton, cuda, auto, got 'gpu'"),
    "module-spacing": (lambda: JacobianDet(spacing=(1.0, -2.0, 1.0)), ValueError,
                       r"JacobianDet: spacing must be .*got \(1\.0, -2\.0, 1\.0\)"),
    "module-spacing-len": (lambda: JacobianDet(spacing=(1.0,)), ValueError,
                           r"JacobianDet: spacing must be .*got \(1\.0,\)"),
    "module-spacing-mismatch": (lambda: JacobianDet(spacing=(1.0, 2.0))(U3), ValueError,
                                r"jacobian_det: spacing must be .*3 numbers"),
}


test_bad_input = bad_input_test(BAD_INPUTS)


def test_validation_runs_before_dispatch(monkeypatch):
    raises_before_dispatch(
        monkeypatch, lambda: jacobian_det(U2, spacing=0.0), "jacobian_det: spacing must be"
    )


def test_module_exports():
    for name in ("jacobian_det", "folding_fraction", "JacobianDet"):
        assert name in mrus_kernels.__all__ and hasattr(mrus_kernels, name)


# =========================================================================== GPU


@pytest.mark.cuda
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_gpu_matches_reference(gpu_backend, dtype, ndim, gen):
    u = _field(gen, SHAPES[ndim], dtype, device="cuda")
    grad = randn(gen, SHAPES[ndim][0], *SHAPES[ndim][2:], dtype=dtype, device="cuda")
    sp = SPACINGS[ndim]
    ref = u.clone().requires_grad_()
    expected = reference.jacobian_det(ref, sp)
    (expected_grad,) = torch.autograd.grad(expected, ref, grad)
    ours = u.clone().requires_grad_()
    with poisoned_empty():
        det = jacobian_det(ours, spacing=sp, backend=gpu_backend)
        (gu,) = torch.autograd.grad(det, ours, grad)
    assert det.device == u.device and det.dtype == dtype and gu.dtype == dtype
    assert_close_verbose(det, expected, dtype)
    assert_close_verbose(gu, expected_grad, dtype)
    frac = folding_fraction(u, spacing=sp, backend=gpu_backend)
    assert frac.device == u.device
    assert_folding_exact_outside_band(frac, det, u, sp, max_band=1)


@pytest.mark.cuda
def test_gpu_large_and_deterministic(gpu_backend, gen):
    u = _field(gen, (2, 3, 40, 48, 56), device="cuda", scale=0.4).requires_grad_()
    grad = randn(gen, 2, 40, 48, 56, device="cuda")
    runs = [torch.autograd.grad(jacobian_det(u, backend=gpu_backend), u, grad)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    ref = u.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.jacobian_det(ref), ref, grad.double())
    assert_close_verbose(runs[0], expected.float(), torch.float32)
    assert_close_verbose(jacobian_det(u, backend=gpu_backend),
                         reference.jacobian_det(u.detach().double()).float(), torch.float32)


@pytest.mark.cuda
def test_gpu_affine_and_fold(gpu_backend, gen):
    matrix = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 1.1]], dtype=torch.float64)
    u = _affine_field(matrix, torch.zeros(3, dtype=torch.float64), (6, 7, 8)).float().cuda()
    det = jacobian_det(u, backend=gpu_backend)
    assert_close_verbose(det.cpu(), torch.full((1, 6, 7, 8), torch.linalg.det(matrix).item()),
                         torch.float32)
    folded = _planted_fold(3, (12, 13, 11), (6, 6, 5)).float().cuda()
    assert float(folding_fraction(folded, backend=gpu_backend)) > 0
