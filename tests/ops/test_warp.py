"""Tests of ``warp``: every backend against the reference, cross-checks against
``grid_sample`` and SciPy, gradients, identities, NaN rules, determinism, the converters, the
module, dispatch, ``torch.compile`` and every validation message.

Conventions pinned here (DESIGN.md): ddf [B, ndim, *S] in voxel units, component i along
spatial axis i, out(x) = image(x + u(x)); voxel centres at integer indices; "zeros" padding
interpolates against zero voxels outside (SciPy "grid-constant"), "border" clamps (SciPy
"nearest"); nearest rounds half to even.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import warp_truth
from scipy import ndimage

import mrus_kernels
from conftest import (
    ALL_DTYPES,
    COMPILE_WARNINGS,
    DTYPE_IDS,
    assert_close_verbose,
    autograd_grads,
    backend_params,
    backend_reason,
    backends_here,
    bad_input_test,
    compile_two_sizes,
    poisoned_empty,
    raises_before_dispatch,
    rand,
    randn,
    require_backend,
    skip_without_float64,
    spy_warp_idx64,
)
from mrus_kernels import (
    BackendUnavailableError,
    Warp,
    available_backends,
    backend_status,
    ddf_from_mm,
    ddf_to_grid,
    ddf_to_mm,
    grid_to_ddf,
    reference,
    warp,
)

# The module, not the function: `import mrus_kernels.warp as m` gives the function `warp`,
# which the package namespace binds over the submodule of the same name.
warp_module = importlib.import_module("mrus_kernels.warp")

MODES = ("linear", "nearest")
PADDINGS = ("zeros", "border")

# Backends that run on CPU tensors, each skipped with its reason where unavailable.
BACKENDS = backend_params(("torch", "cpu", "triton"))
FAST_BACKENDS = backend_params(("torch", "cpu"))  # float64-capable, cheap: the heavy sweeps
KERNEL_BACKENDS = backend_params(("cpu", "triton"))  # our kernels (not the reference)

# (image shape, ddf shape) per ndim: sizes that are not multiples of anything, input spatial
# size different from the output's, image batch 2 with a broadcast ddf (batch 1), C > 1.
# The Triton interpreter is slow: it gets smaller volumes.
SHAPES = {
    2: ((2, 3, 13, 11), (1, 2, 9, 12)),
    3: ((2, 3, 8, 10, 9), (1, 3, 7, 9, 11)),
}
TRITON_SHAPES = {
    2: ((2, 3, 9, 10), (1, 2, 8, 7)),
    3: ((2, 2, 6, 5, 7), (1, 3, 5, 7, 6)),
}


def _shapes(backend: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (TRITON_SHAPES if backend == "triton" else SHAPES)[ndim]


def _inputs(gen, image_shape, ddf_shape, dtype=torch.float32, device="cpu", scale=2.0):
    """A random image (values in [0.5, 1.5)) and displacement (N(0, scale²) voxels, so some
    points fall outside the image)."""
    image = rand(gen, *image_shape, dtype=dtype, device=device)
    ddf = randn(gen, *ddf_shape, dtype=dtype, device=device, scale=scale)
    return image, ddf


def _points(ddf: torch.Tensor) -> torch.Tensor:
    """Sampling points x + u(x), [B, ndim, *S], float64 on the CPU, rounded as the kernels
    round them (warp_truth.sample_points)."""
    return torch.from_numpy(warp_truth.sample_points(ddf))


# =========================================================================== backends vs ref


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_matches_reference(backend, dtype, ndim, mode, padding, gen):
    """Our kernels against the reference. (The torch backend is the reference: SciPy and
    grid_sample check it below.)"""
    skip_without_float64(backend, dtype)
    image_shape, ddf_shape = _shapes(backend, ndim)
    image, ddf = _inputs(gen, image_shape, ddf_shape, dtype)
    expected = reference.warp(image, ddf, mode, padding)
    with poisoned_empty():
        out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
    assert out.dtype == dtype
    assert out.shape == (2, image_shape[1], *ddf_shape[2:])
    assert_close_verbose(out, expected, dtype, name=f"{backend} warp")


def test_poison_reaches_the_output_allocation(gen):
    """The poisoning the tests rely on works: a kernel that writes nothing leaves NaN."""
    require_backend("cpu", "cpu", torch.float32)
    image, ddf = _inputs(gen, (1, 2, 4, 5), (1, 2, 4, 5))
    with poisoned_empty(), mock.patch.object(warp_module._ext.C, "warp_forward_cpu"):
        out = warp(image, ddf, backend="cpu")
    assert bool(out.isnan().all())


@pytest.mark.parametrize("backend", backend_params(("triton", "cuda")))
def test_gpu_backends_reject_float64(backend, gen):
    image, ddf = _inputs(gen, (1, 1, 4, 5), (1, 2, 4, 5), torch.float64)
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}'.*float64"):
        warp(image, ddf, backend=backend)


@pytest.mark.parametrize(("batch_image", "batch_ddf"), [(1, 3), (2, 1), (2, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_broadcast(backend, batch_image, batch_ddf, gen):
    """Either batch size may be 1; the result is the warp of the expanded batch (SciPy,
    item by item)."""
    image, ddf = _inputs(gen, (batch_image, 2, 5, 6, 7), (batch_ddf, 3, 6, 5, 4))
    batch = max(batch_image, batch_ddf)
    with poisoned_empty():
        out = warp(image, ddf, backend=backend)
    assert out.shape == (batch, 2, 6, 5, 4)
    for b in range(batch):
        expected = warp_truth.scipy_warp(image[b % batch_image][None], ddf[b % batch_ddf][None])
        assert_close_verbose(out[b][None], expected, torch.float32, name=f"item {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_are_independent(backend, gen):
    """All channels come from one pass; each equals the warp of that channel alone."""
    image, ddf = _inputs(gen, (1, 5, 9, 8), (1, 2, 7, 10))
    out = warp(image, ddf, padding="border", backend=backend)
    for c in range(image.shape[1]):
        alone = warp(image[:, c : c + 1], ddf, padding="border", backend=backend)
        assert torch.equal(out[:, c : c + 1], alone), f"channel {c}"


@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, ndim, gen):
    """Transposed, strided and expanded views give what their contiguous copies give."""
    spatial_in, spatial_out = ((6, 7, 5), (5, 6, 7)) if ndim == 3 else ((9, 7), (8, 10))
    base = rand(gen, 1, 6, *reversed(spatial_in))  # transposed below
    image = base.permute(0, 1, *range(ndim + 1, 1, -1))[:, ::2]  # [1, 3, *spatial_in]
    image = image.expand(2, *image.shape[1:])  # stride-0 batch
    wide = randn(gen, 2, ndim, *spatial_out[:-1], 2 * spatial_out[-1], scale=2.0)
    ddf = wide[..., ::2]  # strided last axis
    assert not image.is_contiguous() and not ddf.is_contiguous()
    with poisoned_empty():
        out = warp(image, ddf, padding="border", backend=backend)
    dense = warp(image.contiguous(), ddf.contiguous(), padding="border", backend=backend)
    assert torch.equal(out, dense)
    expected = warp_truth.scipy_warp(image, ddf, "linear", "border")
    assert_close_verbose(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("image_shape", "ddf_shape"),
    [
        ((1, 2, 1, 5, 6), (1, 3, 3, 4, 5)),
        ((1, 1, 1, 1), (2, 2, 3, 2)),
        ((1, 2, 4, 1), (1, 2, 1, 1)),
    ],
    ids=["depth1", "2d-1x1", "out-1x1"],
)
def test_size_one_axes(backend, image_shape, ddf_shape, gen):
    """Size-1 axes are legal (unlike a grid with align_corners=True); SciPy agrees."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    image, ddf = _inputs(gen, image_shape, ddf_shape, dtype, scale=1.0)
    for mode in MODES:
        for padding in PADDINGS:
            out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
            assert_close_verbose(out, warp_truth.scipy_warp(image, ddf, mode, padding), dtype,
                                 name=f"{mode}, {padding}")


# =========================================================================== backward vs ref


def _backward_case(gen, backend, ndim, dtype, padding, mode="linear", deterministic=None):
    image_shape, ddf_shape = _shapes(backend, ndim)
    image, ddf = _inputs(gen, image_shape, ddf_shape, dtype)
    grad_out = randn(gen, 2, image_shape[1], *ddf_shape[2:], dtype=dtype)
    ref_image = image.clone().requires_grad_()
    ref_ddf = ddf.clone().requires_grad_()
    expected = autograd_grads(
        reference.warp(ref_image, ref_ddf, mode, padding), (ref_image, ref_ddf), grad_out
    )
    image.requires_grad_()
    ddf.requires_grad_()
    with poisoned_empty():
        out = warp(image, ddf, mode=mode, padding=padding, backend=backend,
                   deterministic=deterministic)
        actual = autograd_grads(out, (image, ddf), grad_out)
    return actual, expected


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_matches_reference(backend, dtype, ndim, padding, gen):
    """Analytic backward kernels against the reference's autograd (linear)."""
    skip_without_float64(backend, dtype)
    (gi, gd), (ei, ed) = _backward_case(gen, backend, ndim, dtype, padding)
    assert gi.dtype == dtype and gd.dtype == dtype
    assert_close_verbose(gi, ei, dtype, name="d image")
    assert_close_verbose(gd, ed, dtype, name="d ddf")


def _nearest_image_grad(image, ddf, grad_out, padding):
    """The image gradient of nearest sampling, as an explicit scatter of grad_out."""
    points = _points(ddf).expand(grad_out.shape[0], -1, *ddf.shape[2:])
    size = image.shape[2:]
    flat = torch.zeros(points.shape[0], *points.shape[2:], dtype=torch.long)
    valid = torch.ones(flat.shape, dtype=torch.bool)
    for i, n in enumerate(size):
        p = points[:, i].clamp(0, n - 1) if padding == "border" else points[:, i]
        r = torch.round(p)  # half to even; random float points have no ties
        valid &= (r >= 0) & (r < n)
        flat = flat * n + r.clamp(0, n - 1).long()
    grad = torch.zeros(image.shape, dtype=torch.float64)
    for b in range(grad_out.shape[0]):
        bi = b if image.shape[0] > 1 else 0
        for c in range(image.shape[1]):
            grad[bi, c].view(-1).index_add_(0, flat[b][valid[b]],
                                            grad_out[b, c].double()[valid[b]])
    return grad


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nearest_gradients(backend, ndim, padding, gen):
    """Nearest: the image gradient is a scatter of grad_out, the ddf gradient is 0."""
    image_shape, ddf_shape = _shapes(backend, ndim)
    image, ddf = _inputs(gen, image_shape, ddf_shape)
    grad_out = randn(gen, 2, image_shape[1], *ddf_shape[2:])
    image.requires_grad_()
    ddf.requires_grad_()
    out = warp(image, ddf, mode="nearest", padding=padding, backend=backend)
    gi, gd = autograd_grads(out, (image, ddf), grad_out)
    assert_close_verbose(gi, _nearest_image_grad(image, ddf, grad_out, padding).float(),
                         torch.float32)
    assert torch.equal(gd, torch.zeros_like(ddf))


