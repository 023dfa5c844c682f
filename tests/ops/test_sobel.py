"""Tests of ``sobel`` and ``sobel_l1``: the kernel backends against the reference, every
backend (the torch one included) against ``scipy.ndimage.sobel`` per (batch, channel) slice
and against a NumPy float64 truth (dense 1D filter matrices and their transposes, checked
against SciPy), analytic identities, gradients (gradcheck in float64, kernels against the
reference's autograd), NaN propagation, the Triton launcher's 64-bit and grid paths, the
CUDA kernels' per-voxel math run on the host (with nvcc), determinism, the module,
``torch.compile`` and every validation message.

The torch backend is the reference itself: it is compared with SciPy / NumPy only, never
with ``mrus_kernels.reference``.

Conventions pinned here (DESIGN.md): component i = [-1, 0, 1] along spatial axis i times
[1, 2, 1] along the others, unnormalised; "replicate" = SciPy mode "nearest", "zeros" =
SciPy mode "constant"; each (batch, channel) volume on its own.
"""

from __future__ import annotations

import ast
import ctypes
import importlib
import inspect
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import (
    DTYPE_IDS,
    assert_close_verbose,
    autograd_grads,
    backend_params,
    backend_reason,
    bad_input_test,
    poisoned_empty,
    raises_before_dispatch,
    rand,
    randn,
    require_backend,
)
from mrus_kernels import SobelL1Loss, reference, sobel, sobel_l1

sobel_module = importlib.import_module("mrus_kernels.sobel")

PADDINGS = ("replicate", "zeros")
OUTPUTS = ("magnitude", "components")
REDUCTIONS = ("mean", "sum", "none")
SCIPY_MODE = {"replicate": "nearest", "zeros": "constant"}

BACKENDS = backend_params(("torch", "cpu", "triton"))
FAST_BACKENDS = backend_params(("torch", "cpu"))  # float64-capable, cheap: the sweeps
KERNEL_BACKENDS = backend_params(("cpu", "triton"))

# Odd sizes, batch > 1, channels > 1. The Triton interpreter is slow: it gets smaller
# volumes, still more than one 256-voxel program per volume (programs straddle rows and
# slices) and an interior away from every edge.
SHAPES = {2: (2, 3, 13, 11), 3: (2, 3, 7, 9, 11)}
TRITON_SHAPES = {2: (2, 2, 17, 19), 3: (1, 2, 5, 7, 9)}


def _sweep(combos: list[tuple], triton_combos: list[tuple]) -> list:
    """Every combination on torch and cpu; the interpreted Triton backend (slow) on a few
    representative ones."""
    params = []
    for p in FAST_BACKENDS:
        params += [pytest.param(*p.values, *c, marks=p.marks, id="-".join(map(str, (p.id, *c))))
                   for c in combos]
    for p in backend_params(("triton",)):
        params += [pytest.param(*p.values, *c, marks=p.marks, id="-".join(map(str, (p.id, *c))))
                   for c in triton_combos]
    return params


def _shape(backend: str, ndim: int) -> tuple[int, ...]:
    return (TRITON_SHAPES if backend == "triton" else SHAPES)[ndim]


def _dtype_for(backend: str) -> torch.dtype:
    """The most precise dtype the backend runs (float64 where it can)."""
    return torch.float64 if backend_reason(backend, "cpu", torch.float64) is None else torch.float32


def _scipy_components(x: torch.Tensor, padding: str) -> torch.Tensor:
    """scipy.ndimage.sobel per (batch, channel) volume and axis: [B, C, ndim, *S], float64."""
    a = x.detach().double().cpu().numpy()
    ndim = a.ndim - 2
    out = np.empty(a.shape[:2] + (ndim,) + a.shape[2:])
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            for i in range(ndim):
                out[b, c, i] = ndimage.sobel(a[b, c], axis=i, mode=SCIPY_MODE[padding], cval=0.0)
    return torch.from_numpy(out)


# NumPy float64 truth, independent of torch and of mrus_kernels: the Sobel as dense 1D
# filter matrices applied along each axis, the backward as their transposes.


def _np_pass(n: int, deriv: bool, padding: str) -> np.ndarray:
    """[n, n] matrix M of one 1D pass: (M a)[m] = sum_o k[o] a[m + o], k = [-1, 0, 1]
    (deriv) or [1, 2, 1], out-of-range a[j] read as a[clamp(j)] (replicate) or 0."""
    k = (-1.0, 0.0, 1.0) if deriv else (1.0, 2.0, 1.0)
    m = np.zeros((n, n))
    for row in range(n):
        for o, w in zip((-1, 0, 1), k):
            j = row + o
            if 0 <= j < n:
                m[row, j] += w
            elif padding == "replicate":
                m[row, min(max(j, 0), n - 1)] += w
    return m


def _np_apply(a: np.ndarray, i: int, padding: str, transpose: bool = False) -> np.ndarray:
    """Component i of the Sobel of every [*S] volume of a [B, C, *S] array (or its adjoint
    with transpose=True)."""
    for ax in range(a.ndim - 2):
        m = _np_pass(a.shape[2 + ax], ax == i, padding)
        a = np.moveaxis(np.tensordot(m.T if transpose else m, a, axes=(1, 2 + ax)), 0, 2 + ax)
    return a


def _np_components(x: torch.Tensor, padding: str) -> np.ndarray:
    a = x.detach().double().cpu().numpy()
    return np.stack([_np_apply(a, i, padding) for i in range(a.ndim - 2)], 2)


def _np_l1(f1: torch.Tensor, f0: torch.Tensor, padding: str, eps: float, reduction: str,
           grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d f1, d f0) of the L1 boundary loss in float64 NumPy, for upstream grad_out
    (the loss's shape)."""
    g1, g0 = _np_components(f1, padding), _np_components(f0, padding)
    m1 = np.sqrt((g1 * g1).sum(2) + eps)
    m0 = np.sqrt((g0 * g0).sum(2) + eps)
    d = np.abs(m1 - m0)
    up = grad_out.detach().double().cpu().numpy()
    if reduction == "none":
        loss = d
    elif reduction == "sum":
        loss = d.sum()
    else:
        loss, up = d.mean(), up / d.size
    w = np.sign(m1 - m0) * up
    grads = []
    for g, m, s in ((g1, m1, 1.0), (g0, m0, -1.0)):
        h = s * w[:, :, None] * g / m[:, :, None]
        grads.append(sum(_np_apply(h[:, :, i], i, padding, transpose=True)
                         for i in range(h.shape[2])))
    return tuple(torch.from_numpy(np.asarray(t)) for t in (loss, *grads))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 2, 4, 1, 5), (1, 1, 3, 4, 6)])
def test_numpy_truth_matches_scipy(shape, padding, gen):
    """The NumPy truth: its components are scipy.ndimage.sobel's, and its transpose is the
    adjoint (<S_i x, y> = <x, S_i^T y>)."""
    x = randn(gen, *shape, dtype=torch.float64)
    y = np.random.default_rng(0).standard_normal(shape)
    comps = _np_components(x, padding)
    assert np.abs(comps - _scipy_components(x, padding).numpy()).max() <= 1e-12
    for i in range(len(shape) - 2):
        lhs = (comps[:, :, i] * y).sum()
        rhs = (x.numpy() * _np_apply(y, i, padding, transpose=True)).sum()
        assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


# =========================================================================== sobel forward


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sobel_matches_reference(backend, ndim, output, padding, gen, poison):
    dtype = _dtype_for(backend)
    x = rand(gen, *_shape(backend, ndim), dtype=dtype)
    out = sobel(x, output=output, padding=padding, backend=backend)
    expected = reference.sobel(x, output, padding)
    assert out.dtype == dtype
    assert_close_verbose(out, expected, dtype, name=f"sobel {output}")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sobel_matches_scipy(backend, ndim, padding, gen):
    """Every component equals scipy.ndimage.sobel of each (batch, channel) volume."""
    dtype = _dtype_for(backend)
    x = randn(gen, *_shape(backend, ndim), dtype=dtype)
    comps = sobel(x, output="components", padding=padding, backend=backend)
    expected = _scipy_components(x, padding)
    assert comps.shape == expected.shape
    assert_close_verbose(comps, expected.to(dtype), dtype, name="components vs scipy")
    mag = sobel(x, padding=padding, eps=1e-6, backend=backend)
    assert_close_verbose(mag, (expected.pow(2).sum(2) + 1e-6).sqrt().to(dtype), dtype,
                         name="magnitude vs scipy")


