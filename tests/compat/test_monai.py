"""mrus_kernels.compat.monai against MONAI 1.6.1's own classes: values and gradients on
random inputs (2D and 3D, float32 and float64, odd shapes, batch and channels > 1), every
constructor option, MONAI's argument errors and the arguments the fused ops cannot serve.

Tolerances: float32 1e-5 of the largest value (the fused kernels sum in another order and
compute coordinates without MONAI's normalise / unnormalise round trip). float64 1e-10,
except where MONAI itself computes in float32 for float64 input, each case saying so:
its Gaussian MI (sigma and bin centres are float32 constants), the normalize=True scale
factors of its regularisers (float32 tensors) and nothing else (its b-spline target
weights and their marginal are float32 too, but hold exact values, and the compat class
rounds the target marginal to float32 as MONAI does).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.modules.loss import _Loss

from conftest import (
    COMPILE_WARNINGS,
    DTYPE_IDS,
    assert_close_verbose,
    backend_params,
    bad_input_test,
    poisoned_empty,
    rand,
    randn,
)
from mrus_kernels.compat import monai as compat

monai = pytest.importorskip(
    "monai", reason="compat tests compare with MONAI 1.6.1: pip install -e .[compat]"
)
from monai import losses as monai_losses  # noqa: E402 (after the importorskip)
from monai.networks import blocks as monai_blocks  # noqa: E402
from monai.utils import GridSampleMode, GridSamplePadMode, LossReduction  # noqa: E402

DTYPES = (torch.float32, torch.float64)
HOST_BACKENDS = backend_params(("torch", "cpu"))
TRITON = backend_params(("triton",))
SHAPES = {2: (2, 3, 7, 9), 3: (2, 2, 5, 6, 7)}  # odd sizes, batch and channels > 1


def monai_warp(*args, **kwargs):
    """MONAI's Warp warns on construction that it uses grid_sample; not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return monai_blocks.Warp(*args, **kwargs)