def test_nearest_ddf_gradient_torch_backend(gen):
    """The torch backend agrees with the kernels: a zero ddf gradient, not an error."""
    image, ddf = _inputs(gen, (1, 1, 5, 6), (1, 2, 5, 6))
    ddf.requires_grad_()
    out = warp(image, ddf, mode="nearest", backend="torch")
    (gd,) = torch.autograd.grad(out.sum(), ddf)
    assert torch.equal(gd, torch.zeros_like(ddf))


@pytest.mark.parametrize("which", ["image", "ddf", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_for_inputs_that_need_them(backend, which, gen):
    image, ddf = _inputs(gen, (2, 2, 5, 6), (1, 2, 6, 5))
    grad_out = randn(gen, 2, 2, 6, 5)
    full_image, full_ddf = image.clone().requires_grad_(), ddf.clone().requires_grad_()
    full = autograd_grads(
        warp(full_image, full_ddf, backend=backend), (full_image, full_ddf), grad_out
    )
    image.requires_grad_(which in ("image", "both"))
    ddf.requires_grad_(which in ("ddf", "both"))
    calls = []
    real = warp_module.launch_backward

    def spy(*args, **kwargs):
        calls.append(args[-2:])  # (need_image, need_ddf)
        return real(*args, **kwargs)

    with mock.patch.object(warp_module, "launch_backward", side_effect=spy):
        warp(image, ddf, backend=backend).backward(grad_out)
    assert (image.grad is not None) == image.requires_grad
    assert (ddf.grad is not None) == ddf.requires_grad
    if image.requires_grad:
        assert torch.equal(image.grad, full[0])
    if ddf.requires_grad:
        assert torch.equal(ddf.grad, full[1])
    if backend != "torch":  # the kernels are asked for exactly what is needed
        assert calls == [(image.requires_grad, ddf.requires_grad)]


@pytest.mark.parametrize("batches", [(1, 2), (2, 1)], ids=["image-b1", "ddf-b1"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck(backend, ndim, padding, batches, gen):
    """float64 gradcheck of image and ddf; some points land outside the image."""
    spatial = (3, 4, 5) if ndim == 3 else (4, 5)
    image, ddf = _inputs(gen, (batches[0], 2, *spatial), (batches[1], ndim, *spatial),
                         torch.float64, scale=1.5)
    points = _points(ddf)[:, 0]
    assert bool((points < 0).any()) and bool((points > spatial[0] - 1).any())  # some outside
    image.requires_grad_()
    ddf.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, d: warp(i, d, padding=padding, backend=backend), (image, ddf)
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck_nearest_image(backend, gen):
    image, ddf = _inputs(gen, (1, 2, 3, 4, 5), (2, 3, 4, 3, 5), torch.float64, scale=1.5)
    image.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i: warp(i, ddf, mode="nearest", padding="border", backend=backend), (image,)
    )


# =========================================================================== grid_sample


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_grid_sample(backend, ndim, mode, padding, gen):
    """grid_sample(align_corners=True) on ddf_to_grid(ddf, size=image size) is our warp."""
    image_shape, ddf_shape = SHAPES[ndim]
    image, ddf = _inputs(gen, image_shape, ddf_shape, torch.float64)
    grid = ddf_to_grid(ddf.expand(2, *ddf.shape[1:]), align_corners=True,
                       size=tuple(image.shape[2:]))
    expected = F.grid_sample(image, grid, mode="bilinear" if mode == "linear" else "nearest",
                             padding_mode=padding, align_corners=True)
    out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
    assert_close_verbose(out, expected, torch.float64)
    baseline = reference.warp_grid_sample(image, ddf, mode, padding)
    assert_close_verbose(baseline, expected, torch.float64, name="warp_grid_sample")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
def test_grid_for_align_corners_false(ndim, mode, padding, gen):
    """A grid made for align_corners=False, converted to a ddf, warps as grid_sample does."""
    image_shape = (2, 2, 6, 7, 5)[: ndim + 2]
    out_spatial = (5, 8, 6)[:ndim]
    image = rand(gen, *image_shape, dtype=torch.float64)
    grid = rand(gen, 2, *out_spatial, ndim, dtype=torch.float64, lo=-1.2, hi=1.2)
    expected = F.grid_sample(image, grid, mode="bilinear" if mode == "linear" else "nearest",
                             padding_mode=padding, align_corners=False)
    ddf = grid_to_ddf(grid, align_corners=False, size=tuple(image.shape[2:]))
    assert ddf.shape == (2, ndim, *out_spatial)
    out = warp(image, ddf, mode=mode, padding=padding, backend="torch")
    assert_close_verbose(out, expected, torch.float64)


@pytest.mark.parametrize("size", [None, "other"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("ndim", (2, 3))
def test_grid_round_trip(ndim, align_corners, size, gen):
    ddf = randn(gen, 2, ndim, *(4, 6, 5)[:ndim], dtype=torch.float64, scale=3.0)
    target = (7, 3, 9)[:ndim] if size else None
    grid = ddf_to_grid(ddf, align_corners=align_corners, size=target)
    assert grid.shape == (2, *ddf.shape[2:], ndim)
    back = grid_to_ddf(grid, align_corners=align_corners, size=target)
    assert_close_verbose(back, ddf, torch.float64)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("ndim", (2, 3))
def test_zero_ddf_grid_is_affine_grid_identity(ndim, align_corners):
    """Pins the axis order: the last grid component is the last spatial axis."""
    spatial = (4, 6, 5)[:ndim]
    ddf = torch.zeros(2, ndim, *spatial, dtype=torch.float64)
    theta = torch.eye(ndim, ndim + 1, dtype=torch.float64).expand(2, -1, -1)
    expected = F.affine_grid(theta, [2, 1, *spatial], align_corners=align_corners)
    assert_close_verbose(ddf_to_grid(ddf, align_corners=align_corners), expected, torch.float64)
    assert_close_verbose(grid_to_ddf(expected, align_corners=align_corners), ddf, torch.float64)


# =========================================================================== SciPy


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("order", (0, 1))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_scipy_map_coordinates(backend, ndim, order, padding, gen):
    """Per (b, c) volume: zeros = SciPy "grid-constant", border = SciPy "nearest"."""
    image_shape, ddf_shape = SHAPES[ndim]
    image, ddf = _inputs(gen, image_shape, ddf_shape, torch.float64)
    out = warp(image, ddf, mode=("nearest", "linear")[order], padding=padding, backend=backend)
    scipy_mode = {"zeros": "grid-constant", "border": "nearest"}[padding]
    coords = _points(ddf)[0].numpy()  # broadcast ddf
    expected = np.stack([
        np.stack([
            ndimage.map_coordinates(image[b, c].numpy(), coords, order=order, mode=scipy_mode,
                                    cval=0.0, prefilter=False)
            for c in range(image.shape[1])
        ])
        for b in range(image.shape[0])
    ])
    assert_close_verbose(out, torch.from_numpy(expected), torch.float64)


# =========================================================================== identities


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_ddf_is_identity(backend, ndim, mode, padding, gen):
    spatial = (5, 7, 6)[:ndim]
    dtypes = (torch.float32,) if backend == "triton" else (torch.float32, torch.float64,
                                                           torch.bfloat16)
    for dtype in dtypes:
        image = rand(gen, 2, 3, *spatial, dtype=dtype)
        ddf = torch.zeros(1, ndim, *spatial, dtype=dtype)
        out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
        assert torch.equal(out, image), dtype


def _roll_case(gen, ndim, backend, padding, shift):
    spatial = (6, 7, 5)[:ndim]
    image = rand(gen, 1, 2, *spatial)
    ddf = torch.zeros(1, ndim, *spatial)
    for i, s in enumerate(shift):
        ddf[:, i] = s
    return image, warp(image, ddf, padding=padding, backend=backend)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_shift_is_roll_inside(backend, ndim, padding, gen):
    """out(x) = image(x + s): torch.roll by -s where x + s stays inside; outside, padding."""
    shift = (2, -1, 3)[:ndim]
    image, out = _roll_case(gen, ndim, backend, padding, shift)
    rolled = torch.roll(image, shifts=[-s for s in shift], dims=list(range(2, ndim + 2)))
    inside = (slice(None), slice(None)) + tuple(
        slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, image.shape[2:])
    )
    assert torch.equal(out[inside], rolled[inside])
    if padding == "zeros":  # everything else samples outside along some axis
        mask = torch.ones_like(out, dtype=torch.bool)
        mask[inside] = False
        assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    else:  # border: the edge values, i.e. the image at the clamped index
        idx = [(torch.arange(n) + s).clamp(0, n - 1) for s, n in zip(shift, image.shape[2:])]
        expected = image[(slice(None), slice(None), *torch.meshgrid(*idx, indexing="ij"))]
        assert torch.equal(out, expected)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_shift_is_all_padding(backend, ndim, padding, gen):
    spatial = (4, 5, 6)[:ndim]
    image = rand(gen, 2, 2, *spatial)
    for sign in (1, -1):
        ddf = torch.full((1, ndim, *spatial), sign * 1000.0)
        out = warp(image, ddf, padding=padding, backend=backend)
        if padding == "zeros":
            assert torch.equal(out, torch.zeros_like(out))
        else:
            corner = image[(slice(None), slice(None)) + (-1 if sign > 0 else 0,) * ndim]
            assert torch.equal(out, corner.reshape(2, 2, *[1] * ndim).expand_as(out))
    # Far along axis 0 only: border gives the last slice along axis 0 everywhere.
    ddf = torch.zeros(1, ndim, *spatial)
    ddf[:, 0] = 1e4
    out = warp(image, ddf, padding=padding, backend=backend)
    edge = image[:, :, -1:].expand_as(out) if padding == "border" else torch.zeros_like(out)
    assert torch.equal(out, edge)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_rounds_half_to_even(backend, padding, gen):
    """Exact ties: x ± 0.5 goes to the even neighbour (-0.5 rounds to 0, inside)."""
    image = rand(gen, 1, 2, 3, 8)
    x = torch.arange(8)
    for shift, idx in ((0.5, torch.where(x % 2 == 0, x, x + 1)),
                       (-0.5, torch.where(x % 2 == 0, x, x - 1))):
        ddf = torch.zeros(1, 2, 3, 8)
        ddf[:, 1] = shift
        out = warp(image, ddf, mode="nearest", padding=padding, backend=backend)
        expected = image[..., idx.clamp(max=7)]
        if padding == "zeros":  # 7 + 0.5 rounds to 8: outside
            expected[..., idx == 8] = 0
        assert torch.equal(out, expected), shift


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_voxel_shift_is_neighbour_average(backend, ndim, padding, gen):
    """u = 0.5 along every axis: the mean of the 2**ndim voxels x + {0, 1}^ndim, with zero
    (zeros) or replicated (border) voxels past the far edge."""
    spatial = (5, 6, 7)[:ndim]
    image = rand(gen, 2, 3, *spatial)
    ddf = torch.full((1, ndim, *spatial), 0.5)
    out = warp(image, ddf, padding=padding, backend=backend)
    padded = F.pad(image, (0, 1) * ndim, mode="constant" if padding == "zeros" else "replicate")
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    expected = pool(padded, kernel_size=2, stride=1)
    assert_close_verbose(out, expected, torch.float32)


# =========================================================================== cpu row loops

# (image shape, ddf shape, displacement scale): rows of 19 voxels (two lane groups of 8 and a
# tail of 3), rows shorter than one lane group with the batch from the ddf, rows of exactly
# 16 with most points outside, and 2D.
CPU_LOOP_CASES = {
    "3d-tail": ((2, 3, 8, 10, 9), (1, 3, 7, 9, 19), 2.0),
    "3d-short": ((1, 2, 5, 6, 7), (2, 3, 4, 5, 3), 2.0),
    "3d-outside": ((1, 1, 9, 9, 16), (1, 3, 6, 7, 16), 8.0),
    "2d": ((2, 2, 13, 11), (2, 2, 9, 21), 3.0),
}


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("case", CPU_LOOP_CASES)
def test_cpu_row_loops(cpu_loops, case, padding, gen):
    """The cpu backend's float32 linear row loops, vector and portable, against the
    reference forward and backward, with NaN and huge displacements mixed in: a NaN voxel
    gives NaN in its output and a zero ddf gradient, everything else is finite."""
    image_shape, ddf_shape, scale = CPU_LOOP_CASES[case]
    image, ddf = _inputs(gen, image_shape, ddf_shape, scale=scale)
    flat = ddf.view(-1)
    nan_at = torch.randperm(flat.numel(), generator=gen)[:3]
    flat[nan_at] = float("nan")
    flat[torch.randperm(flat.numel(), generator=gen)[:3]] = 1e7
    nan_voxel = ddf.isnan().any(1, keepdim=True)  # [Bd, 1, *S]
    grad_out = randn(gen, max(image_shape[0], ddf_shape[0]), image_shape[1], *ddf_shape[2:])
    image.requires_grad_()
    ddf.requires_grad_()
    with poisoned_empty():
        out = warp(image, ddf, padding=padding, backend="cpu")
    gi, gd = autograd_grads(out, (image, ddf), grad_out)
    assert torch.equal(out.isnan(), nan_voxel.expand_as(out))
    ref_image, ref_ddf = image.detach().double().requires_grad_(), ddf.detach().double()
    ref_ddf.requires_grad_()
    expected = reference.warp(ref_image, ref_ddf, "linear", padding)
    assert_close_verbose(out.nan_to_num(0.0), expected.nan_to_num(0.0), torch.float32)
    ei, ed = autograd_grads(expected, (ref_image, ref_ddf), grad_out.double())
    assert_close_verbose(gi, ei, torch.float32, name="d image")
    assert bool(gd.isfinite().all())
    assert bool(gd.masked_select(nan_voxel.expand_as(gd)).eq(0).all())
    live = ~nan_voxel.expand_as(gd)
    assert_close_verbose(gd[live], ed[live], torch.float32, name="d ddf")


def test_info_reports_cpu_vector_paths():
    from mrus_kernels import _ext

    build = _ext.build_info()
    assert build["cpu_simd"] == "avx2" or build["cpu_simd"].startswith("none (")
    assert build["cpu_simd_enabled"] is True


# =========================================================================== NaN and inf


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_displacement(backend, mode, padding, gen):
    """NaN in the ddf: NaN in every channel (and batch item) at that voxel only; the
    gradients stay finite and skip that voxel. Elsewhere SciPy's values and the explicit
    float64 scatter's image gradient."""
    image, ddf = _inputs(gen, (2, 3, 6, 7, 5), (1, 3, 5, 6, 7), scale=1.5)
    nan_at = [(0, 1, 2, 3), (1, 4, 0, 6), (2, 0, 5, 0)]  # (component, *voxel)
    for i, *voxel in nan_at:
        ddf[(0, i, *voxel)] = float("nan")
    image.requires_grad_()
    ddf.requires_grad_()
    out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
    expected_nan = torch.zeros(out.shape, dtype=torch.bool)
    for _, *voxel in nan_at:
        expected_nan[(slice(None), slice(None), *voxel)] = True
    assert torch.equal(out.isnan(), expected_nan)
    expected = warp_truth.scipy_warp(image, ddf.detach().nan_to_num(0.0), mode, padding)
    expected[expected_nan] = float("nan")
    assert_close_verbose(out, expected, torch.float32)
    grad_out = randn(gen, *out.shape)
    gi, gd = autograd_grads(out, (image, ddf), grad_out)
    assert bool(gi.isfinite().all()) and bool(gd.isfinite().all())
    for _, *voxel in nan_at:
        assert torch.equal(gd[(0, slice(None), *voxel)], torch.zeros(3))
    ei, _, _ = warp_truth.scatter_image_grad(image.shape, ddf, grad_out, mode, padding)
    assert_close_verbose(gi, ei, torch.float32, name="d image")


def _stencil_hits(points, size, padding, mode, target):
    """Whether the stencil of each sampling point reads voxel `target`, [B, *S]."""
    hit = torch.ones(points.shape[0], *points.shape[2:], dtype=torch.bool)
    for i, n in enumerate(size):
        p = points[:, i].clamp(0, n - 1) if padding == "border" else points[:, i]
        if mode == "nearest":
            hit &= torch.round(p) == target[i]
        else:
            lower = torch.floor(p)
            hit &= (lower == target[i]) | (lower + 1 == target[i])
    return hit


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_image_propagates_to_its_stencil(backend, mode, padding, gen):
    """A NaN image voxel makes NaN exactly the outputs whose stencil reads it (a corner of
    weight 0 included: 0 * NaN), in its own channel and batch item only."""
    image, ddf = _inputs(gen, (2, 2, 7, 8), (1, 2, 9, 6), scale=1.2)
    points = _points(ddf)
    # The NaN goes where output voxel (4, 3) samples, so that some output reads it.
    target = tuple(int(points[0, i, 4, 3].round().clamp(0, n - 1)) for i, n in enumerate((7, 8)))
    image[(0, 1, *target)] = float("nan")
    out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
    expected_nan = torch.zeros(out.shape, dtype=torch.bool)
    expected_nan[0, 1] = _stencil_hits(points, (7, 8), padding, mode, target)[0]
    assert bool(expected_nan.any())
    assert torch.equal(out.isnan(), expected_nan)
    expected = warp_truth.scipy_warp(image.nan_to_num(0.0), ddf, mode, padding)
    expected[expected_nan] = float("nan")
    assert_close_verbose(out, expected, torch.float32)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_displacement(backend, mode, padding, gen):
    """±inf along axis 0 (other components 0): zeros gives 0, border the edge slice; the
    backward neither crashes nor makes NaN, and the gradient along axis 0 is 0 there (all
    of it with zeros padding: the whole stencil is outside)."""
    image = rand(gen, 1, 2, 5, 6, 4)
    ddf = torch.zeros(1, 3, 5, 6, 4)
    ddf[0, 0, 1, 2, 3] = float("inf")
    ddf[0, 0, 3, 0, 1] = float("-inf")
    image.requires_grad_()
    ddf.requires_grad_()
    out = warp(image, ddf, mode=mode, padding=padding, backend=backend)
    with torch.no_grad():
        expected = image.clone()
        if padding == "zeros":
            expected[:, :, 1, 2, 3] = 0
            expected[:, :, 3, 0, 1] = 0
        else:
            expected[:, :, 1, 2, 3] = image[:, :, -1, 2, 3]
            expected[:, :, 3, 0, 1] = image[:, :, 0, 0, 1]
    assert torch.equal(out, expected)
    if mode == "linear":
        gi, gd = autograd_grads(out, (image, ddf), torch.ones_like(out))
        assert bool(gi.isfinite().all()) and bool(gd.isfinite().all())
        axes = slice(None) if padding == "zeros" else 0
        assert gd[0, axes, 1, 2, 3].eq(0).all() and gd[0, axes, 3, 0, 1].eq(0).all()


# Non-finite values follow the reference term by term (csrc/include/warp.h file comment):
# out = sum_k w_k * v_k over the corners inside, so an infinite corner gives inf where its
# weight is positive and NaN (inf * 0) where it is exactly 0; the displacement gradient is
# sum_k c_k * dw_k/dp_i (c_k the sum over channels of grad_out * v_k, a padding corner
# counting as 0) and exactly 0 along a clamped axis; nearest's displacement gradient is
# (sum_c grad_out) * 0 along each unclamped axis. Dyadic inputs (multiples of 1/4, some
# points on the lattice: weights exactly 0) make float32 and float64 agree on every pattern.
NON_FINITE = ("inf_image", "nan_image", "inf_ddf", "nan_ddf", "non_finite_grad_out",
              "huge_image")


def _non_finite_case(gen, kind, ndim, batch_image=2):
    spatial = (5, 6, 7)[:ndim]
    image = rand(gen, batch_image, 2, *spatial, dtype=torch.float64)
    ddf = torch.randint(-6, 7, (1, ndim, *spatial), generator=gen).double() / 4
    grad_out = torch.randint(-8, 9, (2, 2, *spatial), generator=gen).double() / 8
    centre, low, high = (2,) * ndim, (1,) * ndim, (3,) * ndim
    if kind == "inf_image":
        image[(0, 1) + centre] = float("inf")
        image[(1, 0) + high] = float("-inf")
        image[(1, 0) + low] = float("inf")
    elif kind == "nan_image":
        image[(0, 1) + centre] = float("nan")
    elif kind == "inf_ddf":
        ddf[(0, 0) + centre] = float("inf")
        ddf[(0, ndim - 1) + high] = float("-inf")
    elif kind == "nan_ddf":
        ddf[(0, 0) + centre] = float("nan")
    elif kind == "non_finite_grad_out":
        grad_out[(0, 1) + centre] = float("nan")
        grad_out[(1, 0) + high] = float("inf")
        grad_out[(1, 1) + low] = float("-inf")
        grad_out[(1, 1, 0) + (4,) * (ndim - 1)] = float("inf")  # samples partly outside
    else:  # huge_image: neighbours along the last axis at ±3e38 (their lerp difference
        # overflows float32; the weighted sum does not)
        image[(0, 1) + centre] = 3e38
        image[(0, 1) + centre[:-1] + (3,)] = -3e38
        grad_out /= 8  # keeps the exact ddf gradient below the float32 maximum
    return image, ddf, grad_out


def _warp_and_grads(image, ddf, grad_out, backend, dtype, mode, padding, deterministic=None):
    i = image.to(dtype).requires_grad_()
    d = ddf.to(dtype).requires_grad_()
    out = warp(i, d, mode=mode, padding=padding, backend=backend, deterministic=deterministic)
    gi, gd = torch.autograd.grad(out, (i, d), grad_out.to(dtype))
    return out.detach(), gi, gd


# NumPy (the Triton interpreter) warns on inf * 0 and inf - inf, computed here on purpose.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize(("backend", "dtype"), [
    pytest.param("cpu", torch.float64, id="cpu-f64"),
    pytest.param("cpu", torch.float32, id="cpu-f32"),
    pytest.param("triton", torch.float32, id="triton-f32"),
    pytest.param("torch", torch.float32, id="torch-f32")])
def test_non_finite_values_follow_the_reference(backend, dtype, ndim, mode, padding, kind, gen):
    """inf / NaN in the image, the ddf or grad_out (and image values whose lerp differences
    overflow): output, image gradient and ddf gradient NaN, +inf and -inf exactly where the
    float64 reference has them, every finite element within tolerance."""
    require_backend(backend, "cpu", dtype)
    if kind == "huge_image" and dtype == torch.float64:
        pytest.skip("±3e38 does not overflow float64")
    image, ddf, grad_out = _non_finite_case(gen, kind, ndim)
    expected = _warp_and_grads(image, ddf, grad_out, "torch", torch.float64, mode, padding)
    # The case must exercise something (inf_ddf and huge_image give finite results; a
    # nearest sample may miss the one non-finite image voxel).
    if kind in ("nan_ddf", "non_finite_grad_out") or (mode, kind) == ("linear", "inf_image"):
        assert any(bool((~e.isfinite()).any()) for e in expected)
    got = _warp_and_grads(image, ddf, grad_out, backend, dtype, mode, padding)
    for name, a, e in zip(("out", "d image", "d ddf"), got, expected, strict=True):
        assert_close_verbose(a, e, dtype, name=f"{kind} {name}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ("inf_image", "non_finite_grad_out", "huge_image"))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
def test_cpu_row_loops_non_finite(cpu_loops, ndim, padding, kind, gen):
    """The AVX2 and the portable row loops both redo a non-finite lerp term by term: the
    reference's NaN / inf pattern and values, in float32, forward and backward."""
    image, ddf, grad_out = _non_finite_case(gen, kind, ndim)
    expected = _warp_and_grads(image, ddf, grad_out, "torch", torch.float64, "linear", padding)
    got = _warp_and_grads(image, ddf, grad_out, "cpu", torch.float32, "linear", padding)
    for name, a, e in zip(("out", "d image", "d ddf"), got, expected, strict=True):
        assert_close_verbose(a, e, torch.float32, name=f"{cpu_loops} {kind} {name}")


# =========================================================================== determinism


def _scatter_heavy_case(gen, backend):
    """Many output voxels land on few image voxels: the image gradient is a contended
    scatter. Large enough that the cpu backend splits it over per-thread buffers."""
    if backend == "triton":
        image_shape, ddf_shape = (1, 2, 4, 5, 6), (2, 3, 6, 8, 8)
    else:
        image_shape, ddf_shape = (1, 4, 6, 7, 8), (2, 3, 24, 32, 32)
    image, _ = _inputs(gen, image_shape, ddf_shape)
    out_spatial = ddf_shape[2:]
    # Squeeze the output grid into the image: each image voxel gets many contributions.
    axes = [torch.linspace(-0.7, n - 0.3, m) for n, m in zip(image_shape[2:], out_spatial)]
    target = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    identity = torch.stack(torch.meshgrid(*[torch.arange(m, dtype=torch.float32)
                                            for m in out_spatial], indexing="ij"))
    ddf = (target - identity)[None] + randn(gen, *ddf_shape, scale=0.1)
    grad_out = randn(gen, 2, image_shape[1], *out_spatial)
    return image, ddf, grad_out


def _image_grad(image, ddf, grad_out, backend, deterministic):
    image = image.clone().requires_grad_()
    out = warp(image, ddf, backend=backend, deterministic=deterministic)
    (gi,) = torch.autograd.grad(out, image, grad_out)
    return gi


def _spy_launch_backward(calls):
    """Records the `deterministic` argument the kernels are launched with."""
    real = warp_module.launch_backward

    def spy(*args, **kwargs):
        calls.append(args[7])  # (grad_out, image, ddf, mode, padding, flags, backend, det...)
        return real(*args, **kwargs)

    return mock.patch.object(warp_module, "launch_backward", side_effect=spy)


# The Triton interpreter runs float atomics in one order, so two runs always agree bitwise
# there: the check cannot fail. It runs on a GPU (test_gpu_deterministic_bitwise); on the CPU
# the Triton fixed-point values are checked against float64 with their documented bound.


@pytest.mark.parametrize("how", ["argument", "global", "default"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_image_gradient(backend, how, gen, request):
    """deterministic=True, or torch.use_deterministic_algorithms(True) with the default:
    the deterministic path is taken; by default (the torch setting off) the fast path is
    taken. cpu: two runs agree bitwise (per-thread buffers summed in a fixed order).
    triton: the fixed-point result is within its documented bound of the float64 scatter
    (bitwise agreement cannot fail under the interpreter: see above)."""
    image, ddf, grad_out = _scatter_heavy_case(gen, backend)
    exact, count, abs_sum = warp_truth.scatter_image_grad(image.shape, ddf, grad_out)
    deterministic = True if how == "argument" else None
    if how == "global":
        request.getfixturevalue("deterministic_algorithms")
    calls: list[bool] = []
    with _spy_launch_backward(calls):
        first = _image_grad(image, ddf, grad_out, backend, deterministic)
        second = _image_grad(image, ddf, grad_out, backend, deterministic)
    assert calls == [how != "default"] * 2
    assert_close_verbose(first, exact, torch.float32)
    if how == "default":
        return
    if backend == "cpu":
        assert torch.equal(first, second)
        return
    # Random weights are not exact in float32: each contribution w * g carries up to about
    # 5 roundings (t, 1 - t, the products), added to the bound.
    terms = triton_fixed_point_terms(image.shape, ddf.shape)
    quantum = warp_truth.fixed_point_quantum_bound(float(grad_out.abs().max()), terms)
    warp_truth.assert_fixed_point_close(first, exact, count, quantum, abs_sum,
                                        contribution_ulps=6.0, name="d image")


def triton_fixed_point_terms(image_shape, ddf_shape, scatter: bool = False) -> int:
    """M of the fixed-point docstring: (B if Bi == 1 else 1) * n_out (+1 with the
    displacement-gradient scatter of integrate_velocity)."""
    batch = max(image_shape[0], ddf_shape[0])
    return (batch if image_shape[0] == 1 else 1) * math.prod(ddf_shape[2:]) + int(scatter)


def _dyadic_case(gen, ndim, batches=(1, 2)):
    """Exact contributions (warp_truth.dyadic_*): image [Bi, 2, *S_in], ddf [Bd, ndim,
    *S_out], grad_out [B, 2, *S_out] with magnitudes over 20 octaves."""
    s_in, s_out = ((5, 6, 7), (6, 7, 5)) if ndim == 3 else ((9, 8), (10, 11))
    image = rand(gen, batches[0], 2, *s_in[:ndim])
    ddf = warp_truth.dyadic_ddf(gen, batches[1], ndim, *s_out[:ndim])
    grad_out = warp_truth.dyadic_grad(gen, max(batches), 2, *s_out[:ndim])
    return image, ddf, grad_out


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_fixed_point_precision(backend, ndim, mode, padding, gen):
    """The deterministic image gradient against the exact sum of its contributions (dyadic
    inputs: every w * g is exact in float32 and every sum exact in float64) with the bound
    the fixed point documents: |grad - sum| <= m * q / 2 + 2**-24 |grad|,
    q <= vmax * max(M, 2**11) * 2**-60. Contributions span 20 binary orders, so a quantum
    tied to max |grad_out| alone, or float32 rounding of v / q, shows."""
    _check_fixed_point_precision(backend, "cpu", ndim, mode, padding, gen)


def _check_fixed_point_precision(backend, device, ndim, mode, padding, gen):
    image, ddf, grad_out = _dyadic_case(gen, ndim)
    exact, count, _ = warp_truth.scatter_image_grad(image.shape, ddf, grad_out, mode, padding)
    gi = _image_grad_mode(image.to(device), ddf.to(device), grad_out.to(device), backend, mode,
                          padding, True)
    terms = triton_fixed_point_terms(image.shape, ddf.shape)
    quantum = warp_truth.fixed_point_quantum_bound(float(grad_out.abs().max()), terms)
    warp_truth.assert_fixed_point_close(gi, exact, count, quantum, name="d image")


def _image_grad_mode(image, ddf, grad_out, backend, mode, padding, deterministic):
    image = image.clone().requires_grad_()
    out = warp(image, ddf, mode=mode, padding=padding, backend=backend,
               deterministic=deterministic)
    (gi,) = torch.autograd.grad(out, image, grad_out)
    return gi


def _poison_grad_out(ddf, grad_out, ndim):
    """One NaN, one +inf and one -inf in grad_out (different items and channels), at voxels
    that sample inside the image: +inf where the displacement is 0 (its upper corners have
    weight 0: inf * 0 = NaN there), -inf where it is 0.5 along every axis."""
    g = grad_out.clone()
    d = ddf.clone()
    g[(0, 1) + (2,) * ndim] = float("nan")
    d[(1, slice(None)) + (3,) * ndim] = 0.0
    g[(1, 0) + (3,) * ndim] = float("inf")
    d[(1, slice(None)) + (1,) * ndim] = 0.5
    g[(1, 1) + (1,) * ndim] = float("-inf")
    return d, g


# NumPy (the interpreter, and the float64 truth) warns on inf * 0 = NaN, which the kernels
# compute on purpose where an infinite grad_out meets a corner of weight 0.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_finite_grad_out_poisons_only_what_it_reaches(backend, ndim, mode, deterministic,
                                                          gen):
    """A NaN, a +inf and a -inf in grad_out make non-finite exactly the image-gradient
    elements their samples reach (inf * 0 at a corner of weight 0 is NaN, +inf meeting -inf
    is NaN), as the float64 scatter says; every other element keeps its value (within the
    fixed-point bound on the deterministic path, whose quantum comes from the finite
    values)."""
    _check_non_finite_grad_out(backend, "cpu", ndim, mode, deterministic, gen)


def _check_non_finite_grad_out(backend, device, ndim, mode, deterministic, gen):
    image, ddf, grad_out = _dyadic_case(gen, ndim)
    ddf, grad_out = _poison_grad_out(ddf, grad_out, ndim)
    exact, count, _ = warp_truth.scatter_image_grad(image.shape, ddf, grad_out, mode, "zeros")
    assert bool((~exact.isfinite()).any()) and bool(exact.isfinite().any())
    gi = _image_grad_mode(image.to(device), ddf.to(device), grad_out.to(device), backend, mode,
                          "zeros", deterministic)
    if backend in ("triton", "cuda") and deterministic:
        finite_max = float(grad_out[grad_out.isfinite()].abs().max())
        quantum = warp_truth.fixed_point_quantum_bound(
            finite_max, triton_fixed_point_terms(image.shape, ddf.shape))
        warp_truth.assert_fixed_point_close(gi, exact, count, quantum, name="d image")
    else:
        assert_close_verbose(gi, exact, torch.float32, name="d image")


# =========================================================================== module


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_warp_module(backend, gen):
    image, ddf = _inputs(gen, (2, 2, 6, 5, 4), (1, 3, 5, 6, 4))
    layer = Warp(mode="nearest", padding="border", backend=backend)
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    assert "mode='nearest'" in repr(layer) and "padding='border'" in repr(layer)
    assert torch.equal(layer(image, ddf), warp(image, ddf, mode="nearest", padding="border",
                                               backend=backend))
    default = Warp(backend=backend)
    assert (default.mode, default.padding) == ("linear", "zeros")
    image.requires_grad_()
    default(image, ddf).sum().backward()
    assert image.grad is not None


# =========================================================================== millimetres


def _rotation_spacing_affine(angle_deg: float, spacing, translation=(10.0, -20.0, 30.0)):
    """4x4 voxel-to-world affine: rotation about axis 2 (in the 0-1 plane) times spacing."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = translation
    return affine


def test_ddf_to_mm_by_hand():
    """mm = A · vox with A the linear part; the translation plays no role."""
    # Spacing (2, 3, 0.5), then 90° about axis 0: A = [[2, 0, 0], [0, 0, -0.5], [0, 3, 0]].
    affine = np.array([[2.0, 0, 0, 5], [0, 0, -0.5, 7], [0, 3, 0, -9], [0, 0, 0, 1]])
    ddf = torch.empty(1, 3, 2, 3, 4, dtype=torch.float64)
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = 1.0, 2.0, 4.0
    mm = ddf_to_mm(ddf, affine)
    expected = torch.tensor([2.0, -2.0, 6.0], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    assert_close_verbose(mm, expected.expand_as(mm), torch.float64)
    assert_close_verbose(ddf_from_mm(mm, affine), ddf, torch.float64)
    # 30° about axis 2 with the same spacing, u = (1, 1, 2):
    # A u = (2 cos30 - 3 sin30, 2 sin30 + 3 cos30, 0.5 * 2).
    affine = _rotation_spacing_affine(30.0, (2.0, 3.0, 0.5))
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = 1.0, 1.0, 2.0
    r3 = math.sqrt(3.0)
    expected = torch.tensor([r3 - 1.5, 1.0 + 1.5 * r3, 1.0], dtype=torch.float64)
    assert_close_verbose(ddf_to_mm(ddf, torch.from_numpy(affine)),
                         expected.reshape(1, 3, 1, 1, 1).expand_as(mm), torch.float64)


@pytest.mark.parametrize("ndim", (2, 3))
def test_mm_round_trip(ndim, gen):
    ddf = randn(gen, 2, ndim, *(3, 4, 5)[:ndim], dtype=torch.float64, scale=2.0)
    affine = torch.eye(ndim + 1, dtype=torch.float64)
    affine[:ndim, :] = randn(gen, ndim, ndim + 1, dtype=torch.float64) + 2 * torch.eye(
        ndim, ndim + 1, dtype=torch.float64)
    mm = ddf_to_mm(ddf, affine)
    assert_close_verbose(ddf_from_mm(mm, affine), ddf, torch.float64)
    assert_close_verbose(ddf_to_mm(ddf, affine.numpy()), mm, torch.float64, name="numpy affine")
    expected = torch.einsum("ij,bj...->bi...", affine[:ndim, :ndim], ddf)
    assert_close_verbose(mm, expected, torch.float64)
    mm32 = ddf_to_mm(ddf.float(), affine)
    assert mm32.dtype == torch.float32
    assert_close_verbose(mm32, mm.float(), torch.float32)


def test_mm_batched_affines(gen):
    ddf = randn(gen, 3, 3, 2, 3, 4, dtype=torch.float64)
    affines = torch.from_numpy(np.stack([
        _rotation_spacing_affine(a, sp) for a, sp in
        [(0.0, (1.0, 1.0, 1.0)), (30.0, (2.0, 3.0, 0.5)), (-75.0, (0.8, 0.8, 2.5))]
    ]))
    mm = ddf_to_mm(ddf, affines)
    for b in range(3):
        assert_close_verbose(mm[b : b + 1], ddf_to_mm(ddf[b : b + 1], affines[b]), torch.float64)
    assert_close_verbose(ddf_from_mm(mm, affines), ddf, torch.float64)
    one = ddf_to_mm(ddf, affines[1:2])  # [1, 4, 4] broadcasts over the batch
    assert_close_verbose(one, ddf_to_mm(ddf, affines[1]), torch.float64)


# =========================================================================== torch.compile


# Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(gen):
    """warp under torch.compile(fullgraph=True): no graph break; forward and backward as
    in eager mode."""
    require_backend("cpu", "cpu", torch.float32)
    image, ddf = _inputs(gen, (2, 2, 5, 6, 7), (1, 3, 6, 5, 4))

    def loss(image, ddf):
        moved = warp(image, ddf, padding="border", backend="cpu")
        return moved, (moved * moved).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True)
        results = []
        for fn in (loss, compiled):
            i, d = image.clone().requires_grad_(), ddf.clone().requires_grad_()
            moved, total = fn(i, d)
            total.backward()
            results.append((moved.detach(), i.grad, d.grad))
    finally:
        torch._dynamo.reset()
    for name, eager, comp in zip(("out", "d image", "d ddf"), *results):
        assert_close_verbose(comp, eager, torch.float32, name=name)


@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic_shapes(backend, gen):
    """warp (linear zeros and nearest border) under torch.compile(fullgraph=True,
    dynamic=True): two sizes from one graph, as in eager mode. The torch backend compiles
    the reference (its ndim from a SymInt channel count broke tracing before)."""

    def fn(image, ddf):
        return (warp(image, ddf, backend=backend),
                warp(image, ddf, mode="nearest", padding="border", backend=backend))

    def make(spatial):
        image = rand(gen, 2, 2, *spatial).requires_grad_()
        return image, randn(gen, 1, 3, *spatial, scale=1.5).requires_grad_()

    spatial = ((4, 5, 6), (5, 4, 7)) if backend == "triton" else ((5, 6, 7), (7, 5, 9))
    compile_two_sizes(fn, make, spatial, ("linear", "nearest", "d image", "d ddf"))


@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
def test_torch_compile_dynamic_shapes_converters(gen):
    """ddf_to_grid, grid_to_ddf, ddf_from_mm (NumPy affine) and ddf_to_mm (tensor affine,
    its checks an in-graph assert) under torch.compile(fullgraph=True, dynamic=True): two
    sizes from one graph, as in eager mode (the NumPy affine's dtype check and the affine's
    value checks broke fullgraph tracing before)."""
    affine_np = np.array([[2.0, 0, 0, 1], [0, 0, 3, 2], [0, -1.5, 0, 3], [0, 0, 0, 1]])
    affine_t = torch.from_numpy(affine_np)

    def fn(ddf, grid):
        return (ddf_to_grid(ddf, align_corners=False, size=(9, 8, 7)), grid_to_ddf(grid),
                ddf_from_mm(ddf, affine_np), ddf_to_mm(ddf, affine_t))

    def make(spatial):
        grid = (torch.rand(1, *spatial, 3, generator=gen) * 2 - 1).requires_grad_()
        return randn(gen, 1, 3, *spatial).requires_grad_(), grid

    compile_two_sizes(fn, make, ((5, 6, 7), (7, 5, 9)),
                       ("to grid", "from grid", "from mm", "to mm", "d ddf", "d grid"))


# =========================================================================== dispatch


def test_available_backends():
    names = available_backends()
    assert "torch" in names and "cpu" in names
    status = backend_status()
    assert set(status) == {"torch", "cpu", "triton", "cuda"}
    assert all(status[n] is None for n in names)
    assert all(isinstance(status[n], str) and status[n] for n in status if n not in names)
    assert set(backends_here()) <= set(names)


def _spy_reference():
    return mock.patch.object(warp_module.reference, "warp", wraps=reference.warp)


def test_mrus_backend_env_selects(monkeypatch, gen):
    image, ddf = _inputs(gen, (1, 1, 4, 5), (1, 2, 4, 5))
    monkeypatch.setenv("MRUS_BACKEND", "torch")
    with _spy_reference() as spy:
        warp(image, ddf)
    assert spy.call_count == 1
    monkeypatch.setenv("MRUS_BACKEND", "cpu")
    with _spy_reference() as spy:
        out = warp(image, ddf)
    assert spy.call_count == 0
    assert_close_verbose(out, reference.warp(image, ddf), torch.float32)
    # An explicit backend= wins over the variable; a named one that cannot serve raises.
    monkeypatch.setenv("MRUS_BACKEND", "cuda")
    warp(image, ddf, backend="torch")
    if backend_reason("cuda", "cpu") is not None:
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
            warp(image, ddf)
    monkeypatch.setenv("MRUS_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"warp: MRUS_BACKEND must be one of .*got 'gpu'"):
        warp(image, ddf)
    monkeypatch.setenv("MRUS_BACKEND", "")  # empty: auto (the cpu kernels on CPU tensors)
    with _spy_reference() as spy:
        warp(image, ddf)
    assert spy.call_count == 0


def test_explicit_backend_errors(monkeypatch, gen):
    monkeypatch.delenv("MRUS_BACKEND", raising=False)
    image, ddf = _inputs(gen, (1, 1, 4, 5), (1, 2, 4, 5))
    with pytest.raises(ValueError, match=r"warp: backend must be one of .*got 'bogus'"):
        warp(image, ddf, backend="bogus")
    with pytest.raises(ValueError, match=r"warp: backend must be one of .*got 3"):
        warp(image, ddf, backend=3)
    with pytest.raises(BackendUnavailableError,
                       match=r"warp: backend 'cuda' cannot serve this call: \w.+"):
        warp(image, ddf, backend="cuda")
    if backend_reason("triton") is None:  # interpreted here: switched off, it must say so
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            warp(image, ddf, backend="triton")


def test_info_lists_every_backend():
    result = subprocess.run(
        [sys.executable, "-m", "mrus_kernels.info"], capture_output=True, text=True,
        timeout=300, env=os.environ.copy(), check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mrus_kernels ")
    start = lines.index("backends:")
    status = backend_status()
    for name in ("torch", "cpu", "triton", "cuda"):
        line = next(ln for ln in lines[start:] if ln.split()[:1] == [name])
        if status[name] is None:
            assert line.split()[1] == "available", line
        else:
            assert "unavailable: " in line and len(line.split("unavailable: ")[1]) > 5, line


# =========================================================================== bad input

IMG = torch.ones(1, 2, 4, 5)
DDF = torch.zeros(1, 2, 4, 5)
IMG3 = torch.ones(1, 2, 3, 4, 5)
DDF3 = torch.zeros(1, 3, 3, 4, 5)
AFFINE = torch.eye(4)

# (call, exception, message): each message names the function, the argument and what was
# given.
BAD_INPUTS = {
    "image-not-tensor": (lambda: warp([[1.0]], DDF), TypeError,
                         r"warp: image must be a torch\.Tensor, got list"),
    "ddf-not-tensor": (lambda: warp(IMG, np.zeros((1, 2, 4, 5))), TypeError,
                       r"warp: ddf must be a torch\.Tensor, got ndarray"),
    "image-int": (lambda: warp(IMG.long(), DDF), TypeError,
                  r"warp: image must be a floating-point tensor .*got torch\.int64"),
    "ddf-int": (lambda: warp(IMG, DDF.int()), TypeError,
                r"warp: ddf must be a floating-point tensor .*got torch\.int32"),
    "ddf-bool": (lambda: warp(IMG, DDF.bool()), TypeError, r"warp: ddf .*got torch\.bool"),
    "dtype-mismatch": (lambda: warp(IMG, DDF.double()), TypeError,
                       (r"warp: image and ddf must have the same dtype, got torch\.float32 "
                       r"and torch\.float64")),
    "device-mismatch": (lambda: warp(IMG, DDF.to("meta")), ValueError,
                        r"warp: image and ddf must be on the same device, got cpu and meta"),
    "image-rank-3": (lambda: warp(torch.ones(2, 4, 5), DDF), ValueError,
                     (r"warp: image must be \[B, C, H, W\] \(2D\) or \[B, C, D, H, W\] \(3D\), "
                     r"got shape \(2, 4, 5\)")),
    "image-rank-6": (lambda: warp(torch.ones(1, 1, 2, 3, 4, 5), DDF), ValueError,
                     r"warp: image must be .*got shape \(1, 1, 2, 3, 4, 5\)"),
    "ddf-rank": (lambda: warp(IMG3, DDF), ValueError,
                 r"warp: ddf must have the same rank as image .*got shape \(1, 2, 4, 5\)"),
    "ddf-channels": (lambda: warp(IMG3, torch.zeros(1, 2, 3, 4, 5)), ValueError,
                     r"warp: ddf must have 3 channels .*got 2 \(shape \(1, 2, 3, 4, 5\)\)"),
    "ddf-channels-2d": (lambda: warp(IMG, torch.zeros(1, 3, 4, 5)), ValueError,
                        r"warp: ddf must have 2 channels .*got 3"),
    "batch": (lambda: warp(torch.ones(2, 1, 4, 5), torch.zeros(3, 2, 4, 5)), ValueError,
              r"warp: image and ddf batch sizes must match or one must be 1, got 2 and 3"),
    "image-empty": (lambda: warp(torch.ones(1, 0, 4, 5), DDF), ValueError,
                    r"warp: image must not be empty, got shape \(1, 0, 4, 5\)"),
    "image-empty-batch": (lambda: warp(torch.ones(0, 1, 4, 5), DDF), ValueError,
                          r"warp: image must not be empty, got shape \(0, 1, 4, 5\)"),
    "ddf-empty": (lambda: warp(IMG, torch.zeros(1, 2, 0, 5)), ValueError,
                  r"warp: ddf must not be empty, got shape \(1, 2, 0, 5\)"),
    "mode": (lambda: warp(IMG, DDF, mode="cubic"), ValueError,
             r"warp: mode must be 'linear' or 'nearest', got 'cubic'"),
    "mode-none": (lambda: warp(IMG, DDF, mode=None), ValueError,
                  r"warp: mode must be .*got None"),
    "padding": (lambda: warp(IMG, DDF, padding="reflection"), ValueError,
                r"warp: padding must be 'zeros' or 'border', got 'reflection'"),
    "deterministic-str": (lambda: warp(IMG, DDF, deterministic="yes"), TypeError,
                          r"warp: deterministic must be None, True or False, got 'yes'"),
    "deterministic-int": (lambda: warp(IMG, DDF, deterministic=1), TypeError,
                          r"warp: deterministic must be None, True or False, got 1"),
    "module-mode": (lambda: Warp(mode="bilinear"), ValueError,
                    r"Warp: mode must be 'linear' or 'nearest', got 'bilinear'"),
    "module-padding": (lambda: Warp(padding="reflect"), ValueError,
                       r"Warp: padding must be 'zeros' or 'border', got 'reflect'"),
    # ddf_to_grid
    "to-grid-not-tensor": (lambda: ddf_to_grid("ddf"), TypeError,
                           r"ddf_to_grid: ddf must be a torch\.Tensor, got str"),
    "to-grid-int": (lambda: ddf_to_grid(DDF.long()), TypeError,
                    r"ddf_to_grid: ddf must be a floating-point tensor .*got torch\.int64"),
    "to-grid-rank": (lambda: ddf_to_grid(torch.zeros(1, 2, 5)), ValueError,
                     r"ddf_to_grid: ddf must be \[B, ndim, H, W\] .*got shape \(1, 2, 5\)"),
    "to-grid-empty": (lambda: ddf_to_grid(torch.zeros(1, 2, 0, 5)), ValueError,
                      r"ddf_to_grid: ddf must not be empty, got shape \(1, 2, 0, 5\)"),
    "to-grid-channels": (lambda: ddf_to_grid(torch.zeros(1, 3, 4, 5)), ValueError,
                         (r"ddf_to_grid: ddf must have 2 channels \(one per spatial axis\) "
                          r"for a 2D field, got 3")),
    "to-grid-align-str": (lambda: ddf_to_grid(DDF, align_corners="yes"), TypeError,
                          r"ddf_to_grid: align_corners must be True or False, got 'yes'"),
    "to-grid-align-int": (lambda: ddf_to_grid(DDF, align_corners=1), TypeError,
                          r"ddf_to_grid: align_corners must be True or False, got 1"),
    "to-grid-size-1": (lambda: ddf_to_grid(torch.zeros(1, 2, 1, 5)), ValueError,
                       (r"ddf_to_grid: align_corners=True needs every spatial size >= 2 .*"
                       r"got spatial shape \(1, 5\)")),
    "to-grid-target-size-1": (lambda: ddf_to_grid(DDF, size=(4, 1)), ValueError,
                              (r"ddf_to_grid: align_corners=True needs .*got spatial shape "
                              r"\(4, 1\)")),
    "to-grid-size-len": (lambda: ddf_to_grid(DDF, size=(4,)), ValueError,
                         r"ddf_to_grid: size must be 2 positive ints, got \(4,\)"),
    "to-grid-size-zero": (lambda: ddf_to_grid(DDF, size=(4, 0)), ValueError,
                          r"ddf_to_grid: size must be 2 positive ints, got \(4, 0\)"),
    "to-grid-size-float": (lambda: ddf_to_grid(DDF, size=(4, 5.0)), ValueError,
                           r"ddf_to_grid: size must be 2 positive ints, got \(4, 5\.0\)"),
    "to-grid-size-str": (lambda: ddf_to_grid(DDF, size="45"), ValueError,
                         r"ddf_to_grid: size must be 2 positive ints, got '45'"),
    # grid_to_ddf
    "to-ddf-not-tensor": (lambda: grid_to_ddf(None), TypeError,
                          r"grid_to_ddf: grid must be a torch\.Tensor, got NoneType"),
    "to-ddf-int": (lambda: grid_to_ddf(torch.zeros(1, 4, 5, 2, dtype=torch.int16)), TypeError,
                   r"grid_to_ddf: grid must be a floating-point tensor .*got torch\.int16"),
    "to-ddf-rank": (lambda: grid_to_ddf(torch.zeros(4, 5, 2)), ValueError,
                    (r"grid_to_ddf: grid must be \[B, H, W, 2\] or \[B, D, H, W, 3\], got shape "
                    r"\(4, 5, 2\)")),
    "to-ddf-last-dim": (lambda: grid_to_ddf(torch.zeros(1, 4, 5, 3)), ValueError,
                        r"grid_to_ddf: grid must be .*got shape \(1, 4, 5, 3\)"),
    "to-ddf-align": (lambda: grid_to_ddf(torch.zeros(1, 4, 5, 2), align_corners=None),
                     TypeError, r"grid_to_ddf: align_corners must be True or False, got None"),
    "to-ddf-size-1": (lambda: grid_to_ddf(torch.zeros(1, 4, 1, 2)), ValueError,
                      r"grid_to_ddf: align_corners=True needs .*got spatial shape \(4, 1\)"),
    "to-ddf-size": (lambda: grid_to_ddf(torch.zeros(1, 4, 5, 2), size=[4, 5, 6]), ValueError,
                    r"grid_to_ddf: size must be 2 positive ints, got \[4, 5, 6\]"),
    # ddf_from_mm / ddf_to_mm
    "from-mm-not-tensor": (lambda: ddf_from_mm(np.zeros((1, 3, 2, 2, 2)), AFFINE), TypeError,
                           r"ddf_from_mm: ddf_mm must be a torch\.Tensor, got ndarray"),
    "from-mm-int": (lambda: ddf_from_mm(DDF3.long(), AFFINE), TypeError,
                    r"ddf_from_mm: ddf_mm must be a floating-point tensor .*got torch\.int64"),
    "from-mm-rank": (lambda: ddf_from_mm(torch.zeros(3, 4, 5), AFFINE), ValueError,
                     r"ddf_from_mm: ddf_mm must be \[B, ndim, H, W\] .*got shape \(3, 4, 5\)"),
    "from-mm-channels": (lambda: ddf_from_mm(torch.zeros(1, 2, 3, 4, 5), AFFINE), ValueError,
                         r"ddf_from_mm: ddf_mm must have 3 channels .*3D field, got 2"),
    "from-mm-affine-type": (lambda: ddf_from_mm(DDF3, [[1.0]]), TypeError,
                            (r"ddf_from_mm: affine must be a numpy array or torch\.Tensor, "
                            r"got list")),
    "from-mm-affine-shape": (lambda: ddf_from_mm(DDF3, torch.eye(3)), ValueError,
                             (r"ddf_from_mm: affine must be \[4, 4\] or \[B, 4, 4\] for 3D, got "
                             r"shape \(3, 3\)")),
    "from-mm-affine-rank": (lambda: ddf_from_mm(DDF3, torch.eye(4).expand(1, 1, 4, 4)),
                            ValueError, (r"ddf_from_mm: affine must be .*got shape "
                                        r"\(1, 1, 4, 4\)")),
    "from-mm-affine-batch": (lambda: ddf_from_mm(DDF3.expand(2, -1, -1, -1, -1),
                                                 torch.eye(4).expand(3, 4, 4)), ValueError,
                             r"ddf_from_mm: affine batch size must be 1 or 2, got 3"),
    "from-mm-singular": (lambda: ddf_from_mm(DDF3, torch.diag(torch.tensor([1.0, 0, 1, 1]))),
                         ValueError,
                         (r"ddf_from_mm: affine must have an invertible linear part, got "
                          r"determinant 0\.0")),
    "from-mm-nan": (lambda: ddf_from_mm(DDF3, torch.full((4, 4), float("nan"))), ValueError,
                    r"ddf_from_mm: affine must be finite"),
    "to-mm-not-tensor": (lambda: ddf_to_mm(1.0, AFFINE), TypeError,
                         r"ddf_to_mm: ddf must be a torch\.Tensor, got float"),
    "to-mm-empty": (lambda: ddf_to_mm(torch.zeros(1, 3, 0, 4, 5), AFFINE), ValueError,
                    r"ddf_to_mm: ddf must not be empty, got shape \(1, 3, 0, 4, 5\)"),
    "to-mm-affine-2d": (lambda: ddf_to_mm(DDF, np.eye(4)), ValueError,
                        (r"ddf_to_mm: affine must be \[3, 3\] or \[B, 3, 3\] for 2D, got shape "
                        r"\(4, 4\)")),
    "to-mm-singular": (lambda: ddf_to_mm(DDF, np.zeros((3, 3))), ValueError,
                       (r"ddf_to_mm: affine must have an invertible linear part, got "
                        r"determinant 0\.0")),
    "to-grid-size-bool": (lambda: ddf_to_grid(DDF, size=(True, 5)), ValueError,
                          r"ddf_to_grid: size must be 2 positive ints, got \(True, 5\)"),
    # Affines of odd types or devices, sizes beyond int64: errors that name the argument.
    "from-mm-affine-object": (lambda: ddf_from_mm(DDF3, np.eye(4, dtype=object)), TypeError,
                              (r"ddf_from_mm: affine must hold real numbers \(a float or "
                               r"integer array\), got a numpy array of dtype object")),
    "from-mm-affine-str": (lambda: ddf_from_mm(DDF3, np.full((4, 4), "1")), TypeError,
                           r"ddf_from_mm: affine must hold real numbers .*dtype <U1"),
    "from-mm-affine-complex-np": (lambda: ddf_from_mm(DDF3, np.eye(4, dtype=np.complex128)),
                                  TypeError,
                                  r"ddf_from_mm: affine must hold real numbers .*complex128"),
    "from-mm-affine-meta": (lambda: ddf_from_mm(DDF3, torch.eye(4, device="meta")),
                            ValueError,
                            (r"ddf_from_mm: affine must hold values \(a CPU or CUDA tensor\), "
                             r"got a tensor on device meta")),
    "to-mm-affine-meta": (lambda: ddf_to_mm(DDF, torch.eye(3, device="meta")), ValueError,
                          r"ddf_to_mm: affine must hold values .*device meta"),
    "to-mm-affine-complex": (lambda: ddf_to_mm(DDF, torch.eye(3, dtype=torch.complex64)),
                             TypeError,
                             (r"ddf_to_mm: affine must hold real numbers \(a float or integer "
                              r"tensor\), got dtype torch\.complex64")),
    "to-mm-affine-bool": (lambda: ddf_to_mm(DDF, torch.eye(3, dtype=torch.bool)), TypeError,
                          r"ddf_to_mm: affine must hold real numbers .*got dtype torch\.bool"),
    "to-mm-affine-batch-1": (lambda: ddf_to_mm(DDF, torch.eye(3).expand(2, 3, 3)), ValueError,
                             r"ddf_to_mm: affine batch size must be 1, got 2"),
    "to-grid-size-huge": (lambda: ddf_to_grid(DDF, size=(2**70, 5)), ValueError,
                          (r"ddf_to_grid: size must be 2 positive ints, got "
                           r"\(1180591620717411303424, 5\) \(each at most 2\*\*63 - 1\)")),
    "from-grid-size-huge-np": (lambda: grid_to_ddf(torch.zeros(1, 4, 5, 2),
                                                   size=(np.uint64(2**64 - 1), 5)), ValueError,
                               r"grid_to_ddf: size must be 2 positive ints, got .*2\*\*63"),
}


test_bad_input = bad_input_test(BAD_INPUTS)


def test_validation_runs_before_dispatch(monkeypatch):
    """Bad input is reported as bad input whichever backend was asked for."""
    raises_before_dispatch(monkeypatch, lambda: warp(IMG, DDF, mode="cubic"), "warp: mode must be")


def test_affine_of_any_real_numpy_layout():
    """Integer, big-endian, float16 and reversed-stride NumPy affines (and integer tensors)
    are real affines: the same result as the float64 one."""
    ddf = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)
    affine = np.array([[2.0, 0, 0, 1], [0, 0, 3, 2], [0, -1, 0, 3], [0, 0, 0, 1]])
    expected = ddf_to_mm(ddf, affine)
    flipped = np.ascontiguousarray(affine[::-1])[::-1]  # negative strides
    for other in (affine.astype(np.int32), affine.astype(">f8"), affine.astype(np.float16),
                  flipped, torch.from_numpy(affine).long()):
        assert_close_verbose(ddf_to_mm(ddf, other), expected, torch.float64)
        assert_close_verbose(ddf_from_mm(expected, other), ddf, torch.float64)


def test_align_corners_accepts_numpy_bool():
    ddf = torch.randn(1, 2, 4, 5)
    assert torch.equal(ddf_to_grid(ddf, align_corners=np.bool_(False)),
                       ddf_to_grid(ddf, align_corners=False))


def test_size_accepts_numpy_ints():
    ddf = torch.zeros(1, 2, 4, 5)
    grid = ddf_to_grid(ddf, size=(np.int64(8), np.int32(10)))
    assert_close_verbose(grid_to_ddf(grid, size=(8, 10)), ddf, torch.float32)


def test_align_corners_false_allows_size_one():
    ddf = torch.zeros(1, 2, 1, 5)
    grid = ddf_to_grid(ddf, align_corners=False)
    assert_close_verbose(grid_to_ddf(grid, align_corners=False), ddf, torch.float32)


# =========================================================================== Triton launch


def _triton_modules():
    """(mrus_kernels.triton.warp, mrus_kernels.triton._common), or a skip with the reason."""
    require_backend("triton", "cpu", torch.float32)
    return (importlib.import_module("mrus_kernels.triton.warp"),
            importlib.import_module("mrus_kernels.triton._common"))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
def test_triton_idx64_variants(monkeypatch, ndim, mode, padding, deterministic, gen):
    """With _common.IDX64_THRESHOLD lowered, every launch takes the 64-bit offset variant
    (read at call time), and forward and backward still match the reference."""
    triton_warp, triton_common = _triton_modules()
    monkeypatch.setattr(triton_common, "IDX64_THRESHOLD", 100)
    seen = spy_warp_idx64(monkeypatch, triton_warp)
    (gi, gd), (ei, ed) = _backward_case(gen, "triton", ndim, torch.float32, padding, mode,
                                        deterministic)
    assert seen and all(seen), seen
    assert_close_verbose(gi, ei, torch.float32, name="d image")
    assert_close_verbose(gd, ed, torch.float32, name="d ddf")


def test_triton_grid_limit_is_a_clear_error(monkeypatch, gen):
    """More displacement items than grid axis 1 holds: a ValueError naming the limit (not
    an assert, gone under python -O). A broadcast displacement then keeps its batch in one
    program instead of splitting it over the axis, and still works."""
    triton_warp, triton_common = _triton_modules()
    monkeypatch.setattr(triton_common, "MAX_GRID_YZ", 2)
    image, ddf = _inputs(gen, (3, 2, 5, 6), (3, 2, 4, 5))
    with pytest.raises(ValueError, match=r"warp \(triton\): batch items needs 3 programs on "
                                         r"grid axis 1, at most 2 fit"):
        warp(image, ddf, backend="triton")
    out = warp(image, ddf[:1], backend="triton")
    assert_close_verbose(out, warp_truth.scipy_warp(image, ddf[:1]), torch.float32)


@pytest.mark.parametrize("split", [True, False], ids=["batch-on-grid", "batch-in-program"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
def test_triton_broadcast_ddf_batch_paths(monkeypatch, ndim, mode, split, gen):
    """A broadcast displacement (batch 1, image batch 3) on a small output puts the batch on
    grid axis 1 (forward, and a backward without the displacement gradient; with it, the
    displacement is expanded and its per-item gradients summed); on a large output one
    program walks the batch. Both paths against the reference, gradients included."""
    triton_warp, _ = _triton_modules()
    if not split:
        monkeypatch.setattr(triton_warp, "SPLIT_BELOW_BLOCKS", 0)
        monkeypatch.setattr(warp_module, "_SPLIT_BATCH_BELOW_VOXELS", 0)
    grids = []
    real = triton_warp._launch

    def spy(*args, **kwargs):
        lp = real(*args, **kwargs)
        grids.append(lp.grid[1])
        return lp

    monkeypatch.setattr(triton_warp, "_launch", spy)
    shape_in, shape_out = ((3, 2, 5, 6, 4), (1, 3, 4, 5, 6)) if ndim == 3 else \
        ((3, 2, 7, 6), (1, 2, 5, 8))
    image, ddf = _inputs(gen, shape_in, shape_out)
    grad_out = randn(gen, 3, 2, *shape_out[2:])
    ref_image, ref_ddf = image.double().requires_grad_(), ddf.double().requires_grad_()
    expected = reference.warp(ref_image, ref_ddf, mode)
    ei, ed = autograd_grads(expected, (ref_image, ref_ddf), grad_out.double())
    for need in ("image", "both"):
        grids.clear()
        i = image.clone().requires_grad_()
        d = ddf.clone().requires_grad_(need == "both")
        with poisoned_empty():
            out = warp(i, d, mode=mode, backend="triton")
            grads = autograd_grads(out, (i, d) if need == "both" else (i,), grad_out)
        assert_close_verbose(out, expected, torch.float32, name="out")
        assert_close_verbose(grads[0], ei, torch.float32, name=f"d image ({need})")
        if need == "both":
            assert_close_verbose(grads[1], ed, torch.float32, name="d ddf")
        # Forward, then backward: 3 programs per block (one per item) when split.
        assert grids == [3 if split else 1] * 2, grids


# =========================================================================== GPU


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_gpu_forward_matches_reference(gpu_backend, dtype, ndim, mode, padding, gen):
    image_shape, ddf_shape = SHAPES[ndim]
    image, ddf = _inputs(gen, image_shape, ddf_shape, dtype, device="cuda")
    expected = reference.warp(image, ddf, mode, padding)
    with poisoned_empty():
        out = warp(image, ddf, mode=mode, padding=padding, backend=gpu_backend)
    assert out.device == image.device and out.dtype == dtype
    assert_close_verbose(out, expected, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=DTYPE_IDS.get)
def test_gpu_backward_matches_reference(gpu_backend, dtype, ndim, padding, gen):
    image_shape, ddf_shape = SHAPES[ndim]
    image, ddf = _inputs(gen, image_shape, ddf_shape, dtype, device="cuda")
    grad_out = randn(gen, 2, image_shape[1], *ddf_shape[2:], dtype=dtype, device="cuda")
    ref_image, ref_ddf = image.clone().requires_grad_(), ddf.clone().requires_grad_()
    ei, ed = autograd_grads(reference.warp(ref_image, ref_ddf, "linear", padding),
                    (ref_image, ref_ddf), grad_out)
    for deterministic in (False, True):
        i, d = image.clone().requires_grad_(), ddf.clone().requires_grad_()
        with poisoned_empty():
            out = warp(i, d, padding=padding, backend=gpu_backend, deterministic=deterministic)
            gi, gd = autograd_grads(out, (i, d), grad_out)
        assert_close_verbose(gi, ei, dtype, name=f"d image (deterministic={deterministic})")
        assert_close_verbose(gd, ed, dtype, name=f"d ddf (deterministic={deterministic})")


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
def test_gpu_nearest_gradients(gpu_backend, padding, gen):
    image, ddf = _inputs(gen, *SHAPES[3], device="cuda")
    grad_out = randn(gen, 2, 3, *SHAPES[3][1][2:], device="cuda")
    image.requires_grad_()
    ddf.requires_grad_()
    out = warp(image, ddf, mode="nearest", padding=padding, backend=gpu_backend)
    gi, gd = autograd_grads(out, (image, ddf), grad_out)
    expected = _nearest_image_grad(image.cpu(), ddf.cpu(), grad_out.cpu(), padding)
    assert_close_verbose(gi, expected.float(), torch.float32)
    assert torch.equal(gd, torch.zeros_like(ddf))


@pytest.mark.cuda
def test_gpu_nan_and_inf(gpu_backend, gen):
    image, ddf = _inputs(gen, (2, 3, 6, 7, 5), (1, 3, 5, 6, 7), device="cuda")
    ddf[0, 1, 2, 3, 4] = float("nan")
    ddf[0, 0, 1, 1, 1] = float("inf")
    image[1, 2, 3, 3, 3] = float("nan")
    for padding in PADDINGS:
        out = warp(image, ddf, padding=padding, backend=gpu_backend)
        assert_close_verbose(out, reference.warp(image, ddf, "linear", padding), torch.float32)
        assert bool(out[:, :, 2, 3, 4].isnan().all())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_gpu_deterministic_bitwise(gpu_backend, dtype, gen, deterministic_algorithms):
    """Heavily contended scatter: float atomics would vary from run to run."""
    image = rand(gen, 1, 4, 8, 9, 10, dtype=dtype, device="cuda")
    axes = [torch.linspace(-0.5, n - 0.5, 64) for n in (8, 9, 10)]
    target = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    identity = torch.stack(torch.meshgrid(*[torch.arange(64.0)] * 3, indexing="ij"))
    ddf = ((target - identity)[None].expand(2, -1, -1, -1, -1)
           + randn(gen, 2, 3, 64, 64, 64, scale=0.2)).to("cuda", dtype)
    grad_out = randn(gen, 2, 4, 64, 64, 64, dtype=dtype, device="cuda")
    grads = [_image_grad(image, ddf, grad_out, gpu_backend, None) for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    ref_image = image.clone().requires_grad_()
    (expected,) = autograd_grads(reference.warp(ref_image, ddf), (ref_image,), grad_out)
    assert_close_verbose(grads[0], expected, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
def test_gpu_fixed_point_precision(gpu_backend, ndim, mode, padding, gen):
    """test_fixed_point_precision on the GPU kernels (the CUDA fixed point included)."""
    _check_fixed_point_precision(gpu_backend, "cuda", ndim, mode, padding, gen)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", (2, 3))
def test_gpu_non_finite_grad_out_poisons_only_what_it_reaches(gpu_backend, ndim, mode,
                                                              deterministic, gen):
    _check_non_finite_grad_out(gpu_backend, "cuda", ndim, mode, deterministic, gen)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [True, False], ids=["batch-on-grid", "batch-in-program"])
def test_gpu_broadcast_ddf_batch_paths(gpu_backend, split, monkeypatch, gen):
    """A broadcast displacement with its gradient: expanded and split over the batch (small
    output) or walked by one thread/program (threshold 0), against the reference."""
    if not split:
        monkeypatch.setattr(warp_module, "_SPLIT_BATCH_BELOW_VOXELS", 0)
        if gpu_backend == "triton":
            monkeypatch.setattr(importlib.import_module("mrus_kernels.triton.warp"),
                                "SPLIT_BELOW_BLOCKS", 0)
    image, ddf = _inputs(gen, (4, 3, 9, 10, 11), (1, 3, 12, 7, 9), device="cuda")
    grad_out = randn(gen, 4, 3, 12, 7, 9, device="cuda")
    ref_image, ref_ddf = image.double().requires_grad_(), ddf.double().requires_grad_()
    expected = reference.warp(ref_image, ref_ddf)
    ei, ed = autograd_grads(expected, (ref_image, ref_ddf), grad_out.double())
    for deterministic in (False, True):
        i, d = image.clone().requires_grad_(), ddf.clone().requires_grad_()
        with poisoned_empty():
            out = warp(i, d, backend=gpu_backend, deterministic=deterministic)
            gi, gd = autograd_grads(out, (i, d), grad_out)
        assert_close_verbose(out, expected, torch.float32)
        assert_close_verbose(gi, ei, torch.float32, name=f"d image ({deterministic})")
        assert_close_verbose(gd, ed, torch.float32, name=f"d ddf ({deterministic})")


@pytest.mark.cuda
def test_gpu_large(gpu_backend, gen):
    image, ddf = _inputs(gen, (1, 2, 40, 48, 56), (1, 3, 40, 48, 56), device="cuda", scale=3.0)
    grad_out = randn(gen, 1, 2, 40, 48, 56, device="cuda")
    ref_image, ref_ddf = image.clone().requires_grad_(), ddf.clone().requires_grad_()
    expected = reference.warp(ref_image, ref_ddf, "linear", "border")
    ei, ed = autograd_grads(expected, (ref_image, ref_ddf), grad_out)
    image.requires_grad_()
    ddf.requires_grad_()
    with poisoned_empty():
        out = warp(image, ddf, padding="border", backend=gpu_backend)
        gi, gd = autograd_grads(out, (image, ddf), grad_out)
    assert_close_verbose(out, expected, torch.float32)
    assert_close_verbose(gi, ei, torch.float32, name="d image")
    assert_close_verbose(gd, ed, torch.float32, name="d ddf")


@pytest.mark.cuda
def test_gpu_backend_on_cpu_tensor_or_other_device(gpu_backend, gen):
    image, ddf = _inputs(gen, (1, 1, 4, 5), (1, 2, 4, 5))
    if gpu_backend == "cuda":
        with pytest.raises(
            BackendUnavailableError, match="runs on CUDA tensors, got a tensor on cpu"
        ):
            warp(image, ddf, backend="cuda")
    with pytest.raises(ValueError, match="same device, got cuda:0 and cpu"):
        warp(image.cuda(), ddf, backend=gpu_backend)


@pytest.mark.cuda
def test_gpu_float64_rejected(gpu_backend, gen):
    image, ddf = _inputs(gen, (1, 1, 4, 5), (1, 2, 4, 5), torch.float64, device="cuda")
    with pytest.raises(BackendUnavailableError, match=rf"backend '{gpu_backend}'.*float64"):
        warp(image, ddf, backend=gpu_backend)


@pytest.mark.cuda
def test_auto_picks_a_gpu_kernel(gen):
    image, ddf = _inputs(gen, (1, 1, 4, 5), (1, 2, 4, 5), device="cuda")
    with _spy_reference() as spy:
        out = warp(image, ddf, backend="auto")
    gpu_kernels = [n for n in ("cuda", "triton") if backend_reason(n, "cuda") is None]
    assert spy.call_count == (0 if gpu_kernels else 1)
    assert_close_verbose(out, reference.warp(image, ddf), torch.float32)


def test_module_exports():
    for name in mrus_kernels.__all__:
        assert hasattr(mrus_kernels, name), name
