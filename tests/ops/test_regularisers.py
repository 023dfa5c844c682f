"""grad_l2 / harmonic_energy / bending_energy / diffusion: identities, every kernel backend
against the float64 reference, the reference (backend "torch") against independent NumPy
float64 sums and gradients, bending_energy / diffusion against MONAI's BendingEnergyLoss /
DiffusionLoss, gradcheck, the Triton launchers' 64-bit variants and grid limits,
torch.compile and bad input."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    assert_close_verbose,
    backend_params,
    poisoned_empty,
    randn,
    require_backend,
    spy_launches,
)
from mrus_kernels import bending_energy, grad_l2, harmonic_energy, reference
from mrus_kernels.regularisers import diffusion

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


def _numpy_grad_l2(u: torch.Tensor, spacing=None) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_l2 and its gradient in NumPy float64, written from the definition
    (1/ndim) Σ_i mean(d_i²), d_i = np.diff(u, axis i) / h_i: ∂/∂u(k) = 2 (d(k-1) - d(k)) /
    (h_i · ndim · count_i), the terms beyond either end 0."""
    a = u.detach().double().numpy()
    ndim = a.ndim - 2
    h = spacing or (1.0,) * ndim
    energy, grad = 0.0, np.zeros_like(a)
    for i in range(ndim):
        axis = 2 + i
        d = np.diff(a, axis=axis) / h[i]
        energy += (d * d).mean() / ndim
        before, after = [(0, 0)] * a.ndim, [(0, 0)] * a.ndim
        before[axis], after[axis] = (1, 0), (0, 1)
        grad += 2.0 / (h[i] * d.size * ndim) * (np.pad(d, before) - np.pad(d, after))
    return torch.tensor(energy, dtype=torch.float64), torch.from_numpy(grad)


def _numpy_reduce(per_item: np.ndarray, grad: np.ndarray, reduction: str, weight=None):
    """(energy, gradient) of per-item sums over interior voxels [B] and their gradient:
    "none" weighs item b's gradient by weight[b], "mean" divides by B · C · Π(S_i − 2)."""
    if reduction == "none":
        w = weight.double().numpy() if weight is not None else np.ones(grad.shape[0])
        shaped = w.reshape(-1, *[1] * (grad.ndim - 1))
        return torch.from_numpy(per_item), torch.from_numpy(grad * shaped)
    count = grad.shape[0] * grad.shape[1] * math.prod(n - 2 for n in grad.shape[2:])
    scale = 1.0 if reduction == "sum" else 1.0 / count
    return torch.tensor(per_item.sum() * scale), torch.from_numpy(grad * scale)


def _numpy_harmonic(u: torch.Tensor, reduction: str, weight: torch.Tensor | None = None):
    """harmonic_energy and the gradient of Σ weight · energy in NumPy float64, by an explicit
    loop over interior voxels: the Laplacian there, its square summed per item, and the
    gradient scattered to the stencil's voxels (the kernels gather instead)."""
    a = u.detach().double().numpy()
    ndim = a.ndim - 2
    per_item, grad = np.zeros(a.shape[0]), np.zeros_like(a)
    for inner in np.ndindex(*[n - 2 for n in a.shape[2:]]):
        x = tuple(k + 1 for k in inner)
        neighbours = []
        for i in range(ndim):
            for step in (-1, 1):
                y = list(x)
                y[i] += step
                neighbours.append(tuple(y))
        lap = -2 * ndim * a[(..., *x)] + sum(a[(..., *y)] for y in neighbours)  # [B, C]
        per_item += (lap * lap).sum(1)
        grad[(..., *x)] += -2 * ndim * 2 * lap
        for y in neighbours:
            grad[(..., *y)] += 2 * lap
    return _numpy_reduce(per_item, grad, reduction, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GRAD_L2_SHAPES, ids=str)
def test_grad_l2_matches_reference(backend, shape, gen):
    """Kernel backends against the reference's autograd; the torch row (the reference)
    against NumPy."""
    u = randn(gen, *shape, dtype=torch.float64)
    ndim = len(shape) - 2
    for spacing in (None, tuple(0.5 + i for i in range(ndim))):
        if backend == "torch":
            exp, ge = _numpy_grad_l2(u, spacing)
        else:
            exp, ge = _run(lambda x: reference.grad_l2(x, spacing or (1.0,) * ndim), u,
                           torch.float64)
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
    """Kernel backends against the reference's autograd; the torch row (the reference)
    against NumPy."""
    u = randn(gen, *shape, dtype=torch.float64)
    g = randn(gen, shape[0], dtype=torch.float64) if reduction == "none" else None
    if backend == "torch":
        exp, ge = _numpy_harmonic(u, reduction, g)
    else:
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
        return (grad_l2(x, backend="cpu") + harmonic_energy(x, reduction="mean", backend="cpu")
                + bending_energy(x, backend="cpu")
                + diffusion(x, reduction="sum", backend="cpu"))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(v)
    (g,) = torch.autograd.grad(out, v)
    (ge,) = torch.autograd.grad(fn(v), v)
    assert_close_verbose(out, fn(v).detach())
    assert_close_verbose(g, ge)


# Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic(backend, gen):
    """grad_l2, bending_energy and diffusion with a variable spacing and harmonic_energy under
    torch.compile(fullgraph=True, dynamic=True), as training with varying crop sizes compiles
    them: two input sizes in a row, two spacings each (a number, then a tuple), value and
    gradient as in eager mode. The spacing check called math.isfinite, which dynamo cannot
    trace. (The torch backend's bending_energy / diffusion are plain PyTorch through the
    same spacing check: left out, to keep the test short.)"""

    def fn(u, h):
        out = (grad_l2(u, spacing=h, backend=backend)
               + harmonic_energy(u, reduction="mean", backend=backend))
        if backend != "torch":
            out = (out + bending_energy(u, spacing=h, backend=backend)
                   + diffusion(u, spacing=h, reduction="sum", backend=backend))
        return out

    torch._dynamo.reset()
    try:
        # Inductor for the kernel backends; aot_eager (the same dynamo and AOTAutograd
        # tracing, no C++ code generation) for the torch backend's many ops, to keep
        # the test short.
        compiler = "aot_eager" if backend == "torch" else "inductor"
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=compiler)
        for shape in ((2, 3, 5, 6, 7), (3, 3, 6, 4, 5)):
            u = randn(gen, *shape)
            for h in (0.7, (1.9, 0.5, 1.2)):
                results = []
                for f in (fn, compiled):
                    x = u.clone().requires_grad_()
                    out = f(x, h)
                    results.append((out.detach(), *torch.autograd.grad(out, x)))
                for name, eager, comp in zip(("value", "d u"), *results):
                    assert_close_verbose(comp, eager, torch.float32, name=f"{shape} {h} {name}")
    finally:
        torch._dynamo.reset()


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


TRITON_KERNELS = (
    "_reg_fwd_kernel", "_grad_l2_bwd_kernel", "_laplacian_kernel", "_harmonic_bwd_kernel",
    "_stencil_bwd_kernel",
)
OPS = {
    "grad_l2": (lambda x, b: grad_l2(x, spacing=0.7, backend=b),
                lambda x: reference.grad_l2(x, (0.7,) * (x.dim() - 2))),
    "harmonic": (lambda x, b: harmonic_energy(x, reduction="none", backend=b),
                 lambda x: reference.harmonic_energy(x, "none")),
    "bending": (lambda x, b: bending_energy(x, spacing=0.8, reduction="none", backend=b),
                lambda x: reference.bending_energy(x, (0.8,) * (x.dim() - 2), "none")),
    "diffusion": (lambda x, b: diffusion(x, spacing=0.8, reduction="none", backend=b),
                  lambda x: reference.diffusion(x, (0.8,) * (x.dim() - 2), "none")),
}
TRITON_LAUNCHES = {
    "grad_l2": {"_reg_fwd_kernel", "_grad_l2_bwd_kernel"},
    "harmonic": {"_reg_fwd_kernel", "_laplacian_kernel", "_harmonic_bwd_kernel"},
    "bending": {"_reg_fwd_kernel", "_stencil_bwd_kernel"},
    "diffusion": {"_reg_fwd_kernel", "_stencil_bwd_kernel"},
}


def _triton_modules():
    require_backend("triton", "cpu", torch.float32)
    from mrus_kernels.triton import _common
    from mrus_kernels.triton import regularisers as triton_reg

    return _common, triton_reg


def _check_op(op, shape, gen, name):
    ours, ref = OPS[op]
    u = randn(gen, *shape, dtype=torch.float64)
    g = randn(gen, shape[0], dtype=torch.float64) if op != "grad_l2" else None
    exp, ge = _run(ref, u, torch.float64, g)
    out, gu = _run(lambda x: ours(x, "triton"), u, torch.float32, g)
    assert_close_verbose(out, exp, atol=F32_TOL, rtol=F32_TOL, name=f"{name} {op}")
    assert_close_verbose(gu, ge, atol=F32_TOL, rtol=F32_TOL, name=f"{name} d {op}")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (3, 2, 9, 10)], ids=str)
