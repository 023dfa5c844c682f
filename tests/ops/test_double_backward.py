"""Double (and third) backward of every operator on the kernel backends.

The first-order gradients are fused kernels (``mrus::<op>_backward`` custom ops); their own
derivatives go through the reference (mrus_kernels/_double.py). Checked here:

- second derivatives (d/d inputs and d/d grad_out of <first-order gradients, c>) of the
  cpu backend in float64 against the torch backend's autograd, and of the triton backend
  (float32, interpreted) against the torch backend in float64;
- ``torch.autograd.gradgradcheck`` (finite differences of the kernels' first-order
  gradients) on tiny float64 shapes for the cpu backend;
- a third derivative of ``warp``;
- a first backward without ``create_graph`` records nothing (no graph, nothing saved), and
  ``torch.compile`` still serves the first order.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import mrus_kernels as mk
from conftest import assert_close_verbose, backend_params, rand, randn

Case = Callable[[torch.Generator, torch.dtype], tuple[Callable, list[torch.Tensor]]]


def _warp(image_shape, ddf_shape, mode="linear", padding="zeros", scale=1.5) -> Case:
    def build(gen, dtype):
        image = rand(gen, *image_shape, dtype=dtype)
        ddf = randn(gen, *ddf_shape, dtype=dtype, scale=scale)
        return (lambda b, i, d: mk.warp(i, d, mode=mode, padding=padding, backend=b)), [image, ddf]

    return build


def _compose(shape_u, shape_v, padding="border") -> Case:
    def build(gen, dtype):
        u = randn(gen, *shape_u, dtype=dtype, scale=1.3)
        v = randn(gen, *shape_v, dtype=dtype, scale=1.3)
        return (lambda b, u, v: mk.compose(u, v, padding=padding, backend=b)), [u, v]

    return build


def _integrate(shape, memory, padding="border") -> Case:
    def build(gen, dtype):
        v = randn(gen, *shape, dtype=dtype, scale=2.0)
        return (lambda b, v: mk.integrate_velocity(
            v, 3, memory=memory, padding=padding, backend=b)), [v]

    return build


def _lncc(shape, window, masked) -> Case:
    def build(gen, dtype):
        f = rand(gen, *shape, dtype=dtype)
        m = rand(gen, *shape, dtype=dtype) + 0.3 * f
        mask = rand(gen, 1, 1, *shape[2:], dtype=dtype, lo=0.0, hi=1.0) if masked else None
        return (lambda b, f, m: mk.lncc(f, m, window=window, mask=mask, backend=b)), [f, m]

    return build


def _mi(fn, shape, kernel, masked, value_range=None) -> Case:
    def build(gen, dtype):
        f = rand(gen, *shape, dtype=dtype)
        m = rand(gen, *shape, dtype=dtype) + 0.5 * f * f
        mask = (rand(gen, shape[0], 1, *shape[2:], dtype=dtype, lo=0.0, hi=1.0) > 0.3) if masked \
            else None
        return (lambda b, f, m: fn(f, m, bins=6, kernel=kernel, mask=mask,
                                   value_range=value_range, backend=b)), [f, m]

    return build


def _joint_histogram(shape) -> Case:
    def build(gen, dtype):
        f, m = rand(gen, *shape, dtype=dtype), rand(gen, *shape, dtype=dtype)
        return (lambda b, f, m: mk.joint_histogram(f, m, bins=5, backend=b)), [f, m]

    return build


def _grad_l2(shape, spacing) -> Case:
    def build(gen, dtype):
        return (lambda b, u: mk.grad_l2(u, spacing=spacing, backend=b)), [
            randn(gen, *shape, dtype=dtype)
        ]

    return build


def _harmonic(shape, reduction) -> Case:
    def build(gen, dtype):
        return (lambda b, u: mk.harmonic_energy(u, reduction=reduction, backend=b)), [
            randn(gen, *shape, dtype=dtype)
        ]

    return build


def _jacobian(shape, spacing) -> Case:
    def build(gen, dtype):
        return (lambda b, u: mk.jacobian_det(u, spacing=spacing, backend=b)), [
            randn(gen, *shape, dtype=dtype, scale=0.4)
        ]

    return build


def _sobel(shape, output, padding) -> Case:
    def build(gen, dtype):
        return (lambda b, x: mk.sobel(x, output=output, padding=padding, backend=b)), [
            rand(gen, *shape, dtype=dtype)
        ]

    return build


def _sobel_l1(shape, reduction, padding="replicate") -> Case:
    def build(gen, dtype):
        f1, f0 = rand(gen, *shape, dtype=dtype), rand(gen, *shape, dtype=dtype)
        return (lambda b, f1, f0: mk.sobel_l1(f1, f0, padding=padding, reduction=reduction,
                                              backend=b)), [f1, f0]

    return build


# Odd shapes, batch broadcast where the operator has it, 2D and 3D, every mode of each op.
CASES: dict[str, Case] = {
    "warp_linear_zeros_2d": _warp((2, 2, 6, 7), (1, 2, 5, 6)),
    "warp_linear_border_3d": _warp((1, 2, 4, 5, 6), (2, 3, 4, 3, 5), padding="border"),
    "warp_nearest_2d": _warp((2, 1, 5, 6), (2, 2, 5, 6), mode="nearest"),
    "compose_2d": _compose((2, 2, 6, 5), (1, 2, 6, 5)),
    "compose_zeros_3d": _compose((1, 3, 4, 5, 3), (1, 3, 4, 5, 3), padding="zeros"),
    "integrate_store_2d": _integrate((2, 2, 5, 6), "store"),
    "integrate_recompute_3d": _integrate((1, 3, 4, 3, 5), "recompute", padding="zeros"),
    "lncc_2d": _lncc((2, 1, 7, 8), 3, masked=False),
    "lncc_mask_3d": _lncc((1, 1, 5, 6, 5), 3, masked=True),
    "mi_gaussian_2d": _mi(mk.mutual_information, (2, 1, 7, 9), "gaussian", masked=False),
    "mi_bspline_mask_3d": _mi(mk.mutual_information, (1, 1, 4, 5, 6), "bspline", masked=True),
    "nmi_gaussian_range_2d": _mi(mk.nmi, (1, 1, 8, 7), "gaussian", masked=False,
                                 value_range=(0.3, 2.5)),
    "joint_histogram_2d": _joint_histogram((1, 1, 5, 6)),
    "grad_l2_3d": _grad_l2((2, 3, 4, 5, 3), (1.0, 2.0, 0.5)),
    "grad_l2_2d": _grad_l2((1, 2, 6, 5), None),
    "harmonic_sum_3d": _harmonic((1, 3, 4, 5, 4), "sum"),
    "harmonic_none_2d": _harmonic((2, 2, 6, 5), "none"),
    "jacobian_2d": _jacobian((2, 2, 6, 5), None),
    "jacobian_3d": _jacobian((1, 3, 4, 5, 3), (1.0, 0.5, 2.0)),
    "sobel_magnitude_3d": _sobel((1, 2, 4, 5, 3), "magnitude", "replicate"),
    "sobel_components_2d": _sobel((2, 2, 6, 7), "components", "zeros"),
    "sobel_l1_mean_2d": _sobel_l1((2, 2, 6, 7), "mean"),
    "sobel_l1_none_3d": _sobel_l1((1, 2, 4, 5, 3), "none", padding="zeros"),
}

KERNEL_BACKENDS = backend_params(("cpu", "triton"))


def _seeded(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)))


def _second_derivatives(name: str, backend: str, dtype: torch.dtype,
                        *, create_graph: bool = False) -> list[torch.Tensor]:
    """d/d(inputs, grad_out) of Σ_k <first-order gradient k, c_k>, same random inputs,
    grad_out and c_k for every backend (drawn in float64, then cast)."""
    call, inputs = CASES[name](_seeded(name), torch.float64)
    xs = [x.to(dtype).requires_grad_() for x in inputs]
    out = call(backend, *xs)
    gen = _seeded(name + "/cotangents")
    go = randn(gen, max(1, out.numel()), dtype=dtype).reshape(out.shape).requires_grad_()
    cots = [randn(gen, *x.shape, dtype=dtype) for x in xs]
    firsts = torch.autograd.grad(out, xs, go, create_graph=True)
    s = sum((f * c).sum() for f, c in zip(firsts, cots, strict=True))
    seconds = torch.autograd.grad(s, [*xs, go], allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(seconds, [*xs, go],
                                                                     strict=True)]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_second_derivatives_cpu_float64_match_torch(name, backend, poison):
    """cpu float64 against the torch backend's own double backward, 1e-10."""
    expected = _second_derivatives(name, "torch", torch.float64)
    actual = _second_derivatives(name, backend, torch.float64)
    labels = [f"d/d input {k}" for k in range(len(actual) - 1)] + ["d/d grad_out"]
    assert any(bool(e.abs().max() > 0) for e in expected), "degenerate case: all zero"
    for a, e, label in zip(actual, expected, labels, strict=True):
        assert_close_verbose(a, e, name=f"{name} {label}")


