"""Tests of ``grid_sample``: values and gradients (input and grid) against
``torch.nn.functional.grid_sample`` on every backend, 4D and 5D, bilinear / nearest, zeros /
border, both align_corners, odd shapes, output sizes unlike the input's, size-1 axes, points
outside the image, round-half-to-even ties, NaN, torch.compile and every validation message.

Random grids keep every sample point at least ``GAP`` voxel away from where the
interpolation has a kink (integers for bilinear, half-integers for nearest): there the two
implementations, which round the coordinate differently, may take a gradient (or a nearest
voxel) from different sides. Ties are checked on their own with exact coordinates.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mrus_kernels
from conftest import (
    COMPILE_WARNINGS,
    DTYPE_IDS,
    assert_close_verbose,
    backend_params,
    bad_input_test,
    compile_two_sizes,
    raises_before_dispatch,
    rand,
    require_backend,
    skip_without_float64,
)
from mrus_kernels import grid_sample

grid_sample_module = importlib.import_module("mrus_kernels.grid_sample")

BACKENDS = backend_params(("torch", "cpu", "triton"))
FAST_BACKENDS = backend_params(("torch", "cpu"))
GAP = 1e-3  # voxels, least distance of a sample point from a kink

# (input shape, grid spatial shape) per ndim: odd sizes, output size unlike the input's,
# batch 2, channels > 1. The Triton interpreter is slow: smaller volumes.
SHAPES = {2: ((2, 3, 5, 7), (4, 6)), 3: ((2, 2, 3, 5, 7), (4, 2, 6))}
TRITON_SHAPES = {2: ((2, 2, 3, 5), (4, 3)), 3: ((1, 2, 3, 4, 5), (2, 3, 2))}


def normalise(p: torch.Tensor, n: int, align_corners: bool) -> torch.Tensor:
    """Voxel coordinate -> grid_sample's normalised coordinate for an axis of size n."""
    if align_corners:
        return p * (2 / (n - 1)) - 1 if n > 1 else p  # size 1: every coordinate maps to 0
    return (2 * p + 1) / n - 1


def random_grid(gen: torch.Generator, batch: int, out: tuple[int, ...], size_in: tuple[int, ...],
                mode: str, align_corners: bool, dtype: torch.dtype) -> torch.Tensor:
    """A grid [batch, *out, ndim] whose voxel coordinates cover the image and up to three
    voxels around it (points outside), each at least GAP from a kink of `mode`."""
    ndim = len(size_in)
    comps = []
    for i in reversed(range(ndim)):  # the grid's last dim is x (the last axis) first
        n = size_in[i]
        k = torch.randint(-3, n + 2, (batch, *out), generator=gen).double()
        f = torch.rand(batch, *out, generator=gen, dtype=torch.float64) * (0.5 - 2 * GAP) + GAP
        if mode == "bilinear":
            f = 2 * f  # [2 GAP, 1 - 2 GAP]: away from the integers
        else:
            f = f + 0.5 * torch.randint(0, 2, f.shape, generator=gen)  # away from k + 0.5
        comps.append(normalise(k + f, n, align_corners))
    return torch.stack(comps, dim=-1).to(dtype)


def _shapes(backend: str, ndim: int):
    return (TRITON_SHAPES if backend == "triton" else SHAPES)[ndim]


def _compare(backend, image, grid, mode, padding, align_corners, dtype, grad_out=None):
    """grid_sample of `backend` against F.grid_sample: values, d input and d grid."""
    results = []
    for fn in (lambda i, g: grid_sample(i, g, mode, padding, align_corners, backend=backend),
               lambda i, g: F.grid_sample(i, g, mode, padding, align_corners)):
        i = image.detach().clone().requires_grad_()
        g = grid.detach().clone().requires_grad_()
        out = fn(i, g)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(1)).to(dtype)
        gi, gg = torch.autograd.grad(out, (i, g), grad_out)
        results.append((out.detach(), gi, gg))
    for name, ours, theirs in zip(("out", "d input", "d grid"), *results, strict=True):
        assert_close_verbose(ours, theirs, dtype, name=name)
    return results[0]


# =========================================================================== vs grid_sample


