"""``mrus_kernels.compat.voxelmorph`` against the VoxelMorph 0.3.4 / neurite 0.3.4 classes it
replaces: ``pytest benchmarks/bench_compat_voxelmorph.py`` (needs the ``compat`` or ``bench``
extra; every row skips with the reason without it).

One group per class and size, ``compat_voxelmorph-<class>-fwdbwd-<device>-<size>``, timing a
training step's share (forward and backward, every input's gradient freshly allocated each
round), with rows:

- ``original``: the VoxelMorph class (``voxelmorph.nn.modules``); for the losses, what
  VoxelMorph 0.3 points to: ``-neurite.nn.modules.NCC(window_size=9)`` and
  ``neurite.nn.modules.SpatialGradient("l2")``. The baseline of the speed-ups.
- ``mrus_<backend>``: the compat class with ``backend=`` ``cpu`` (CPU sizes) or ``cuda`` and
  ``triton`` (GPU sizes, marked ``cuda``); skipped with the reason where the backend cannot
  serve the call.

Classes (float32, VoxelMorph's defaults unless named): ``SpatialTransformer`` (image and
displacement gradients), ``IntegrateVelocityField(steps=7)``,
``ResizeDisplacementField(scale_factor=2)`` (a half-size field resized to the full size, as
VoxelMorph's ``int_downsize=2``), ``NCC(win=[9, 9, 9]).loss`` (gradients of both images),
``Grad("l2").loss``. CPU sizes 64³ (integration 48³, resize 32³ -> 64³); GPU sizes
160×192×224 (resize 80×96×112 -> 160×192×224). Displacements are smooth
(``bench_warp.smooth_ddf``: at most 3 voxels, sample points off the integer grid; the
velocity and the gradient loss's field ``bench_compose.smooth_field``: every component
between 0.6 and 1 of its amplitude, off the kinks of the early squaring steps).

Every row is checked against the original run in float64 on the same inputs (values and
gradients, 1e-4 of the largest; 1e-3 for the integration, see ``SPECS``) before it is
timed, so ``pytest benchmarks --benchmark-disable`` is a correctness run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mrus_kernels.compat import voxelmorph as compat

from .bench_compose import smooth_field
from .bench_warp import smooth_ddf
from .conftest import (
    bench_cases,
    bench_forward_backward,
    reference_with_grads,
    row_info,
    shape_id,
    skip_unless_backend,
)

DTYPE = torch.float32
RTOL = 1e-4
ROUNDS = {"cpu": (10, 2), "cuda": (30, 5)}  # (timed, warmup) rounds per device type
BASELINE = "original"


def _originals():
    """(voxelmorph.nn.modules, neurite.nn.modules), or a skip naming the extra."""
    reason = "needs voxelmorph 0.3.4 and neurite: pip install -e .[bench]"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # their import-time deprecations
        vxm = pytest.importorskip("voxelmorph.nn.modules", reason=reason)
        ne = pytest.importorskip("neurite.nn.modules", reason=reason)
    return vxm, ne


def _quiet(fn: Callable) -> Callable:
    def call(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)

    return call


@dataclass(frozen=True)
class Spec:
    """One class: its input sizes, how to make its inputs and both implementations."""

    cpu_shape: tuple[int, ...]  # the size the group is named by
    gpu_shape: tuple[int, ...]
    inputs: Callable[[tuple[int, ...], torch.Generator], tuple[torch.Tensor, ...]]
    ours: Callable[[str], Callable]  # backend -> callable
    theirs: Callable[[], Callable]
    rtol: float = RTOL


def _image_and_ddf(shape, gen):
    return torch.randn(shape, generator=gen), smooth_ddf((shape[0], 3, *shape[2:]), gen).float()


def _velocity(shape, gen):
    # Every component bounded away from 0 (bench_compose.smooth_field): the early, scaled-down
    # squaring steps then keep their sample points off the integer grid, where float32 and
    # the float64 check would take a gradient from different sides of a kink.
    return (smooth_field(shape, gen).float(),)


def _half_size_field(shape, gen):
    half = (shape[0], 3, *[n // 2 for n in shape[2:]])
    return (smooth_ddf(half, gen).float(),)


def _image_pair(shape, gen):
    fixed = torch.rand(shape, generator=gen)
    return fixed, 0.7 * fixed + 0.3 * torch.rand(shape, generator=gen)


def _neurite_ncc_loss(window: int) -> Callable:
    """-neurite NCC as a scalar: the value VoxelMorph's classic NCC().loss returned."""
    ncc = _originals()[1].NCC(window_size=window)
    return lambda fixed, moving: -ncc(fixed, moving).reshape(())


