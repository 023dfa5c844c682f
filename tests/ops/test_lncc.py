"""lncc / LNCCLoss: identities, every backend against the float64 reference, gradients,
determinism, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_verbose, backend_params, poisoned_empty, rand
from mrus_kernels import LNCCLoss, lncc, reference
from mrus_kernels.backends import call_reason

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


def _check_backend(backend, shape, window, gen, mask=None, dtype=torch.float32):
    f = rand(gen, *shape, dtype=dtype).requires_grad_()
    m = rand(gen, *shape, dtype=dtype).requires_grad_()
    fd = f.detach().double().requires_grad_()
    md = m.detach().double().requires_grad_()
    with poisoned_empty():
        out = lncc(f, m, window=window, mask=mask, backend=backend)
    exp = _ref(fd, md, window, mask)
    tol = 1e-10 if dtype == torch.float64 else F32_RTOL
    assert_close_verbose(out, exp, atol=tol, rtol=tol, name="lncc")
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
    assert_close_verbose(out, _ref(f, m, 3, mask.float()), atol=F32_RTOL, rtol=F32_RTOL)


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
