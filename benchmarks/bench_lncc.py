"""``lncc`` against what users run today: ``pytest benchmarks/bench_lncc.py``.

Rows: ``mrus_<backend>`` (cpu on CPU sizes; cuda, triton on GPU sizes), ``reference``
(box sums by convolutions in the inputs' float32, :func:`mrus_kernels.reference.lncc` with
``sum_dtype=None``: what users write; the baseline), ``compiled``
(``torch.compile`` of it) and ``monai`` (``LocalNormalizedCrossCorrelationLoss``, rectangular
kernel, when importable; it zero-pads its windows, so it is checked only for finiteness).
Groups: ``lncc-fwd-<device>-<size>`` and ``lncc-fwdbwd-<device>-<size>`` (gradient of the
moving image). Sizes: CPU 1×1×64×64×64, GPU 1×1×160×192×224 and a 2D batch 16×1×256×256
(the GPU kernels split lines into chunks when a pass has few lines); window 9, float32.
GPU inputs are at raw scanner intensities (×1000), where float32 running sums used to
lose the flat background (the check against float64 then fails).
Ideal bytes: forward |I| + |J|; forward + backward 2(|I| + |J|) + |dJ|.
Every row is checked against the float64 reference (rtol 1e-4) before timing.
"""

from __future__ import annotations

import pytest
import torch

from mrus_kernels import lncc, reference

from .conftest import assert_close_rel, nbytes, run_benchmark, shape_id, skip_unless_backend

WINDOW = 9
CPU_SIZES = [(1, 1, 64, 64, 64)]
GPU_SIZES = [(1, 1, 160, 192, 224), (16, 1, 256, 256)]


def _inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(shape, generator=g)
    m = (0.7 * f + 0.3 * torch.rand(shape, generator=g))
    scale = 1000.0 if device == "cuda" else 1.0
    return (f * scale).to(device), (m * scale).to(device)


def _impl(name, device, ndim):
    if name.startswith("mrus_"):
        backend = name[5:]
        skip_unless_backend(backend, device)
        return lambda f, m: lncc(f, m, window=WINDOW, backend=backend)
    if name == "reference":
        return lambda f, m: reference.lncc(f, m, WINDOW, sum_dtype=None)
    if name == "compiled":
        fn = torch.compile(reference.lncc, dynamic=False)
        return lambda f, m: fn(f, m, WINDOW, sum_dtype=None)
    monai_losses = pytest.importorskip("monai.losses")
    loss = monai_losses.LocalNormalizedCrossCorrelationLoss(
        spatial_dims=ndim, kernel_size=WINDOW, kernel_type="rectangular", reduction="none")
    return lambda f, m: -loss(m, f).flatten(1).mean(1)


def _bench(benchmark, name, shape, device, backward):
    f, m = _inputs(shape, device)
    fn = _impl(name, device, len(shape) - 2)
    exp = reference.lncc(f.double(), m.double(), WINDOW)
    if backward:
        md = m.double().requires_grad_()
        (eg,) = torch.autograd.grad(reference.lncc(f.double(), md, WINDOW).sum(), md)
        mg = m.clone().requires_grad_()

        def run():
            mg.grad = None
            fn(f, mg).sum().backward()
            return mg.grad
        got = run()
        if name != "monai":
            assert_close_rel(name, got, eg)
        ideal = 2 * nbytes(f, m) + nbytes(m)
    else:
        def run():
            with torch.no_grad():
                return fn(f, m)
        got = run()
        if name != "monai":
            assert_close_rel(name, got, exp)
        ideal = nbytes(f, m)
    assert bool(torch.isfinite(got).all())
    benchmark.group = f"lncc-{'fwdbwd' if backward else 'fwd'}-{device}-{shape_id(shape)}"
    run_benchmark(benchmark, run, rounds=5 if device == "cpu" else 20, device=device,
                  ideal_bytes=ideal, baseline=name == "reference",
                  extra_info={"impl": name, "shape": shape_id(shape), "window": WINDOW})


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", ["mrus_cpu", "reference", "compiled", "monai"])
@pytest.mark.parametrize("shape", CPU_SIZES, ids=shape_id)
def test_lncc_cpu(benchmark, name, shape, backward):
    _bench(benchmark, name, shape, "cpu", backward)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", ["mrus_cuda", "mrus_triton", "reference", "compiled", "monai"])
@pytest.mark.parametrize("shape", GPU_SIZES, ids=shape_id)
def test_lncc_gpu(benchmark, name, shape, backward):
    _bench(benchmark, name, shape, "cuda", backward)
