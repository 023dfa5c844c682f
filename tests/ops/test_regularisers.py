"""grad_l2 / harmonic_energy: identities, every backend against the float64 reference,
gradients, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_verbose, backend_params, poisoned_empty, randn
from mrus_kernels import grad_l2, harmonic_energy, reference

BACKENDS = backend_params(("torch", "cpu", "triton"))
# Odd sizes and the smallest sizes each op takes (3 for harmonic_energy: one interior voxel;
# 2 for grad_l2: one difference), where a row's first and last voxel are all it has.
SHAPES = [(2, 3, 7, 9, 11), (3, 2, 9, 10), (1, 3, 3, 3, 3), (1, 3, 4, 3, 5), (2, 2, 5, 3)]
GRAD_L2_SHAPES = [*SHAPES, (1, 3, 2, 3, 6), (2, 2, 5, 2), (1, 3, 4, 5, 2)]
F32_TOL = 1e-5


def _run(fn, u, dtype, g=None):
    x = u.to(dtype).requires_grad_()
    with poisoned_empty():
        out = fn(x)
        (gx,) = torch.autograd.grad(out, x, g.to(dtype) if g is not None else None)
    return out, gx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GRAD_L2_SHAPES, ids=str)
def test_grad_l2_matches_reference(backend, shape, gen):
    u = randn(gen, *shape, dtype=torch.float64)
    ndim = len(shape) - 2
    for spacing in (None, tuple(0.5 + i for i in range(ndim))):
        exp, ge = _run(lambda x: reference.grad_l2(x, spacing or (1.0,) * ndim), u, torch.float64)
        for dtype in (torch.float32, torch.float64):
            if backend == "triton" and dtype == torch.float64:
                continue
            out, g = _run(lambda x: grad_l2(x, spacing=spacing, backend=backend), u, dtype)
            tol = F32_TOL if dtype == torch.float32 else 1e-10
            assert_close_verbose(out, exp, atol=tol, rtol=tol, name="grad_l2")
            assert_close_verbose(g, ge, atol=tol, rtol=tol, name="d grad_l2")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_harmonic_matches_reference(backend, shape, reduction, gen):
    u = randn(gen, *shape, dtype=torch.float64)
    g = randn(gen, shape[0], dtype=torch.float64) if reduction == "none" else None
    exp, ge = _run(lambda x: reference.harmonic_energy(x, reduction), u, torch.float64, g)
    for dtype in (torch.float32, torch.float64):
        if backend == "triton" and dtype == torch.float64:
            continue
        out, gu = _run(
            lambda x: harmonic_energy(x, reduction=reduction, backend=backend), u, dtype, g
        )
        tol = F32_TOL if dtype == torch.float32 else 1e-10
        assert_close_verbose(out, exp, atol=tol, rtol=tol, name="harmonic")
        assert_close_verbose(gu, ge, atol=tol, rtol=tol, name="d harmonic")


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_gradcheck_float64(backend, gen):
    u = randn(gen, 2, 3, 3, 4, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: grad_l2(x, spacing=(1.0, 2.0, 0.5), backend=backend), (u,)
    )
    for red in ("sum", "mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: harmonic_energy(x, reduction=red, backend=backend), (u,)
        )
    v = randn(gen, 1, 2, 5, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: grad_l2(x, backend=backend), (v,))
    assert torch.autograd.gradcheck(lambda x: harmonic_energy(x, backend=backend), (v,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identities(backend):
    d, h, w = 5, 6, 7
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    const = torch.full((1, 3, d, h, w), 2.5)
    assert grad_l2(const, backend=backend).item() == 0.0
    assert harmonic_energy(const, backend=backend).item() == 0.0
    # A ramp of slope a along W: mean squared difference a² on W, 0 elsewhere.
    ramp = (0.75 * x.float())[None, None]
    assert math.isclose(grad_l2(ramp, backend=backend).item(), 0.75**2 / 3, rel_tol=1e-6)
    assert math.isclose(grad_l2(ramp, spacing=(1.0, 1.0, 0.5), backend=backend).item(),
                        (0.75 / 0.5) ** 2 / 3, rel_tol=1e-6)
    # Linear fields are harmonic; x² has Laplacian 2 everywhere.
    lin = torch.stack([x + 2 * y - z, y - z, 3 * x]).float()[None]
    assert abs(harmonic_energy(lin, backend=backend).item()) <= 1e-8
    quad = (x.float() ** 2)[None, None]
    interior = (d - 2) * (h - 2) * (w - 2)
    assert math.isclose(harmonic_energy(quad, backend=backend).item(), 4.0 * interior, rel_tol=1e-6)
    assert math.isclose(harmonic_energy(quad, reduction="mean", backend=backend).item(), 4.0,
                        rel_tol=1e-6)


def test_noncontiguous_half_and_compile(gen):
    u = randn(gen, 2, 3, 11, 9, 7).transpose(2, 4)
    assert_close_verbose(grad_l2(u, backend="cpu"), reference.grad_l2(u.double()), atol=F32_TOL,
                         rtol=F32_TOL)
    for dtype in (torch.float16, torch.bfloat16):
        out = harmonic_energy(u.to(dtype), reduction="mean", backend="cpu")
        assert out.dtype == dtype
        assert_close_verbose(
            out, reference.harmonic_energy(u.to(dtype).double(), "mean"), dtype=dtype
        )
    v = u.contiguous().requires_grad_()

    def fn(x):
        return grad_l2(x, backend="cpu") + harmonic_energy(x, reduction="mean", backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(v)
    (g,) = torch.autograd.grad(out, v)
    (ge,) = torch.autograd.grad(fn(v), v)
    assert_close_verbose(out, fn(v).detach())
    assert_close_verbose(g, ge)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_backends(gpu_backend, shape, gen):
    u = randn(gen, *shape, dtype=torch.float64)
    for red in ("sum", "none"):
        g = randn(gen, shape[0], dtype=torch.float64) if red == "none" else None
        exp, ge = _run(lambda x: reference.harmonic_energy(x, red), u, torch.float64, g)
        out, gu = _run(lambda x: harmonic_energy(x, reduction=red, backend=gpu_backend),
                       u.cuda(), torch.float32, g.cuda() if g is not None else None)
        assert_close_verbose(out, exp, atol=F32_TOL, rtol=F32_TOL)
        assert_close_verbose(gu, ge, atol=F32_TOL, rtol=F32_TOL)
    exp, ge = _run(lambda x: reference.grad_l2(x), u, torch.float64)
    out, gu = _run(lambda x: grad_l2(x, backend=gpu_backend), u.cuda(), torch.float32)
    assert_close_verbose(out, exp, atol=F32_TOL, rtol=F32_TOL)
    assert_close_verbose(gu, ge, atol=F32_TOL, rtol=F32_TOL)


U = torch.rand(1, 3, 4, 5, 6)


@pytest.mark.parametrize(
    "fn,exc,match",
    [
        (lambda: grad_l2(U, spacing=(1.0, 2.0)), ValueError,
         "spacing must be None, a number or 3"),
        (lambda: grad_l2(U, spacing=(1.0, -2.0, 1.0)), ValueError,
         "spacing must be finite and > 0"),
        (lambda: grad_l2(torch.rand(1, 3, 4, 1, 6)), ValueError,
         "every spatial size of u must be >= 2"),
        (lambda: grad_l2(U.numpy()), TypeError, "u must be a torch.Tensor"),
        (lambda: grad_l2(U.long()), TypeError, "u must be a floating-point tensor"),
        (lambda: grad_l2(torch.rand(3, 4, 5)), ValueError, r"u must be \[B, C, H, W\]"),
        (lambda: harmonic_energy(U, reduction="max"), ValueError,
         "reduction must be 'sum' or 'mean' or 'none'"),
        (lambda: harmonic_energy(torch.rand(1, 3, 4, 2, 6)), ValueError,
         "every spatial size of u must be >= 3"),
        (lambda: harmonic_energy(U, backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
