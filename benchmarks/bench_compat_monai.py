"""MONAI's registration classes against their drop-ins in :mod:`mrus_kernels.compat.monai`:
``pytest benchmarks/bench_compat_monai.py`` (``-k compat_monai``).

One group per adapted class, device and size, forward + backward (a training step's use),
float32. Rows:

- ``monai``: the MONAI 1.6.1 class, the baseline of the speed-ups;
- ``mrus_<backend>``: the compat class with ``backend=`` ``cpu`` (CPU size) or ``cuda`` and
  ``triton`` (GPU size), skipped with the reason when the backend cannot serve the call.

Classes and their settings (the same for both rows): ``Warp()`` (bilinear, border) and
``DVF2DDF()`` (7 steps, bilinear, zeros) on smooth displacements of at most 3 voxels
(``bench_warp.smooth_ddf``, sample points off the voxel grid; ``bench_compose.smooth_field``,
components bounded away from 0: both keep float32 and float64 on the same side of linear
sampling's kinks),
``GlobalMutualInformationLoss()`` (Gaussian, 23 bins) and ``("b-spline")``,
``LocalNormalizedCrossCorrelationLoss(kernel_size=9)`` (VoxelMorph's window; MONAI's cost
grows with it, the fused one's does not), ``BendingEnergyLoss()`` and ``DiffusionLoss()``.
Images are in [0, 1] (MONAI's Gaussian MI clamps to it); the second image is a
nonlinear function of the first plus noise.

Sizes: CPU ``1×1×48×48×48`` (fast enough for a correctness run on a shared 2-core
machine), GPU ``1×1×160×192×224`` (marked ``cuda``; skipped without a GPU). Displacement
fields are ``[1, 3, *S]``.

Every benchmark checks its loss (or output) and gradients against the MONAI class run in
float64 on the same float32 inputs, to 1e-4 of the largest value, before it times anything:
``pytest benchmarks --benchmark-disable -k compat_monai`` is a correctness run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mrus_kernels.compat import monai as compat

from .bench_compose import monai_layer, smooth_field
from .bench_warp import smooth_ddf
from .conftest import bench_cases, bench_forward_backward, row_info, shape_id, skip_unless_backend

CPU_SHAPES = [(1, 1, 48, 48, 48)]
GPU_SHAPES = [(1, 1, 160, 192, 224)]
DTYPE = torch.float32
RTOL = 1e-4
ROUNDS = {"cpu": (5, 1), "cuda": (30, 5)}  # (timed, warmup) rounds per device type
BASELINE = "monai"

# class -> (constructor arguments, inputs: "pair" (two images), "warp" (image, ddf),
# "field" (one displacement)).
CLASSES: dict[str, tuple[dict, str]] = {
    "Warp": ({}, "warp"),
    "DVF2DDF": ({}, "field"),
    "GlobalMutualInformationLoss": ({}, "pair"),
    "GlobalMutualInformationLoss-bspline": ({"kernel_type": "b-spline"}, "pair"),
    "LocalNormalizedCrossCorrelationLoss": ({"kernel_size": 9}, "pair"),
    "BendingEnergyLoss": ({}, "field"),
    "DiffusionLoss": ({}, "field"),
}
CASES = bench_cases(CPU_SHAPES, GPU_SHAPES, ("mrus_cpu", BASELINE),
                    ("mrus_cuda", "mrus_triton", BASELINE))


def _class_name(key: str) -> str:
    return key.partition("-")[0]


def make_original(key: str) -> torch.nn.Module:
    """The MONAI module of ``key``; skips the test when MONAI is absent."""
    kwargs, _ = CLASSES[key]
    name = _class_name(key)
    if name in ("Warp", "DVF2DDF"):
        return monai_layer(name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own import-time deprecations
        losses = pytest.importorskip("monai.losses", reason="MONAI is absent: pip install .[bench]")
    return getattr(losses, name)(**kwargs)


def make_impl(key: str, impl_name: str, device: str) -> Callable[..., torch.Tensor]:
    """The row's callable; skips the test when it cannot run."""
    if impl_name == BASELINE:
        return make_original(key)
    backend = impl_name.removeprefix("mrus_")
    skip_unless_backend(backend, device, DTYPE)
    kwargs, _ = CLASSES[key]
    return getattr(compat, _class_name(key))(**kwargs, backend=backend)


