"""``compose`` against what users run today: ``pytest benchmarks/bench_compose.py``.

compose(u, v)(x) = v(x) + u(x + v(x)), the displacement of φ_u ∘ φ_v, "border" padding.

Rows of every group:

- ``mrus_<backend>``: :func:`mrus_kernels.compose` with ``backend=`` ``cpu`` (CPU sizes) or
  ``cuda`` and ``triton`` (GPU sizes); skipped with the reason when the backend cannot
  serve the call.
- ``grid_sample``: the VoxelMorph-style composition ``v + grid_sample(u, id + v)``
  (:func:`compose_grid_sample`), the baseline of the speed-ups.
- ``compiled``: ``torch.compile`` of it, compiled afresh in each benchmark.
- ``monai``: ``v + monai.networks.blocks.Warp(padding_mode="border")(u, v)`` when MONAI is
  importable (optional; skipped when absent). MONAI's ddf is in voxel units with channel i
  along spatial axis i, as ours.

Groups, one per pass and size: ``compose-fwd-<device>-<size>`` (no grad) and
``compose-fwdbwd-<device>-<size>`` (u and v require grad; ``out.backward(grad_out)``, both
gradients freshly allocated every round). Sizes: CPU ``1×3×48×48×48``; GPU
``1×3×160×192×224`` and ``2×3×128×128×64``; float32.

Ideal bytes: forward |u| + |v| + |out|; forward + backward adds |grad_out| + |u| + |v| +
|grad_u| + |grad_v|.

Inputs are seeded smooth random fields (coarse noise at 1/8 resolution, trilinearly
upsampled, each component between 0.2 and 1 times ``AMPLITUDE`` voxels: see
:func:`smooth_field`). Every benchmark checks its outputs and gradients
against ``reference.compose`` (run in float64 on the same float32 inputs) to ``RTOL`` of the
largest value before it times anything.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mrus_kernels import compose, reference

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

CPU_SHAPES = [(1, 3, 48, 48, 48)]
GPU_SHAPES = [(1, 3, 160, 192, 224), (2, 3, 128, 128, 64)]
BASELINES = ("grid_sample", "compiled", "monai")
BASELINE = "grid_sample"  # the speed-ups are relative to this row
DTYPE = torch.float32
RTOL = 1e-4
AMPLITUDE = 3.0  # voxels, largest displacement component
ROUNDS = {"cpu": (10, 2), "cuda": (50, 5)}  # (timed, warmup) rounds per device type

def cases(ours: Callable[[str], tuple[str, ...]], baselines: tuple[str, ...]) -> list:
    """pytest params (shape, device, impl) for every size; ``ours(device)`` names our rows."""
    return bench_cases(CPU_SHAPES, GPU_SHAPES, (*ours("cpu"), *baselines),
                       (*ours("cuda"), *baselines))


CASES = cases(lambda d: ("mrus_cpu",) if d == "cpu" else ("mrus_cuda", "mrus_triton"), BASELINES)


# ---------------------------------------------------------------------------- inputs


def smooth_field(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A smooth random displacement [B, ndim, *S], float64 on the CPU, voxel units, every
    component between 0.2 and 1 times ``AMPLITUDE`` voxels.

    Bounded away from 0 on purpose: linear sampling has a kink wherever a sample point is an
    integer, and "border" padding one at the faces, so where a field (or an early, scaled-down
    squaring step of it) is within rounding of 0, float32 kernels and the float64 reference
    would take the gradient from different sides. Timing is not affected."""
    spatial = shape[2:]
    coarse = torch.randn(
        shape[0], len(spatial), *[max(2, n // 8) for n in spatial], generator=generator,
        dtype=torch.float64,
    )
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    field = F.interpolate(coarse, size=spatial, mode=mode, align_corners=True)
    return AMPLITUDE * (0.6 + 0.4 * field / field.abs().amax())


def compose_grid_sample(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """VoxelMorph-style composition: v + grid_sample(u, id + v), border padding."""
    return v + reference.warp_grid_sample(u, v, "linear", "border")


@functools.lru_cache(maxsize=1)
def monai_blocks() -> tuple[object | None, str | None]:
    """MONAI's ``networks.blocks`` module, or None and why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's own import-time deprecations
            from monai.networks import blocks
    except Exception as exc:  # noqa: BLE001 - optional: any import failure means "absent"
        return None, f"MONAI is not importable ({type(exc).__name__}: {exc}); `pip install monai`"
    return blocks, None


def monai_layer(name: str, **kwargs) -> torch.nn.Module:
    """A MONAI block (``Warp``, ``DVF2DDF``); skips the test when MONAI is absent."""
    blocks, reason = monai_blocks()
    if blocks is None:
        pytest.skip(reason)
    with warnings.catch_warnings():
        # "Using PyTorch native grid_sample": it says which path MONAI took.
        warnings.simplefilter("ignore", UserWarning)
        return getattr(blocks, name)(**kwargs)


@dataclass
class Case:
    """Inputs of one size and what the reference makes of them."""

    u: torch.Tensor  # [B, 3, *S], float32, voxel units
    v: torch.Tensor  # [B, 3, *S]
    grad_out: torch.Tensor  # [B, 3, *S]
    out: torch.Tensor  # reference forward
    grad_u: torch.Tensor  # reference d(out · grad_out) / d u
    grad_v: torch.Tensor


@functools.lru_cache(maxsize=len(CPU_SHAPES) + len(GPU_SHAPES))
def make_case(shape: tuple[int, ...], device: str) -> Case:
    generator = torch.Generator().manual_seed(0)
    u = smooth_field(shape, generator).to(DTYPE)
    v = smooth_field(shape, generator).to(DTYPE)
    grad_out = torch.randn(shape, generator=generator, dtype=DTYPE)
    out, (grad_u, grad_v) = reference_with_grads(
        lambda a, b: reference.compose(a, b, "border"), (u, v), grad_out
    )
    return Case(
        *(t.to(device) for t in (u, v, grad_out)),
        *(t.to(device, DTYPE) for t in (out, grad_u, grad_v)),
    )


def make_impl(name: str, device: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The callable (u, v) -> composed field of one row; skips when it cannot run."""
    if name.startswith("mrus_"):
        backend = name.removeprefix("mrus_")
        skip_unless_backend(backend, device, DTYPE)
        return functools.partial(compose, backend=backend)
    if name == "grid_sample":
        return compose_grid_sample
    if name == "compiled":
        torch._dynamo.reset()  # one fresh compile per benchmark
        return torch.compile(compose_grid_sample, dynamic=False)
    if name == "monai":
        layer = monai_layer("Warp", mode="bilinear", padding_mode="border")
        return lambda u, v: v + layer(u, v)
    raise ValueError(f"unknown row {name!r}")


# ---------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_compose_forward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    u, v = case.u, case.v
    bench_forward(
        benchmark, impl_name, lambda: impl(u, v), case.out,
        rtol=RTOL,
        group=f"compose-fwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=nbytes(u, v, case.out),
        baseline=impl_name == BASELINE,
        extra_info=row_info("compose", impl_name, shape, DTYPE, "forward"),
    )


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_compose_forward_backward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    u = case.u.clone().requires_grad_()
    v = case.v.clone().requires_grad_()
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(u, v), case.out,
        {"u": (u, case.grad_u), "v": (v, case.grad_v)},
        grad_out=case.grad_out,
        rtol=RTOL,
        group=f"compose-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=nbytes(case.u, case.v, case.out)
        + nbytes(case.grad_out, case.u, case.v, case.grad_u, case.grad_v),
        baseline=impl_name == BASELINE,
        extra_info=row_info("compose", impl_name, shape, DTYPE, "forward+backward"),
    )