# The Triton interpreter is slow: a subset covering every backward op.
TRITON_CASES = (
    "warp_linear_zeros_2d", "warp_linear_border_3d", "compose_2d", "integrate_store_2d",
    "lncc_2d", "mi_gaussian_2d", "mi_bspline_mask_3d", "grad_l2_3d", "harmonic_none_2d",
    "jacobian_3d", "sobel_magnitude_3d", "sobel_components_2d", "sobel_l1_mean_2d",
)


@pytest.mark.parametrize("name", TRITON_CASES)
@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_second_derivatives_triton_float32_match_torch(name, backend, poison):
    """triton float32 (interpreted) against the torch backend in float64."""
    expected = _second_derivatives(name, "torch", torch.float64)
    actual = _second_derivatives(name, backend, torch.float32)
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close_verbose(a, e, torch.float32, atol=2e-4, rtol=2e-4, name=f"{name} {k}")


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_second_derivatives_half_warp(backend):
    """float16 inputs: the reference runs in float32 and the gradients come back in float16."""
    expected = _second_derivatives("warp_linear_zeros_2d", "torch", torch.float64)
    actual = _second_derivatives("warp_linear_zeros_2d", backend, torch.float16)
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == torch.float16
        assert_close_verbose(a, e, torch.float16, atol=2e-2, rtol=2e-2, name=f"input {k}")