def monai_dvf2ddf(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return monai_blocks.DVF2DDF(*args, **kwargs)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


def compare(ours, theirs, inputs, dtype, *, tol=None, grad_of=None, name="", upcast=True):
    """Runs both callables on their own copies of ``inputs``; compares values and the
    gradients of sum(out * w) (w random, fixed) for every input in ``grad_of``.

    MONAI runs in float64 on float32 inputs (the inputs exactly, cast up): the truth the
    float32 result is held to, rather than MONAI's own float32 rounding (its LNCC loses
    digits to cancellation in var = Σx² − (Σx)²/n). ``upcast=False``: MONAI in the
    inputs' dtype (its Warp jitter draws dtype-dependent random numbers)."""
    grad_of = range(len(inputs)) if grad_of is None else grad_of
    a_in = leaves(*inputs)
    b_in = leaves(*(x.double() if upcast and x.dtype == torch.float32 else x for x in inputs))
    with poisoned_empty():
        a = ours(*a_in)
    b = theirs(*b_in)
    atol = rtol = tol
    assert_close_verbose(a, b, dtype, atol=atol, rtol=rtol, name=f"{name} value")
    w = torch.randn(b.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w = w.to(b.dtype)
    ga = torch.autograd.grad((a * w).sum(), [a_in[i] for i in grad_of], allow_unused=True)
    gb = torch.autograd.grad((b * w).sum(), [b_in[i] for i in grad_of], allow_unused=True)
    for i, x, y in zip(grad_of, ga, gb, strict=True):
        if y is None:
            assert x is None or bool((x == 0).all()), f"{name}: grad {i} should be None or 0"
            continue
        assert x is not None, f"{name}: no gradient for input {i}"
        assert_close_verbose(x, y, dtype, atol=atol, rtol=rtol, name=f"{name} grad {i}")


# ---------------------------------------------------------------------------- Warp


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("jitter", [False, True], ids=["grid", "jitter"])
def test_warp_matches_monai(gen, backend, dtype, ndim, mode, padding_mode, jitter):
    shape = SHAPES[ndim]
    image = rand(gen, *shape, dtype=dtype)
    # Up to a few voxels: many samples fall outside, so the padding matters.
    ddf = randn(gen, shape[0], ndim, *shape[2:], dtype=dtype, scale=2.0)
    ours = compat.Warp(mode, padding_mode, jitter, backend=backend)
    theirs = monai_warp(mode, padding_mode, jitter)
    compare(ours, theirs, (image, ddf), dtype, name=f"Warp {mode} {padding_mode}",
            upcast=not jitter)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_triton(gen, backend, ndim):
    shape = (2, 2, 5, 6) if ndim == 2 else (1, 2, 3, 4, 5)
    image = rand(gen, *shape)
    ddf = randn(gen, shape[0], ndim, *shape[2:], scale=1.5)
    compare(compat.Warp(padding_mode="zeros", backend=backend), monai_warp("bilinear", "zeros"),
            (image, ddf), torch.float32, name="Warp triton")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_warp_size_one_axis(gen, backend):
    """MONAI samples a size-1 axis at its one voxel whatever the displacement along it
    (grid_sample, align_corners=True); its gradient there is 0."""
    image = rand(gen, 2, 2, 1, 6, 5, dtype=torch.float64)
    ddf = randn(gen, 2, 3, 1, 6, 5, dtype=torch.float64, scale=1.5)
    for padding_mode in ("zeros", "border"):
        compare(compat.Warp(padding_mode=padding_mode, backend=backend),
                monai_warp(padding_mode=padding_mode), (image, ddf), torch.float64,
                name=f"Warp size-1 {padding_mode}")


def test_warp_defaults_aliases_and_enums(gen):
    """Defaults are MONAI's (bilinear, border, no jitter); "trilinear" is bilinear, as in
    MONAI's PyTorch path; MONAI's enum members are accepted."""
    image = rand(gen, 1, 1, 5, 6, 7, dtype=torch.float64)
    ddf = randn(gen, 1, 3, 5, 6, 7, dtype=torch.float64, scale=2.0)
    expected = monai_warp()(image, ddf)
    for layer in (compat.Warp(), compat.Warp("trilinear"),
                  compat.Warp(GridSampleMode.BILINEAR, GridSamplePadMode.BORDER)):
        assert_close_verbose(layer(image, ddf), expected, name=repr(layer))
    assert isinstance(compat.Warp(), torch.nn.Module)


def test_warp_jitter_leaves_global_rng_alone(gen):
    image = rand(gen, 1, 1, 5, 6)
    ddf = randn(gen, 1, 2, 5, 6)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    compat.Warp(jitter=True)(image, ddf)
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------- DVF2DDF


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_dvf2ddf_matches_monai(gen, backend, dtype, ndim, mode, padding_mode):
    shape = (SHAPES[ndim][0], ndim, *SHAPES[ndim][2:])
    dvf = randn(gen, *shape, dtype=dtype, scale=3.0)
    for num_steps in (1, 7):
        compare(compat.DVF2DDF(num_steps, mode, padding_mode, backend=backend),
                monai_dvf2ddf(num_steps, mode, padding_mode), (dvf,), dtype,
                name=f"DVF2DDF {num_steps} {mode} {padding_mode}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_dvf2ddf_defaults_and_size_one_axis(gen, backend):
    dvf = randn(gen, 1, 3, 1, 7, 6, dtype=torch.float64, scale=3.0)
    compare(compat.DVF2DDF(backend=backend), monai_dvf2ddf(), (dvf,), torch.float64,
            name="DVF2DDF size-1")
    dvf = randn(gen, 2, 2, 9, 8, dtype=torch.float64, scale=3.0)
    compare(compat.DVF2DDF(backend=backend), monai_dvf2ddf(), (dvf,), torch.float64,
            name="DVF2DDF defaults")


@pytest.mark.parametrize("backend", TRITON)
def test_dvf2ddf_triton(gen, backend):
    dvf = randn(gen, 1, 2, 5, 6, scale=2.0)
    compare(compat.DVF2DDF(3, backend=backend), monai_dvf2ddf(3), (dvf,), torch.float32,
            name="DVF2DDF triton")


# ---------------------------------------------------------------------------- MI


def mi_inputs(gen, shape, dtype):
    """pred partly outside [0, 1] (MONAI's Gaussian path clamps it); target related."""
    pred = rand(gen, *shape, dtype=dtype, lo=-0.1, hi=1.1)
    target = (pred.clamp(0, 1) ** 2 + 0.2 * rand(gen, *shape, dtype=dtype, lo=0, hi=1)) / 1.2
    return pred, target


# MONAI's float64 Gaussian MI uses float32 sigma and bin centres (its buffers).
GAUSSIAN_F64_TOL = 1e-5


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(3, 2, 5, 6, 7), (2, 1, 9, 13), (2, 50)], ids=str)
@pytest.mark.parametrize("kernel_type", ["gaussian", "b-spline"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gmi_matches_monai(gen, backend, dtype, shape, kernel_type, reduction):
    pred, target = mi_inputs(gen, shape, dtype)
    tol = GAUSSIAN_F64_TOL if (kernel_type, dtype) == ("gaussian", torch.float64) else None
    compare(
        compat.GlobalMutualInformationLoss(kernel_type, reduction=reduction, backend=backend),
        monai_losses.GlobalMutualInformationLoss(kernel_type, reduction=reduction),
        (pred, target), dtype, tol=tol, name=f"GMI {kernel_type} {reduction}",
    )


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        {"num_bins": 8, "sigma_ratio": 1.0},
        {"num_bins": 32, "sigma_ratio": 0.25},
        {"num_bins": 5, "smooth_nr": 1e-3, "smooth_dr": 1e-2},
        {"num_bins": 2},
        {"kernel_type": "b-spline", "num_bins": 5},
        {"kernel_type": "b-spline", "num_bins": 12, "smooth_nr": 1e-3, "smooth_dr": 1e-2},
        {"kernel_type": "b-spline", "num_bins": 40, "reduction": LossReduction.SUM},
    ],
    ids=str,
)
def test_gmi_options(gen, backend, options):
    pred, target = mi_inputs(gen, (2, 1, 7, 9, 8), torch.float64)
    tol = None if options.get("kernel_type") == "b-spline" else GAUSSIAN_F64_TOL
    compare(compat.GlobalMutualInformationLoss(**options, backend=backend),
            monai_losses.GlobalMutualInformationLoss(**options), (pred, target),
            torch.float64, tol=tol, name=f"GMI {options}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_gmi_bspline_box_ties(gen, backend):
    """Target values on exact .5 bin ties: MONAI's box window gives half to each of the
    two bins; with a single rounding direction the loss differs (checked)."""
    pred, _ = mi_inputs(gen, (2, 1, 6, 7), torch.float64)
    # min 0, max 38, 23 bins: bin size 2 and t = x / 2 + 2, a .5 tie at every odd x.
    target = torch.randint(0, 39, (2, 1, 6, 7), generator=gen).to(torch.float64)
    target[0, 0, 0, 0], target[1, 0, 0, 0] = 0, 38
    ties = (target % 2 == 1) & (target < 38)
    assert int(ties.sum()) > 10
    compare(compat.GlobalMutualInformationLoss("b-spline", backend=backend),
            monai_losses.GlobalMutualInformationLoss("b-spline"), (pred, target),
            torch.float64, name="GMI b-spline ties")
    # The tie handling matters: rounding every tie up gives another value.
    theirs = monai_losses.GlobalMutualInformationLoss("b-spline")(pred, target)
    shifted = monai_losses.GlobalMutualInformationLoss("b-spline")(
        pred, torch.where(ties, target + 0.01, target)
    )
    assert abs(float(theirs - shifted)) > 1e-4


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("kernel_type", ["gaussian", "b-spline"])
def test_gmi_triton(gen, backend, kernel_type):
    pred, target = mi_inputs(gen, (2, 1, 5, 6), torch.float32)
    compare(compat.GlobalMutualInformationLoss(kernel_type, num_bins=8, backend=backend),
            monai_losses.GlobalMutualInformationLoss(kernel_type, num_bins=8),
            (pred, target), torch.float32, name=f"GMI triton {kernel_type}")


def test_gmi_is_a_loss_and_reads_reduction_at_call(gen):
    pred, target = mi_inputs(gen, (3, 1, 5, 6), torch.float64)
    ours = compat.GlobalMutualInformationLoss()
    theirs = monai_losses.GlobalMutualInformationLoss()
    assert isinstance(ours, _Loss) and ours.reduction == "mean"
    ours.reduction = theirs.reduction = "none"
    assert_close_verbose(ours(pred, target), theirs(pred, target), atol=GAUSSIAN_F64_TOL,
                         rtol=GAUSSIAN_F64_TOL)


# ---------------------------------------------------------------------------- LNCC


def lncc_inputs(gen, shape, dtype):
    pred = rand(gen, *shape, dtype=dtype)
    target = 0.5 * pred + 0.5 * rand(gen, *shape, dtype=dtype)
    return pred, target


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "spatial_dims,shape", [(1, (2, 3, 11)), (2, (2, 3, 7, 9)), (3, (2, 2, 5, 6, 7))],
    ids=["1d", "2d", "3d"],
)
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lncc_matches_monai(gen, backend, dtype, spatial_dims, shape, kernel_size, reduction):
    pred, target = lncc_inputs(gen, shape, dtype)
    kwargs = {"spatial_dims": spatial_dims, "kernel_size": kernel_size, "reduction": reduction}
    compare(compat.LocalNormalizedCrossCorrelationLoss(**kwargs, backend=backend),
            monai_losses.LocalNormalizedCrossCorrelationLoss(**kwargs), (pred, target), dtype,
            name=f"LNCC {kwargs}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [{}, {"smooth_nr": 1e-3, "smooth_dr": 1e-2}, {"smooth_dr": 0.5}, {"kernel_size": 1}],
    ids=str,
)
def test_lncc_options(gen, backend, options):
    pred, target = lncc_inputs(gen, (2, 1, 5, 6, 7), torch.float64)
    # Flat patches: the smooth_dr clamp of the raw variances is active there.
    pred[:, :, :2], target[:, :, :2] = 0.75, 0.5
    compare(compat.LocalNormalizedCrossCorrelationLoss(**options, backend=backend),
            monai_losses.LocalNormalizedCrossCorrelationLoss(**options), (pred, target),
            torch.float64, name=f"LNCC {options}")


@pytest.mark.parametrize("backend", TRITON)
def test_lncc_triton(gen, backend):
    pred, target = lncc_inputs(gen, (1, 2, 5, 6), torch.float32)
    compare(compat.LocalNormalizedCrossCorrelationLoss(2, 3, backend=backend),
            monai_losses.LocalNormalizedCrossCorrelationLoss(2, 3), (pred, target),
            torch.float32, name="LNCC triton")


# ---------------------------------------------------------------------------- regularisers

REGULARISERS = {
    "bending": (compat.BendingEnergyLoss, monai_losses.BendingEnergyLoss),
    "diffusion": (compat.DiffusionLoss, monai_losses.DiffusionLoss),
}
FIELD_SHAPES = {1: (2, 1, 9), 2: (2, 2, 7, 9), 3: (2, 3, 5, 6, 7)}
# MONAI's bending energy indexes with a list of slices, which torch deprecates; not ours.
monai_indexing_warning = pytest.mark.filterwarnings(
    "ignore:Using a non-tuple sequence for multidimensional indexing"
)


@monai_indexing_warning
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("which", list(REGULARISERS))
def test_regularisers_match_monai(gen, backend, dtype, ndim, normalize, reduction, which):
    ours_cls, theirs_cls = REGULARISERS[which]
    field = randn(gen, *FIELD_SHAPES[ndim], dtype=dtype)
    # MONAI's normalize factors are float32 tensors, also for float64 fields.
    tol = 1e-6 if normalize and dtype == torch.float64 else None
    compare(ours_cls(normalize, reduction, backend=backend), theirs_cls(normalize, reduction),
            (field,), dtype, tol=tol, name=f"{which} normalize={normalize} {reduction}")


@monai_indexing_warning
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("which", list(REGULARISERS))
def test_regularisers_triton(gen, backend, which):
    ours_cls, theirs_cls = REGULARISERS[which]
    field = randn(gen, 1, 2, 5, 6)
    compare(ours_cls(backend=backend), theirs_cls(), (field,), torch.float32,
            name=f"{which} triton")


@monai_indexing_warning
@pytest.mark.parametrize("which", list(REGULARISERS))
def test_regularisers_integer_field(which):
    """MONAI takes an integer field and returns a float energy; so do we."""
    ours_cls, theirs_cls = REGULARISERS[which]
    field = torch.arange(2 * 5 * 6, dtype=torch.int64).reshape(1, 2, 5, 6) ** 2 % 7
    expected = theirs_cls()(field)
    assert_close_verbose(ours_cls()(field), expected, name=which)


# ---------------------------------------------------------------------------- compile


COMPILE_CASES = {
    "warp": (lambda: compat.Warp(), "warp"),
    "dvf2ddf": (lambda: compat.DVF2DDF(), "field"),
    "gmi": (lambda: compat.GlobalMutualInformationLoss(), "pair"),
    "gmi_bspline": (lambda: compat.GlobalMutualInformationLoss("b-spline"), "pair"),
    "lncc": (lambda: compat.LocalNormalizedCrossCorrelationLoss(), "pair"),
    "bending": (lambda: compat.BendingEnergyLoss(normalize=True), "field"),
    "diffusion": (lambda: compat.DiffusionLoss(), "field"),
}


@COMPILE_WARNINGS[0]
@COMPILE_WARNINGS[1]
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph(gen, case):
    """Every class traces as one graph (dynamo; no graph break), same values as eager."""
    make, kind = COMPILE_CASES[case]
    image, other = rand(gen, 2, 1, 5, 6, 7), rand(gen, 2, 1, 5, 6, 7)
    field = randn(gen, 2, 3, 5, 6, 7)
    args = {"warp": (image, field), "field": (field,), "pair": (image, other)}[kind]
    torch._dynamo.reset()
    layer = make()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert_close_verbose(compiled(*args), layer(*args), name=case)


def test_compile_warp_jitter(gen):
    """jitter=True draws its offsets outside the graph (a generator cannot be made inside
    one): a graph break, same values."""
    image, ddf = rand(gen, 1, 2, 5, 6), randn(gen, 1, 2, 5, 6)
    torch._dynamo.reset()
    layer = compat.Warp(jitter=True)
    compiled = torch.compile(layer, backend="eager")
    assert_close_verbose(compiled(image, ddf), monai_warp(jitter=True)(image, ddf))


# ---------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
@pytest.mark.parametrize("case", list(COMPILE_CASES) + ["warp_jitter"])
def test_cuda_matches_monai(gen, gpu_backend, case):
    """Every class on CUDA tensors (backend cuda and triton) against MONAI run on the same
    device in float64; Warp's jitter draws from a CUDA generator there, as MONAI's."""
    make, kind = COMPILE_CASES.get(case, (lambda: compat.Warp(jitter=True), "warp"))
    image, other = rand(gen, 2, 1, 9, 10, 11), rand(gen, 2, 1, 9, 10, 11)
    field = randn(gen, 2, 3, 9, 10, 11)
    args = {"warp": (image, field), "field": (field,), "pair": (image, other)}[kind]
    args = tuple(x.cuda() for x in args)
    ours = make()
    ours.backend = gpu_backend
    if isinstance(ours, compat.DVF2DDF):
        ours.warp_layer.backend = gpu_backend
    theirs = {
        "warp": lambda: monai_warp(), "warp_jitter": lambda: monai_warp(jitter=True),
        "dvf2ddf": lambda: monai_dvf2ddf(),
        "gmi": lambda: monai_losses.GlobalMutualInformationLoss(),
        "gmi_bspline": lambda: monai_losses.GlobalMutualInformationLoss("b-spline"),
        "lncc": lambda: monai_losses.LocalNormalizedCrossCorrelationLoss(),
        "bending": lambda: monai_losses.BendingEnergyLoss(normalize=True),
        "diffusion": lambda: monai_losses.DiffusionLoss(),
    }[case]().cuda()
    compare(ours.cuda(), theirs, args, torch.float32, name=f"{case} {gpu_backend}",
            upcast=case != "warp_jitter")


# ---------------------------------------------------------------------------- errors


def _image(*shape):
    return torch.rand(*shape)


BAD_INPUT = {
    # What the fused ops cannot serve: named, with what to use instead.
    "warp_bicubic": (lambda: compat.Warp("bicubic"), ValueError, r"mode='bicubic'.*bilinear"),
    "warp_reflection": (lambda: compat.Warp(padding_mode="reflection"), ValueError,
                        r"padding_mode='reflection'.*'zeros' or 'border'"),
    "warp_int_mode": (lambda: compat.Warp(1), ValueError, r"mode must be.*integer codes"),
    "warp_unknown_mode": (lambda: compat.Warp("cubic"), ValueError, r"mode must be"),
    "warp_int_padding": (lambda: compat.Warp(padding_mode=7), ValueError,
                         r"padding_mode must be.*integer codes"),
    "dvf2ddf_bicubic": (lambda: compat.DVF2DDF(mode="bicubic"), ValueError, r"bicubic"),
    "dvf2ddf_reflection": (lambda: compat.DVF2DDF(padding_mode="reflection"), ValueError,
                           r"reflection"),
    "lncc_triangular": (
        lambda: compat.LocalNormalizedCrossCorrelationLoss(kernel_type="triangular"),
        ValueError, r"kernel_type='triangular'.*rectangular"),
    "lncc_gaussian": (
        lambda: compat.LocalNormalizedCrossCorrelationLoss(kernel_type="gaussian"),
        ValueError, r"kernel_type='gaussian'.*rectangular"),
    "lncc_none": (lambda: compat.LocalNormalizedCrossCorrelationLoss(reduction="none"),
                  ValueError, r"reduction='none'.*'mean' or 'sum'"),
    "bending_none": (lambda: compat.BendingEnergyLoss(reduction="none"), ValueError,
                     r"reduction='none'.*'mean' or 'sum'"),
    "diffusion_none": (lambda: compat.DiffusionLoss(reduction="none"), ValueError,
                       r"reduction='none'.*'mean' or 'sum'"),
    "gmi_one_bin": (lambda: compat.GlobalMutualInformationLoss(num_bins=1), ValueError,
                    r"num_bins must be >= 2"),
    "gmi_bspline_four_bins": (
        lambda: compat.GlobalMutualInformationLoss("b-spline", num_bins=4), ValueError,
        r"num_bins must be >= 5"),
    "gmi_sigma_zero": (lambda: compat.GlobalMutualInformationLoss(sigma_ratio=0.0), ValueError,
                       r"sigma_ratio"),
    # MONAI's own argument errors, with its messages.
    "warp_spatial_dims": (lambda: compat.Warp()(_image(1, 1, 5), torch.zeros(1, 1, 5)),
                          NotImplementedError, r"unsupported spatial_dims=1"),
    "warp_ddf_shape": (lambda: compat.Warp()(_image(2, 1, 5, 6), torch.zeros(1, 2, 5, 6)),
                       ValueError, r"the input DDF shape must be \(2, 2, 5, 6\)"),
    "dvf2ddf_steps": (lambda: compat.DVF2DDF(0), ValueError, r"expecting positive num_steps"),
    "dvf2ddf_channels": (lambda: compat.DVF2DDF()(torch.zeros(1, 3, 5, 6)), ValueError,
                         r"DDF shape must be"),
    "gmi_bins": (lambda: compat.GlobalMutualInformationLoss(num_bins=0), ValueError,
                 r"num_bins must > 0"),
    "gmi_kernel": (lambda: compat.GlobalMutualInformationLoss("bspline"), ValueError,
                   r"kernel_type must be 'gaussian' or 'b-spline'"),
    "gmi_reduction": (lambda: compat.GlobalMutualInformationLoss(reduction="avg"), ValueError,
                      r"reduction must be"),
    "gmi_shapes": (lambda: compat.GlobalMutualInformationLoss()(_image(2, 1, 5, 6),
                                                                _image(2, 1, 6, 5)),
                   ValueError, r"ground truth has differing shape"),
    "lncc_even": (lambda: compat.LocalNormalizedCrossCorrelationLoss(kernel_size=4),
                  ValueError, r"kernel_size must be odd, got 4"),
    "lncc_spatial_dims": (lambda: compat.LocalNormalizedCrossCorrelationLoss(spatial_dims=4),
                          ValueError, r"Unsupported ndim: 4-d"),
    "lncc_kernel_type": (lambda: compat.LocalNormalizedCrossCorrelationLoss(kernel_type="box"),
                         ValueError, r"kernel_type must be"),
    "lncc_pred_dims": (lambda: compat.LocalNormalizedCrossCorrelationLoss(2)(
        _image(1, 1, 5, 6, 7), _image(1, 1, 5, 6, 7)), ValueError,
        r"expecting pred with 2 spatial dimensions"),
    "lncc_shapes": (lambda: compat.LocalNormalizedCrossCorrelationLoss(2)(
        _image(1, 1, 5, 6), _image(1, 1, 6, 5)), ValueError, r"ground truth has differing"),
    "bending_rank": (lambda: compat.BendingEnergyLoss()(torch.zeros(1, 4, 3, 3, 3, 3)),
                     ValueError, r"Expecting 3-d, 4-d or 5-d pred"),
    "bending_small": (lambda: compat.BendingEnergyLoss()(torch.zeros(1, 2, 2, 5)), ValueError,
                      r"All spatial dimensions must be > 2"),
    "diffusion_channels": (lambda: compat.DiffusionLoss()(torch.zeros(1, 3, 5, 5)), ValueError,
                           r"does not match number of spatial dimensions, 2"),
}

test_bad_input = bad_input_test(BAD_INPUT)


def test_spatial_dims_errors_are_value_errors_too():
    """MONAI raises NotImplementedError there, mrus ValueError: both are caught."""
    with pytest.raises(ValueError):
        compat.Warp()(_image(1, 1, 5), torch.zeros(1, 1, 5))
    with pytest.raises(NotImplementedError):
        compat.LocalNormalizedCrossCorrelationLoss(spatial_dims=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: compat.LocalNormalizedCrossCorrelationLoss(),
        lambda: compat.BendingEnergyLoss(),
        lambda: compat.DiffusionLoss(),
    ],
    ids=["lncc", "bending", "diffusion"],
)
def test_per_voxel_none_set_later_raises(make):
    """reduction is an attribute, read at each call (MONAI's _Loss semantics): "none" set
    after construction raises too, instead of returning a reduced value."""
    loss = make()
    assert isinstance(loss, _Loss)
    loss.reduction = "none"
    field = torch.rand(1, 3, 5, 6, 7)
    with pytest.raises(ValueError, match="reduction='none'"):
        if isinstance(loss, compat.LocalNormalizedCrossCorrelationLoss):
            loss(field[:, :1], field[:, 1:2])
        else:
            loss(field)