@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("padding", ("zeros", "border"))
@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_grid_sample(backend, dtype, ndim, mode, padding, align_corners, gen, poison):
    """Values and both gradients as F.grid_sample (float64: to 1e-10)."""
    skip_without_float64(backend, dtype)
    image_shape, out = _shapes(backend, ndim)
    image = rand(gen, *image_shape, dtype=dtype)
    grid = random_grid(gen, image_shape[0], out, image_shape[2:], mode, align_corners, dtype)
    ours, _, gg = _compare(backend, image, grid, mode, padding, align_corners, dtype)
    assert ours.shape == (*image_shape[:2], *out)
    if mode == "nearest":
        assert torch.equal(gg, torch.zeros_like(gg))  # as grid_sample: no grid gradient
    else:
        assert gg.abs().amax() > 0


@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
@pytest.mark.parametrize(("image_shape", "out"), [((1, 2, 1, 5), (3, 4)),
                                                  ((2, 1, 4, 1), (2, 3)),
                                                  ((1, 2, 1, 4, 1), (2, 3, 2))])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_size_one_axes(backend, image_shape, out, mode, align_corners, gen):
    """Size-1 axes: with align_corners=True grid_sample samples them at 0 whatever the grid
    says (and gives the grid no gradient there); with False at g / 2."""
    dtype = torch.float64
    image = rand(gen, *image_shape, dtype=dtype)
    grid = random_grid(gen, image_shape[0], out, image_shape[2:], mode, align_corners, dtype)
    _compare(backend, image, grid, mode, "zeros", align_corners, dtype)
    _compare(backend, image, grid, mode, "border", align_corners, dtype)


@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_ties_round_half_to_even(backend, align_corners, gen):
    """Sample points exactly half-way between voxels go to the even one, as grid_sample's
    nearbyint: -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, either padding."""
    n = 5 if align_corners else 8  # sizes whose normalised half-integers are exact in binary
    image = rand(gen, 1, 2, n, n)
    half = torch.tensor([-0.5, 0.5, 1.5, 2.5, 3.5], dtype=torch.float64)
    x = normalise(torch.full_like(half, 1.0), n, align_corners)  # voxel 1 along W
    y = normalise(half, n, align_corners)
    grid = torch.stack([x, y], dim=-1).view(1, 5, 1, 2).float()
    for padding in ("zeros", "border"):
        ours = grid_sample(image, grid, "nearest", padding, align_corners, backend=backend)
        theirs = F.grid_sample(image, grid, "nearest", padding, align_corners)
        assert torch.equal(ours, theirs), (padding, ours[0, 0, :, 0], theirs[0, 0, :, 0])
        assert torch.equal(ours[0, :, :, 0], image[0, :, [0, 0, 2, 2, 4], 1])


@pytest.mark.parametrize("padding", ("zeros", "border"))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck(backend, ndim, padding, gen):
    image_shape, out = {2: ((1, 2, 3, 4), (3, 2)), 3: ((1, 1, 2, 3, 4), (2, 2, 3))}[ndim]
    image = rand(gen, *image_shape, dtype=torch.float64).requires_grad_()
    grid = random_grid(gen, 1, out, image_shape[2:], "bilinear", False, torch.float64)
    grid.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, g: grid_sample(i, g, padding_mode=padding, backend=backend), (image, grid))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    """A transposed image and a permuted grid give what their contiguous copies give."""
    image = rand(gen, 2, 3, 6, 5).transpose(2, 3)  # [2, 3, 5, 6], not contiguous
    grid = random_grid(gen, 2, (4, 3), (5, 6), "bilinear", True, torch.float32)
    grid = grid.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not image.is_contiguous() and not grid.is_contiguous()
    _compare(backend, image, grid, "bilinear", "zeros", True, torch.float32)


@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_grid_point_is_nan_in_every_channel(backend, mode, gen):
    """A NaN grid point gives NaN in every channel there (the warp's rule, where grid_sample
    gives 0, NaN or a border value); every other point is grid_sample's."""
    image = rand(gen, 1, 3, 5, 6)
    grid = random_grid(gen, 1, (3, 4), (5, 6), mode, False, torch.float32)
    grid[0, 1, 2, 0] = float("nan")
    ours = grid_sample(image, grid, mode, backend=backend)
    theirs = F.grid_sample(image, grid, mode, align_corners=False)
    assert ours[0, :, 1, 2].isnan().all()
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2] = False
    assert_close_verbose(ours[0][:, keep], theirs[0][:, keep], torch.float32)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=DTYPE_IDS.get)