# ---------------------------------------------------------------------------- inputs


@dataclass
class Case:
    inputs: tuple[torch.Tensor, ...]  # float32, on the device
    grad_of: tuple[int, ...]  # which inputs require grad
    grad_out: torch.Tensor | None  # for a non-scalar output (Warp, DVF2DDF)


@functools.lru_cache(maxsize=3 * (len(CPU_SHAPES) + len(GPU_SHAPES)))
def make_case(kind: str, shape: tuple[int, ...], device: str) -> Case:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=generator, dtype=torch.float64)
    field_shape = (shape[0], len(shape) - 2, *shape[2:])
    grad_out = None
    if kind == "pair":
        other = (image**2 + 0.3 * torch.rand(shape, generator=generator, dtype=torch.float64))
        inputs, grad_of = (image, other / 1.3), (0,)
    elif kind == "warp":
        # Sample points kept off the integer grid, where linear sampling has a kink.
        inputs, grad_of = (image, smooth_ddf(field_shape, generator)), (0, 1)
        grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        # Components bounded away from 0: no squaring step samples within rounding of a
        # voxel centre (bench_compose.smooth_field).
        inputs, grad_of = (smooth_field(field_shape, generator),), (0,)
        grad_out = torch.randn(field_shape, generator=generator, dtype=torch.float64)
    inputs = tuple(x.to(device, DTYPE) for x in inputs)
    if grad_out is not None:
        grad_out = grad_out.to(device, DTYPE)
    return Case(inputs, grad_of, grad_out)


@functools.lru_cache(maxsize=1)  # the rows of one class run one after the other
def expected(key: str, shape: tuple[int, ...], device: str):
    """MONAI's result and gradients in float64 on the case's float32 inputs."""
    case = make_case(CLASSES[key][1], shape, device)
    original = make_original(key)
    leaves = [x.double().requires_grad_(i in case.grad_of) for i, x in enumerate(case.inputs)]
    out = original(*leaves)
    is_loss = _class_name(key) not in ("Warp", "DVF2DDF")
    if is_loss:
        out.backward()
    else:
        # DVF2DDF has no output gradient on a loss: sum(out * grad_out) as for Warp.
        out.backward(case.grad_out.double())
    grads = [leaves[i].grad.to(DTYPE) for i in case.grad_of]
    return out.detach().to(DTYPE), grads


# ---------------------------------------------------------------------------- benchmarks


# MONAI's bending energy indexes with a list of slices, which torch deprecates; not ours.
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
@pytest.mark.parametrize("key", list(CLASSES))
def test_compat_monai(shape, device, impl_name, key, benchmark):
    impl = make_impl(key, impl_name, device)
    if isinstance(impl, torch.nn.Module):
        impl = impl.to(device)
    case = make_case(CLASSES[key][1], shape, device)
    out, grads = expected(key, shape, device)
    leaves = [x.clone().requires_grad_(i in case.grad_of) for i, x in enumerate(case.inputs)]
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(*leaves), out,
        {f"input{i}": (leaves[i], g) for i, g in zip(case.grad_of, grads, strict=True)},
        grad_out=case.grad_out if out.dim() else None,
        rtol=RTOL,
        label="output" if out.dim() else "loss",
        group=f"compat-monai-{key}-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        baseline=impl_name == BASELINE,
        extra_info=row_info("compat.monai", impl_name, shape, DTYPE, "forward+backward",
                            cls=key),
    )