def test_scipy_on_the_whole_array_mixes_batch_and_channels(gen):
    """Why the comparison is per slice: scipy on [B, C, *S] also smooths across B and C."""
    x = randn(gen, 2, 3, 5, 6, dtype=torch.float64)
    whole = ndimage.sobel(x.numpy(), axis=2, mode="nearest")
    ours = sobel(x, output="components", backend="torch")[:, :, 0]
    assert (torch.from_numpy(whole) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sobel_of_a_ramp_is_constant_inside(backend, ndim, padding):
    """x = sum_i a_i * index_i: component i = 2 a_i 4**(ndim - 1) at every interior voxel."""
    dtype = _dtype_for(backend)
    shape = _shape(backend, ndim)
    slopes = (0.5, -1.25, 2.0)[:ndim]
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape[2:]],
                          indexing="ij")
    ramp = sum(a * ax for a, ax in zip(slopes, axes))
    x = ramp.expand(shape).to(dtype).contiguous()
    comps = sobel(x, output="components", padding=padding, backend=backend)
    inner = (slice(None),) * 3 + (slice(1, -1),) * ndim
    for i, a in enumerate(slopes):
        got = comps[:, :, i][inner[:2] + inner[3:]]
        assert got.numel() > 0
        expected = torch.full_like(got, 2 * a * 4 ** (ndim - 1))
        assert_close_verbose(got, expected, dtype, name=f"component {i}")