def test_half_dtypes(dtype, gen):
    """float16 / bfloat16: grid_sample of the float32 copies, to half precision. The
    displacement (up to ~4 voxels here) is rounded to the dtype: 2**-8 relative in bfloat16
    moves a point by up to 0.016 voxel, hence the looser bfloat16 bound."""
    require_backend("cpu", "cpu", dtype)
    image = rand(gen, 1, 2, 5, 6, 7, dtype=dtype)
    grid = random_grid(gen, 1, (3, 4, 5), (5, 6, 7), "bilinear", True, dtype)
    ours = grid_sample(image, grid, align_corners=True, backend="cpu")
    assert ours.dtype == dtype
    theirs = F.grid_sample(image.float(), grid.float(), align_corners=True)
    assert_close_verbose(ours, theirs, dtype, atol=4e-2 if dtype == torch.bfloat16 else None)


def test_align_corners_none_is_false(gen):
    """None (grid_sample's default, meaning False there) and NumPy bools are accepted."""
    image = rand(gen, 1, 1, 4, 5)
    grid = random_grid(gen, 1, (3, 3), (4, 5), "bilinear", False, torch.float32)
    expected = grid_sample(image, grid, align_corners=False)
    assert torch.equal(grid_sample(image, grid, align_corners=None), expected)
    assert torch.equal(grid_sample(image, grid, align_corners=np.bool_(False)), expected)
    assert torch.equal(grid_sample(image, grid), expected)  # the default


def test_exported():
    assert mrus_kernels.grid_sample is grid_sample
    assert "grid_sample" in mrus_kernels.__all__


@pytest.mark.cuda
@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
@pytest.mark.parametrize("ndim", (2, 3))
def test_gpu_matches_grid_sample(gpu_backend, ndim, mode, align_corners, gen):
    """On a GPU (``pytest -m cuda``): float32 values and gradients as F.grid_sample's there,
    both paddings."""
    image_shape, out = SHAPES[ndim]
    image = rand(gen, *image_shape, device="cuda")
    grid = random_grid(gen, image_shape[0], out, image_shape[2:], mode, align_corners,
                       torch.float32).cuda()
    for padding in ("zeros", "border"):
        _compare(gpu_backend, image, grid, mode, padding, align_corners, torch.float32)


# =========================================================================== torch.compile


@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
def test_torch_compile_dynamic_shapes(backend, gen):
    """grid_sample (bilinear zeros, nearest border with align_corners) under
    torch.compile(fullgraph=True, dynamic=True): two sizes from one graph, values and
    gradients as in eager mode. (The torch backend, inductor compiling the reference warp,
    takes 30 s here; test_warp.py covers it.)"""

    def fn(image, grid):
        return (grid_sample(image, grid, backend=backend),
                grid_sample(image, grid, "nearest", "border", True, backend=backend))

    def make(spatial):
        image = rand(gen, 2, 2, *spatial).requires_grad_()
        out = tuple(n + 3 for n in spatial)  # no size shared with the input (duck sizing)
        grid = random_grid(gen, 2, out, spatial, "bilinear", False, torch.float32)
        return image, grid.requires_grad_()

    # No spatial size 3: it would share a symbol with the grid's last dim (static).
    spatial = ((4, 5, 6), (5, 4, 7)) if backend == "triton" else ((5, 6, 7), (7, 5, 9))
    compile_two_sizes(fn, make, spatial, ("bilinear", "nearest", "d input", "d grid"))


# =========================================================================== bad input

IMG = torch.zeros(1, 2, 4, 5)
GRID = torch.zeros(1, 3, 3, 2)

