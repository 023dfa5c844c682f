"""``integrate_velocity`` (scaling and squaring, 7 steps) against what users run today:
``pytest benchmarks/bench_integrate.py``.

Rows of every group:

- ``mrus_<backend>_<memory>``: :func:`mrus_kernels.integrate_velocity` with ``backend=``
  ``cpu`` (CPU sizes) or ``cuda`` and ``triton`` (GPU sizes) and ``memory=`` ``store`` (keeps
  the 7 intermediate fields) or ``recompute`` (keeps only v; recomputes them in the backward);
  skipped with the reason when the backend cannot serve the call.
- ``grid_sample``: VoxelMorph's ``VecInt``: ``u = v / 2**7``, then 7 times
  ``u = u + grid_sample(u, id + u)`` (:func:`vecint_grid_sample`), the baseline of the
  speed-ups.
- ``compiled``: ``torch.compile`` of it, compiled afresh in each benchmark.
- ``monai``: ``monai.networks.blocks.DVF2DDF(num_steps=7, padding_mode="border")`` when MONAI
  is importable (optional; skipped when absent).

All rows use "border" padding (our default; VoxelMorph's grid_sample default is "zeros",
which would make it a different map near the border).

Groups, one per pass and size: ``integrate-fwd-<device>-<size>`` (no grad) and
``integrate-fwdbwd-<device>-<size>`` (v requires grad; ``u.backward(grad_out)``, the
gradient freshly allocated every round). Sizes: CPU ``1×3×48×48×48``; GPU
``1×3×160×192×224`` and ``2×3×128×128×64``; float32. Peak extra memory (GPU) shows what
"recompute" saves: the 7 stored fields of "store", and the reference's autograd graph.

Ideal bytes (GB/s = ideal bytes / median): forward 2·steps·|v| (each step reads its field
once and writes the next); forward + backward adds 3·steps·|v| (each backward step reads
the upstream gradient and the step's input, and writes the next gradient).

Every benchmark checks its result and gradient against ``reference.integrate_velocity``
(float64 on the same float32 inputs) to ``RTOL`` of the largest value before it times
anything. Target (CPU, cpu backend): forward + backward at least 2x faster than
``grid_sample``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mrus_kernels import integrate_velocity, reference

from .bench_compose import (
    CPU_SHAPES,
    DTYPE,
    GPU_SHAPES,
    ROUNDS,
    cases,
    monai_layer,
    smooth_field,
)
from .conftest import (
    bench_forward,
    bench_forward_backward,
    nbytes,
    reference_with_grads,
    row_info,
    shape_id,
    skip_unless_backend,
)

STEPS = 7
RTOL = 1e-4
BASELINES = ("grid_sample", "compiled", "monai")
BASELINE = "grid_sample"
MEMORY = ("store", "recompute")


def _ours(device: str) -> tuple[str, ...]:
    backends = ("cpu",) if device == "cpu" else ("cuda", "triton")
    return tuple(f"mrus_{b}_{m}" for b in backends for m in MEMORY)


CASES = cases(_ours, BASELINES)


def vecint_grid_sample(v: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """VoxelMorph's VecInt: scaling and squaring over grid_sample, border padding."""
    u = v / 2**steps
    for _ in range(steps):
        u = u + reference.warp_grid_sample(u, u, "linear", "border")
    return u


@dataclass
class Case:
    v: torch.Tensor  # [B, 3, *S], float32, voxel units
    grad_out: torch.Tensor  # [B, 3, *S]
    out: torch.Tensor  # reference forward
    grad_v: torch.Tensor  # reference d(out · grad_out) / d v


@functools.lru_cache(maxsize=len(CPU_SHAPES) + len(GPU_SHAPES))
def make_case(shape: tuple[int, ...], device: str) -> Case:
    generator = torch.Generator().manual_seed(1)
    v = smooth_field(shape, generator).to(DTYPE)
    grad_out = torch.randn(shape, generator=generator, dtype=DTYPE)
    out, (grad_v,) = reference_with_grads(
        lambda a: reference.integrate_velocity(a, STEPS, "border"), (v,), grad_out
    )
    return Case(
        v.to(device), grad_out.to(device), out.to(device, DTYPE), grad_v.to(device, DTYPE),
    )


def make_impl(name: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable v -> displacement of one row; skips when it cannot run."""
    if name.startswith("mrus_"):
        backend, memory = name.removeprefix("mrus_").split("_")
        skip_unless_backend(backend, device, DTYPE)
        return functools.partial(integrate_velocity, steps=STEPS, memory=memory, backend=backend)
    if name == "grid_sample":
        return vecint_grid_sample
    if name == "compiled":
        torch._dynamo.reset()  # one fresh compile per benchmark
        return torch.compile(vecint_grid_sample, dynamic=False)
    if name == "monai":
        return monai_layer("DVF2DDF", num_steps=STEPS, mode="bilinear", padding_mode="border")
    raise ValueError(f"unknown row {name!r}")


def _info(name: str, shape: tuple[int, ...], pass_: str) -> dict:
    memory = name.rsplit("_", 1)[1] if name.startswith("mrus_") else None
    return row_info("integrate_velocity", name, shape, DTYPE, pass_, steps=STEPS, memory=memory)


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_integrate_forward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    v = case.v
    bench_forward(
        benchmark, impl_name, lambda: impl(v), case.out,
        rtol=RTOL,
        group=f"integrate-fwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=2 * STEPS * nbytes(v),
        baseline=impl_name == BASELINE,
        extra_info=_info(impl_name, shape, "forward"),
    )


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_integrate_forward_backward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    v = case.v.clone().requires_grad_()
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(v), case.out,
        {"v": (v, case.grad_v)},
        grad_out=case.grad_out,
        rtol=RTOL,
        group=f"integrate-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=5 * STEPS * nbytes(case.v),
        baseline=impl_name == BASELINE,
        extra_info=_info(impl_name, shape, "forward+backward"),
    )
