"""``grad_l2``, ``harmonic_energy``, ``bending_energy`` and ``diffusion`` against plain
PyTorch and MONAI: ``pytest benchmarks/bench_regularisers.py``.

Rows: ``mrus_<backend>``, ``reference`` (:mod:`mrus_kernels.reference`) and ``compiled``
(its ``torch.compile``); for bending_energy and diffusion also ``monai`` (MONAI's
``BendingEnergyLoss`` / ``DiffusionLoss``, when installed). The baseline is ``monai``
where there is one, else ``reference``. Groups ``<op>-<fwd|fwdbwd>-<device>-<size>``; sizes
CPU 1×3×64×64×64, GPU 1×3×160×192×224; float32. Ideal bytes: forward |u|; forward +
backward 2|u| + |du|. Each row is checked against the float64 reference first.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mrus_kernels import bending_energy, grad_l2, harmonic_energy, reference
from mrus_kernels.regularisers import diffusion

from .conftest import assert_close_rel, nbytes, run_benchmark, shape_id, skip_unless_backend

CPU_SIZES = [(1, 3, 64, 64, 64)]
GPU_SIZES = [(1, 3, 160, 192, 224)]
OPS = {
    "grad_l2": (lambda u, b: grad_l2(u, backend=b), lambda u: reference.grad_l2(u)),
    "harmonic": (lambda u, b: harmonic_energy(u, reduction="mean", backend=b),
                 lambda u: reference.harmonic_energy(u, "mean")),
    "bending": (lambda u, b: bending_energy(u, backend=b),
                lambda u: reference.bending_energy(u)),
    "diffusion": (lambda u, b: diffusion(u, backend=b), lambda u: reference.diffusion(u)),
}
MONAI_OPS = ("bending", "diffusion")


def _monai(op):
    """MONAI's class for op (its defaults: normalize=False, reduction="mean")."""
    losses = pytest.importorskip("monai.losses", reason="MONAI rows: pip install -e .[compat]")
    loss = losses.BendingEnergyLoss() if op == "bending" else losses.DiffusionLoss()

    def run(u):
        with warnings.catch_warnings():
            # MONAI 1.6.1 indexes with lists of slices: a deprecation warning per call.
            warnings.simplefilter("ignore")
            return loss(u)

    return run


def _bench(benchmark, op, name, shape, device, backward):
    ours, ref = OPS[op]
    if name.startswith("mrus_"):
        skip_unless_backend(name[5:], device)
        fn = lambda u: ours(u, name[5:])  # noqa: E731
    elif name == "reference":
        fn = ref
    elif name == "monai":
        fn = _monai(op)
    else:
        fn = torch.compile(ref, dynamic=False)
    u = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    ud = u.double().requires_grad_()
    exp = ref(ud)
    (eg,) = torch.autograd.grad(exp, ud)
    if backward:
        ug = u.clone().requires_grad_()

        def run():
            ug.grad = None
            fn(ug).backward()
            return ug.grad
        assert_close_rel(name, run(), eg)
        ideal = 2 * nbytes(u) + nbytes(u)
    else:
        def run():
            with torch.no_grad():
                return fn(u)
        assert_close_rel(name, run(), exp.detach())
        ideal = nbytes(u)
    benchmark.group = f"{op}-{'fwdbwd' if backward else 'fwd'}-{device}-{shape_id(shape)}"
    run_benchmark(benchmark, run, rounds=5 if device == "cpu" else 20, device=device,
                  ideal_bytes=ideal,
                  baseline=name == ("monai" if op in MONAI_OPS else "reference"),
                  extra_info={"impl": name, "shape": shape_id(shape)})


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", ["mrus_cpu", "reference", "compiled"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", CPU_SIZES, ids=shape_id)
def test_regularisers_cpu(benchmark, op, name, shape, backward):
    _bench(benchmark, op, name, shape, "cpu", backward)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", ["mrus_cuda", "mrus_triton", "reference", "compiled"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", GPU_SIZES, ids=shape_id)
def test_regularisers_gpu(benchmark, op, name, shape, backward):
    _bench(benchmark, op, name, shape, "cuda", backward)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", MONAI_OPS)
@pytest.mark.parametrize("shape", CPU_SIZES, ids=shape_id)
def test_regularisers_monai_cpu(benchmark, op, shape, backward):
    _bench(benchmark, op, "monai", shape, "cpu", backward)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", MONAI_OPS)
@pytest.mark.parametrize("shape", GPU_SIZES, ids=shape_id)
def test_regularisers_monai_gpu(benchmark, op, shape, backward):
    _bench(benchmark, op, "monai", shape, "cuda", backward)
