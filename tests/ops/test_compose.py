"""Tests of ``compose`` and ``integrate_velocity`` (scaling and squaring): every backend
against the reference, a cross-check against SciPy, gradients (gradcheck, both memory modes),
identities (zero, translations, inverse maps), the modules, ``torch.compile`` and every
validation message.

Conventions pinned here (DESIGN.md): fields [B, ndim, *S] in voxel units, component i along
spatial axis i; compose(u, v)(x) = v(x) + u(x + v(x)), the displacement of φ_u ∘ φ_v;
integrate_velocity(v, steps): u = v / 2**steps, then steps times u = compose(u, u); padding
"border" (SciPy "nearest") by default.
"""

from __future__ import annotations

import importlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
import warp_truth
from scipy import ndimage

import mrus_kernels
from conftest import (
    ALL_DTYPES,
    DTYPE_IDS,
    assert_close_verbose,
    backend_params,
    bad_input_test,
    compile_two_sizes,
    poisoned_empty,
    raises_before_dispatch,
    randn,
    require_backend,
    skip_without_float64,
    spy_warp_idx64,
)
from mrus_kernels import (
    BackendUnavailableError,
    Compose,
    IntegrateVelocity,
    compose,
    integrate_velocity,
    reference,
)

compose_module = importlib.import_module("mrus_kernels.compose")

PADDINGS = ("border", "zeros")
MEMORY = ("store", "recompute")
BACKENDS = backend_params(("torch", "cpu", "triton"))
FAST_BACKENDS = backend_params(("torch", "cpu"))
KERNEL_BACKENDS = backend_params(("cpu", "triton"))

# Odd sizes; u and v batch 2 and 1 (broadcast). The Triton interpreter gets smaller volumes.
SHAPES = {2: (2, 2, 9, 11), 3: (2, 3, 5, 7, 6)}
TRITON_SHAPES = {2: (2, 2, 7, 6), 3: (2, 3, 4, 5, 6)}


def _shape(backend: str, ndim: int) -> tuple[int, ...]:
    return (TRITON_SHAPES if backend == "triton" else SHAPES)[ndim]


def _pair(gen, shape, dtype=torch.float32, device="cpu", scale=1.5):
    """u [B, ndim, *S] and v [1, ndim, *S], N(0, scale²) voxels: some points fall outside."""
    u = randn(gen, *shape, dtype=dtype, device=device, scale=scale)
    v = randn(gen, 1, *shape[1:], dtype=dtype, device=device, scale=scale)
    return u, v


def _smooth(shape, amplitude: float, dtype=torch.float64) -> torch.Tensor:
    """A smooth velocity: one sine period per field, along the next axis, per component."""
    spatial = shape[2:]
    ndim = len(spatial)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    comps = [
        torch.sin(2 * math.pi * axes[(i + 1) % ndim] / spatial[(i + 1) % ndim] + i)
        for i in range(ndim)
    ]
    return (amplitude * torch.stack(comps)[None]).expand(shape[0], -1, *spatial).to(dtype)


def _interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    return x[(slice(None), slice(None)) + (slice(margin, -margin),) * (x.dim() - 2)]


# =========================================================================== compose


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compose_matches_reference(backend, dtype, ndim, padding, gen):
    """Our kernels against the reference (the torch backend is the reference: SciPy checks
    it in test_compose_matches_scipy)."""
    skip_without_float64(backend, dtype)
    u, v = _pair(gen, _shape(backend, ndim), dtype)
    for a, b in ((u, v), (v, u)):  # either batch broadcast
        expected = reference.compose(a, b, padding)
        with poisoned_empty():
            out = compose(a, b, padding=padding, backend=backend)
        assert out.dtype == dtype and out.shape == u.shape
        assert_close_verbose(out, expected, dtype, name=f"{backend} compose")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compose_backward_matches_reference(backend, dtype, ndim, padding, gen):
    skip_without_float64(backend, dtype)
    u, v = _pair(gen, _shape(backend, ndim), dtype)
    grad = randn(gen, *u.shape, dtype=dtype)
    ru, rv = u.clone().requires_grad_(), v.clone().requires_grad_()
    expected = torch.autograd.grad(reference.compose(ru, rv, padding), (ru, rv), grad)
    ou, ov = u.clone().requires_grad_(), v.clone().requires_grad_()
    with poisoned_empty():
        actual = torch.autograd.grad(compose(ou, ov, padding=padding, backend=backend),
                                     (ou, ov), grad)
    for name, a, e in zip(("d u", "d v"), actual, expected):
        assert a.dtype == dtype
        assert_close_verbose(a, e, dtype, name=f"{backend} {name}")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 19), (1, 2, 9, 13)], ids=["3d", "2d"])