# Tiny float64 cases for gradgradcheck (finite differences of the kernels' own first-order
# gradients, so the reference's second derivatives are checked against the kernels). MI
# gets a fixed value_range: the per-item range is a detached function of the values, which
# finite differences would perturb.
GRADGRAD: dict[str, Case] = {
    "warp": _warp((1, 2, 4, 5), (1, 2, 3, 4)),
    "compose": _compose((1, 2, 4, 3), (1, 2, 4, 3)),
    "integrate": _integrate((1, 2, 4, 3), "store"),
    "lncc": _lncc((1, 1, 5, 4), 3, masked=True),
    "mi": _mi(mk.mutual_information, (1, 1, 4, 5), "gaussian", masked=False,
              value_range=(0.2, 2.4)),
    "nmi_bspline": _mi(mk.nmi, (1, 1, 4, 4), "bspline", masked=True,
                       value_range=((0.2, 1.7), (0.2, 2.9))),
    "grad_l2": _grad_l2((1, 2, 3, 4), (1.0, 0.5)),
    "harmonic": _harmonic((1, 1, 4, 5), "sum"),
    "jacobian": _jacobian((1, 2, 4, 3), None),
    "sobel": _sobel((1, 1, 4, 5), "magnitude", "replicate"),
    "sobel_components": _sobel((1, 1, 3, 4), "components", "zeros"),
    "sobel_l1": _sobel_l1((1, 1, 4, 3), "sum"),
}


