"""``warp`` against what users run today: ``pytest benchmarks/bench_warp.py``.

Rows of every group:

- ``mrus_<backend>``: :func:`mrus_kernels.warp` with ``backend=`` ``cpu`` (CPU sizes) or
  ``cuda`` and ``triton`` (GPU sizes); skipped with the reason when the backend cannot
  serve the call (``backends.call_reason``).
- ``grid_sample``: the VoxelMorph-style spatial transformer
  (``reference.warp_grid_sample``: ddf to a normalised grid, then ``F.grid_sample``), the
  baseline of the speed-ups.
- ``compiled``: ``torch.compile(reference.warp_grid_sample, dynamic=False)``, compiled
  afresh in each benchmark (one compile per benchmark, inside the correctness check).
- ``monai``: ``monai.networks.blocks.Warp(mode="bilinear", padding_mode="zeros")`` when
  MONAI is importable (an optional dependency, skipped when absent). Its ddf is in voxel
  units with channel i along spatial axis i, as ours (it reverses the order to x, y, z for
  ``grid_sample`` itself), so it takes our ddf unchanged; its default padding is
  ``"border"``, hence the explicit ``"zeros"``.

Groups, one per pass and size: ``warp-fwd-<device>-<size>`` (inputs without grad) and
``warp-fwdbwd-<device>-<size>`` (image and ddf require grad; ``out.backward(grad_out)``
with a fixed random ``grad_out``, both gradients freshly allocated every round as in a
training step). Sizes: CPU ``1×1×64×64×64``; GPU ``1×1×160×192×224``, ``2×1×128×128×64``,
``1×16×128×128×64``; float32, linear interpolation, zeros padding. On the GPU the
forward + backward groups also time ``mrus_<backend>_det`` (``deterministic=True``: the
fixed-point image gradient), and ``warp-bcast-fwdbwd-<device>-<size>`` warps a batch of
images by one displacement (ddf batch 1: the batch goes on a grid axis for small outputs).

Ideal bytes (what a perfect kernel moves; GB/s = ideal bytes / median time), with
|x| the bytes of tensor x:

- forward: |ddf| + |image| + |out| (read the displacement, read the image once, write
  the output; the 8 corner gathers of a smooth field hit cache);
- forward + backward: the forward, plus the backward reading |grad_out| + |image| + |ddf|
  and writing |grad_image| + |grad_ddf|, i.e. 3|ddf| + 3|image| + 2|out| in all.

Inputs are seeded and look like registration: a random image and a smooth random
displacement (coarse noise at 1/8 resolution, trilinearly upsampled, at most
``AMPLITUDE`` voxels). Each sample point x + u(x) is then nudged at least ``GRID_GAP``
voxel off the integer grid: linear interpolation has a kink there, and ``grid_sample``'s
normalised coordinates round differently from ours, so at a point within an ulp of a voxel
centre the two would take the displacement gradient from different sides. Timing is not
affected.

Every benchmark checks its outputs and gradients against ``reference.warp`` (the
gather-based oracle, run in float64 on the same float32 inputs) to 1e-4 of the largest
value before it times anything: ``pytest benchmarks --benchmark-disable`` is a
correctness run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mrus_kernels import reference, warp

from .conftest import (
    bench_cases,
    bench_forward,
    bench_forward_backward,
    nbytes,
    reference_with_grads,
    row_info,
    shape_id,
    skip_unless_backend,
)

CPU_SHAPES = [(1, 1, 64, 64, 64)]
GPU_SHAPES = [(1, 1, 160, 192, 224), (2, 1, 128, 128, 64), (1, 16, 128, 128, 64)]
# Image shapes warped by one displacement (ddf batch 1).
CPU_BROADCAST_SHAPES = [(4, 1, 24, 24, 24)]
GPU_BROADCAST_SHAPES = [(8, 1, 48, 48, 48)]
BASELINES = ("grid_sample", "compiled", "monai")
BASELINE = "grid_sample"  # the speed-ups are relative to this row
DTYPE = torch.float32
RTOL = 1e-4
AMPLITUDE = 3.0  # voxels, largest displacement component
GRID_GAP = 1e-3  # voxels, least distance of a sample point from the integer grid
ROUNDS = {"cpu": (15, 3), "cuda": (50, 5)}  # (timed, warmup) rounds per device type

Impl = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CASES = bench_cases(CPU_SHAPES, GPU_SHAPES, ("mrus_cpu", *BASELINES),
                    ("mrus_cuda", "mrus_triton", *BASELINES))
# Forward + backward adds the deterministic rows on the GPU.
FWDBWD_CASES = CASES + bench_cases([], GPU_SHAPES, (), ("mrus_cuda_det", "mrus_triton_det"))
BROADCAST_CASES = bench_cases(CPU_BROADCAST_SHAPES, GPU_BROADCAST_SHAPES,
                              ("mrus_cpu", BASELINE), ("mrus_cuda", "mrus_triton", BASELINE))


# ---------------------------------------------------------------------------- inputs


def smooth_ddf(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A smooth random displacement for images of ``shape``, float64 on the CPU.

    Returns:
        Tensor [B, 3, D, H, W], voxel units, component i along spatial axis i, at most
        ``AMPLITUDE`` voxels, every x + u(x) at least ``GRID_GAP`` off the integer grid.
    """
    batch, spatial = shape[0], shape[2:]
    coarse = torch.randn(
        batch,
        len(spatial),
        *[max(2, n // 8) for n in spatial],
        generator=generator,
        dtype=torch.float64,
    )
    ddf = F.interpolate(coarse, size=spatial, mode="trilinear", align_corners=True)
    ddf = AMPLITUDE * ddf / ddf.abs().amax()
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    for i, x in enumerate(axes):
        p = x + ddf[:, i]
        lower = torch.floor(p)
        ddf[:, i] = lower + (p - lower).clamp(GRID_GAP, 1 - GRID_GAP) - x
    return ddf


@dataclass
class Case:
    """Inputs of one size and what the reference makes of them."""

    image: torch.Tensor  # [B, C, *S], float32
    ddf: torch.Tensor  # [B, 3, *S], float32, voxel units
    grad_out: torch.Tensor  # [B, C, *S], float32
    out: torch.Tensor  # reference forward
    grad_image: torch.Tensor  # reference d(out · grad_out) / d image
    grad_ddf: torch.Tensor  # reference d(out · grad_out) / d ddf


@functools.lru_cache(maxsize=8)
def make_case(shape: tuple[int, ...], device: str, broadcast: bool = False) -> Case:
    """Seeded inputs of ``shape`` on ``device`` and the float64 reference results; with
    ``broadcast`` one displacement (batch 1) for the whole image batch."""
    generator = torch.Generator().manual_seed(0)
    ddf = smooth_ddf((1, *shape[1:]) if broadcast else shape, generator).to(DTYPE)
    image = torch.randn(shape, generator=generator, dtype=DTYPE)
    grad_out = torch.randn(shape, generator=generator, dtype=DTYPE)
    image, ddf, grad_out = image.to(device), ddf.to(device), grad_out.to(device)
    out, (grad_image, grad_ddf) = reference_with_grads(reference.warp, (image, ddf), grad_out)
    return Case(
        image, ddf, grad_out, out.to(DTYPE), grad_image.to(DTYPE), grad_ddf.to(DTYPE)
    )


# ---------------------------------------------------------------------------- rows


@functools.lru_cache(maxsize=1)
def _monai_warp_class() -> tuple[type | None, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's own import-time deprecations
            from monai.networks.blocks import Warp
    except Exception as exc:  # noqa: BLE001 - optional: any import failure means "absent"
        return None, f"MONAI is not importable ({type(exc).__name__}: {exc}); `pip install monai`"
    return Warp, None


def make_impl(name: str, device: str) -> Impl:
    """The callable (image, ddf) -> out of one row; skips the test when it cannot run."""
    if name.startswith("mrus_"):
        backend, _, variant = name.removeprefix("mrus_").partition("_")
        skip_unless_backend(backend, device, DTYPE)
        return functools.partial(warp, backend=backend, deterministic=variant == "det")
    if name == "grid_sample":
        return reference.warp_grid_sample
    if name == "compiled":
        torch._dynamo.reset()  # one fresh compile per benchmark, nothing reused from others
        return torch.compile(reference.warp_grid_sample, dynamic=False)
    if name == "monai":
        cls, reason = _monai_warp_class()
        if cls is None:
            pytest.skip(reason)
        with warnings.catch_warnings():
            # "Using PyTorch native grid_sample": it says which path MONAI took.
            warnings.simplefilter("ignore", UserWarning)
            return cls(mode="bilinear", padding_mode="zeros")
    raise ValueError(f"unknown row {name!r}")


def ideal_bytes(case: Case, backward: bool) -> int:
    """Least traffic of a warp (see the module docstring)."""
    forward = nbytes(case.ddf, case.image, case.out)
    if not backward:
        return forward
    return forward + nbytes(case.grad_out, case.image, case.ddf, case.grad_image, case.grad_ddf)


# ---------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_warp_forward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    image, ddf = case.image, case.ddf
    bench_forward(
        benchmark, impl_name, lambda: impl(image, ddf), case.out,
        rtol=RTOL,
        group=f"warp-fwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=ideal_bytes(case, backward=False),
        baseline=impl_name == BASELINE,
        extra_info=row_info("warp", impl_name, shape, DTYPE, "forward"),
    )


@pytest.mark.parametrize(("shape", "device", "impl_name"), FWDBWD_CASES)
def test_warp_forward_backward(shape, device, impl_name, benchmark):
    _forward_backward(shape, device, impl_name, benchmark, broadcast=False)


@pytest.mark.parametrize(("shape", "device", "impl_name"), BROADCAST_CASES)
def test_warp_broadcast_forward_backward(shape, device, impl_name, benchmark):
    _forward_backward(shape, device, impl_name, benchmark, broadcast=True)


def _forward_backward(shape, device, impl_name, benchmark, broadcast: bool) -> None:
    impl = make_impl(impl_name, device)
    case = make_case(shape, device, broadcast)
    image = case.image.clone().requires_grad_()
    ddf = case.ddf.clone().requires_grad_()
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(image, ddf), case.out,
        {"image": (image, case.grad_image), "ddf": (ddf, case.grad_ddf)},
        grad_out=case.grad_out,
        rtol=RTOL,
        group=f"warp-{'bcast-' if broadcast else ''}fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=ideal_bytes(case, backward=True),
        baseline=impl_name == BASELINE,
        extra_info=row_info("warp", impl_name, shape, DTYPE, "forward+backward"),
    )
