"""Tests of ``mrus_kernels.compat.voxelmorph`` against VoxelMorph 0.3.4 and neurite 0.3.4
(the ``compat`` extra): values and gradients of every class on random inputs, 2D and 3D,
float32 and float64, odd shapes, channels > 1, both align_corners, integration steps 0, 1
and 7, resize factors 0.5, 2 and 1.5; and every error for what the fused ops do not serve.

(The file is not called test_voxelmorph.py: tests/ is not a package, so that basename would
clash with tests/models/test_voxelmorph.py.)

Displacements are drawn through the sample point each one makes the transformer read, so
that every point lies at least ``GAP`` voxel from a kink of the interpolation (integers for
linear, half-integers for nearest), where grid_sample's normalised coordinates and ours,
which round differently, could take a gradient or a nearest voxel from different sides.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from conftest import (
    DTYPE_IDS,
    assert_close_verbose,
    backend_params,
    bad_input_test,
    rand,
    skip_without_float64,
)
from mrus_kernels.compat.voxelmorph import (
    NCC,
    Grad,
    IntegrateVelocityField,
    ResizeDisplacementField,
    SpatialTransformer,
)

compat_vxm = importlib.import_module("mrus_kernels.compat.voxelmorph")

BACKENDS = backend_params(("torch", "cpu", "triton"))
GAP = 1e-3  # voxels
DTYPES = (torch.float64, torch.float32)
# Image shapes per ndim: odd sizes, batch 2 / channels > 1. Triton (interpreted) gets less.
SHAPES = {2: (2, 3, 5, 7), 3: (1, 2, 3, 5, 7)}
TRITON_SHAPES = {2: (2, 2, 4, 5), 3: (1, 2, 3, 4, 5)}


def originals():
    """(voxelmorph.nn.modules, neurite.nn.modules), or a skip naming the extra."""
    reason = "needs the compat extra (voxelmorph 0.3.4, neurite): pip install -e .[compat]"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # their import-time deprecations
        vxm = pytest.importorskip("voxelmorph.nn.modules", reason=reason)
        ne = pytest.importorskip("neurite.nn.modules", reason=reason)
    return vxm, ne


def run_original(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _shape(backend: str, ndim: int) -> tuple[int, ...]:
    return (TRITON_SHAPES if backend == "triton" else SHAPES)[ndim]


def displacement(gen, batch: int, spatial: tuple[int, ...], mode: str, align_corners: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """A displacement [batch, ndim, *spatial] whose VoxelMorph sample points lie up to three
    voxels around the image, each at least GAP from a kink of `mode`."""
    ndim = len(spatial)
    comps = []
    for i, n in enumerate(spatial):
        k = torch.randint(-3, n + 2, (batch, *spatial), generator=gen).double()
        f = torch.rand(batch, *spatial, generator=gen, dtype=torch.float64) * (0.5 - 2 * GAP) + GAP
        f = 2 * f if mode == "linear" else f + 0.5 * torch.randint(0, 2, f.shape, generator=gen)
        q = k + f  # the voxel coordinate grid_sample will read
        x = torch.arange(n, dtype=torch.float64).view([n if a == i else 1 for a in range(ndim)])
        # VoxelMorph: g = (x + u)·2/max(n-1, 1) − 1; with align_corners=False grid_sample
        # reads q = ((g + 1)·n − 1)/2, so x + u = (2q + 1)·max(n−1, 1)/(2n).
        point = q if align_corners else (2 * q + 1) * max(n - 1, 1) / (2 * n)
        comps.append(point - x)
    return torch.stack(comps, dim=1).to(dtype)


def compare(ours, theirs, inputs, dtype, *, atol=None, names=("out",)):
    """Values of ours(*inputs) and theirs(*inputs) and the gradients of both to every
    floating-point input, with the same random upstream gradient."""
    results = []
    for fn in (ours, theirs):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = run_original(fn, *leaves) if fn is theirs else fn(*leaves)
        grad_out = torch.randn(out.shape, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(3)).to(out.dtype)
        diff = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(out, diff, grad_out, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(diff, grads, strict=True)]
        results.append((out.detach(), *grads))
    labels = (*names, *[f"d input {k}" for k in range(len(results[0]) - len(names))])
    for label, a, b in zip(labels, *results, strict=True):
        assert_close_verbose(a, b, dtype, atol=atol, name=label)
    return results[0]


# =========================================================================== SpatialTransformer


@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("mode", ("linear", "nearest"))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_transformer(backend, dtype, ndim, mode, align_corners, gen):
    vxm, _ = originals()
    skip_without_float64(backend, dtype)
    shape = _shape(backend, ndim)
    image = rand(gen, *shape, dtype=dtype)
    ddf = displacement(gen, shape[0], shape[2:], mode, align_corners, dtype)
    ours = SpatialTransformer(mode, align_corners, backend=backend)
    theirs = vxm.SpatialTransformer(mode, align_corners)
    compare(ours, theirs, (image, ddf), dtype)


@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("mode", ("linear", "nearest"))
@pytest.mark.parametrize("shape", ((1, 2, 1, 5), (2, 1, 4, 1), (1, 2, 1, 4, 3)),
                         ids=("1x5", "4x1", "1x4x3"))
def test_spatial_transformer_size_one_axes(shape, mode, align_corners, gen):
    """Size-1 axes: VoxelMorph's normalisation 2/max(S-1, 1) with grid_sample reading them
    at 0 (align_corners) or at u - 1/2."""
    vxm, _ = originals()
    dtype = torch.float64
    image = rand(gen, *shape, dtype=dtype)
    ddf = displacement(gen, shape[0], shape[2:], mode, align_corners, dtype)
    compare(SpatialTransformer(mode, align_corners), vxm.SpatialTransformer(mode, align_corners),
            (image, ddf), dtype)


def test_spatial_transformer_integer_label_map(gen):
    """An integer image is sampled as float32; with nearest it comes back in its dtype."""
    vxm, _ = originals()
    labels = torch.randint(0, 7, (1, 1, 6, 5, 7), generator=gen)
    ddf = displacement(gen, 1, (6, 5, 7), "nearest", True, torch.float32)
    ours = SpatialTransformer("nearest")(labels, ddf)
    theirs = run_original(vxm.SpatialTransformer("nearest"), labels, ddf)
    assert ours.dtype == theirs.dtype == torch.int64
    assert torch.equal(ours, theirs)
    linear = SpatialTransformer()(labels, ddf)
    assert linear.dtype == torch.float32
    assert_close_verbose(linear, run_original(vxm.SpatialTransformer(), labels, ddf))


# =========================================================================== IntegrateVelocityField


@pytest.mark.parametrize("steps", (0, 1, 7))
@pytest.mark.parametrize("align_corners", (True, False), ids=("ac", "no-ac"))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_integrate_velocity_field(dtype, ndim, align_corners, steps, gen):
    vxm, _ = originals()
    shape = SHAPES[ndim]
    v = displacement(gen, shape[0], shape[2:], "linear", align_corners, dtype) * 0.7
    compare(IntegrateVelocityField(steps=steps, align_corners=align_corners),
            vxm.IntegrateVelocityField(steps=steps, align_corners=align_corners), (v,), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integrate_velocity_field_backends(backend, gen):
    """Every backend, float32, 7 steps, through the fused integrate_velocity."""
    vxm, _ = originals()
    shape = _shape(backend, 3)
    v = displacement(gen, shape[0], shape[2:], "linear", True, torch.float32)
    compare(IntegrateVelocityField(steps=7, backend=backend),
            vxm.IntegrateVelocityField(steps=7), (v,), torch.float32)


def test_integrate_velocity_field_nearest(gen):
    vxm, _ = originals()
    v = displacement(gen, 2, (5, 7), "nearest", True, torch.float64) * 0.5
    compare(IntegrateVelocityField(steps=3, interpolation_mode="nearest"),
            vxm.IntegrateVelocityField(steps=3, interpolation_mode="nearest"), (v,),
            torch.float64)


def test_integrate_velocity_field_size_one_axis(gen):
    """A size-1 axis (sampled at 0 by VoxelMorph's transformer) takes the per-step path."""
    vxm, _ = originals()
    v = displacement(gen, 1, (1, 5, 6), "linear", True, torch.float64)
    compare(IntegrateVelocityField(steps=4), vxm.IntegrateVelocityField(steps=4), (v,),
            torch.float64)


def test_integrate_velocity_field_uses_the_fused_integration(monkeypatch, gen):
    """Linear, align_corners=True: one call of mrus integrate_velocity (zeros padding)."""
    calls = []
    real = compat_vxm.integrate_velocity

    def spy(v, steps, **kwargs):
        calls.append((steps, kwargs["padding"]))
        return real(v, steps, **kwargs)

    monkeypatch.setattr(compat_vxm, "integrate_velocity", spy)
    IntegrateVelocityField(steps=5)(torch.randn(1, 3, 4, 5, 6, generator=gen))
    assert calls == [(5, "zeros")]


# ==================================================================== ResizeDisplacementField


@pytest.mark.parametrize(("mode", "align_corners"),
                         [("linear", True), ("linear", False), ("linear", None),
                          ("nearest", None)])
@pytest.mark.parametrize("scale_factor", (0.5, 2, 1.5))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_resize_displacement_field(dtype, ndim, scale_factor, mode, align_corners, gen):
    vxm, _ = originals()
    shape = (2, ndim, 5, 7) if ndim == 2 else (1, ndim, 3, 5, 7)
    disp = rand(gen, *shape, dtype=dtype, lo=-3, hi=3)
    ours = compare(ResizeDisplacementField(scale_factor, mode, align_corners),
                   vxm.ResizeDisplacementField(scale_factor, mode, align_corners), (disp,),
                   dtype)[0]
    assert ours.shape[2:] == tuple(int(n * scale_factor) for n in shape[2:])


@pytest.mark.parametrize("mode", ("linear", "nearest"))
@pytest.mark.parametrize("shape", ((1, 2, 3, 5), (1, 3, 3, 5, 2), (2, 4, 8, 1)),
                         ids=("3x5", "3x5x2", "8x1-channels4"))
def test_resize_unchanged_axis_sizes(shape, mode, gen):
    """scale_factor 1.2 leaves axes of size <= 4 at their size: the CPU kernels copy such an
    axis (linear; nearest on 4D input), and F.interpolate's rule applies elsewhere. Any
    channel count is resampled.

    torch 2.13's 3D nearest backward on the CPU disagrees with its own forward there (it
    fails gradcheck: the backward copies an unchanged axis, the forward does not), so for
    that case the values are compared and our gradient is checked by gradcheck instead."""
    vxm, _ = originals()
    align = False if mode == "linear" else None
    disp = rand(gen, *shape, dtype=torch.float64, lo=-3, hi=3)
    ours = ResizeDisplacementField(1.2, mode, align)
    theirs = vxm.ResizeDisplacementField(1.2, mode, align)
    if mode == "nearest" and len(shape) == 5:
        assert torch.equal(ours(disp), run_original(theirs, disp))
        leaf = disp.clone().requires_grad_()
        assert torch.autograd.gradcheck(ours, (leaf,))
        assert not torch.autograd.gradcheck(theirs, (leaf,), raise_exception=False)
        return
    compare(ours, theirs, (disp,), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_displacement_field_backends(backend, gen):
    vxm, _ = originals()
    disp = rand(gen, 1, 3, 3, 4, 5, lo=-3, hi=3)
    compare(ResizeDisplacementField(1.5, backend=backend), vxm.ResizeDisplacementField(1.5),
            (disp,), torch.float32)


# =========================================================================== NCC


@pytest.mark.parametrize("win", (None, 3, [5, 5, 5]), ids=("win9", "win3", "win5-list"))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ncc(dtype, ndim, win, gen):
    """-neurite NCC(window_size=win), windows wider than the image included (win 9 on 5x7)."""
    _, ne = originals()
    if isinstance(win, list):
        win = win[:ndim]
    shape = SHAPES[ndim]
    fixed = rand(gen, *shape, dtype=dtype)
    moving = fixed + 0.4 * rand(gen, *shape, dtype=dtype)
    theirs = ne.NCC(window_size=9 if win is None else win)
    out = compare(NCC(win).loss, lambda a, b: -theirs(a, b).reshape(()), (fixed, moving), dtype)
    assert out[0] < -0.5  # correlated images


@pytest.mark.parametrize("backend", BACKENDS)
def test_ncc_backends(backend, gen):
    _, ne = originals()
    shape = _shape(backend, 3)
    fixed = rand(gen, *shape)
    moving = fixed + 0.4 * rand(gen, *shape)
    compare(NCC([3, 3, 3], backend=backend).loss,
            lambda a, b: -ne.NCC(window_size=3)(a, b).reshape(()), (fixed, moving),
            torch.float32)


def test_ncc_is_a_module(gen):
    fixed, moving = rand(gen, 1, 1, 6, 7), rand(gen, 1, 1, 6, 7)
    loss = NCC(5)
    assert torch.equal(loss(fixed, moving), loss.loss(fixed, moving))


# =========================================================================== Grad


@pytest.mark.parametrize("loss_mult", (None, 2.5))
@pytest.mark.parametrize("ndim", (2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad(backend, dtype, ndim, loss_mult, gen):
    """neurite SpatialGradient("l2") * loss_mult; loss(y_true, y_pred) and loss(y_pred)."""
    _, ne = originals()
    skip_without_float64(backend, dtype)
    shape = _shape(backend, ndim)
    u = rand(gen, shape[0], ndim, *shape[2:], dtype=dtype, lo=-2, hi=2)
    mult = 1.0 if loss_mult is None else loss_mult
    loss = Grad("l2", loss_mult, backend=backend)

    def theirs(x):
        return ne.SpatialGradient("l2")(x) * mult

    compare(lambda x: loss.loss(None, x), theirs, (u,), dtype)
    compare(loss.loss, theirs, (u,), dtype)
    compare(loss, theirs, (u,), dtype)


# =========================================================================== GPU


@pytest.mark.cuda
@pytest.mark.parametrize("cls", ("SpatialTransformer", "IntegrateVelocityField",
                                 "ResizeDisplacementField", "ResizeNearest", "NCC", "Grad"))
def test_gpu_classes_match_the_originals(cls, gen):
    """On a GPU (``pytest -m cuda``), backend auto: every class as its original there, float32
    (resizes by 1.2, which keeps the size-3 axis: aten's CUDA rules differ from the CPU's)."""
    vxm, ne = originals()
    shape = (1, 2, 3, 5, 7)
    image = rand(gen, *shape, device="cuda")
    ddf = displacement(gen, 1, shape[2:], "linear", True, torch.float32).cuda()
    cases = {
        "SpatialTransformer": (SpatialTransformer(), vxm.SpatialTransformer(), (image, ddf)),
        "IntegrateVelocityField": (IntegrateVelocityField(steps=7),
                                   vxm.IntegrateVelocityField(steps=7), (ddf,)),
        "ResizeDisplacementField": (ResizeDisplacementField(1.2, align_corners=False),
                                    vxm.ResizeDisplacementField(1.2, align_corners=False),
                                    (ddf,)),
        "ResizeNearest": (ResizeDisplacementField(1.2, "nearest", None),
                          vxm.ResizeDisplacementField(1.2, "nearest", None), (ddf,)),
        "NCC": (NCC(5).loss, lambda a, b: -ne.NCC(window_size=5)(a, b).reshape(()),
                (image, image.flip(-1))),
        "Grad": (Grad("l2").loss, ne.SpatialGradient("l2"), (ddf,)),
    }
    ours, theirs, inputs = cases[cls]
    compare(ours, theirs, inputs, torch.float32)


# =========================================================================== bad input

IMG = torch.zeros(1, 1, 4, 5)
DDF = torch.zeros(1, 2, 4, 5)

BAD_INPUTS = {
    "grad-l1": (lambda: Grad(), ValueError,
                (r"Grad: penalty='l1' is not served by a fused op; use penalty='l2' "
                 r"\(mrus_kernels\.grad_l2\) or keep neurite\.nn\.modules\.SpatialGradient")),
    "grad-penalty": (lambda: Grad("l3"), ValueError,
                     r"Grad: penalty must be 'l2' \('l1' is not served\), got 'l3'"),
    "grad-loss-mult": (lambda: Grad("l2", loss_mult="2"), TypeError,
                       r"Grad: loss_mult must be None or a number, got str"),
    "grad-size-one": (lambda: Grad("l2").loss(None, torch.zeros(1, 2, 1, 5)), ValueError,
                      r"Grad: every spatial size of y_pred must be >= 2 .*\(1, 2, 1, 5\)"),
    "grad-args": (lambda: Grad("l2").loss(DDF, DDF, DDF), TypeError,
                  r"Grad\.loss takes \(y_true, y_pred\) or \(y_pred\), got 3 arguments"),
    "grad-not-tensor": (lambda: Grad("l2").loss(None, None), TypeError,
                        r"Grad: y_pred must be a torch\.Tensor, got NoneType"),
    "ncc-even": (lambda: NCC(4), ValueError,
                 r"NCC: win=4 is not served: lncc's window is a centred cube"),
    "ncc-unequal": (lambda: NCC([3, 5]), ValueError,
                    r"NCC: win=\[3, 5\] is not served: .*use an odd int or equal odd sizes"),
    "ncc-float": (lambda: NCC(9.0), TypeError,
                  r"NCC: win must be None, an int or a list of ints, got 9\.0"),
    "ncc-shapes": (lambda: NCC(3).loss(IMG, torch.zeros(1, 1, 4, 6)), ValueError,
                   (r"NCC: y_true and y_pred must have the same shape, got \(1, 1, 4, 5\) and "
                    r"\(1, 1, 4, 6\)")),
    "ncc-rank": (lambda: NCC([3, 3, 3]).loss(IMG, IMG), ValueError,
                 r"NCC: win has 3 sizes, the images have 2 spatial axes"),
    "ncc-dtype": (lambda: NCC(3).loss(IMG, IMG.double()), TypeError,
                  r"NCC: y_true and y_pred must have the same dtype"),
    "st-bicubic": (lambda: SpatialTransformer("bicubic"), ValueError,
                   (r"SpatialTransformer: interpolation_mode='bicubic' is not served by the fused "
                    r"warp \(linear and nearest only\)")),
    "st-mode": (lambda: SpatialTransformer("cubic"), ValueError,
                (r"SpatialTransformer: interpolation_mode must be 'linear' or 'bilinear' or "
                 r"'trilinear' or 'nearest', got 'cubic'")),
    "st-align": (lambda: SpatialTransformer(align_corners="yes"), TypeError,
                 r"SpatialTransformer: align_corners must be True or False, got 'yes'"),
    "st-affine": (lambda: SpatialTransformer()(IMG, torch.eye(3)), ValueError,
                  (r"SpatialTransformer: deformation_field must be a displacement "
                   r"\[B, ndim, \*S\], got shape \(3, 3\): affine matrices are not served")),
    "st-field-shape": (lambda: SpatialTransformer()(IMG, torch.zeros(1, 2, 4, 6)), ValueError,
                       (r"SpatialTransformer: deformation_field must be \[B, 2, 4, 5\] for "
                        r"moving_image of shape \(1, 1, 4, 5\), got shape \(1, 2, 4, 6\)")),
    "st-field-channels": (lambda: SpatialTransformer()(IMG, torch.zeros(1, 3, 4, 5)),
                          ValueError, r"SpatialTransformer: deformation_field must be \[B, 2"),
    "st-dtype": (lambda: SpatialTransformer()(IMG, DDF.double()), TypeError,
                 (r"SpatialTransformer: moving_image and deformation_field must have the same "
                  r"dtype, got torch\.float32 and torch\.float64")),
    "st-not-tensor": (lambda: SpatialTransformer()(IMG, 0.0), TypeError,
                      r"SpatialTransformer: deformation_field must be a torch\.Tensor, got float"),
    "ivf-steps-negative": (lambda: IntegrateVelocityField(steps=-1), ValueError,
                           r"IntegrateVelocityField: steps must be >= 0, got -1"),
    "ivf-steps-float": (lambda: IntegrateVelocityField(steps=1.5), TypeError,
                        r"IntegrateVelocityField: steps must be an int, got float"),
    "ivf-channels": (lambda: IntegrateVelocityField()(torch.zeros(1, 3, 4, 5)), ValueError,
                     (r"IntegrateVelocityField: velocity_field must have 2 channels \(one per "
                      r"spatial axis\) for a 2D field, got 3")),
    "ivf-bicubic": (lambda: IntegrateVelocityField(interpolation_mode="bicubic"), ValueError,
                    r"SpatialTransformer: interpolation_mode='bicubic' is not served"),
    "rdf-none": (lambda: ResizeDisplacementField(None), TypeError,
                 r"ResizeDisplacementField: scale_factor must be a number, got NoneType"),
    "rdf-tuple": (lambda: ResizeDisplacementField((2, 2)), TypeError,
                  r"ResizeDisplacementField: scale_factor must be a number, got tuple"),
    "rdf-zero": (lambda: ResizeDisplacementField(0.0), ValueError,
                 r"ResizeDisplacementField: scale_factor must be finite and > 0, got 0\.0"),
    "rdf-nearest-align": (lambda: ResizeDisplacementField(2, "nearest"), ValueError,
                          (r"ResizeDisplacementField: align_corners must be None with "
                           r"interpolation_mode='nearest'")),
    "rdf-bicubic": (lambda: ResizeDisplacementField(2, "bicubic"), ValueError,
                    r"ResizeDisplacementField: interpolation_mode='bicubic' is not served"),
    "rdf-area": (lambda: ResizeDisplacementField(2, "area", None), ValueError,
                 r"ResizeDisplacementField: interpolation_mode='area' is not served"),
    "rdf-bilinear-3d": (lambda: ResizeDisplacementField(2, "bilinear")(torch.zeros(1, 3, 2, 3, 4)),
                        ValueError,
                        (r"ResizeDisplacementField: interpolation_mode='bilinear' needs a 4D "
                         r"disp, got shape \(1, 3, 2, 3, 4\)")),
    "rdf-empty": (lambda: ResizeDisplacementField(0.2)(DDF), ValueError,
                  (r"ResizeDisplacementField: scale_factor 0\.2 gives an empty output for disp "
                   r"of shape \(1, 2, 4, 5\) \(output spatial size \(0, 1\)\)")),
    "rdf-int": (lambda: ResizeDisplacementField(2)(DDF.long()), TypeError,
                r"ResizeDisplacementField: disp must be a floating-point tensor"),
}

test_bad_input = bad_input_test(BAD_INPUTS)