@pytest.mark.parametrize("name", list(GRADGRAD))
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_gradgradcheck_cpu(name, backend):
    call, inputs = GRADGRAD[name](_seeded(name), torch.float64)
    xs = [x.requires_grad_() for x in inputs]
    assert torch.autograd.gradgradcheck(lambda *a: call(backend, *a), xs)


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
def test_third_derivative_warp(backend):
    """d/d ddf of the second derivative (create_graph at the second backward too)."""
    dtype = torch.float64 if backend == "cpu" else torch.float32

    def third(b, dt):
        call, (image, ddf) = CASES["warp_linear_zeros_2d"](_seeded("third"), torch.float64)
        image, ddf = image.to(dt).requires_grad_(), ddf.to(dt).requires_grad_()
        gen = _seeded("third/c")
        c1, c2 = randn(gen, *ddf.shape, dtype=dt), randn(gen, *ddf.shape, dtype=dt)
        (g,) = torch.autograd.grad(call(b, image, ddf).sum(), ddf, create_graph=True)
        h = torch.autograd.grad((g * c1).sum(), (image, ddf), create_graph=True)
        return torch.autograd.grad((h[0] ** 2).sum() + (h[1] * c2).sum(), (image, ddf))

    for a, e in zip(third(backend, dtype), third("torch", torch.float64), strict=True):
        assert_close_verbose(a, e, dtype, atol=1e-10 if dtype == torch.float64 else 2e-4)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_first_backward_records_nothing(name, backend):
    """Without create_graph the backward ops run outside autograd: the gradients have no
    graph (nothing saved for a second backward); with it they do."""
    call, inputs = CASES[name](_seeded(name), torch.float64)
    xs = [x.requires_grad_() for x in inputs]
    out = call(backend, *xs)
    grads = torch.autograd.grad(out, xs, torch.ones_like(out), retain_graph=True)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)
    # grad_out requiring grad too: the components' Sobel backward depends on nothing else.
    go = torch.ones_like(out, requires_grad=True)
    grads = torch.autograd.grad(out, xs, go, create_graph=True)
    assert all(g.requires_grad for g in grads)


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_integrate_double_backward_keeps_trace_unsaved(backend):
    """The stored trace ([steps, B, ndim, *S]) is the velocity's function, not a primal:
    the double-backward formula recomputes from v and does not keep the trace alive."""
    v = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    u = mk.integrate_velocity(v, 4, backend=backend)
    (g,) = torch.autograd.grad(u.square().sum(), v, create_graph=True)
    saved = [t for t in g.grad_fn.saved_tensors if t is not None]
    assert all(t.dim() == v.dim() for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_compose_same_tensor_twice(backend):
    """compose(u, u): one tensor as both primals gets the two partial derivatives."""
    u0 = randn(_seeded("same"), 1, 2, 5, 6, dtype=torch.float64, scale=1.2)
    c = randn(_seeded("same/c"), 1, 2, 5, 6, dtype=torch.float64)
    results = []
    for b in ("torch", backend):
        u = u0.clone().requires_grad_()
        (g,) = torch.autograd.grad(mk.compose(u, u, backend=b).sum(), u, create_graph=True)
        results.append(torch.autograd.grad((g * c).sum(), u)[0])
    assert_close_verbose(results[1], results[0])


# Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_torch_compile_first_order_unchanged(backend):
    """A compiled training step (warp, lncc, grad_l2) matches eager in value and gradient."""
    gen = _seeded("compile")
    image = rand(gen, 1, 1, 12, 11)
    ddf0 = randn(gen, 1, 2, 12, 11, scale=0.7)
    fixed = rand(gen, 1, 1, 12, 11)

    def step(ddf):
        moved = mk.warp(image, ddf, backend=backend)
        return -mk.lncc(fixed, moved, window=3, backend=backend).mean() + mk.grad_l2(
            ddf, backend=backend)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True)
        results = []
        for fn in (step, compiled):
            ddf = ddf0.clone().requires_grad_()
            loss = fn(ddf)
            loss.backward()
            results.append((loss.detach(), ddf.grad))
    finally:
        torch._dynamo.reset()
    assert_close_verbose(results[1][0], results[0][0], name="loss")
    assert_close_verbose(results[1][1], results[0][1], name="grad")