def test_cpu_loops_compose_and_integrate(cpu_loops, shape, padding, gen):
    """compose (the ADD_DDF kernels) and integrate_velocity (DDF_GRAD_SCATTER: u ∘ u, both
    gradients into one buffer), forward and backward, on both float32 CPU loops (vector and
    portable) against the reference; rows of 19 and 13 voxels leave partial lane groups."""
    require_backend("cpu", "cpu", torch.float32)
    u, v = _pair(gen, shape)
    grad = randn(gen, *shape)
    ru, rv = u.clone().requires_grad_(), v.clone().requires_grad_()
    ref = reference.compose(ru, rv, padding)
    expected = torch.autograd.grad(ref, (ru, rv), grad)
    ou, ov = u.clone().requires_grad_(), v.clone().requires_grad_()
    with poisoned_empty():
        out = compose(ou, ov, padding=padding, backend="cpu")
        actual = torch.autograd.grad(out, (ou, ov), grad)
    assert_close_verbose(out, ref, torch.float32, name=f"{cpu_loops} compose")
    for name, a, e in zip(("d u", "d v"), actual, expected):
        assert_close_verbose(a, e, torch.float32, name=f"{cpu_loops} compose {name}")
    rv = u.clone().requires_grad_()
    ref = reference.integrate_velocity(rv, 4, padding)
    (expected,) = torch.autograd.grad(ref, rv, grad)
    for memory in MEMORY:
        x = u.clone().requires_grad_()
        with poisoned_empty():
            out = integrate_velocity(x, 4, memory=memory, padding=padding, backend="cpu")
            (actual,) = torch.autograd.grad(out, x, grad)
        assert_close_verbose(out, ref, torch.float32, name=f"{cpu_loops} integrate {memory}")
        assert_close_verbose(actual, expected, torch.float32, atol=1e-4,
                             name=f"{cpu_loops} integrate {memory} d v")


