"""The test harness itself: poisoned allocators and the launchers' device guard."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import POISONED_ALLOCATORS, poisoned_empty
from mrus_kernels import _ext

OPS = ("jacobian", "lncc", "mi", "regularisers", "sobel", "warp")


@pytest.mark.parametrize("owner, name, poisoned", POISONED_ALLOCATORS,
                         ids=[n for _, n, _ in POISONED_ALLOCATORS])
def test_every_uninitialised_allocator_is_poisoned(owner, name, poisoned):
    base = torch.ones(3, 4)
    calls = {
        "empty": lambda: torch.empty(3, 4),
        "empty_like": lambda: torch.empty_like(base),
        "empty_strided": lambda: torch.empty_strided((3, 4), (4, 1)),
        "new_empty": lambda: base.new_empty((3, 4)),
    }
    with poisoned_empty():
        t = calls[name]()
        ints = torch.empty(5, dtype=torch.int64)  # integers cannot hold NaN: left alone
    assert t.shape == (3, 4) and bool(t.isnan().all()), t
    assert ints.dtype == torch.int64
    # Outside the block the real allocators are back.
    assert getattr(owner, name) is not poisoned


def test_poisoned_allocators_keep_out_and_zero_size():
    buf = torch.zeros(2)
    with poisoned_empty():
        out = torch.empty(2, out=buf)
        empty = torch.empty(0)
    assert out is buf and bool((buf == 0).all())
    assert empty.numel() == 0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", ["launch_forward", "launch_backward"])
def test_every_launcher_runs_under_the_tensors_device(op, which):
    fn = getattr(importlib.import_module(f"mrus_kernels.{op}"), which)
    assert getattr(fn, "__mrus_device_guard__", False), f"mrus_kernels.{op}.{which}"


def test_device_guard_enters_the_first_cuda_tensors_device(monkeypatch):
    # No GPU needed: a tensor that reports a CUDA device, and a recording torch.cuda.device.
    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):  # noqa: D401 - property of the fake
            return True

        @property
        def device(self):
            return torch.device("cuda", 1)

    entered: list[torch.device] = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    seen = []

    @_ext.on_tensor_device
    def launcher(a, b, *, c=None):
        seen.append(len(entered))
        return 7

    cpu = torch.ones(1)
    fake = torch.ones(1).as_subclass(FakeCuda)
    assert launcher(cpu, 3, c=None) == 7 and entered == []
    assert launcher(cpu, fake) == 7
    assert entered == [torch.device("cuda", 1), "exit"] and seen == [0, 1]
    entered.clear()
    assert launcher(1, 2, c=fake) == 7 and entered[0] == torch.device("cuda", 1)
    assert _ext.tensor_device((cpu, 3)) is None


@pytest.mark.cuda
def test_ops_on_a_second_gpu_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import mrus_kernels as mk

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 9, 10, 11, generator=gen)
    ddf = torch.randn(2, 3, 9, 10, 11, generator=gen)
    expected = mk.warp(image, ddf, backend="cpu")
    torch.cuda.set_device(0)
    for backend in ("cuda", "triton"):
        out = mk.warp(image.to("cuda:1"), ddf.to("cuda:1"), backend=backend)
        assert out.device == torch.device("cuda", 1)
        err = (out.cpu() - expected).abs().max().item()
        assert err <= 1e-5, (backend, err)
