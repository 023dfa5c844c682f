"""Parzen-window mutual information against what users run today:
``pytest benchmarks/bench_mi.py``.

Rows of every group:

- ``mrus_<backend>``: :func:`mrus_kernels.mutual_information` with ``backend=`` ``cpu``
  (CPU size) or ``cuda`` and ``triton`` (GPU sizes); skipped with the reason when the
  backend cannot serve the call.
- ``reference``: ``reference.mutual_information``, the dense-weights PyTorch formulation
  (``[B, N, K]`` Parzen weights per image, then an einsum), the baseline of the speed-ups.
- ``compiled``: ``torch.compile`` of it (GPU sizes only: compiling it on a shared 2-core CI
  machine costs more than the whole suite).
- ``monai``: ``monai.losses.GlobalMutualInformationLoss`` (Gaussian, 32 bins, sigma_ratio
  0.5) when MONAI is importable.

All rows compute the same quantity. MONAI puts its K bin centres at linspace(0, 1, K) with
sigma = 0.5 bin widths and clamps values to [0, 1]; that is our definition with
``value_range = (-1 / (2 (K - 1)), 1 + 1 / (2 (K - 1)))`` (bin width 1 / (K - 1), first
centre 0) and sigma = 0.5, on images in [0, 1]. MONAI adds 1e-7 inside its logarithms
where we clamp at eps, so its row is checked to 1e-3 relative, the others to 1e-4.

Groups, one per pass and size: ``mi-fwd-<device>-<size>`` (no gradients) and
``mi-fwdbwd-<device>-<size>`` (-MI backward into the moving image, which requires grad,
as when training a registration network; its gradient is freshly allocated every round).
Sizes: CPU ``1×1×64×64×64``; GPU ``1×1×160×192×224`` and ``2×1×128×128×64``; float32, 32
bins. Each row reports the median time and, on a GPU, the peak extra memory.

Every benchmark checks its result (and gradient) against ``reference.mutual_information``
run in float64 on the same float32 inputs before it times anything, so
``pytest benchmarks --benchmark-disable`` is a correctness run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mrus_kernels import mutual_information, reference

from .conftest import (
    bench_cases,
    bench_forward,
    bench_forward_backward,
    reference_with_grads,
    row_info,
    shape_id,
    skip_unless_backend,
)

CPU_SHAPES = [(1, 1, 64, 64, 64)]
GPU_SHAPES = [(1, 1, 160, 192, 224), (2, 1, 128, 128, 64)]
BINS = 32
SIGMA = 0.5
HALF_BIN = 1.0 / (2 * (BINS - 1))
VALUE_RANGE = (-HALF_BIN, 1.0 + HALF_BIN)  # MONAI's bins (see the module docstring)
DTYPE = torch.float32
RTOL = {"monai": 1e-3}
RTOL_DEFAULT = 1e-4
BASELINE = "reference"
ROUNDS = {"cpu": (5, 1), "cuda": (50, 5)}  # (timed, warmup) rounds per device type

Impl = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (fixed, moving) -> loss

CASES = bench_cases(CPU_SHAPES, GPU_SHAPES, ("mrus_cpu", "reference", "monai"),
                    ("mrus_cuda", "mrus_triton", "reference", "compiled", "monai"))


@dataclass
class Case:
    fixed: torch.Tensor  # [B, 1, *S] in [0, 1], float32
    moving: torch.Tensor  # [B, 1, *S] in [0, 1], non-linearly related to fixed plus noise
    loss: torch.Tensor  # reference -mean MI, float64
    grad_moving: torch.Tensor  # its gradient w.r.t. moving, float32


@functools.lru_cache(maxsize=len(CPU_SHAPES) + len(GPU_SHAPES))
def make_case(shape: tuple[int, ...], device: str) -> Case:
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(shape, generator=generator, dtype=torch.float64)
    noise = torch.rand(shape, generator=generator, dtype=torch.float64)
    moving = 0.5 + 0.4 * torch.sin(6 * fixed) * (0.7 + 0.3 * noise)
    fixed, moving = fixed.to(device, DTYPE), moving.to(device, DTYPE)
    loss, (grad_moving,) = reference_with_grads(
        lambda m: _reference_loss(fixed.double(), m), (moving,)
    )
    return Case(fixed, moving, loss, grad_moving.to(DTYPE))


def _reference_loss(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    return -reference.mutual_information(fixed, moving, BINS, "gaussian", SIGMA, VALUE_RANGE).mean()


def make_impl(name: str, device: str) -> Impl:
    """The callable (fixed, moving) -> -mean MI of one row; skips when it cannot run."""
    if name.startswith("mrus_"):
        backend = name.removeprefix("mrus_")
        skip_unless_backend(backend, device, DTYPE)

        def ours(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
            return -mutual_information(fixed, moving, bins=BINS, sigma=SIGMA,
                                       value_range=VALUE_RANGE, backend=backend).mean()

        return ours
    if name == "reference":
        return _reference_loss
    if name == "compiled":
        torch._dynamo.reset()
        return torch.compile(_reference_loss, dynamic=False)
    if name == "monai":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from monai.losses import GlobalMutualInformationLoss
        except Exception as exc:  # noqa: BLE001 - optional dependency
            pytest.skip(f"MONAI is not importable ({type(exc).__name__}: {exc})")
        return GlobalMutualInformationLoss(num_bins=BINS, sigma_ratio=SIGMA).to(device)
    raise ValueError(f"unknown row {name!r}")


def _info(name: str, shape: tuple[int, ...], pass_: str) -> dict[str, object]:
    return row_info("mutual_information", name, shape, DTYPE, pass_, bins=BINS)


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_mi_forward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return impl(case.fixed, case.moving)

    bench_forward(
        benchmark, impl_name, step, case.loss,
        rtol=RTOL.get(impl_name, RTOL_DEFAULT),
        label="loss",
        group=f"mi-fwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        baseline=impl_name == BASELINE,
        extra_info=_info(impl_name, shape, "forward"),
    )


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_mi_forward_backward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    moving = case.moving.clone().requires_grad_()
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(case.fixed, moving), case.loss,
        {"moving": (moving, case.grad_moving)},
        rtol=RTOL.get(impl_name, RTOL_DEFAULT),
        label="loss",
        group=f"mi-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        baseline=impl_name == BASELINE,
        extra_info=_info(impl_name, shape, "forward+backward"),
    )
