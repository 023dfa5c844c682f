"""``sobel_l1`` (the ACMT boundary loss) against what users run today:
``pytest benchmarks/bench_sobel.py``.

Rows of every group:

- ``mrus_<backend>``: :func:`mrus_kernels.sobel_l1` with ``backend=`` ``cpu`` (CPU sizes) or
  ``cuda`` and ``triton`` (GPU sizes); skipped with the reason when the backend cannot
  serve the call.
- ``conv3d``: the baseline of the speed-ups, written here as a user would: each Sobel
  component by ``F.conv3d`` with ``groups=C`` and the three 3×3×3 separable kernels
  (replicate padding by ``F.pad``), the magnitudes, then ``mean |m1 - m0|``.
- ``compiled``: ``torch.compile(conv3d row, dynamic=False)``, compiled afresh in each
  benchmark.
- ``reference``: ``mrus_kernels.reference.sobel_l1`` (separable shifts in plain PyTorch).

Groups, one per pass and size: ``sobel_l1-fwd-<device>-<size>`` (inputs without grad) and
``sobel_l1-fwdbwd-<device>-<size>`` (both inputs require grad, ``loss.backward()``, both
gradients freshly allocated every round as in a training step). Sizes: CPU ``1×8×32×32×32``;
GPU ``2×32×128×128×64`` and ``1×16×160×192×224``; float32, replicate padding.

Ideal bytes (GB/s = ideal bytes / median time): forward |f1| + |f0| (read both inputs
once, a scalar out); forward + backward: the forward plus reading both inputs again and
writing both gradients, 3 (|f1| + |f0|).

Every benchmark checks its loss and gradients against ``reference.sobel_l1`` run in
float64 on the same float32 inputs (to 1e-4 of the largest value) before timing, so
``pytest benchmarks --benchmark-disable`` is a correctness run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mrus_kernels import reference, sobel_l1

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

CPU_SHAPES = [(1, 8, 32, 32, 32)]
GPU_SHAPES = [(2, 32, 128, 128, 64), (1, 16, 160, 192, 224)]
BASELINES = ("conv3d", "compiled", "reference")
BASELINE = "conv3d"  # the speed-ups are relative to this row
DTYPE = torch.float32
EPS = 1e-6
RTOL = 1e-4
ROUNDS = {"cpu": (10, 2), "cuda": (50, 5)}  # (timed, warmup) rounds per device type

Impl = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CASES = bench_cases(CPU_SHAPES, GPU_SHAPES, ("mrus_cpu", *BASELINES),
                    ("mrus_cuda", "mrus_triton", *BASELINES))


# ---------------------------------------------------------------------------- baseline


def sobel_kernels_3d(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The three 3×3×3 Sobel kernels, [3, 1, 3, 3, 3]: kernel i = [-1, 0, 1] along axis i
    times [1, 2, 1] along the others (cross-correlation, as F.conv3d applies it)."""
    s = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device)
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device=device)
    kernels = []
    for i in range(3):
        f = [d if j == i else s for j in range(3)]
        kernels.append(f[0][:, None, None] * f[1][None, :, None] * f[2][None, None, :])
    return torch.stack(kernels)[:, None]


def conv3d_magnitude(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Sobel magnitude [B, C, D, H, W] by a grouped F.conv3d (3 output channels per input
    channel) on the replicate-padded input."""
    c = x.shape[1]
    weight = sobel_kernels_3d(x.dtype, x.device).repeat(c, 1, 1, 1, 1)  # [3C, 1, 3, 3, 3]
    g = F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), weight, groups=c)
    return torch.sqrt((g * g).unflatten(1, (c, 3)).sum(2) + eps)


def conv3d_sobel_l1(f1: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    """The ACMT boundary loss as a user writes it: mean |m(f1) - m(f0)|."""
    return (conv3d_magnitude(f1) - conv3d_magnitude(f0)).abs().mean()


def make_impl(name: str, device: str) -> Impl:
    if name.startswith("mrus_"):
        backend = name.removeprefix("mrus_")
        skip_unless_backend(backend, device, DTYPE)
        return functools.partial(sobel_l1, backend=backend)
    if name == "conv3d":
        return conv3d_sobel_l1
    if name == "compiled":
        torch._dynamo.reset()
        return torch.compile(conv3d_sobel_l1, dynamic=False)
    if name == "reference":
        return reference.sobel_l1
    raise ValueError(f"unknown row {name!r}")


# ---------------------------------------------------------------------------- inputs


@dataclass
class Case:
    f1: torch.Tensor  # [B, C, D, H, W], float32
    f0: torch.Tensor
    loss: torch.Tensor  # reference, float64 -> float32
    grad_f1: torch.Tensor
    grad_f0: torch.Tensor


@functools.lru_cache(maxsize=1)
def make_case(shape: tuple[int, ...], device: str) -> Case:
    """Seeded feature-like inputs (smooth plus noise) and the float64 reference results."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(2 * shape[0], shape[1], *[max(2, n // 4) for n in shape[2:]],
                         generator=generator)
    smooth = F.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True)
    noise = 0.1 * torch.randn(2 * shape[0], *shape[1:], generator=generator)
    f1, f0 = (smooth + noise).to(DTYPE).chunk(2)
    f1, f0 = f1.contiguous().to(device), f0.contiguous().to(device)
    loss, (grad_f1, grad_f0) = reference_with_grads(
        lambda a, b: reference.sobel_l1(a, b, "replicate", EPS), (f1, f0)
    )
    return Case(f1, f0, loss.to(DTYPE), grad_f1.to(DTYPE), grad_f0.to(DTYPE))


# ---------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_sobel_l1_forward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    f1, f0 = case.f1, case.f0
    bench_forward(
        benchmark, impl_name, lambda: impl(f1, f0), case.loss,
        rtol=RTOL,
        label="loss",
        group=f"sobel_l1-fwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=nbytes(f1, f0),
        baseline=impl_name == BASELINE,
        extra_info=row_info("sobel_l1", impl_name, shape, DTYPE, "forward"),
    )


@pytest.mark.parametrize(("shape", "device", "impl_name"), CASES)
def test_sobel_l1_forward_backward(shape, device, impl_name, benchmark):
    impl = make_impl(impl_name, device)
    case = make_case(shape, device)
    f1 = case.f1.clone().requires_grad_()
    f0 = case.f0.clone().requires_grad_()
    bench_forward_backward(
        benchmark, impl_name, lambda: impl(f1, f0), case.loss,
        {"f1": (f1, case.grad_f1), "f0": (f0, case.grad_f0)},
        rtol=RTOL,
        label="loss",
        group=f"sobel_l1-fwdbwd-{device}-{shape_id(shape)}",
        rounds=ROUNDS[device],
        device=device,
        ideal_bytes=3 * nbytes(case.f1, case.f0),
        baseline=impl_name == BASELINE,
        extra_info=row_info("sobel_l1", impl_name, shape, DTYPE, "forward+backward"),
    )