SPECS = {
    "SpatialTransformer": Spec(
        (1, 1, 64, 64, 64), (1, 1, 160, 192, 224), _image_and_ddf,
        lambda b: compat.SpatialTransformer(backend=b),
        lambda: _originals()[0].SpatialTransformer(),
    ),
    "IntegrateVelocityField": Spec(
        (1, 3, 48, 48, 48), (1, 3, 160, 192, 224), _velocity,
        lambda b: compat.IntegrateVelocityField(steps=7, backend=b),
        lambda: _originals()[0].IntegrateVelocityField(steps=7),
        # Seven squaring steps with zeros padding: a few of the 48³ · 7 intermediate sample
        # points fall within float32 rounding of a kink (an integer or a face), where the
        # float32 gradient takes the other side (2.9e-4 of the largest at one voxel; float64
        # runs of the compat class agree with the original's to 6e-8).
        rtol=1e-3,
    ),
    "ResizeDisplacementField": Spec(
        (1, 3, 64, 64, 64), (1, 3, 160, 192, 224), _half_size_field,
        lambda b: compat.ResizeDisplacementField(scale_factor=2, backend=b),
        lambda: _originals()[0].ResizeDisplacementField(scale_factor=2),
    ),
    "NCC": Spec(
        (1, 1, 64, 64, 64), (1, 1, 160, 192, 224), _image_pair,
        lambda b: compat.NCC(win=[9, 9, 9], backend=b).loss,
        lambda: _neurite_ncc_loss(9),
    ),
    "Grad": Spec(
        (1, 3, 64, 64, 64), (1, 3, 160, 192, 224), _velocity,
        lambda b: compat.Grad("l2", backend=b).loss,
        lambda: _originals()[1].SpatialGradient("l2"),
    ),
}

CASES = [
    pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks)
    for name, spec in SPECS.items()
    for p in bench_cases([spec.cpu_shape], [spec.gpu_shape], ("mrus_cpu", BASELINE),
                         ("mrus_cuda", "mrus_triton", BASELINE))
]


@functools.lru_cache(maxsize=4)
def make_case(name: str, shape: tuple[int, ...], device: str):
    """Seeded inputs of class `name` on `device`, the upstream gradient (None for a loss)
    and the original's float64 result and gradients, float32."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(t.to(device) for t in spec.inputs(shape, gen))
    theirs = _quiet(spec.theirs())
    with torch.no_grad():
        out = theirs(*inputs)
    grad_out = None if out.dim() == 0 else torch.randn(out.shape, generator=gen).to(device)
    expected, grads = reference_with_grads(theirs, inputs, grad_out)
    return inputs, grad_out, expected.to(DTYPE), tuple(g.to(DTYPE) for g in grads)


@pytest.mark.parametrize(("cls", "shape", "device", "impl_name"), CASES)
def test_compat_voxelmorph_forward_backward(cls, shape, device, impl_name, benchmark):
    spec = SPECS[cls]
    if impl_name == BASELINE:
        fn = _quiet(spec.theirs())
    else:
        backend = impl_name.removeprefix("mrus_")
        skip_unless_backend(backend, device, DTYPE)
        fn = spec.ours(backend)
    inputs, grad_out, expected, grads = make_case(cls, shape, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    bench_forward_backward(
        benchmark, f"{cls} {impl_name}", lambda: fn(*leaves), expected,
        {f"input {k}": (leaf, g) for k, (leaf, g) in enumerate(zip(leaves, grads, strict=True))},
        grad_out=grad_out,
        rtol=spec.rtol,
        group=f"compat_voxelmorph-{cls}-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        baseline=impl_name == BASELINE,
        extra_info=row_info(f"compat.voxelmorph.{cls}", impl_name, shape, DTYPE,
                            "forward+backward"),
    )