@pytest.mark.parametrize(("backend", "dtype"), [
    *[pytest.param(*p.values, d, marks=p.marks, id=f"{p.id}-{DTYPE_IDS[d]}")
      for p in backend_params(("cpu",)) for d in (torch.float16, torch.bfloat16)],
    *[pytest.param(*p.values, torch.bfloat16, marks=p.marks, id=f"{p.id}-bf16")
      for p in backend_params(("triton",))],
])
def test_half_types_accumulate_in_float32(backend, dtype, gen):
    ndim = 2 if backend == "triton" else 3  # the interpreter is slow
    x = rand(gen, *_shape(backend, ndim), dtype=dtype)
    y = rand(gen, *_shape(backend, ndim), dtype=dtype)
    for output in OUTPUTS:
        out = sobel(x, output=output, backend=backend)
        assert out.dtype == dtype
        assert_close_verbose(out, reference.sobel(x.double(), output).to(dtype), dtype)
    f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = sobel_l1(f1, f0, backend=backend)
    assert loss.dtype == dtype
    r1, r0 = x.double().requires_grad_(), y.double().requires_grad_()
    expected = reference.sobel_l1(r1, r0)
    assert_close_verbose(loss, expected.to(dtype), dtype)
    g = autograd_grads(loss, (f1, f0), None)
    e = autograd_grads(expected, (r1, r0), None)
    for name, a, b in zip(("f1", "f0"), g, e):
        assert a.dtype == dtype
        assert_close_verbose(a, b.to(dtype), dtype, name=f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    base = rand(gen, 3, 2, 9, 7, 11, dtype=torch.float64)
    x = base.transpose(2, 4)[::2]  # [2, 2, 11, 7, 9], non-contiguous
    y = rand(gen, *x.shape, dtype=torch.float64).transpose(3, 4).contiguous().transpose(3, 4)
    assert not x.is_contiguous() and not y.is_contiguous()
    out = sobel(x, output="components", backend=backend)
    assert_close_verbose(out, _scipy_components(x, "replicate"), torch.float64)
    loss = sobel_l1(x, y, backend=backend)
    expected, _, _ = _np_l1(x, y, "replicate", 1e-6, "mean", torch.ones(()))
    assert_close_verbose(loss, expected, torch.float64)


@pytest.mark.parametrize("shape", [(1, 1, 1, 5, 6), (1, 2, 4, 1, 3), (2, 1, 3, 4, 1),
                                   (1, 1, 1, 1), (1, 1, 5, 1), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("padding", PADDINGS)
def test_size_one_axes(shape, padding, gen):
    """A size-1 axis: replicate reads the voxel itself on both sides (derivative 0)."""
    require_backend("cpu", "cpu", torch.float64)
    x = rand(gen, *shape, dtype=torch.float64)
    y = rand(gen, *shape, dtype=torch.float64)
    assert_close_verbose(sobel(x, output="components", padding=padding, backend="cpu"),
                         _scipy_components(x, padding), torch.float64)
    f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
    r1, r0 = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = sobel_l1(f1, f0, padding=padding, reduction="sum", backend="cpu")
    expected = reference.sobel_l1(r1, r0, padding, 1e-6, "sum")
    assert_close_verbose(loss, expected, torch.float64)
    for a, b in zip(autograd_grads(loss, (f1, f0), None), autograd_grads(expected, (r1, r0), None)):
        assert_close_verbose(a, b, torch.float64)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_propagates_as_in_the_reference(backend, gen):
    """A NaN voxel makes its 26 neighbours NaN (the centre tap is 0 in every component, so
    the voxel itself stays finite, as in the reference); other channels stay finite."""
    x = rand(gen, 1, 2, 5, 6, 7)
    x[0, 1, 2, 3, 3] = float("nan")
    for output in OUTPUTS:
        out = sobel(x, output=output, backend=backend)
        expected = reference.sobel(x, output)
        nan = expected.isnan().any(2) if output == "components" else expected.isnan()
        assert int(nan.sum()) == 26 and not bool(nan[0, 0].any())
        assert_close_verbose(out, expected, torch.float32, name=output)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_at_an_edge_reaches_what_the_reference_says(backend, ndim, padding, gen):
    """A NaN in a corner, and in a volume whose last axis has size 1, reaches exactly the
    outputs it reaches in the reference: under zero padding the derivative's missing
    neighbour is 0 and its centre weight is 0, so 0 * NaN must not put a NaN in the
    derivative along the edge's axis (the CPU passes multiplied both by 0 once)."""
    base = _shape(backend, ndim)
    for shape in (base, (*base[:-1], 1)):
        x = rand(gen, *shape)
        x[(0, 1, *(0,) * ndim)] = float("nan")
        for output in OUTPUTS:
            out = sobel(x, output=output, padding=padding, backend=backend)
            expected = reference.sobel(x.double(), output, padding)
            nan = expected.isnan()
            assert 0 < int(nan.sum()) < nan.numel(), (shape, output)
            assert torch.equal(out.isnan(), nan), (
                f"{shape} {output}: NaN at {int(out.isnan().sum())} outputs, the reference at "
                f"{int(nan.sum())}"
            )
            assert_close_verbose(out[~nan], expected[~nan].float(), torch.float32, name=output)


# =========================================================================== sobel backward


@pytest.mark.parametrize(("backend", "ndim", "output", "padding"), [
    p for p in _sweep(
        [(n, o, pad) for n in (2, 3) for o in OUTPUTS for pad in PADDINGS],
        [(3, "magnitude", "replicate"), (2, "magnitude", "zeros"), (3, "components", "zeros"),
         (2, "components", "replicate")],
    ) if not p.id.startswith("torch")
])
def test_sobel_backward_matches_reference(backend, ndim, output, padding, gen):
    dtype = _dtype_for(backend)
    x = rand(gen, *_shape(backend, ndim), dtype=dtype)
    ref_x, ker_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = reference.sobel(ref_x, output, padding)
    grad_out = randn(gen, *expected.shape, dtype=dtype)
    (e,) = autograd_grads(expected, (ref_x,), grad_out)
    with poisoned_empty():
        out = sobel(ker_x, output=output, padding=padding, backend=backend)
        (g,) = autograd_grads(out, (ker_x,), grad_out)
    assert_close_verbose(g, e, dtype, name=f"d x ({output})")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_sobel_gradcheck(backend, ndim, output, padding, gen):
    x = rand(gen, *((1, 2, 3, 3, 4) if ndim == 3 else (2, 2, 4, 5)), dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: sobel(t, output=output, padding=padding, backend=backend), (x,)
    )


def _nan_case(backend: str, ndim: int, where: str, gen: torch.Generator) -> tuple:
    """x and where to put one NaN: an interior voxel, or a corner, where "replicate" folds
    the clamped reads."""
    shape = _shape(backend, ndim)
    spot = (0, 1, *(n // 2 for n in shape[2:])) if where == "interior" else (0, 1, *(0,) * ndim)
    return rand(gen, *shape), spot


def _nan_gradients(x, spot, ndim, padding, backend, gen):
    """(output, kernel gradient, float64 reference gradient) per output mode, with one NaN at
    `spot`: in x for magnitude and L1, in the upstream gradient for components."""
    nan_x = x.clone()
    nan_x[spot] = float("nan")
    cases = []
    for output in OUTPUTS:
        src = x if output == "components" else nan_x
        ref_x, ker_x = src.double().requires_grad_(), src.clone().requires_grad_()
        expected = reference.sobel(ref_x, output, padding)
        grad_out = randn(gen, *expected.shape)
        if output == "components":
            grad_out[(*spot[:2], ndim - 1, *spot[2:])] = float("nan")
        out = sobel(ker_x, output=output, padding=padding, backend=backend)
        (got,) = autograd_grads(out, (ker_x,), grad_out)
        (want,) = autograd_grads(expected, (ref_x,), grad_out.double())
        cases.append((output, got, want))
    return cases


def _assert_same_nan_reach(name, got, want):
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), (
        f"{name}: NaN at {int(got.isnan().sum())} gradient elements, the reference at "
        f"{int(nan.sum())}"
    )
    assert_close_verbose(got[~nan], want[~nan].float(), torch.float32, name=name)


@pytest.mark.parametrize(("backend", "ndim", "padding", "where"), [
    pytest.param(*p.values, n, pad, w, id=f"{p.id}-{n}-{pad}-{w}", marks=p.marks)
    for p in KERNEL_BACKENDS for n in (2, 3) for pad in PADDINGS for w in ("interior", "edge")
])
def test_backward_nan_reaches_what_the_reference_says(backend, ndim, padding, where, gen):
    """A NaN reaches exactly the gradient elements it reaches in the reference's autograd:
    terms whose adjoint weight is 0 (the derivative's centre) are not read, so NaN * 0 does
    not spread it further; the other elements match the reference. (The L1 loss is left out:
    torch's abs backward takes sign(NaN) as 0 or NaN depending on the torch version.)"""
    x, spot = _nan_case(backend, ndim, where, gen)
    for name, got, want in _nan_gradients(x, spot, ndim, padding, backend, gen):
        assert 0 < int(want.isnan().sum()) < want.numel(), name  # the case tests something
        _assert_same_nan_reach(name, got, want)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
def test_backward_nan_on_a_size_one_axis(ndim, padding, gen):
    """On a size-1 axis the derivative is x - x under "replicate" (NaN for NaN, in the
    reference's autograd too) and 0 - 0 under zero padding (no read at all): the CPU
    backward reads x exactly where the reference does. (The Triton and CUDA gathers skip
    every term of weight 0, so they give 0 where "replicate" gives NaN here.)"""
    require_backend("cpu", "cpu", torch.float32)
    shape = (*SHAPES[ndim][:-1], 1)
    spot = (0, 1, *(0,) * ndim)
    x = rand(gen, *shape)
    for name, got, want in _nan_gradients(x, spot, ndim, padding, "cpu", gen):
        _assert_same_nan_reach(name, got, want)


# =========================================================================== large intensities

# Every backend in float32 (the cpu and torch backends also in float64 below): a constant
# image has no edges at any magnitude. A kernel that sums the 26 weighted inputs in one
# running sum rounds at the scale of the inputs (|g| ~ 1e9 at 1e15, ~1e24 at 1e30); one that
# forms each derivative pair x(+1) - x(-1) first gives exactly 0.
LARGE = (1e15, 1e30, -1e30)
LARGE_SHAPES = {2: (1, 2, 7, 6), 3: (1, 2, 7, 6, 5)}


def _interior(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """The voxels at least one voxel away from every edge (the last ndim axes)."""
    return t[(..., *[slice(1, -1)] * ndim)]


@pytest.mark.parametrize("value", LARGE)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_image_has_no_edges(backend, ndim, value, poison):
    """A constant image at 1e15 / ±1e30: components exactly 0 ("replicate" everywhere,
    "zeros" inside), magnitude sqrt(eps), its gradient 0; the components' gradient for a
    constant upstream exactly 0 inside and the float64 truth at the edges; sobel_l1 of two
    constant images exactly 0 with zero gradients."""
    shape = LARGE_SHAPES[ndim]
    x = torch.full(shape, value)
    for padding in PADDINGS:
        g = sobel(x, output="components", padding=padding, backend=backend)
        got = g if padding == "replicate" else _interior(g, ndim)
        assert got.abs().max().item() == 0.0, (padding, got.abs().max().item())
    xg = x.clone().requires_grad_()
    m = sobel(xg, backend=backend)
    assert torch.equal(m, torch.full_like(m, torch.tensor(1e-6).sqrt().item()))
    m.sum().backward()
    assert xg.grad.abs().max().item() == 0.0
    # Components backward: the adjoint filter of a constant upstream gradient.
    up = torch.full((*shape[:2], ndim, *shape[2:]), value / 1e2)
    xg = x.clone().requires_grad_()
    (grad,) = autograd_grads(sobel(xg, output="components", backend=backend), (xg,), up)
    truth = sum(_np_apply(up[:, :, i].double().numpy(), i, "replicate", transpose=True)
                for i in range(ndim))
    assert _interior(grad, ndim).abs().max().item() == 0.0
    err = (grad.double() - torch.from_numpy(truth)).abs().max().item()
    assert err <= 1e-6 * abs(truth).max(), err
    f1, f0 = x.clone().requires_grad_(), torch.full(shape, -value / 3).requires_grad_()
    for reduction in REDUCTIONS:
        loss = sobel_l1(f1, f0, reduction=reduction, backend=backend)
        assert loss.abs().max().item() == 0.0, (reduction, loss.abs().max().item())
        g1, g0 = torch.autograd.grad(loss.sum(), (f1, f0))
        assert g1.abs().max().item() == 0.0 and g0.abs().max().item() == 0.0


# float32(1e15) = 999999986991104 (24 significant bits) and its float32 spacing there.
OFFSET, STEP = float(np.float32(1e15)), 2.0**26


def _offset_ramp(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, list]:
    """OFFSET + STEP (i + 2 j [+ 3 k] + c) per volume (c: the channel), and the slope of
    each axis. Every value is a float32 of one binade, so every difference of two of them is
    exact, and so is every [1, 2, 1]-weighted sum of differences: a Sobel that forms the
    differences first gets exactly 32 * slope (3D) / 8 * slope (2D) inside, one that sums
    the weighted inputs rounds at 16 * OFFSET (spacing 2**30 > STEP)."""
    ndim = len(shape) - 2
    slopes = [STEP * (i + 1) for i in range(ndim)]
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape[2:]],
                           indexing="ij")
    ramp = sum(s * g for s, g in zip(slopes, grids))
    chan = torch.arange(shape[1], dtype=torch.float64).view(1, -1, *[1] * ndim) * STEP
    x = OFFSET + ramp + chan + torch.zeros(shape, dtype=torch.float64)
    assert torch.equal(x.float().double(), x)
    return x.to(dtype), slopes


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_plus_ramp_is_exact(backend, ndim, poison):
    """A ramp on an offset of ~1e15 (_offset_ramp), in the backend's most precise dtype
    (float64 on torch/cpu, float32 on triton): the components are the float64 truth,
    exactly inside (the known slope times the weights' sum), and the components' gradient
    for the same ramp as upstream is the truth (exactly two voxels away from the edges,
    to 1e-6 of its largest value everywhere)."""
    dtype = _dtype_for(backend)
    x, slopes = _offset_ramp(LARGE_SHAPES[ndim], dtype)
    weight = 32.0 if ndim == 3 else 8.0
    for padding in PADDINGS:
        g = sobel(x, output="components", padding=padding, backend=backend)
        truth = torch.from_numpy(_np_components(x, padding))
        for i, s in enumerate(slopes):
            inside = _interior(g[:, :, i], ndim).double()
            assert torch.equal(inside, torch.full_like(inside, weight * s)), (padding, i)
        err = (g.double() - truth).abs().max().item()
        assert err <= 1e-6 * truth.abs().max().item(), (padding, err)
    # The adjoint of an upstream gradient that is itself a large offset plus a ramp.
    up = torch.stack([x] * ndim, 2)
    xg = x.clone().requires_grad_()
    (grad,) = autograd_grads(sobel(xg, output="components", backend=backend), (xg,), up)
    truth = torch.from_numpy(sum(_np_apply(up[:, :, i].double().numpy(), i, "replicate",
                                           transpose=True) for i in range(ndim)))
    # At the edges the components' shares are ~3e16 and cancel: a float32 rounding of
    # each (~2**31) is the error to expect there, not one relative to their sum.
    err = (grad.double() - truth).abs().max().item()
    assert err <= 1e-6 * truth.abs().max().item(), err
    inner = [slice(None), slice(None)] + [slice(2, -2)] * ndim
    assert torch.equal(grad.double()[tuple(inner)], truth[tuple(inner)])


# =========================================================================== Triton launcher


def _triton_modules():
    require_backend("triton", "cpu", torch.float32)
    return (importlib.import_module("mrus_kernels.triton.sobel"),
            importlib.import_module("mrus_kernels.triton._common"))


def test_triton_launcher_has_no_assert():
    """Checks in the launcher are real errors: `assert` disappears under python -O."""
    module, _ = _triton_modules()
    asserts = [n.lineno for n in ast.walk(ast.parse(inspect.getsource(module)))
               if isinstance(n, ast.Assert)]
    assert asserts == [], f"assert statements at lines {asserts} of {module.__file__}"


@pytest.mark.parametrize(("ndim", "padding"), [(2, "zeros"), (3, "replicate")])
def test_triton_idx64_variants_match_reference(ndim, padding, monkeypatch, gen, poison):
    """With _common.IDX64_THRESHOLD lowered, every kernel runs its 64-bit-offset variant (the
    threshold is read at call time) and still matches the reference: forward and backward of
    every mode (components, magnitude, L1 unreduced and reduced)."""
    _, common = _triton_modules()
    monkeypatch.setattr(common, "IDX64_THRESHOLD", 16)
    asked = []
    real = common.needs_idx64
    monkeypatch.setattr(common, "needs_idx64", lambda *r: asked.append(real(*r)) or asked[-1])
    shape = TRITON_SHAPES[ndim]
    x, y = rand(gen, *shape), rand(gen, *shape)
    for output in OUTPUTS:
        ker_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
        out = sobel(ker_x, output=output, padding=padding, backend="triton")
        expected = reference.sobel(ref_x, output, padding)
        assert_close_verbose(out, expected, torch.float32, name=output)
        grad_out = randn(gen, *expected.shape)
        (g,) = autograd_grads(out, (ker_x,), grad_out)
        (e,) = autograd_grads(expected, (ref_x,), grad_out.double())
        assert_close_verbose(g, e, torch.float32, name=f"d x ({output})")
    for reduction in ("none", "mean"):
        f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
        r1, r0 = x.double().requires_grad_(), y.double().requires_grad_()
        loss = sobel_l1(f1, f0, padding=padding, reduction=reduction, backend="triton")
        expected = reference.sobel_l1(r1, r0, padding, 1e-6, reduction)
        assert_close_verbose(loss, expected, torch.float32, name=f"l1 {reduction}")
        grad_out = randn(gen, *expected.shape, 1)[..., 0]
        for name, a, b in zip(("f1", "f0"), autograd_grads(loss, (f1, f0), grad_out),
                              autograd_grads(expected, (r1, r0), grad_out.double())):
            assert_close_verbose(a, b, torch.float32, name=f"l1 {reduction} d {name}")
    # 2 forwards + 2 backwards (sobel), 2 forwards + 2 backwards (L1), all 64-bit.
    assert len(asked) == 8 and all(asked)


def test_triton_grid_limits(monkeypatch, gen):
    """The batch is on grid axis 0: more volumes than CUDA's axis-1 limit still run; a grid
    beyond axis 0's limit raises ValueError naming what it counts (never an assert)."""
    module, common = _triton_modules()
    monkeypatch.setattr(common, "MAX_GRID_YZ", 1)
    x = rand(gen, 3, 2, 4, 5, 3).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    out = sobel(x, backend="triton")
    expected = reference.sobel(ref_x)
    assert_close_verbose(out, expected, torch.float32)
    grad_out = randn(gen, *out.shape)
    (g,) = autograd_grads(out, (x,), grad_out)
    (e,) = autograd_grads(expected, (ref_x,), grad_out.double())
    assert_close_verbose(g, e, torch.float32)
    monkeypatch.setattr(common, "MAX_GRID_X", 5)  # 3 * 2 volumes, one program each
    with pytest.raises(ValueError, match=r"sobel \(triton\): B \* C \* ceil\(voxels / 256\) "
                       r"needs 6 programs on grid axis 0, at most 5"):
        sobel(x, backend="triton")
    with pytest.raises(ValueError, match=r"needs 6 programs on grid axis 0"):
        module.sobel_backward(torch.ones(3, 2, 4, 5, 3), x.detach(), None,
                              torch.empty(3, 2, 4, 5, 3), None, mode=module.MAGNITUDE,
                              padding=module.BORDER, eps=1e-6, reduction=module.NONE)


# =========================================================================== sobel_l1


@pytest.mark.parametrize(("backend", "ndim", "padding", "reduction"), _sweep(
    [(n, pad, r) for n in (2, 3) for pad in PADDINGS for r in REDUCTIONS],
    [(3, "replicate", "mean"), (2, "zeros", "none"), (2, "replicate", "sum")],
))
def test_l1_equals_unfused_composition(backend, ndim, padding, reduction, gen):
    """sobel_l1 = reduce(|m(f1) - m(f0)|) and its gradients for both inputs, against the
    NumPy float64 truth (SciPy-checked filter matrices; the backward by their transposes)."""
    dtype = _dtype_for(backend)
    shape = _shape(backend, ndim)
    x, y = rand(gen, *shape, dtype=dtype), rand(gen, *shape, dtype=dtype)
    f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
    with poisoned_empty():
        loss = sobel_l1(f1, f0, padding=padding, reduction=reduction, backend=backend)
    out_shape = shape if reduction == "none" else ()
    grad_out = randn(gen, *out_shape, 1, dtype=dtype)[..., 0]  # [] for the scalars
    expected, e1, e0 = _np_l1(x, y, padding, 1e-6, reduction, grad_out)
    assert loss.shape == expected.shape and loss.dtype == dtype
    assert_close_verbose(loss, expected, dtype, name="loss")
    with poisoned_empty():
        g = autograd_grads(loss, (f1, f0), grad_out)
    for name, a, b in zip(("f1", "f0"), g, (e1, e0)):
        assert_close_verbose(a, b, dtype, name=f"grad {name}")


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_l1_gradcheck(backend, ndim, padding, reduction, gen):
    shape = (1, 2, 3, 3, 4) if ndim == 3 else (2, 1, 4, 5)
    f1 = rand(gen, *shape, dtype=torch.float64).requires_grad_()
    f0 = rand(gen, *shape, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: sobel_l1(a, b, padding=padding, reduction=reduction, backend=backend),
        (f1, f0),
    )


@pytest.mark.parametrize(("backend", "which"), [
    *[pytest.param(*p.values, "f1", marks=p.marks, id=f"{p.id}-f1") for p in KERNEL_BACKENDS],
    *[pytest.param(*p.values, w, marks=p.marks, id=f"{p.id}-{w}")
      for p in backend_params(("cpu",)) for w in ("f0", "both")],
])
def test_l1_gradients_only_for_inputs_that_need_them(backend, which, gen):
    shape = _shape(backend, 2)
    x, y = rand(gen, *shape), rand(gen, *shape)
    full1, full0 = x.clone().requires_grad_(), y.clone().requires_grad_()
    full = autograd_grads(sobel_l1(full1, full0, backend=backend), (full1, full0), None)
    f1, f0 = x.clone().requires_grad_(which != "f0"), y.clone().requires_grad_(which != "f1")
    calls = []
    real = sobel_module.launch_backward

    def spy(*args, **kwargs):
        calls.append(args[-2:])  # (need_x, need_x0)
        return real(*args, **kwargs)

    with mock.patch.object(sobel_module, "launch_backward", side_effect=spy):
        sobel_l1(f1, f0, backend=backend).backward()
    assert calls == [(f1.requires_grad, f0.requires_grad)]
    for t, ref in ((f1, full[0]), (f0, full[1])):
        assert (t.grad is not None) == t.requires_grad
        if t.requires_grad:
            assert torch.equal(t.grad, ref)


def test_l1_is_deterministic_across_thread_counts(gen):
    """Per-slice partial sums added in a fixed order: bitwise the same with 1 or 2 threads."""
    require_backend("cpu", "cpu", torch.float32)
    x, y = rand(gen, 2, 4, 17, 9, 10), rand(gen, 2, 4, 17, 9, 10)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
            loss = sobel_l1(f1, f0, backend="cpu")
            loss.backward()
            results.append((loss.detach(), f1.grad, f0.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_l1_of_identical_inputs_is_zero_with_zero_gradient(gen):
    require_backend("cpu", "cpu", torch.float32)
    x = rand(gen, 1, 3, 5, 6, 7)
    f1, f0 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = sobel_l1(f1, f0, backend="cpu")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(f1.grad, torch.zeros_like(x)) and torch.equal(f0.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_module(backend, gen):
    x, y = rand(gen, 1, 4, 5, 6, 7), rand(gen, 1, 4, 5, 6, 7)
    loss_fn = SobelL1Loss(padding="zeros", reduction="sum", backend=backend)
    assert "padding='zeros'" in repr(loss_fn) and "reduction='sum'" in repr(loss_fn)
    one = torch.ones(())
    assert_close_verbose(loss_fn(x, y), _np_l1(x, y, "zeros", 1e-6, "sum", one)[0],
                         torch.float32)
    assert_close_verbose(SobelL1Loss(backend=backend)(x, y),
                         _np_l1(x, y, "replicate", 1e-6, "mean", one)[0], torch.float32)


# =========================================================================== torch.compile


# Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(gen):
    """sobel and sobel_l1 under torch.compile(fullgraph=True): no graph break; forward and
    backward as in eager mode."""
    require_backend("cpu", "cpu", torch.float32)
    x, y = rand(gen, 2, 3, 5, 6, 7), rand(gen, 2, 3, 5, 6, 7)

    def loss(f1, f0):
        edges = sobel(f1, output="components", backend="cpu")
        total = sobel_l1(f1, f0, backend="cpu") + (edges * edges).mean()
        return edges, total + sobel(f0, backend="cpu").mean()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True)
        results = []
        for fn in (loss, compiled):
            a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
            edges, total = fn(a, b)
            total.backward()
            results.append((edges.detach(), total.detach(), a.grad, b.grad))
    finally:
        torch._dynamo.reset()
    for name, eager, comp in zip(("edges", "loss", "d f1", "d f0"), *results):
        assert_close_verbose(comp, eager, torch.float32, name=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic(backend, gen):
    """sobel and sobel_l1 under torch.compile(fullgraph=True, dynamic=True): two input sizes
    in a row, two values of eps each, values and gradients as in eager mode."""

    def fn(f1, f0, eps):
        edges = sobel(f1, output="components", backend=backend)
        mag = sobel(f0, eps=eps, backend=backend)
        loss = sobel_l1(f1, f0, eps=eps, backend=backend) + (edges * edges).mean()
        return edges, mag, loss + mag.mean()

    torch._dynamo.reset()
    try:
        # Inductor for the kernel backends; aot_eager (the same dynamo and AOTAutograd
        # tracing, no C++ code generation) for the torch backend's many ops, to keep
        # the test short.
        compiler = "aot_eager" if backend == "torch" else "inductor"
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=compiler)
        for shape in ((2, 2, 4, 5, 3), (3, 2, 5, 3, 4)):
            x, y = rand(gen, *shape), rand(gen, *shape)
            for eps in (1e-6, 1e-3):
                results = []
                for f in (fn, compiled):
                    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
                    edges, mag, total = f(a, b, eps)
                    results.append((edges.detach(), mag.detach(), total.detach(),
                                    *torch.autograd.grad(total, (a, b))))
                for name, eager, comp in zip(("edges", "magnitude", "loss", "d f1", "d f0"),
                                             *results):
                    assert_close_verbose(comp, eager, torch.float32,
                                         name=f"{shape} {eps} {name}")
    finally:
        torch._dynamo.reset()


# =========================================================================== bad input

X2 = torch.ones(1, 2, 4, 5)
X3 = torch.ones(1, 2, 3, 4, 5)

BAD_INPUTS = {
    "x-not-tensor": (lambda: sobel([[1.0]]), TypeError,
                     r"sobel: x must be a torch\.Tensor, got list"),
    "x-int": (lambda: sobel(X2.long()), TypeError,
              r"sobel: x must be a floating-point tensor .*got torch\.int64"),
    "x-bool": (lambda: sobel(X2.bool()), TypeError, r"sobel: x .*got torch\.bool"),
    "x-rank-3": (lambda: sobel(torch.ones(2, 4, 5)), ValueError,
                 (r"sobel: x must be \[B, C, H, W\] \(2D\) or \[B, C, D, H, W\] \(3D\), got "
                  r"shape \(2, 4, 5\)")),
    "x-rank-6": (lambda: sobel(torch.ones(1, 1, 2, 3, 4, 5)), ValueError,
                 r"sobel: x must be .*got shape \(1, 1, 2, 3, 4, 5\)"),
    "x-empty": (lambda: sobel(torch.ones(1, 0, 4, 5)), ValueError,
                r"sobel: x must not be empty, got shape \(1, 0, 4, 5\)"),
    "output": (lambda: sobel(X2, output="gradient"), ValueError,
               r"sobel: output must be 'magnitude' or 'components', got 'gradient'"),
    "output-none": (lambda: sobel(X2, output=None), ValueError,
                    r"sobel: output must be .*got None"),
    "padding": (lambda: sobel(X3, padding="reflect"), ValueError,
                r"sobel: padding must be 'replicate' or 'zeros', got 'reflect'"),
    "padding-border": (lambda: sobel(X3, padding="border"), ValueError,
                       r"sobel: padding must be 'replicate' or 'zeros', got 'border'"),
    "eps-str": (lambda: sobel(X2, eps="1e-6"), TypeError,
                r"sobel: eps must be a float, got str '1e-6'"),
    "eps-bool": (lambda: sobel(X2, eps=True), TypeError, r"sobel: eps must be a float, got bool"),
    "eps-zero": (lambda: sobel(X2, eps=0.0), ValueError,
                 r"sobel: eps must be positive and finite .*got 0\.0"),
    "eps-negative": (lambda: sobel(X2, eps=-1e-3), ValueError,
                     r"sobel: eps must be positive and finite .*got -0\.001"),
    "eps-nan": (lambda: sobel(X2, eps=float("nan")), ValueError,
                r"sobel: eps must be positive and finite .*got nan"),
    "eps-inf": (lambda: sobel(X2, eps=float("inf")), ValueError,
                r"sobel: eps must be positive and finite .*got inf"),
    # eps must be a normal float32 (the GPU backends compute in float32): 1e-300 is 0 there
    # (a NaN gradient where every component vanishes), 1e300 is inf.
    "eps-tiny": (lambda: sobel(X2, eps=1e-300), ValueError,
                 r"sobel: eps must be positive and finite \(in \[1e-30, 1e\+30\].*got 1e-300"),
    "eps-huge": (lambda: sobel(X2, eps=1e300, backend="torch"), ValueError,
                 r"sobel: eps must be .*got 1e\+300"),
    "l1-eps-tiny": (lambda: sobel_l1(X2, X2, eps=1e-31, backend="cpu"), ValueError,
                    r"sobel_l1: eps must be .*got 1e-31"),
    "backend": (lambda: sobel(X2, backend="numpy"), ValueError,
                r"sobel: backend must be one of torch, cpu, triton, cuda, auto, got 'numpy'"),
    # sobel_l1
    "f1-not-tensor": (lambda: sobel_l1(np.ones((1, 2, 4, 5)), X2), TypeError,
                      r"sobel_l1: f1 must be a torch\.Tensor, got ndarray"),
    "f0-not-tensor": (lambda: sobel_l1(X2, 1.0), TypeError,
                      r"sobel_l1: f0 must be a torch\.Tensor, got float"),
    "f1-int": (lambda: sobel_l1(X2.int(), X2), TypeError,
               r"sobel_l1: f1 must be a floating-point tensor .*got torch\.int32"),
    "f0-int": (lambda: sobel_l1(X2, X2.to(torch.uint8)), TypeError,
               r"sobel_l1: f0 must be a floating-point tensor .*got torch\.uint8"),
    "f1-rank": (lambda: sobel_l1(torch.ones(4, 5), torch.ones(4, 5)), ValueError,
                r"sobel_l1: f1 must be \[B, C, H, W\] .*got shape \(4, 5\)"),
    "f1-empty": (lambda: sobel_l1(torch.ones(0, 2, 4, 5), torch.ones(0, 2, 4, 5)), ValueError,
                 r"sobel_l1: f1 must not be empty, got shape \(0, 2, 4, 5\)"),
    "shape": (lambda: sobel_l1(X2, torch.ones(1, 2, 4, 6)), ValueError,
              (r"sobel_l1: f1 and f0 must have the same shape, got \(1, 2, 4, 5\) and "
               r"\(1, 2, 4, 6\)")),
    "shape-batch": (lambda: sobel_l1(X2, torch.ones(2, 2, 4, 5)), ValueError,
                    r"sobel_l1: f1 and f0 must have the same shape, got \(1, 2, 4, 5\) and "
                    r"\(2, 2, 4, 5\)"),
    "rank-mismatch": (lambda: sobel_l1(X3, X2), ValueError,
                      r"sobel_l1: f1 and f0 must have the same shape"),
    "dtype": (lambda: sobel_l1(X2, X2.double()), TypeError,
              r"sobel_l1: f1 and f0 must have the same dtype, "
              r"got torch\.float32 and torch\.float64"),
    "device": (lambda: sobel_l1(X2, X2.to("meta")), ValueError,
               r"sobel_l1: f1 and f0 must be on the same device, got cpu and meta"),
    "l1-padding": (lambda: sobel_l1(X2, X2, padding="nearest"), ValueError,
                   r"sobel_l1: padding must be 'replicate' or 'zeros', got 'nearest'"),
    "reduction": (lambda: sobel_l1(X2, X2, reduction="max"), ValueError,
                  r"sobel_l1: reduction must be 'mean' or 'sum' or 'none', got 'max'"),
    "l1-eps": (lambda: sobel_l1(X2, X2, eps=0), ValueError,
               r"sobel_l1: eps must be positive and finite .*got 0"),
    "module-padding": (lambda: SobelL1Loss(padding="reflect"), ValueError,
                       r"SobelL1Loss: padding must be 'replicate' or 'zeros', got 'reflect'"),
    "module-reduction": (lambda: SobelL1Loss(reduction="avg"), ValueError,
                         r"SobelL1Loss: reduction must be .*got 'avg'"),
    "module-eps": (lambda: SobelL1Loss(eps=-1.0), ValueError,
                   r"SobelL1Loss: eps must be positive and finite .*got -1\.0"),
}


test_bad_input = bad_input_test(BAD_INPUTS)


def test_validation_runs_before_dispatch(monkeypatch):
    """Bad input is reported as bad input whichever backend was asked for."""
    raises_before_dispatch(
        monkeypatch, lambda: sobel_l1(X2, X2, reduction="max"), "sobel_l1: reduction must be"
    )


def test_explicit_backend_errors():
    if backend_reason("cuda", "cpu") is not None:
        with pytest.raises(RuntimeError, match=r"sobel: backend 'cuda' cannot serve this call"):
            sobel(X2, backend="cuda")
        with pytest.raises(RuntimeError, match=r"sobel_l1: backend 'cuda' cannot serve"):
            sobel_l1(X2, X2, backend="cuda")


# =========================================================================== CUDA math, on the host

# The per-voxel bodies of csrc/cuda/sobel.cu are host-device functions; this program runs
# them over every voxel on the CPU, in the order the launchers do (forward, first backward
# pass into a NaN-poisoned scratch, adjoint gather), so the CUDA kernels' math is checked
# on machines without a GPU (nvcc only).
_CUDA_HOST_HARNESS = r"""
// Host-side run of the CUDA Sobel kernels' per-voxel bodies (forward_voxel,
// backward_prep_voxel, adjoint_voxel, voxel_coords, l1_scalar_upstream) over every voxel,
// in the order the launchers use them: the CUDA kernels' math without a GPU. Built by
// tests/ops/test_sobel.py::test_cuda_kernel_bodies_on_the_host.
#include "sobel.cu"

#include <vector>

using namespace mrus;
using namespace mrus::cuda;

static sobel::SobelArgs make_args(int dtype, int ndim, int64_t B, int64_t C, const int64_t* S,
                                  int padding, double eps, int mode, int reduction) {
  sobel::SobelArgs a;
  a.dtype = dtype; a.ndim = ndim; a.B = B; a.C = C;
  for (int i = 0; i < 3; ++i) a.size[i] = i < ndim ? S[i] : 1;
  a.padding = padding; a.eps = eps; a.mode = mode; a.reduction = reduction;
  return a;
}

template <int NDIM, typename T>
static void fwd(const sobel::SobelArgs& a, const void* x, const void* x0, void* out) {
  const int64_t vox = a.voxels();
  double total = 0.0;
  for (int64_t v = 0; v < a.volumes(); ++v)
    for (int64_t n = 0; n < vox; ++n) {
      int64_t q[3];
      voxel_coords<NDIM>(a, vox, n, q);
      total += forward_voxel<NDIM, T>(a, vox, v, n, q, (const T*)x, (const T*)x0, (T*)out);
    }
  if (a.mode == 2 && a.reduction != 0) {
    const double scale = a.reduction == 2 ? 1.0 / double(a.numel()) : 1.0;
    ((T*)out)[0] = from_float<T>(static_cast<float>(total * scale));
  }
}

template <int NDIM, typename T>
static void bwd(const sobel::SobelArgs& a, const void* go, const void* x, const void* x0,
                void* gx, void* gx0) {
  const int64_t vox = a.voxels(), V = a.volumes();
  auto gather = [&](auto* h, T* g) {
    for (int64_t v = 0; v < V; ++v)
      for (int64_t n = 0; n < vox; ++n) {
        int64_t q[3];
        voxel_coords<NDIM>(a, vox, n, q);
        g[v * vox + n] = from_float<T>(adjoint_voxel<NDIM>(a, vox, n, q, h + v * NDIM * vox));
      }
  };
  if (a.mode == 0) {
    gather((const T*)go, (T*)gx);
    return;
  }
  // Poisoned scratch: every element must be written by the first pass.
  std::vector<float> h1(gx ? V * NDIM * vox : 0, NAN), h0(gx0 ? V * NDIM * vox : 0, NAN);
  const float up = l1_scalar_upstream<T>(a, (const T*)go);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t n = 0; n < vox; ++n) {
      int64_t q[3];
      voxel_coords<NDIM>(a, vox, n, q);
      backward_prep_voxel<NDIM, T>(a, vox, v, n, q, (const T*)go, (const T*)x, (const T*)x0, up,
                                   gx ? h1.data() : nullptr, gx0 ? h0.data() : nullptr);
    }
  if (gx) gather((const float*)h1.data(), (T*)gx);
  if (gx0) gather((const float*)h0.data(), (T*)gx0);
}

template <typename F>
static void dispatch(int dtype, int ndim, F&& f) {
  auto nd = [&](auto tag) {
    if (ndim == 2) f(std::integral_constant<int, 2>{}, tag);
    else f(std::integral_constant<int, 3>{}, tag);
  };
  if (dtype == int(DType::F32)) nd(TypeTag<float>{});
  else if (dtype == int(DType::F16)) nd(TypeTag<__half>{});
  else nd(TypeTag<__nv_bfloat16>{});
}

extern "C" void host_sobel_forward(int dtype, int ndim, int64_t B, int64_t C, const int64_t* S,
                                   int padding, double eps, int mode, int reduction,
                                   const void* x, const void* x0, void* out) {
  const auto a = make_args(dtype, ndim, B, C, S, padding, eps, mode, reduction);
  dispatch(dtype, ndim, [&](auto nd, auto tag) {
    fwd<decltype(nd)::value, typename decltype(tag)::type>(a, x, x0, out);
  });
}

extern "C" void host_sobel_backward(int dtype, int ndim, int64_t B, int64_t C, const int64_t* S,
                                    int padding, double eps, int mode, int reduction,
                                    const void* go, const void* x, const void* x0, void* gx,
                                    void* gx0) {
  const auto a = make_args(dtype, ndim, B, C, S, padding, eps, mode, reduction);
  dispatch(dtype, ndim, [&](auto nd, auto tag) {
    bwd<decltype(nd)::value, typename decltype(tag)::type>(a, go, x, x0, gx, gx0);
  });
}

// The >= 2**32-voxel path of voxel_coords (quotients in double, corrected) against exact
// 64-bit integer arithmetic, for volumes up to 2**52 voxels. Returns the number of mismatches.
extern "C" int64_t host_coords_check(int64_t trials) {
  uint64_t state = 88172645463325252ull;
  auto next = [&]() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  int64_t bad = 0;
  for (int64_t t = 0; t < trials; ++t) {
    sobel::SobelArgs a;
    a.ndim = 3;
    for (int k = 0; k < 3; ++k) a.size[k] = 1 + int64_t(next() % (t % 3 == 0 ? 7 : (1u << 17)));
    const int64_t vox = a.size[0] * a.size[1] * a.size[2];
    // n near multiples of the sizes (where a rounded quotient could cross an integer) and random.
    int64_t n = int64_t(next() % uint64_t(vox));
    if (t % 2) {
      const int64_t m = a.size[2] * (int64_t(next() % uint64_t(a.size[0] * a.size[1])));
      n = m + int64_t(next() % 3) - 1;
      if (n < 0) n = 0;
      if (n >= vox) n = vox - 1;
    }
    int64_t q[3];
    voxel_coords<3>(a, int64_t(1) << 40, n, q);  // forces the 64-bit path
    const int64_t e2 = n % a.size[2], e1 = (n / a.size[2]) % a.size[1];
    const int64_t e0 = n / a.size[2] / a.size[1];
    if (q[0] != e0 || q[1] != e1 || q[2] != e2) ++bad;
  }
  return bad;
}
"""


@pytest.fixture(scope="module")
def cuda_host_lib(tmp_path_factory):
    nvcc = shutil.which("nvcc") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.exists()), None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = Path(__file__).resolve().parents[2]
    work = tmp_path_factory.mktemp("sobel_cuda_host")
    src, lib = work / "harness.cu", work / "libsobelhost.so"
    src.write_text(_CUDA_HOST_HARNESS)
    # PTX only for the device side: the kernels are not run, only their host instances.
    cmd = [nvcc, "-std=c++17", "-O1", "-gencode", "arch=compute_80,code=compute_80", "-shared",
           "-Xcompiler", "-fPIC", f"-I{root / 'csrc' / 'include'}", f"-I{root / 'csrc' / 'cuda'}",
           str(src), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def _host_args(x: torch.Tensor, padding: str, mode: int, reduction: str) -> tuple:
    from mrus_kernels._ext import DTYPE_CODES

    sizes = (ctypes.c_int64 * 3)(*(list(x.shape[2:]) + [1] * (5 - x.dim())))
    return (ctypes.c_int(DTYPE_CODES[x.dtype]), ctypes.c_int(x.dim() - 2),
            ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), sizes,
            ctypes.c_int(sobel_module._PADDING_CODES[padding]), ctypes.c_double(1e-6),
            ctypes.c_int(mode), ctypes.c_int(sobel_module._REDUCTION_CODES[reduction]))


def _p(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The data pointer of t (NULL for None). The caller keeps t alive across the C call:
    the pointer of a temporary such as _p(torch.ones(...)) dangles once _p returns."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_cuda_kernel_bodies_on_the_host(cuda_host_lib, dtype, gen):
    """The CUDA kernels' per-voxel math (two-pass backward included) against the float64
    reference: every mode, reduction and gradient subset, both paddings, 2D / 3D / a
    size-1 axis; and the >= 2**32-voxel index path against integer arithmetic."""
    lib = cuda_host_lib
    lib.host_coords_check.restype = ctypes.c_int64
    assert lib.host_coords_check(ctypes.c_int64(200_000)) == 0
    nan = float("nan")
    for shape in ((2, 3, 13, 11), (2, 2, 7, 9, 11), (1, 2, 4, 1, 3)):
        for padding in PADDINGS:
            x, y = rand(gen, *shape).to(dtype), rand(gen, *shape).to(dtype)
            for output, mode in (("components", 0), ("magnitude", 1)):
                ref_x = x.double().requires_grad_()
                expected = reference.sobel(ref_x, output, padding)
                out = torch.full(expected.shape, nan, dtype=dtype)
                lib.host_sobel_forward(*_host_args(x, padding, mode, "none"), _p(x), _p(None),
                                       _p(out))
                assert_close_verbose(out, expected, dtype, name=f"{shape} {padding} {output}")
                grad_out = randn(gen, *expected.shape).to(dtype)
                (e,) = autograd_grads(expected, (ref_x,), grad_out.double())
                g = torch.full(shape, nan, dtype=dtype)
                lib.host_sobel_backward(*_host_args(x, padding, mode, "none"), _p(grad_out),
                                        _p(x), _p(None), _p(g), _p(None))
                assert_close_verbose(g, e, dtype, name=f"{shape} {padding} d {output}")
            for reduction in REDUCTIONS:
                r1, r0 = x.double().requires_grad_(), y.double().requires_grad_()
                expected = reference.sobel_l1(r1, r0, padding, 1e-6, reduction)
                out = torch.full(expected.shape, nan, dtype=dtype)
                lib.host_sobel_forward(*_host_args(x, padding, 2, reduction), _p(x), _p(y),
                                       _p(out))
                assert_close_verbose(out, expected, dtype, name=f"{shape} {padding} {reduction}")
                grad_out = randn(gen, *expected.shape, 1)[..., 0].to(dtype)
                e1, e0 = autograd_grads(expected, (r1, r0), grad_out.double())
                for need1, need0 in ((True, True), (True, False), (False, True)):
                    g1 = torch.full(shape, nan, dtype=dtype) if need1 else None
                    g0 = torch.full(shape, nan, dtype=dtype) if need0 else None
                    lib.host_sobel_backward(*_host_args(x, padding, 2, reduction), _p(grad_out),
                                            _p(x), _p(y), _p(g1), _p(g0))
                    for name, a, b in (("f1", g1, e1), ("f0", g0, e0)):
                        if a is not None:
                            assert_close_verbose(a, b, dtype,
                                                 name=f"{shape} {padding} {reduction} d {name}")


@pytest.mark.slow
@pytest.mark.parametrize("ndim", (2, 3))
def test_cuda_kernel_bodies_large_intensities(cuda_host_lib, ndim):
    """The CUDA kernels' per-voxel math on a constant image at 1e15 / ±1e30 (components
    exactly 0, magnitude sqrt(eps) with zero gradient, sobel_l1 0, the components'
    gradient of a constant upstream 0 inside) and on the offset ramp (components exact
    inside, the gradient of the ramp as upstream exact two voxels from the edges)."""
    lib = cuda_host_lib
    shape = LARGE_SHAPES[ndim]
    nan = float("nan")
    for value in LARGE:
        x = torch.full(shape, value)
        out = torch.full((*shape[:2], ndim, *shape[2:]), nan)
        lib.host_sobel_forward(*_host_args(x, "replicate", 0, "none"), _p(x), _p(None), _p(out))
        assert out.abs().max().item() == 0.0, value
        mag = torch.full(shape, nan)
        lib.host_sobel_forward(*_host_args(x, "replicate", 1, "none"), _p(x), _p(None), _p(mag))
        assert torch.equal(mag, torch.full_like(mag, torch.tensor(1e-6).sqrt().item()))
        g = torch.full(shape, nan)
        ones = torch.ones(shape)  # named: a temporary's storage is freed before the call
        lib.host_sobel_backward(*_host_args(x, "replicate", 1, "none"), _p(ones),
                                _p(x), _p(None), _p(g), _p(None))
        assert g.abs().max().item() == 0.0, value
        y = torch.full(shape, -value / 3)
        d = torch.full(shape, nan)
        lib.host_sobel_forward(*_host_args(x, "replicate", 2, "none"), _p(x), _p(y), _p(d))
        assert d.abs().max().item() == 0.0, value
        up = torch.full(out.shape, value / 1e2)
        lib.host_sobel_backward(*_host_args(x, "replicate", 0, "none"), _p(up), _p(x),
                                _p(None), _p(g), _p(None))
        assert _interior(g, ndim).abs().max().item() == 0.0, value
    x, slopes = _offset_ramp(shape, torch.float32)
    weight = 32.0 if ndim == 3 else 8.0
    out = torch.full((*shape[:2], ndim, *shape[2:]), nan)
    lib.host_sobel_forward(*_host_args(x, "replicate", 0, "none"), _p(x), _p(None), _p(out))
    for i, s in enumerate(slopes):
        inside = _interior(out[:, :, i], ndim)
        assert torch.equal(inside, torch.full_like(inside, weight * s)), i
    up = torch.stack([x] * ndim, 2).contiguous()
    g = torch.full(shape, nan)
    lib.host_sobel_backward(*_host_args(x, "replicate", 0, "none"), _p(up), _p(x), _p(None),
                            _p(g), _p(None))
    truth = torch.from_numpy(sum(_np_apply(up[:, :, i].double().numpy(), i, "replicate",
                                           transpose=True) for i in range(ndim)))
    inner = [slice(None), slice(None)] + [slice(2, -2)] * ndim
    assert torch.equal(g.double()[tuple(inner)], truth[tuple(inner)])
    assert (g.double() - truth).abs().max().item() <= 1e-6 * truth.abs().max().item()


# =========================================================================== GPU


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_gpu_matches_reference(gpu_backend, dtype, ndim, padding, gen):
    shape = SHAPES[ndim]
    x = rand(gen, *shape, dtype=dtype, device="cuda")
    y = rand(gen, *shape, dtype=dtype, device="cuda")
    for output in OUTPUTS:
        ker_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
        with poisoned_empty():
            out = sobel(ker_x, output=output, padding=padding, backend=gpu_backend)
        expected = reference.sobel(ref_x, output, padding)
        assert out.dtype == dtype and out.device == x.device
        assert_close_verbose(out, expected, dtype, name=output)
        grad_out = randn(gen, *expected.shape, device="cuda")
        with poisoned_empty():
            (g,) = autograd_grads(out, (ker_x,), grad_out.to(dtype))
        (e,) = autograd_grads(expected, (ref_x,), grad_out.double())
        assert_close_verbose(g, e, dtype, name=f"d x ({output})")
    for reduction in REDUCTIONS:
        f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
        r1, r0 = x.double().requires_grad_(), y.double().requires_grad_()
        with poisoned_empty():
            loss = sobel_l1(f1, f0, padding=padding, reduction=reduction, backend=gpu_backend)
        expected = reference.sobel_l1(r1, r0, padding, 1e-6, reduction)
        assert_close_verbose(loss, expected, dtype, name=f"loss {reduction}")
        grad_out = randn(gen, *expected.shape, 1, device="cuda")[..., 0]
        with poisoned_empty():
            g = autograd_grads(loss, (f1, f0), grad_out.to(dtype))
        e = autograd_grads(expected, (r1, r0), grad_out.double())
        for name, a, b in zip(("f1", "f0"), g, e):
            assert_close_verbose(a, b, dtype, name=f"grad {name} ({reduction})")


@pytest.mark.cuda
def test_gpu_large_and_deterministic(gpu_backend, gen):
    """Sizes beyond one tile / block in every axis; two runs bitwise equal."""
    x = rand(gen, 2, 3, 37, 45, 70, device="cuda")
    y = rand(gen, 2, 3, 37, 45, 70, device="cuda")
    runs = []
    for _ in range(2):
        f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = sobel_l1(f1, f0, backend=gpu_backend)
        loss.backward()
        runs.append((loss.detach(), f1.grad, f0.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    r1, r0 = x.double().requires_grad_(), y.double().requires_grad_()
    expected = reference.sobel_l1(r1, r0)
    assert_close_verbose(runs[0][0], expected, torch.float32)
    for a, b in zip(runs[0][1:], autograd_grads(expected, (r1, r0), None)):
        assert_close_verbose(a, b, torch.float32)


@pytest.mark.cuda
def test_gpu_more_volumes_than_grid_axis_y_holds(gpu_backend, gen):
    """B * C = 70000 > 65535 (grid axis y's limit) small volumes: the CUDA kernels put the
    volumes on grid axis x with the voxel blocks, so every volume is computed (the last
    ones included) and matches the reference, forward and both gradients."""
    x = rand(gen, 2, 35000, 3, 4, 5, device="cuda")
    y = rand(gen, 2, 35000, 3, 4, 5, device="cuda")
    out = sobel(x, output="components", padding="zeros", backend=gpu_backend)
    assert_close_verbose(out, reference.sobel(x.double(), "components", "zeros"), torch.float32)
    f1, f0 = x.clone().requires_grad_(), y.clone().requires_grad_()
    r1, r0 = x.double().requires_grad_(), y.double().requires_grad_()
    loss = sobel_l1(f1, f0, reduction="sum", backend=gpu_backend)
    expected = reference.sobel_l1(r1, r0, "replicate", 1e-6, "sum")
    assert_close_verbose(loss, expected, torch.float32, name="loss")
    for name, a, b in zip(("f1", "f0"), autograd_grads(loss, (f1, f0), None),
                          autograd_grads(expected, (r1, r0), None)):
        assert_close_verbose(a, b, torch.float32, name=f"grad {name}")


@pytest.mark.cuda
def test_gpu_float64_rejected(gpu_backend):
    with pytest.raises(RuntimeError, match="float64 runs on the torch and cpu backends only"):
        sobel(X2.double().cuda(), backend=gpu_backend)