def test_triton_idx64_variants_match_reference(op, shape, monkeypatch, gen):
    """With _common.IDX64_THRESHOLD lowered, the forward and every backward kernel launch
    their 64-bit-offset variant (read at call time) and still match the reference."""
    _common, triton_reg = _triton_modules()
    monkeypatch.setattr(_common, "IDX64_THRESHOLD", 100)
    calls = spy_launches(monkeypatch, triton_reg, *TRITON_KERNELS)
    _check_op(op, shape, gen, "IDX64")
    launched = {name for name, _, _ in calls}
    assert launched == TRITON_LAUNCHES[op]
    assert all(meta["IDX64"] is True for _, _, meta in calls), calls


@pytest.mark.parametrize("op", list(OPS))
def test_triton_batch_fits_grid_limits(op, monkeypatch, gen):
    """The batch does not sit on grid axis 1 or 2 (65535 programs): with that limit lowered
    to 1, a batch of 3 launches within it and gives the reference's values."""
    _common, triton_reg = _triton_modules()
    monkeypatch.setattr(_common, "MAX_GRID_YZ", 1)
    calls = spy_launches(monkeypatch, triton_reg, *TRITON_KERNELS)
    _check_op(op, (3, 2, 5, 6), gen, "batch 3")
    assert calls
    for name, grid, _ in calls:
        assert grid[0] <= _common.MAX_GRID_X and all(n <= 1 for n in grid[1:]), (name, grid)


@pytest.mark.parametrize("op,label", [("grad_l2", "grad_l2"), ("harmonic", "harmonic_energy"),
                                      ("bending", "bending_energy"), ("diffusion", "diffusion")])
def test_triton_grid_overflow_raises(op, label, monkeypatch):
    """More programs than grid axis 0 takes: a ValueError naming the operator and the axis."""
    _common, _ = _triton_modules()
    monkeypatch.setattr(_common, "MAX_GRID_X", 2)
    with pytest.raises(ValueError, match=rf"{label} \(triton\): B \* voxel blocks needs 3 "
                                         r"programs on grid axis 0, at most 2 fit"):
        OPS[op][0](torch.rand(3, 2, 5, 6), "triton")


U = torch.rand(1, 3, 4, 5, 6)