BAD_INPUTS = {
    "input-not-tensor": (lambda: grid_sample(np.zeros((1, 2, 4, 5)), GRID), TypeError,
                         r"grid_sample: input must be a torch\.Tensor, got ndarray"),
    "grid-not-tensor": (lambda: grid_sample(IMG, [0.0]), TypeError,
                        r"grid_sample: grid must be a torch\.Tensor, got list"),
    "input-int": (lambda: grid_sample(IMG.long(), GRID), TypeError,
                  r"grid_sample: input must be a floating-point tensor .*got torch\.int64"),
    "grid-int": (lambda: grid_sample(IMG, GRID.int()), TypeError,
                 r"grid_sample: grid must be a floating-point tensor .*got torch\.int32"),
    "input-rank": (lambda: grid_sample(torch.zeros(1, 2, 4), GRID), ValueError,
                   r"grid_sample: input must be \[B, C, H, W\] .*got shape \(1, 2, 4\)"),
    "input-empty": (lambda: grid_sample(torch.zeros(1, 0, 4, 5), GRID), ValueError,
                    r"grid_sample: input must not be empty, got shape \(1, 0, 4, 5\)"),
    "grid-rank": (lambda: grid_sample(IMG, torch.zeros(1, 3, 3, 3, 3)), ValueError,
                  (r"grid_sample: grid must be \[N, H_out, W_out, 2\] for a 2D input of shape "
                   r"\(1, 2, 4, 5\), got shape \(1, 3, 3, 3, 3\)")),
    "grid-last-dim": (lambda: grid_sample(torch.zeros(1, 1, 3, 4, 5), torch.zeros(1, 2, 2, 2, 2)),
                      ValueError,
                      (r"grid_sample: grid must be \[N, D_out, H_out, W_out, 3\] for a 3D input "
                       r".*got shape \(1, 2, 2, 2, 2\)")),
    "grid-empty": (lambda: grid_sample(IMG, torch.zeros(1, 0, 3, 2)), ValueError,
                   r"grid_sample: grid must not be empty, got shape \(1, 0, 3, 2\)"),
    "batch": (lambda: grid_sample(IMG, torch.zeros(2, 3, 3, 2)), ValueError,
              r"grid_sample: input and grid must have the same batch size, got 1 and 2"),
    "dtype": (lambda: grid_sample(IMG, GRID.double()), TypeError,
              (r"grid_sample: input and grid must have the same dtype, got torch\.float32 and "
               r"torch\.float64")),
    "device": (lambda: grid_sample(IMG, GRID.to("meta")), ValueError,
               r"grid_sample: input and grid must be on the same device, got cpu and meta"),
    "bicubic": (lambda: grid_sample(IMG, GRID, mode="bicubic"), ValueError,
                (r"grid_sample: mode='bicubic' is not served by the fused warp \(mode must be "
                 r"'bilinear' or 'nearest'\); use torch\.nn\.functional\.grid_sample")),
    "mode": (lambda: grid_sample(IMG, GRID, mode="linear"), ValueError,
             r"grid_sample: mode must be 'bilinear' or 'nearest', got 'linear'"),
    "reflection": (lambda: grid_sample(IMG, GRID, padding_mode="reflection"), ValueError,
                   (r"grid_sample: padding_mode='reflection' is not served by the fused warp "
                    r"\(padding_mode must be 'zeros' or 'border'\)")),
    "padding": (lambda: grid_sample(IMG, GRID, padding_mode=0), ValueError,
                r"grid_sample: padding_mode must be 'zeros' or 'border', got 0"),
    "align-corners": (lambda: grid_sample(IMG, GRID, align_corners="yes"), TypeError,
                      r"grid_sample: align_corners must be True, False or None, got 'yes'"),
}

test_bad_input = bad_input_test(BAD_INPUTS)


def test_validation_runs_before_dispatch(monkeypatch):
    raises_before_dispatch(monkeypatch, lambda: grid_sample(IMG, GRID, mode="bicubic"),
                           "grid_sample: mode='bicubic'")


def test_displacement_of_identity_grid_is_zero():
    """The identity grid (affine_grid of the identity, same size) becomes a zero
    displacement with either align_corners: the conversion is grid_sample's own."""
    for align_corners in (True, False):
        theta = torch.eye(3, 4, dtype=torch.float64)[None]
        grid = F.affine_grid(theta, [1, 1, 3, 4, 5], align_corners=align_corners)
        ddf = grid_sample_module._displacement(grid, (3, 4, 5), align_corners)
        assert ddf.shape == (1, 3, 3, 4, 5)
        assert ddf.abs().max() <= 1e-12