@pytest.fixture
def one_thread():
    """gradcheck makes thousands of calls on tiny fields: waking an OpenMP team for each
    costs far more than the work on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


GRADCHECK_CASES = [
    pytest.param(2, "border", (2, 1), id="2d-border-v-b1"),
    pytest.param(2, "border", (1, 2), id="2d-border-u-b1"),
    pytest.param(2, "zeros", (2, 2), id="2d-zeros-b2"),
    pytest.param(3, "border", (2, 1), id="3d-border-v-b1"),
    pytest.param(3, "zeros", (1, 2), id="3d-zeros-u-b1"),
]


@pytest.mark.parametrize(("ndim", "padding", "batches"), GRADCHECK_CASES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compose_gradcheck(backend, ndim, padding, batches, gen, one_thread):
    """float64 gradcheck of both inputs; some points land outside the field."""
    spatial = (3, 3, 4) if ndim == 3 else (4, 5)
    u = randn(gen, batches[0], ndim, *spatial, dtype=torch.float64, scale=1.5).requires_grad_()
    v = randn(gen, batches[1], ndim, *spatial, dtype=torch.float64, scale=1.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: compose(a, b, padding=padding, backend=backend), (u, v)
    )


@pytest.mark.parametrize("which", ["u", "v"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compose_gradient_of_one_input(backend, which, gen):
    u, v = _pair(gen, (2, 2, 5, 6))
    grad = randn(gen, 2, 2, 5, 6)
    fu, fv = u.clone().requires_grad_(), v.clone().requires_grad_()
    full = torch.autograd.grad(compose(fu, fv, backend=backend), (fu, fv), grad)
    u.requires_grad_(which == "u")
    v.requires_grad_(which == "v")
    compose(u, v, backend=backend).backward(grad)
    assert (u.grad is not None) == (which == "u") and (v.grad is not None) == (which == "v")
    assert torch.equal(u.grad if which == "u" else v.grad, full[0] if which == "u" else full[1])


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compose_matches_scipy(backend, ndim, padding, gen):
    """Independent cross-check: v + map_coordinates(u_i, x + v, order=1), SciPy mode
    "nearest" (border) or "grid-constant" (zeros)."""
    u, v = _pair(gen, SHAPES[ndim], torch.float64)
    out = compose(u, v, padding=padding, backend=backend)
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in v.shape[2:]], indexing="ij")
    coords = np.stack(axes) + v[0].numpy()
    expected = np.stack([
        np.stack([
            v[0, i].numpy() + ndimage.map_coordinates(
                u[b, i].numpy(), coords, order=1, mode=warp_truth.SCIPY_MODES[padding],
                cval=0.0, prefilter=False)
            for i in range(ndim)
        ])
        for b in range(u.shape[0])
    ])
    assert_close_verbose(out, torch.from_numpy(expected), torch.float64)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_integrate_matches_scipy(backend, ndim, padding, gen):
    """Independent cross-check of scaling and squaring: u = v / 2**steps, then steps times
    u + u(x + u) with SciPy's map_coordinates, float64."""
    v = randn(gen, *SHAPES[ndim], dtype=torch.float64, scale=3.0)
    for steps in (1, 4):
        out = integrate_velocity(v, steps, padding=padding, backend=backend)
        assert_close_verbose(out, warp_truth.scipy_integrate(v, steps, padding), torch.float64,
                             name=f"{steps} steps")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_compose_with_zero_is_identity(backend, ndim, padding, gen):
    u, _ = _pair(gen, _shape(backend, ndim))
    zero = torch.zeros_like(u)
    assert torch.equal(compose(u, zero, padding=padding, backend=backend), u)
    assert torch.equal(compose(zero, u, padding=padding, backend=backend), u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compose_translations_add(backend, gen):
    """Two constant shifts compose to their sum (border padding: a constant field)."""
    a = torch.tensor([0.75, -1.25, 2.5]).view(1, 3, 1, 1, 1).expand(1, 3, 4, 5, 6)
    b = torch.tensor([-0.5, 3.0, 0.25]).view(1, 3, 1, 1, 1).expand(1, 3, 4, 5, 6)
    assert torch.equal(compose(a, b, backend=backend), a + b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compose_non_contiguous(backend, gen):
    wide = randn(gen, 2, 3, 4, 5, 12, scale=1.5)
    u, v = wide[..., ::2], wide[:1, :, :, :, 1::2]
    assert not u.is_contiguous() and not v.is_contiguous()
    with poisoned_empty():
        out = compose(u, v, backend=backend)
    assert torch.equal(out, compose(u.contiguous(), v.contiguous(), backend=backend))
    assert_close_verbose(out, warp_truth.scipy_compose(u, v), torch.float32)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compose_deterministic_gradient(backend, padding, gen, deterministic_algorithms):
    """With deterministic algorithms on: d u (the scatter) and d v against float64 truths.
    cpu: two runs agree bitwise. triton: d u (fixed point) is within its documented bound of
    the exact sum of its contributions (v dyadic and grad of 12 bits: exact contributions);
    the bitwise check cannot fail under the interpreter (atomics run in one order) and runs
    on a GPU (test_gpu_compose_matches_reference)."""
    u = randn(gen, *_shape(backend, 3), scale=1.5)
    v = warp_truth.dyadic_ddf(gen, 1, *u.shape[1:])
    grad = warp_truth.dyadic_grad(gen, *u.shape)
    u.requires_grad_()
    v.requires_grad_()
    runs = [torch.autograd.grad(compose(u, v, padding=padding, backend=backend), (u, v), grad)
            for _ in range(2)]
    exact_u, count, _ = warp_truth.scatter_image_grad(u.shape, v, grad, "linear", padding)
    ru, rv = u.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    _, ev = torch.autograd.grad(reference.compose(ru, rv, padding), (ru, rv), grad.double())
    assert_close_verbose(runs[0][1], ev, torch.float32, name="d v")
    if backend == "cpu":
        assert_close_verbose(runs[0][0], exact_u, torch.float32, name="d u")
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        return
    terms = math.prod(u.shape[2:])  # M: u is not broadcast, one item reads each u item
    quantum = warp_truth.fixed_point_quantum_bound(float(grad.abs().max()), terms)
    warp_truth.assert_fixed_point_close(runs[0][0], exact_u, count, quantum, name="d u")


# =========================================================================== integrate


@pytest.mark.parametrize("steps", (0, 1, 4))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_integrate_matches_reference(backend, dtype, ndim, padding, steps, gen):
    """Our kernels against the reference (the torch backend is the reference: SciPy checks
    it in test_integrate_matches_scipy)."""
    skip_without_float64(backend, dtype)
    shape = _shape(backend, ndim)
    v = randn(gen, *shape, dtype=dtype, scale=3.0)
    expected = reference.integrate_velocity(v, steps, padding)
    for memory in MEMORY:
        with poisoned_empty():
            out = integrate_velocity(v, steps, memory=memory, padding=padding, backend=backend)
        assert out.dtype == dtype and out.shape == v.shape
        # Half types round each of the `steps` fields: the error grows with the steps.
        tol = {"atol": 2e-2, "rtol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {}
        assert_close_verbose(out, expected, dtype, name=f"{backend} {memory}", **tol)
    if steps == 0:
        out = integrate_velocity(v, 0, backend=backend)
        assert torch.equal(out, v) and out.data_ptr() != v.data_ptr()


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_integrate_backward_matches_reference(backend, dtype, ndim, padding, gen):
    """Both memory modes against the reference's autograd in float64, and (cpu) bitwise
    equal to each other: the recomputed intermediates are the stored ones. Under the Triton
    interpreter the atomics run in one order, so the bitwise check cannot fail there: it
    runs on a GPU (test_gpu_integrate_deterministic_bitwise)."""
    skip_without_float64(backend, dtype)
    shape = _shape(backend, ndim)
    v = randn(gen, *shape, dtype=dtype, scale=3.0)
    grad = randn(gen, *shape, dtype=dtype)
    steps = 3 if backend == "triton" else 5
    ref = v.double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.integrate_velocity(ref, steps, padding), ref,
                                      grad.double())
    grads = {}
    for memory in MEMORY:
        x = v.clone().requires_grad_()
        with poisoned_empty():
            out = integrate_velocity(x, steps, memory=memory, padding=padding, backend=backend)
            (grads[memory],) = torch.autograd.grad(out, x, grad)
        assert_close_verbose(grads[memory], expected, dtype, name=f"{backend} {memory} d v",
                             atol=1e-4 if dtype == torch.float32 else None)
    if backend == "cpu":
        assert torch.equal(grads["store"], grads["recompute"])


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_integrate_gradcheck(backend, ndim, memory, gen, one_thread):
    shape = (1, 3, 3, 3, 4) if ndim == 3 else (2, 2, 4, 5)
    v = randn(gen, *shape, dtype=torch.float64, scale=2.0).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: integrate_velocity(x, 3, memory=memory, backend=backend), (v,)
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_memory_modes_give_identical_gradients(backend, gen):
    """Same forward, same gradient, bitwise, for 7 steps and a batch of 2."""
    v = randn(gen, 2, 3, 6, 7, 5, dtype=torch.float64, scale=2.0)
    grad = randn(gen, 2, 3, 6, 7, 5, dtype=torch.float64)
    results = []
    for memory in MEMORY:
        x = v.clone().requires_grad_()
        out = integrate_velocity(x, 7, memory=memory, backend=backend)
        out.backward(grad)
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_recompute_keeps_no_intermediates(backend, gen):
    """"store" keeps the steps' inputs and runs no forward kernel in the backward;
    "recompute" keeps none and reruns step k's k squarings: steps (steps - 1) / 2 in all."""
    steps = 5
    v = randn(gen, *_shape(backend, 2), scale=2.0)
    border = int(compose_module.Padding.BORDER)
    real = compose_module.launch_forward
    for memory, kept, reruns in (("store", steps, 0), ("recompute", 0, steps * (steps - 1) // 2)):
        _, trace = compose_module._integrate_op(v, steps, border, backend, memory == "store", False)
        assert trace.shape == ((kept, *v.shape) if kept else (0,)), memory
        x = v.clone().requires_grad_()
        out = integrate_velocity(x, steps, memory=memory, backend=backend)
        with mock.patch.object(compose_module, "launch_forward", side_effect=real) as spy:
            out.backward(torch.ones_like(out))
        assert spy.call_count == reruns, memory


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_store_keeps_nothing_without_a_backward(backend, gen):
    """"store" saves the intermediates only when a gradient will be asked for."""
    v = randn(gen, *_shape(backend, 2), scale=2.0)
    real = compose_module._integrate_op
    with mock.patch.object(compose_module, "_integrate_op", side_effect=real) as spy:
        plain = integrate_velocity(v, 4, memory="store", backend=backend)
        with torch.no_grad():
            integrate_velocity(v.clone().requires_grad_(), 4, memory="store", backend=backend)
        out = integrate_velocity(v.clone().requires_grad_(), 4, memory="store", backend=backend)
    assert [c.args[4] for c in spy.call_args_list] == [False, False, True]
    assert torch.equal(plain, out.detach())


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_velocity_is_a_translation(backend, ndim):
    """exp of a constant field is the same constant shift (border padding samples the
    constant everywhere); only the interpolation weights' rounding (their float sum is not
    exactly 1) separates the result from the shift."""
    shift = torch.tensor([1.75, -2.5, 0.625][:ndim]).view(1, ndim, *[1] * ndim)
    v = shift.expand(2, ndim, *(4, 5, 6)[:ndim]).contiguous()
    for memory in MEMORY:
        out = integrate_velocity(v, 7, memory=memory, backend=backend)
        assert_close_verbose(out, v, torch.float32, atol=1e-6, rtol=1e-6, name=memory)


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_map_error_shrinks_with_steps(backend, ndim):
    """compose(exp(v), exp(-v)) ≈ 0 for a smooth small v, away from the borders (where
    border padding truncates the field), and the error shrinks as the steps grow."""
    size = (32, 32) if ndim == 2 else (16, 16, 16)
    step_counts = (0, 1, 2, 4, 7)
    if backend == "triton":  # the interpreter is slow
        size, step_counts = ((24, 24), (0, 2, 7)) if ndim == 2 else ((10, 10, 10), (0, 2, 7))
    v = _smooth((1, ndim, *size), 1.0, torch.float32)
    errors = []
    for steps in step_counts:
        phi = integrate_velocity(v, steps, backend=backend)
        inv = integrate_velocity(-v, steps, backend=backend)
        errors.append(float(_interior(compose(phi, inv, backend=backend), 3).abs().max()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15 * errors[0], errors
    assert errors[-1] < (0.05 if size[0] >= 16 else 0.1), errors  # coarser grid, more error


@pytest.mark.parametrize("backend", BACKENDS)
def test_integrate_non_contiguous_and_broadcast_batch(backend, gen):
    wide = randn(gen, 2, 2, 6, 14, scale=2.0)
    v = wide[..., ::2]
    assert not v.is_contiguous()
    with poisoned_empty():
        out = integrate_velocity(v, 4, backend=backend)
    assert_close_verbose(out, warp_truth.scipy_integrate(v, 4), torch.float32)
    for b in range(2):  # batch items do not mix
        assert torch.equal(out[b : b + 1], integrate_velocity(v[b : b + 1], 4, backend=backend))


# =========================================================================== modules, compile


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_modules(backend, gen):
    u, v = _pair(gen, (2, 3, 4, 5, 6))
    layer = Compose(padding="zeros", backend=backend)
    assert list(layer.parameters()) == []
    assert torch.equal(layer(u, v), compose(u, v, padding="zeros", backend=backend))
    assert Compose().padding == "border"
    vecint = IntegrateVelocity(steps=5, memory="recompute", backend=backend)
    assert "steps=5" in repr(vecint) and "memory='recompute'" in repr(vecint)
    x = u.clone().requires_grad_()
    out = vecint(x)
    assert torch.equal(out, integrate_velocity(u, 5, memory="recompute", backend=backend))
    out.sum().backward()
    assert x.grad is not None
    default = IntegrateVelocity()
    assert (default.steps, default.memory, default.padding) == (7, "store", "border")
    assert default.deterministic is None and Compose().deterministic is None


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_modules_pass_deterministic(backend, gen):
    """deterministic=True on the modules reaches the kernels: the backward is launched on
    the deterministic path, and two runs agree bitwise."""
    u, v = _pair(gen, (2, 3, 9, 10, 11))
    calls: list[bool] = []
    real = compose_module.launch_backward

    def spy(*args, **kwargs):
        calls.append(args[7])  # (grad_out, image, ddf, mode, padding, flags, backend, det...)
        return real(*args, **kwargs)

    grads = []
    # compose's backward runs in mrus_kernels.warp, integrate_velocity's in compose.
    with mock.patch.object(importlib.import_module("mrus_kernels.warp"), "launch_backward",
                           side_effect=spy), \
            mock.patch.object(compose_module, "launch_backward", side_effect=spy):
        for layer, inputs in ((Compose(backend=backend, deterministic=True), (u, v)),
                              (IntegrateVelocity(3, backend=backend, deterministic=True), (u,))):
            for _ in range(2):
                xs = [x.clone().requires_grad_() for x in inputs]
                layer(*xs).square().sum().backward()
                grads.append([x.grad for x in xs])
    assert calls and all(calls)
    for first, second in (grads[0:2], grads[2:4]):
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(gen):
    """compose and integrate_velocity (both memory modes) under
    torch.compile(fullgraph=True): no graph break, forward and backward as in eager mode."""
    require_backend("cpu", "cpu", torch.float32)
    u, v = _pair(gen, (2, 3, 4, 5, 6))

    def loss(u, v):
        w = compose(u, v, backend="cpu")
        a = integrate_velocity(w, 4, memory="store", backend="cpu")
        b = integrate_velocity(v, 3, memory="recompute", backend="cpu")
        return w, a, b, (a * a).sum() + (b * w).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True)
        results = []
        for fn in (loss, compiled):
            x, y = u.clone().requires_grad_(), v.clone().requires_grad_()
            w, a, b, total = fn(x, y)
            total.backward()
            results.append((w.detach(), a.detach(), b.detach(), x.grad, y.grad))
    finally:
        torch._dynamo.reset()
    for name, eager, comp in zip(("compose", "store", "recompute", "d u", "d v"), *results):
        assert_close_verbose(comp, eager, torch.float32, name=name)


# Inductor's own import of torch.jit; dynamo's note on backends.py's cached Triton check.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize(("backend", "together"), [
    *[pytest.param(*p.values, True, marks=p.marks, id=p.id)
      for p in backend_params(("cpu", "triton"))],
    pytest.param("torch", False, id="torch-separate"),
    pytest.param("torch", True, id="torch-together", marks=pytest.mark.xfail(
        strict=True, reason="inductor (torch 2.13) miscompiles the gradient of the reference's "
        "compose steps when compose and two integrate_velocity calls share one dynamic-shape "
        "graph (each alone compiles correctly: torch-separate)")),
])
def test_torch_compile_dynamic_shapes(backend, together, gen):
    """compose and integrate_velocity (both memory modes) under
    torch.compile(fullgraph=True, dynamic=True) (training on crops of varying size): two
    sizes in a row from one graph (no recompile), forward and gradients as in eager mode.
    On the torch backend this compiles the reference itself (recompute leaves what to keep
    to the compiler there): inductor miscompiled its gradients before, for integrate_velocity
    with 2 or more steps and for the checkpointed recompute mode."""
    ops = (lambda u, v: compose(u, v, backend=backend),
           lambda u, v: integrate_velocity(v, 3, backend=backend),
           lambda u, v: integrate_velocity(u, 2, memory="recompute", padding="zeros",
                                           backend=backend))
    shapes = ((1, 3, 4, 5, 6), (1, 3, 5, 6, 4)) if backend == "triton" else (
        (1, 3, 5, 6, 7), (1, 3, 7, 5, 9))
    groups = [ops] if together else [(op,) for op in ops]
    for group in groups:
        def fn(u, v, group=group):
            return tuple(op(u, v) for op in group)

        def make(shape):
            return (randn(gen, *shape, scale=1.5).requires_grad_(),
                    randn(gen, *shape, scale=1.5).requires_grad_())

        names = [f"out {i}" for i in range(len(group))] + ["d u", "d v"]
        compile_two_sizes(fn, make, shapes, names)



# =========================================================================== bad input


U2 = torch.zeros(1, 2, 4, 5)
U3 = torch.zeros(1, 3, 3, 4, 5)

BAD_INPUTS = {
    "compose-not-tensor": (lambda: compose([0.0], U2), TypeError,
                           r"compose: u must be a torch\.Tensor, got list"),
    "compose-int": (lambda: compose(U2, U2.int()), TypeError,
                    r"compose: v must be a floating-point tensor .*got torch\.int32"),
    "compose-rank": (lambda: compose(torch.zeros(2, 4, 5), U2), ValueError,
                     (r"compose: u must be \[B, ndim, H, W\] \(2D\) or \[B, ndim, D, H, W\] "
                      r"\(3D\), got shape \(2, 4, 5\)")),
    "compose-channels": (lambda: compose(torch.zeros(1, 2, 3, 4, 5), U3), ValueError,
                         (r"compose: u must have 3 channels \(one per spatial axis\) for a 3D "
                          r"field, got 2 \(shape \(1, 2, 3, 4, 5\)\)")),
    "compose-channels-2d": (lambda: compose(U2, torch.zeros(1, 3, 4, 5)), ValueError,
                            r"compose: v must have 2 channels .*got 3"),
    "compose-shapes": (lambda: compose(U2, torch.zeros(1, 2, 4, 6)), ValueError,
                       (r"compose: u and v must have the same shape \[\*, ndim, \*S\], got "
                        r"\(1, 2, 4, 5\) and \(1, 2, 4, 6\)")),
    "compose-ndim": (lambda: compose(U2, U3), ValueError,
                     r"compose: u and v must have the same shape .*\(1, 2, 4, 5\) and \(1, 3, 3"),
    "compose-batch": (lambda: compose(U2.expand(2, -1, -1, -1), U2.expand(3, -1, -1, -1)),
                      ValueError,
                      r"compose: u and v batch sizes must match or one must be 1, got 2 and 3"),
    "compose-dtype": (lambda: compose(U2, U2.double()), TypeError,
                      r"compose: u and v must have the same dtype, got torch\.float32 and "
                      r"torch\.float64"),
    "compose-device": (lambda: compose(U2, U2.to("meta")), ValueError,
                       r"compose: u and v must be on the same device, got cpu and meta"),
    "compose-empty": (lambda: compose(torch.zeros(1, 2, 0, 5), torch.zeros(1, 2, 0, 5)),
                      ValueError, r"compose: u must not be empty, got shape \(1, 2, 0, 5\)"),
    "compose-padding": (lambda: compose(U2, U2, padding="reflection"), ValueError,
                        r"compose: padding must be 'border' or 'zeros', got 'reflection'"),
    "compose-deterministic": (lambda: compose(U2, U2, deterministic="no"), TypeError,
                              r"compose: deterministic must be None, True or False, got 'no'"),
    "compose-backend": (lambda: compose(U2, U2, backend="gpu"), ValueError,
                        r"compose: backend must be one of torch, cpu, triton, cuda, auto, "
                        r"got 'gpu'"),
    "integrate-not-tensor": (lambda: integrate_velocity(np.zeros((1, 2, 4, 5))), TypeError,
                             r"integrate_velocity: v must be a torch\.Tensor, got ndarray"),
    "integrate-int": (lambda: integrate_velocity(U2.long()), TypeError,
                      r"integrate_velocity: v must be a floating-point tensor .*got torch\.int64"),
    "integrate-rank": (lambda: integrate_velocity(torch.zeros(1, 3, 2, 3, 4, 5)), ValueError,
                       r"integrate_velocity: v must be .*got shape \(1, 3, 2, 3, 4, 5\)"),
    "integrate-channels": (lambda: integrate_velocity(torch.zeros(1, 1, 4, 5)), ValueError,
                           r"integrate_velocity: v must have 2 channels .*got 1"),
    "integrate-steps-negative": (lambda: integrate_velocity(U2, -1), ValueError,
                                 (r"integrate_velocity: steps must be in \[0, 62\] \(the scale "
                                  r"2\*\*steps must fit in int64\), got -1")),
    "integrate-steps-huge": (lambda: integrate_velocity(U2, 1100), ValueError,
                             r"integrate_velocity: steps must be in \[0, 62\] .*got 1100"),
    "integrate-steps-63": (lambda: integrate_velocity(U2, 63, backend="torch"), ValueError,
                           r"integrate_velocity: steps must be in \[0, 62\] .*got 63"),
    "integrate-steps-np-bool": (lambda: integrate_velocity(U2, np.bool_(True)), TypeError,
                                r"integrate_velocity: steps must be an int, got bool"),
    "integrate-steps-float": (lambda: integrate_velocity(U2, 7.0), TypeError,
                              r"integrate_velocity: steps must be an int, got float"),
    "integrate-steps-bool": (lambda: integrate_velocity(U2, True), TypeError,
                             r"integrate_velocity: steps must be an int, got bool"),
    "integrate-memory": (lambda: integrate_velocity(U2, memory="checkpoint"), ValueError,
                         (r"integrate_velocity: memory must be 'store' or 'recompute', got "
                          r"'checkpoint'")),
    "integrate-padding": (lambda: integrate_velocity(U2, padding=None), ValueError,
                          r"integrate_velocity: padding must be 'border' or 'zeros', got None"),
    "integrate-deterministic": (lambda: integrate_velocity(U2, deterministic=0), TypeError,
                                r"integrate_velocity: deterministic must be None, True or False"),
    "module-compose-padding": (lambda: Compose(padding="reflect"), ValueError,
                               r"Compose: padding must be 'border' or 'zeros', got 'reflect'"),
    "module-steps": (lambda: IntegrateVelocity(steps=-2), ValueError,
                     r"IntegrateVelocity: steps must be in \[0, 62\] .*got -2"),
    "module-steps-huge": (lambda: IntegrateVelocity(steps=2**70), ValueError,
                          (r"IntegrateVelocity: steps must be in \[0, 62\] .*got "
                           r"1180591620717411303424")),
    "module-steps-float": (lambda: IntegrateVelocity(steps=2.5), TypeError,
                           r"IntegrateVelocity: steps must be an int, got float"),
    "module-compose-deterministic": (lambda: Compose(deterministic="yes"), TypeError,
                                     r"Compose: deterministic must be None, True or False"),
    "module-integrate-deterministic": (lambda: IntegrateVelocity(deterministic=1), TypeError,
                                       r"IntegrateVelocity: deterministic must be None, True "
                                       r"or False"),
    "module-memory": (lambda: IntegrateVelocity(memory="none"), ValueError,
                      r"IntegrateVelocity: memory must be 'store' or 'recompute', got 'none'"),
    "module-padding": (lambda: IntegrateVelocity(padding="zero"), ValueError,
                       r"IntegrateVelocity: padding must be 'border' or 'zeros', got 'zero'"),
}


test_bad_input = bad_input_test(BAD_INPUTS)


# =========================================================================== non-finite, IDX64


# NumPy (the interpreter) warns on inf * 0 = NaN, which the kernels compute on purpose where
# an infinite gradient meets a corner of weight 0.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_integrate_non_finite_gradient_poisons_the_same_elements(backend, gen):
    """A NaN and an inf in the upstream gradient of integrate_velocity: the deterministic
    backward (fixed point on Triton, through the squaring steps' displacement-gradient
    scatter) makes non-finite exactly the elements the float path does, with the same kind
    (NaN, +inf, -inf), and agrees with it elsewhere."""
    v = randn(gen, *_shape(backend, 3), scale=1.0)
    grad = randn(gen, *v.shape)
    grad[0, 1, 1, 2, 3] = float("nan")
    grad[1, 0, 2, 2, 2] = float("inf")
    grads = {}
    for det in (False, True):
        x = v.clone().requires_grad_()
        (grads[det],) = torch.autograd.grad(
            integrate_velocity(x, 2, backend=backend, deterministic=det), x, grad)
    fast, det = grads[False], grads[True]
    assert bool((~fast.isfinite()).any()) and bool(fast.isfinite().any())
    for fn in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(fn(det), fn(fast)), fn.__name__
    live = fast.isfinite()
    assert_close_verbose(det[live], fast[live], torch.float32)


# NumPy (the Triton interpreter) warns on inf * 0 and inf - inf, computed here on purpose.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ("inf", "-inf", "nan"))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize(("backend", "dtype"), [
    pytest.param("cpu", torch.float64, id="cpu-f64"),
    pytest.param("cpu", torch.float32, id="cpu-f32"),
    pytest.param("triton", torch.float32, id="triton-f32")])
def test_integrate_non_finite_velocity_follows_the_reference(backend, dtype, ndim, padding,
                                                             kind, gen):
    """One inf or NaN in v: u and d v NaN, +inf and -inf exactly where the float64
    reference has them (warp.h: each squaring step sums w_k * u_k term by term, so an
    infinite u spreads as inf, and as NaN only where a weight is exactly 0 or infinities of
    both signs meet), finite elements within tolerance. Dyadic v (multiples of 1/4) keep
    float32 and float64 on the same pattern."""
    require_backend(backend, "cpu", dtype)
    spatial = (4, 5, 6)[:ndim]
    v = torch.randint(-8, 9, (1, ndim, *spatial), generator=gen).double() / 4
    v[(0, 0) + (2,) * ndim] = float(kind)
    grad = torch.randint(-8, 9, (1, ndim, *spatial), generator=gen).double() / 8

    def run(name, dt):
        x = v.to(dt).requires_grad_()
        u = integrate_velocity(x, 3, padding=padding, backend=name)
        (gx,) = torch.autograd.grad(u, x, grad.to(dt))
        return u.detach(), gx

    eu, ev = run("torch", torch.float64)
    assert bool((~eu.isfinite()).any()) and bool(eu.isfinite().any())
    u, gv = run(backend, dtype)
    assert_close_verbose(u, eu, dtype, name=f"u ({kind})")
    assert_close_verbose(gv, ev, dtype, name=f"d v ({kind})")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
def test_triton_idx64_variants(monkeypatch, ndim, padding, deterministic, gen):
    """With _common.IDX64_THRESHOLD lowered, compose (ADD_DDF) and integrate_velocity
    (DDF_GRAD_SCATTER in the backward) take the 64-bit offset variants, forward and
    backward, and match the float64 reference."""
    require_backend("triton", "cpu", torch.float32)
    triton_warp = importlib.import_module("mrus_kernels.triton.warp")
    monkeypatch.setattr(importlib.import_module("mrus_kernels.triton._common"),
                        "IDX64_THRESHOLD", 100)
    seen = spy_warp_idx64(monkeypatch, triton_warp)
    u, v = _pair(gen, _shape("triton", ndim))
    grad = randn(gen, *u.shape)
    ru, rv = u.double().requires_grad_(), v.double().requires_grad_()
    expected = reference.compose(ru, rv, padding)
    eu, ev = torch.autograd.grad(expected, (ru, rv), grad.double())
    ou, ov = u.clone().requires_grad_(), v.clone().requires_grad_()
    out = compose(ou, ov, padding=padding, backend="triton", deterministic=deterministic)
    gu, gv = torch.autograd.grad(out, (ou, ov), grad)
    assert_close_verbose(out, expected, torch.float32, name="compose")
    assert_close_verbose(gu, eu, torch.float32, name="compose d u")
    assert_close_verbose(gv, ev, torch.float32, name="compose d v")
    ref = u.double().requires_grad_()
    expected = reference.integrate_velocity(ref, 2, padding)
    (ex,) = torch.autograd.grad(expected, ref, grad.double())
    x = u.clone().requires_grad_()
    out = integrate_velocity(x, 2, padding=padding, backend="triton",
                             deterministic=deterministic)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert_close_verbose(out, expected, torch.float32, name="integrate")
    assert_close_verbose(gx, ex, torch.float32, atol=1e-4, name="integrate d v")
    assert seen and all(seen), seen


@pytest.mark.parametrize("backend", backend_params(("triton", "cuda")))
def test_gpu_backends_reject_float64(backend, gen):
    u, v = _pair(gen, (1, 2, 4, 5), torch.float64)
    with pytest.raises(BackendUnavailableError, match=rf"compose: backend '{backend}'.*float64"):
        compose(u, v, backend=backend)
    with pytest.raises(BackendUnavailableError,
                       match=rf"integrate_velocity: backend '{backend}'.*float64"):
        integrate_velocity(u, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integrate_most_steps(backend, gen):
    """steps = MAX_STEPS (62: 2**62 is the largest scale torch takes as an int64) runs on
    every backend and matches the reference; a NumPy integer is an int."""
    assert compose_module.MAX_STEPS == 62
    v = randn(gen, 1, 2, 4, 5, scale=3.0)
    expected = reference.integrate_velocity(v.double(), 62)
    out = integrate_velocity(v, np.int64(62), backend=backend)
    assert_close_verbose(out, expected, torch.float32)
    assert IntegrateVelocity(np.int32(62)).steps == 62


def test_validation_runs_before_dispatch(monkeypatch):
    raises_before_dispatch(
        monkeypatch, lambda: integrate_velocity(U2, -3), "integrate_velocity: steps must be in"
    )


def test_module_exports():
    for name in ("compose", "integrate_velocity", "Compose", "IntegrateVelocity"):
        assert name in mrus_kernels.__all__ and hasattr(mrus_kernels, name)


# =========================================================================== GPU


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_gpu_compose_matches_reference(gpu_backend, dtype, ndim, padding, gen):
    u, v = _pair(gen, SHAPES[ndim], dtype, device="cuda")
    grad = randn(gen, *u.shape, dtype=dtype, device="cuda")
    ru, rv = u.clone().requires_grad_(), v.clone().requires_grad_()
    expected = reference.compose(ru, rv, padding)
    eu, ev = torch.autograd.grad(expected, (ru, rv), grad)
    for deterministic in (False, True):
        ou, ov = u.clone().requires_grad_(), v.clone().requires_grad_()
        with poisoned_empty():
            out = compose(ou, ov, padding=padding, backend=gpu_backend,
                          deterministic=deterministic)
            gu, gv = torch.autograd.grad(out, (ou, ov), grad)
        assert out.device == u.device and out.dtype == dtype
        assert_close_verbose(out, expected, dtype)
        assert_close_verbose(gu, eu, dtype, name=f"d u (deterministic={deterministic})")
        assert_close_verbose(gv, ev, dtype, name=f"d v (deterministic={deterministic})")
        if deterministic:  # a second run agrees bitwise (fixed point; atomics would vary)
            again = torch.autograd.grad(
                compose(ou, ov, padding=padding, backend=gpu_backend, deterministic=True),
                (ou, ov), grad)
            assert torch.equal(again[0], gu) and torch.equal(again[1], gv)


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
def test_gpu_integrate_matches_reference(gpu_backend, ndim, padding, gen):
    shape = (2, ndim, *(24, 20, 16)[:ndim])
    v = randn(gen, *shape, device="cuda", scale=3.0)
    grad = randn(gen, *shape, device="cuda")
    ref = v.double().requires_grad_()
    expected = reference.integrate_velocity(ref, 7, padding)
    (expected_grad,) = torch.autograd.grad(expected, ref, grad.double())
    grads = {}
    for memory in MEMORY:
        x = v.clone().requires_grad_()
        with poisoned_empty():
            out = integrate_velocity(x, 7, memory=memory, padding=padding, backend=gpu_backend)
            (grads[memory],) = torch.autograd.grad(out, x, grad)
        assert_close_verbose(out, expected.float(), torch.float32, atol=1e-4)
        assert_close_verbose(grads[memory], expected_grad.float(), torch.float32, atol=1e-4)
    assert_close_verbose(grads["recompute"], grads["store"], torch.float32)


@pytest.mark.cuda
def test_gpu_integrate_deterministic_bitwise(gpu_backend, gen, deterministic_algorithms):
    v = randn(gen, 2, 3, 32, 32, 32, device="cuda", scale=4.0).requires_grad_()
    grad = randn(gen, 2, 3, 32, 32, 32, device="cuda")
    """Bitwise equal runs and memory modes (the fixed-point scatter; float atomics would
    vary), and the float64 reference's values."""
    runs = [torch.autograd.grad(integrate_velocity(v, 7, memory=memory, backend=gpu_backend),
                                v, grad)[0]
            for memory in ("store", "store", "recompute")]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    ref = v.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.integrate_velocity(ref, 7), ref, grad.double())
    assert_close_verbose(runs[0], expected, torch.float32, atol=1e-4)


@pytest.mark.cuda
def test_gpu_identities(gpu_backend):
    v = _smooth((1, 3, 16, 16, 16), 1.0, torch.float32).cuda()
    phi = integrate_velocity(v, 7, backend=gpu_backend)
    inv = integrate_velocity(-v, 7, backend=gpu_backend)
    assert float(_interior(compose(phi, inv, backend=gpu_backend), 3).abs().max()) < 0.05
    shift = torch.tensor([1.75, -2.5, 0.625], device="cuda").view(1, 3, 1, 1, 1)
    const = shift.expand(1, 3, 5, 6, 7).contiguous()
    assert_close_verbose(integrate_velocity(const, 7, backend=gpu_backend), const, torch.float32,
                         atol=1e-6, rtol=1e-6)