@pytest.mark.parametrize(
    "fn,exc,match",
    [
        (lambda: grad_l2(U, spacing=(1.0, 2.0)), ValueError,
         "spacing must be None, a number or 3"),
        (lambda: grad_l2(U, spacing=(1.0, -2.0, 1.0)), ValueError,
         r"grad_l2: spacing must be in \[1e-12, 1e\+12\] per axis .*got \(1\.0, -2\.0, 1\.0\)"),
        # The weights 1/h² must be finite normal float32 numbers: 1e-200 raised
        # ZeroDivisionError, 1e200 OverflowError (the torch backend returned inf / 0).
        (lambda: grad_l2(U, spacing=1e-200), ValueError,
         r"grad_l2: spacing must be in \[1e-12, 1e\+12\] .*got \(1e-200, 1e-200, 1e-200\)"),
        (lambda: grad_l2(U, spacing=(1.0, 1e200, 1.0), backend="torch"), ValueError,
         r"grad_l2: spacing must be in .*got \(1\.0, 1e\+200, 1\.0\)"),
        (lambda: grad_l2(U, spacing=(1.0, 2e12, 1.0), backend="cpu"), ValueError,
         r"grad_l2: spacing must be in .*got \(1\.0, 2000000000000\.0, 1\.0\)"),
        (lambda: grad_l2(U, spacing=(float("nan"), 1.0, 1.0)), ValueError,
         r"grad_l2: spacing must be in .*got \(nan, 1\.0, 1\.0\)"),
        (lambda: grad_l2(U, spacing=math.inf), ValueError,
         r"grad_l2: spacing must be in .*got \(inf, inf, inf\)"),
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


# --------------------------------------------------------------------------------------
# bending_energy and diffusion (MONAI's BendingEnergyLoss / DiffusionLoss)
# --------------------------------------------------------------------------------------

STENCIL_OPS = {"bending": bending_energy, "diffusion": diffusion}
STENCIL_REFS = {"bending": reference.bending_energy, "diffusion": reference.diffusion}
# Odd shapes, 2D and 3D, down to one interior voxel (size 3) along an axis.
STENCIL_SHAPES = [(1, 3, 3, 4, 5), (2, 3, 5, 3, 7), (2, 2, 5, 7), (1, 2, 3, 3), (2, 1, 4, 6, 5)]


def _numpy_stencil(u: torch.Tensor, op: str, spacing=None, reduction="mean", weight=None):
    """bending_energy / diffusion and the gradient of Σ weight · energy in NumPy float64, by
    an explicit loop over interior voxels: each derivative written as its taps (offset,
    coefficient with the spacing) from the definition, its square summed per item with the
    term's factor, the gradient scattered to the taps (the kernels gather instead)."""
    a = u.detach().double().numpy()
    ndim = a.ndim - 2
    h = spacing or (1.0,) * ndim

    def step(*pairs):
        o = [0] * ndim
        for axis, s in pairs:
            o[axis] += s
        return tuple(o)

    terms = []  # (taps [(offset, coefficient)], factor)
    for i in range(ndim):
        if op == "bending":
            c = 1.0 / h[i] ** 2
            terms.append(([(step((i, 1)), c), (step(), -2 * c), (step((i, -1)), c)], 1.0))
        else:
            c = 1.0 / (2 * h[i])
            terms.append(([(step((i, 1)), c), (step((i, -1)), -c)], 1.0))
    if op == "bending":
        for i in range(ndim):
            for j in range(i + 1, ndim):
                c = 1.0 / (4 * h[i] * h[j])
                taps = [(step((i, p), (j, q)), p * q * c) for p in (1, -1) for q in (1, -1)]
                terms.append((taps, 2.0))
    per_item, grad = np.zeros(a.shape[0]), np.zeros_like(a)
    for inner in np.ndindex(*[n - 2 for n in a.shape[2:]]):
        x = [k + 1 for k in inner]
        for taps, factor in terms:
            at = [tuple(xi + oi for xi, oi in zip(x, o)) for o, _ in taps]
            v = sum(c * a[(..., *y)] for y, (_, c) in zip(at, taps))  # [B, C]
            per_item += factor * (v * v).sum(1)
            for y, (_, c) in zip(at, taps):
                grad[(..., *y)] += 2 * factor * c * v
    return _numpy_reduce(per_item, grad, reduction, weight)


def _spacings(ndim):
    return (None, tuple(0.6 + 0.45 * i for i in range(ndim)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(STENCIL_OPS))
@pytest.mark.parametrize("shape", STENCIL_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_stencil_matches_reference(backend, op, shape, reduction, gen):
    """Kernel backends against the reference's autograd (float64: cpu 1e-10; float32
    relative 1e-5); the torch row (the reference) against the NumPy loop. Values and
    gradients, with and without spacing, outputs poisoned."""
    u = randn(gen, *shape, dtype=torch.float64)
    g = randn(gen, shape[0], dtype=torch.float64) if reduction == "none" else None
    for spacing in _spacings(len(shape) - 2):
        if backend == "torch":
            exp, ge = _numpy_stencil(u, op, spacing, reduction, g)
        else:
            exp, ge = _run(lambda x: STENCIL_REFS[op](x, spacing, reduction), u, torch.float64, g)
        for dtype in (torch.float32, torch.float64):
            if backend == "triton" and dtype == torch.float64:
                continue
            out, gu = _run(lambda x: STENCIL_OPS[op](
                x, spacing=spacing, reduction=reduction, backend=backend), u, dtype, g)
            assert out.dtype == dtype
            tol = F32_TOL if dtype == torch.float32 else 1e-10
            assert_close_verbose(out, exp, atol=tol, rtol=tol, name=f"{op} {spacing}")
            assert_close_verbose(gu, ge, atol=tol, rtol=tol, name=f"d {op} {spacing}")


def _monai_loss(op: str, u: torch.Tensor, normalize: bool, reduction: str) -> torch.Tensor:
    losses = pytest.importorskip(
        "monai.losses", reason="compares with MONAI: pip install -e .[compat]"
    )
    cls = losses.BendingEnergyLoss if op == "bending" else losses.DiffusionLoss
    with warnings.catch_warnings():
        # MONAI 1.6.1 indexes with lists of slices, which torch deprecates with a warning.
        warnings.simplefilter("ignore")
        out = cls(normalize=normalize, reduction=reduction)(u)
    # "none" is MONAI's map [B, C, *(S - 2)]; ours gives the per-item sums of it.
    return out.flatten(1).sum(1) if reduction == "none" else out


MONAI_SHAPES = [(2, 3, 3, 4, 5), (1, 3, 5, 3, 7), (2, 2, 5, 7), (1, 2, 3, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(STENCIL_OPS))
@pytest.mark.parametrize("shape", MONAI_SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_stencil_matches_monai(backend, op, shape, normalize, gen):
    """Values and gradients against MONAI 1.6.1's classes on random fields (C = ndim, as
    MONAI requires), every reduction; normalize=True reproduced as u_c / S_c with spacing
    h_i = 1 / S_i. MONAI computes its normalize factors in float32 (an int tensor divided),
    hence the 1e-6 tolerance there."""
    u = randn(gen, *shape, dtype=torch.float64)
    size = shape[2:]
    if normalize:
        sizes = torch.tensor(size, dtype=torch.float64).reshape(1, -1, *[1] * len(size))
        spacing = tuple(1.0 / n for n in size)
    else:
        sizes, spacing = None, None
    dtype = torch.float32 if backend == "triton" else torch.float64
    for reduction in ("mean", "sum", "none"):
        g = randn(gen, shape[0], dtype=torch.float64) if reduction == "none" else None
        exp, ge = _run(lambda x: _monai_loss(op, x, normalize, reduction), u, torch.float64, g)

        def ours(x):
            x = x / sizes.to(x.dtype) if normalize else x
            return STENCIL_OPS[op](x, spacing=spacing, reduction=reduction, backend=backend)

        out, gu = _run(ours, u, dtype, g)
        tol = F32_TOL if dtype == torch.float32 else (1e-6 if normalize else 1e-10)
        assert_close_verbose(out, exp, atol=tol, rtol=tol, name=f"{op} {reduction}")
        assert_close_verbose(gu, ge, atol=tol, rtol=tol, name=f"d {op} {reduction}")


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("op", list(STENCIL_OPS))
def test_stencil_gradcheck_float64(backend, op, gen):
    u = randn(gen, 2, 3, 3, 4, 5, dtype=torch.float64).requires_grad_()
    v = randn(gen, 1, 2, 5, 3, dtype=torch.float64).requires_grad_()
    fn = STENCIL_OPS[op]
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x: fn(x, spacing=(1.3, 0.7, 1.1), reduction=red, backend=backend), (u,)
        )
    assert torch.autograd.gradcheck(lambda x: fn(x, backend=backend), (v,))


@pytest.mark.parametrize("op", list(STENCIL_OPS))
def test_stencil_double_backward_cpu(op, gen):
    """Second derivatives of the fused gradient (its derivative goes through the
    reference, mrus_kernels/_double.py): gradgradcheck in float64, and against the torch
    backend's autograd, spacing included."""
    require_backend("cpu", "cpu", torch.float64)
    fn = STENCIL_OPS[op]
    u = randn(gen, 2, 3, 3, 4, 5, dtype=torch.float64).requires_grad_()
    spacing = (1.3, 0.7, 1.1)
    assert torch.autograd.gradgradcheck(
        lambda x: fn(x, spacing=spacing, reduction="none", backend="cpu"), (u,)
    )
    c = randn(gen, *u.shape, dtype=torch.float64)
    second = []
    for backend in ("cpu", "torch"):
        (gu,) = torch.autograd.grad(fn(u, spacing=spacing, backend=backend), u,
                                    create_graph=True)
        second.append(torch.autograd.grad((gu * c).sum(), u)[0])
    assert_close_verbose(second[0], second[1], torch.float64, name=f"d² {op}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stencil_identities(backend):
    """Closed forms: constants and linear fields have zero bending; x² along an axis has
    second difference 2 (bending 4 per interior voxel); x·y has mixed derivative 1
    (bending 2 · 1); a ramp a·x has central derivative a (diffusion a²), h scaling by 1/h."""
    d, h, w = 5, 6, 7
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    x, y, z = x.float(), y.float(), z.float()
    n_in = (d - 2) * (h - 2) * (w - 2)
    const = torch.full((1, 3, d, h, w), 2.5)
    lin = torch.stack([x + 2 * y - z, y - z, 3 * x])[None]
    for op in STENCIL_OPS.values():
        assert op(const, backend=backend).item() == 0.0
    assert abs(bending_energy(lin, reduction="sum", backend=backend).item()) <= 1e-6
    quad = (x**2)[None, None]
    assert math.isclose(bending_energy(quad, reduction="sum", backend=backend).item(),
                        4.0 * n_in, rel_tol=1e-6)
    assert math.isclose(bending_energy(quad, spacing=(1.0, 1.0, 2.0), backend=backend).item(),
                        4.0 / 2.0**4, rel_tol=1e-6)
    mixed = (x * y)[None, None]
    assert math.isclose(bending_energy(mixed, backend=backend).item(), 2.0, rel_tol=1e-6)
    assert math.isclose(bending_energy(mixed, spacing=(1.0, 0.5, 2.0), backend=backend).item(),
                        2.0, rel_tol=1e-6)  # 1 / (h_H h_W) = 1
    ramp = (0.75 * z)[None, None]
    assert math.isclose(diffusion(ramp, backend=backend).item(), 0.75**2, rel_tol=1e-6)
    assert math.isclose(diffusion(ramp, spacing=(0.5, 1.0, 1.0), reduction="sum",
                                  backend=backend).item(), (0.75 / 0.5) ** 2 * n_in, rel_tol=1e-6)


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stencil_half(backend, dtype, gen):
    """float16 / bfloat16 in, accumulated in float32, the input's dtype out; value and
    gradient against the float64 reference of the same (rounded) input."""
    u = randn(gen, 2, 3, 4, 5, 6).to(dtype)
    for op, fn in STENCIL_OPS.items():
        exp, ge = _run(lambda x: STENCIL_REFS[op](x, (1.0, 0.8, 1.2), "mean"), u.double(),
                       torch.float64)
        out, gu = _run(lambda x: fn(x, spacing=(1.0, 0.8, 1.2), backend=backend), u, dtype)
        assert out.dtype == dtype and gu.dtype == dtype
        assert_close_verbose(out, exp, dtype, name=op)
        assert_close_verbose(gu, ge, dtype, name=f"d {op}")


def test_stencil_cpu_threads(gen):
    """The CPU backward keeps the term planes of d − 1, d, d + 1 per thread across its run
    of planes: with 3 threads on 4 volumes of 9 planes, runs start mid-volume (plane 12 =
    volume 1, depth 3); values and gradients still match the reference in float64."""
    require_backend("cpu", "cpu", torch.float64)
    u = randn(gen, 2, 2, 9, 50, 60, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for op, fn in STENCIL_OPS.items():
            g = randn(gen, 2, dtype=torch.float64)
            exp, ge = _run(lambda x: STENCIL_REFS[op](x, (0.9, 1.1, 1.3), "none"), u,
                           torch.float64, g)
            out, gu = _run(lambda x: fn(x, spacing=(0.9, 1.1, 1.3), reduction="none",
                                        backend="cpu"), u, torch.float64, g)
            assert_close_verbose(out, exp, name=op)
            assert_close_verbose(gu, ge, name=f"d {op}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stencil_noncontiguous(backend, gen):
    """A transposed (non-contiguous) field gives the reference's values and gradients
    (torch.compile of both ops: test_noncontiguous_half_and_compile)."""
    u = randn(gen, 2, 3, 7, 5, 6).transpose(2, 4)
    for op, fn in STENCIL_OPS.items():
        exp, ge = _run(lambda x: STENCIL_REFS[op](x, None, "sum"), u.double(), torch.float64)
        out, gu = _run(lambda x: fn(x, reduction="sum", backend=backend), u, torch.float32)
        assert_close_verbose(out, exp, atol=F32_TOL, rtol=F32_TOL, name=op)
        assert_close_verbose(gu, ge, atol=F32_TOL, rtol=F32_TOL, name=f"d {op}")


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(STENCIL_OPS))
@pytest.mark.parametrize("shape", STENCIL_SHAPES, ids=str)
def test_stencil_gpu_backends(gpu_backend, op, shape, gen):
    u = randn(gen, *shape, dtype=torch.float64)
    for red in ("mean", "none"):
        g = randn(gen, shape[0], dtype=torch.float64) if red == "none" else None
        for spacing in _spacings(len(shape) - 2):
            exp, ge = _run(lambda x: STENCIL_REFS[op](x, spacing, red), u, torch.float64, g)
            out, gu = _run(lambda x: STENCIL_OPS[op](x, spacing=spacing, reduction=red,
                                                     backend=gpu_backend),
                           u.cuda(), torch.float32, g.cuda() if g is not None else None)
            assert_close_verbose(out, exp, atol=F32_TOL, rtol=F32_TOL)
            assert_close_verbose(gu, ge, atol=F32_TOL, rtol=F32_TOL)


@pytest.mark.parametrize(
    "fn,exc,match",
    [
        (lambda: bending_energy(torch.rand(1, 3, 4, 2, 6)), ValueError,
         r"bending_energy: every spatial size of u must be >= 3, got spatial shape \(4, 2, 6\)"),
        (lambda: diffusion(torch.rand(2, 2, 5, 2)), ValueError,
         r"diffusion: every spatial size of u must be >= 3, got spatial shape \(5, 2\)"),
        (lambda: bending_energy(torch.rand(1, 2, 2, 5), backend="cpu"), ValueError,
         "bending_energy: every spatial size of u must be >= 3"),
        (lambda: bending_energy(U, reduction="max"), ValueError,
         "bending_energy: reduction must be 'sum' or 'mean' or 'none'"),
        (lambda: diffusion(U, reduction="batchmean"), ValueError,
         "diffusion: reduction must be"),
        (lambda: bending_energy(U, spacing=(1.0, 2.0)), ValueError,
         "bending_energy: spacing must be None, a number or 3"),
        # 1/h⁴ must stay a normal float32: bending takes h in [1e-6, 1e6] only.
        (lambda: bending_energy(U, spacing=1e-7), ValueError,
         r"bending_energy: spacing must be in \[1e-06, 1e\+06\] .*got \(1e-07, 1e-07, 1e-07\)"),
        (lambda: bending_energy(U, spacing=(1.0, 2e6, 1.0), backend="cpu"), ValueError,
         r"bending_energy: spacing must be in \[1e-06, 1e\+06\]"),
        (lambda: diffusion(U, spacing=(1.0, float("nan"), 1.0)), ValueError,
         r"diffusion: spacing must be in \[1e-12, 1e\+12\] .*got \(1\.0, nan, 1\.0\)"),
        (lambda: diffusion(U.long()), TypeError, "diffusion: u must be a floating-point"),
        (lambda: bending_energy(torch.rand(3, 4, 5)), ValueError, r"u must be \[B, C, H, W\]"),
        (lambda: diffusion(U, backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_stencil_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()



# --------------------------------------------------------------------------------------
# The CUDA kernels' per-voxel math, on the host
# --------------------------------------------------------------------------------------

# The CUDA kernels are thin loops over the host-device functions of
# csrc/include/regularisers.h, which the CPU kernels (row loops of their own) do not call.
# This program runs them over every voxel on the CPU as the CUDA launchers do (forward per
# kind, the gather backward; harmonic's two passes through a NaN-poisoned scratch), so
# their math is checked without a GPU.
_REG_HOST_HARNESS = r"""
#include <cmath>
#include <vector>

#include "regularisers.h"

using namespace mrus;
using namespace mrus::reg;

template <typename T, Kind K>
static void run(const RegArgs& a, const T* u, const T* scale, T* energy, T* grad) {
  const int64_t per_item = a.C * a.vol();
  std::vector<T> lap(K == Kind::HARMONIC ? size_t(a.B * per_item) : 0, T(NAN));
  auto each = [&](auto f) {
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t idx = 0; idx < per_item; ++idx) {
        const int64_t x[3] = {(idx / (a.H * a.W)) % a.D, (idx / a.W) % a.H, idx % a.W};
        f(b, b * per_item + idx, x);
      }
  };
  for (int64_t b = 0; b < a.B; ++b) energy[b] = T(0);
  each([&](int64_t b, int64_t off, const int64_t* x) {
    energy[b] += kind_energy<T, K>(a, u + off, x);
  });
  if constexpr (K == Kind::HARMONIC) {
    each([&](int64_t, int64_t off, const int64_t* x) {
      lap[off] = harmonic_laplacian<T>(a, u + off, x);
    });
    each([&](int64_t b, int64_t off, const int64_t* x) {
      grad[off] = scale[b] * harmonic_grad_from_laplacian<T>(a, lap.data() + off, x);
    });
  } else if constexpr (K == Kind::GRAD_L2) {
    each([&](int64_t b, int64_t off, const int64_t* x) {
      grad[off] = scale[b] * grad_l2_grad<T>(a, u + off, x);
    });
  } else {
    each([&](int64_t b, int64_t off, const int64_t* x) {
      grad[off] = scale[b] * stencil_grad<T, K == Kind::BENDING>(a, u + off, x);
    });
  }
}

template <typename T>
static void dispatch(const RegArgs& a, const void* u, const void* s, void* e, void* g) {
  const T* up = static_cast<const T*>(u);
  const T* sp = static_cast<const T*>(s);
  T* ep = static_cast<T*>(e);
  T* gp = static_cast<T*>(g);
  switch (a.kind) {
    case Kind::GRAD_L2: run<T, Kind::GRAD_L2>(a, up, sp, ep, gp); break;
    case Kind::HARMONIC: run<T, Kind::HARMONIC>(a, up, sp, ep, gp); break;
    case Kind::BENDING: run<T, Kind::BENDING>(a, up, sp, ep, gp); break;
    case Kind::DIFFUSION: run<T, Kind::DIFFUSION>(a, up, sp, ep, gp); break;
  }
}

// size: D, H, W (D = 1 for 2D); wt, wx: RegArgs' weights (axis order D, H, W).
extern "C" void host_regulariser(int f64, int kind, int ndim, int64_t B, int64_t C,
                                 const int64_t* size, const double* wt, const double* wx,
                                 const void* u, const void* scale, void* energy, void* grad) {
  RegArgs a;
  a.kind = static_cast<Kind>(kind);
  a.ndim = ndim;
  a.B = B;
  a.C = C;
  a.D = size[0];
  a.H = size[1];
  a.W = size[2];
  for (int i = 0; i < 3; ++i) {
    a.wt[i] = wt[i];
    a.wx[i] = wx[i];
  }
  if (f64) {
    dispatch<double>(a, u, scale, energy, grad);
  } else {
    dispatch<float>(a, u, scale, energy, grad);
  }
}
"""


@pytest.fixture(scope="module")
def reg_host_lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++) found")
    root = Path(__file__).resolve().parents[2]
    work = tmp_path_factory.mktemp("reg_host")
    src, lib = work / "harness.cpp", work / "libreghost.so"
    src.write_text(_REG_HOST_HARNESS)
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{root / 'csrc' / 'include'}",
           str(src), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def _host_weights(kind: int, shape: tuple[int, ...], spacing) -> tuple[list, list]:
    """RegArgs' wt / wx from the Python weights, as csrc/cpu/regularisers.cpp reg_args maps
    them: axis weights to (D, H, W) (2D: H, W), pair (i, j) to index 3 - i - j."""
    from mrus_kernels import regularisers as reg_mod

    ndim = len(shape) - 2
    h = spacing or (1.0,) * ndim
    w = reg_mod._weights(kind, shape, h)
    off = 3 - ndim
    wt, wx = [0.0] * 3, [0.0] * 3
    for i in range(ndim):
        wt[i + off] = w[i]
    if kind == reg_mod.BENDING:
        pairs = [(i, j) for i in range(off, 3) for j in range(i + 1, 3)]
        for k, (i, j) in enumerate(pairs):
            wx[3 - i - j] = w[ndim + k]
    return wt, wx


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 7), (2, 2, 5, 7), (1, 3, 3, 3, 3)], ids=str)
def test_cuda_kernel_math_on_the_host(reg_host_lib, shape, gen):
    """Per-item energies and scaled gradients of every kind by the CUDA kernels' per-voxel
    functions (float64 and float32) against the reference's autograd in float64."""
    from mrus_kernels import regularisers as reg_mod

    ndim = len(shape) - 2
    spacing = tuple(0.7 + 0.4 * i for i in range(ndim))
    refs = {
        reg_mod.GRAD_L2: None,  # mean over each axis, averaged: no per-item form, see below
        reg_mod.HARMONIC: lambda x: reference.harmonic_energy(x, "none"),
        reg_mod.BENDING: lambda x: reference.bending_energy(x, spacing, "none"),
        reg_mod.DIFFUSION: lambda x: reference.diffusion(x, spacing, "none"),
    }
    u = randn(gen, *shape, dtype=torch.float64)
    scale = randn(gen, shape[0], dtype=torch.float64)
    size = (ctypes.c_int64 * 3)(*([1] * (3 - ndim) + list(shape[2:])))
    for kind, ref in refs.items():
        if kind == reg_mod.GRAD_L2:
            # grad_l2's weights already hold the means: per item Σ_i wt_i Σ d_i².
            wts = reg_mod._weights(kind, shape, spacing)

            def ref(x, wts=wts):
                total = x.new_zeros(x.shape[0])
                for i, wi in enumerate(wts):
                    d = torch.diff(x, dim=2 + i)
                    total = total + wi * (d * d).flatten(1).sum(1)
                return total

        x = u.clone().requires_grad_()
        exp = ref(x)
        (ge,) = torch.autograd.grad(exp, x, scale)
        wt, wx = _host_weights(kind, shape, spacing)
        for dtype in (torch.float64, torch.float32):
            uu, ss = u.to(dtype), scale.to(dtype)
            energy = torch.full((shape[0],), float("nan"), dtype=dtype)
            grad = torch.full(shape, float("nan"), dtype=dtype)
            reg_host_lib.host_regulariser(
                ctypes.c_int(dtype == torch.float64), ctypes.c_int(kind), ctypes.c_int(ndim),
                ctypes.c_int64(shape[0]), ctypes.c_int64(shape[1]), size,
                (ctypes.c_double * 3)(*wt), (ctypes.c_double * 3)(*wx),
                ctypes.c_void_p(uu.data_ptr()), ctypes.c_void_p(ss.data_ptr()),
                ctypes.c_void_p(energy.data_ptr()), ctypes.c_void_p(grad.data_ptr()),
            )
            tol = 1e-10 if dtype == torch.float64 else F32_TOL
            assert_close_verbose(energy, exp, atol=tol, rtol=tol, name=f"kind {kind}")
            assert_close_verbose(grad, ge, atol=tol, rtol=tol, name=f"d kind {kind}")
