"""``grid_sample`` against ``torch.nn.functional.grid_sample``:
``pytest benchmarks/bench_grid_sample.py``.

Rows: ``grid_sample`` (``F.grid_sample``, the baseline of the speed-ups) and
``mrus_<backend>`` (:func:`mrus_kernels.grid_sample`: the grid turned into a voxel
displacement, then the fused warp) with ``backend=`` ``cpu`` (CPU sizes) or ``cuda`` and
``triton`` (GPU sizes, marked ``cuda``), each skipped with the reason where the backend
cannot serve the call. Groups: ``grid_sample-fwd-<device>-<size>`` (no gradients) and
``grid_sample-fwdbwd-<device>-<size>`` (input and grid require grad; ``out.backward(g)``).
Sizes: CPU 1×1×64×64×64; GPU 1×1×160×192×224 and 1×16×128×128×64; float32, bilinear,
zeros padding, ``align_corners=False`` (grid_sample's default).

The grid is a smooth random displacement (``bench_warp.smooth_ddf``: at most 3 voxels,
every point off the integer grid, where linear interpolation has a kink) in grid_sample's
normalised form. Every row is checked against F.grid_sample run in float64 on the same
inputs (values and both gradients, 1e-4 of the largest) before it is timed, so
``pytest benchmarks --benchmark-disable`` is a correctness run.

Ideal bytes: forward |grid| + |input| + |out|; forward + backward
3|grid| + 3|input| + 2|out| (as bench_warp, the grid in place of the displacement).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mrus_kernels import ddf_to_grid, grid_sample

from .bench_warp import smooth_ddf
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
GPU_SHAPES = [(1, 1, 160, 192, 224), (1, 16, 128, 128, 64)]
BASELINE = "grid_sample"
DTYPE = torch.float32
RTOL = 1e-4
ROUNDS = {"cpu": (15, 3), "cuda": (50, 5)}  # (timed, warmup) rounds per device type
ALIGN_CORNERS = False

CASES = bench_cases(CPU_SHAPES, GPU_SHAPES, ("mrus_cpu", BASELINE),
                    ("mrus_cuda", "mrus_triton", BASELINE))


def _torch_grid_sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(image, grid, align_corners=ALIGN_CORNERS)


@functools.lru_cache(maxsize=4)
def make_case(shape: tuple[int, ...], device: str):
    """Seeded (image, grid, grad_out) on ``device`` and F.grid_sample's float64 results:
    (out, d image, d grid), each float32."""
    generator = torch.Generator().manual_seed(0)
    ddf = smooth_ddf(shape, generator)
    grid = ddf_to_grid(ddf, align_corners=ALIGN_CORNERS).to(DTYPE)
    image = torch.randn(shape, generator=generator, dtype=DTYPE)
    grad_out = torch.randn(shape, generator=generator, dtype=DTYPE)
    image, grid, grad_out = image.to(device), grid.to(device), grad_out.to(device)
    out, (gi, gg) = reference_with_grads(_torch_grid_sample, (image, grid), grad_out)
    return image, grid, grad_out, out.to(DTYPE), gi.to(DTYPE), gg.to(DTYPE)


def make_impl(name: str, device: str):
    if name == BASELINE:
        return _torch_grid_sample
    backend = name.removeprefix("mrus_")
    skip_unless_backend(backend, device, DTYPE)
    return functools.partial(grid_sample, align_corners=ALIGN_CORNERS, backend=backend)


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_grid_sample_forward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    image, grid, _, out, _, _ = make_case(shape, device)
    bench_forward(
        benchmark, impl_name, lambda: impl(image, grid), out,
        rtol=RTOL,
        group=f"grid_sample-fwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=nbytes(grid, image, out),
        baseline=impl_name == BASELINE,
        extra_info=row_info("grid_sample", impl_name, shape, DTYPE, "forward"),
    )


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_grid_sample_forward_backward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    image, grid, grad_out, out, grad_image, grad_grid = make_case(shape, device)
    image = image.clone().requires_grad_()
    grid = grid.clone().requires_grad_()
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(image, grid), out,
        {"input": (image, grad_image), "grid": (grid, grad_grid)},
        grad_out=grad_out,
        rtol=RTOL,
        group=f"grid_sample-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=3 * nbytes(grid, image) + 2 * nbytes(out),
        baseline=impl_name == BASELINE,
        extra_info=row_info("grid_sample", impl_name, shape, DTYPE, "forward+backward"),
    )
