"""Shared helpers of the operator benchmarks (``pytest benchmarks``).

Every ``bench_<op>.py`` uses the same pieces, so each row of every suite is measured and
reported the same way:

- :func:`run_benchmark` times a zero-argument callable with ``benchmark.pedantic`` (warmup
  rounds first; the CUDA device is synchronised inside the timed call, so times are real
  and not launch times), then records in ``extra_info``: device, peak extra memory
  (:func:`peak_extra_memory`), ideal bytes, achieved GB/s and the fraction of the
  measured copy bandwidth (:func:`copy_bandwidth_gbs`).
- :func:`assert_close_rel` checks a result against the reference before any timing, so
  ``pytest benchmarks --benchmark-disable`` is a correctness run.
  :func:`reference_with_grads` makes the float64 reference results and gradients;
  :func:`bench_forward` and :func:`bench_forward_backward` check a row against them and
  then time it, gradients cleared before every round.
- Tests marked ``cuda`` (the marker of ``pyproject.toml``) skip cleanly without a GPU.
- A summary table at the end of the run adds what pytest-benchmark's own table leaves
  out: speed-up over the group's baseline row, peak extra memory, GB/s, % of copy.

Suites import these as ``from .conftest import ...`` (``benchmarks`` is a package, so the
name cannot clash with ``tests/conftest.py``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

MiB = 2**20
HAS_CUDA = torch.cuda.is_available()

# Rows recorded by run_benchmark, printed by pytest_terminal_summary.
_ROWS: list[dict[str, Any]] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A runtest hook in this conftest applies only to items under benchmarks/.
    if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


# ---------------------------------------------------------------------------- measuring


def synchronize(device: torch.device | str) -> None:
    """Waits for the work queued on ``device`` (a no-op for CPU tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the process's peak resident set (``VmHWM``) to its current one (Linux:
    ``echo 5 > /proc/self/clear_refs``). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_memory(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak memory, in MiB, that ``fn()`` allocates beyond what was allocated before.

    Counts what the call leaves behind too (its output, gradients it writes), since a
    caller pays for that memory. CUDA: torch's caching allocator statistics. CPU: the
    growth of the process's peak resident set over its resident set before the call
    (Linux, where the peak can be reset; None elsewhere). The CPU figure counts pages the
    allocator had to take from the system, so memory freed earlier and reused is not
    counted: it is the extra memory a training process needs for the call.
    """
    device = torch.device(device)
    if device.type != "cuda":
        before = _proc_status_mib("VmRSS")
        if before is None or not _reset_peak_rss():
            return None
        result = fn()
        peak = _proc_status_mib("VmHWM")
        del result
        return None if peak is None else max(0.0, peak - before)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / MiB


@functools.cache
def _copy_bandwidth(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(2**30, free // 8)
    else:
        nbytes = 2**28
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = []
    if device.type == "cuda":
        copies = 10
        for _ in range(5):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(copies):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3 / copies)
    else:
        for _ in range(5):
            start_s = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - start_s)
    return 2 * nbytes / sorted(seconds)[len(seconds) // 2] / 1e9


def copy_bandwidth_gbs(device: torch.device | str) -> float:
    """Measured copy bandwidth of ``device`` in GB/s (1e9 B/s), once per session.

    A large float32 copy (1 GiB on a GPU, timed with CUDA events; 256 MiB on the CPU, wall
    clock), median of 5, counting the bytes read and the bytes written. It is the practical
    ceiling of a memory-bound operator, so ``GB/s / copy GB/s`` says how close one gets.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _copy_bandwidth(device)


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors' elements (the unit of ideal traffic counts)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def shape_id(shape: tuple[int, ...]) -> str:
    """``(1, 1, 64, 64, 64)`` -> ``"1x1x64x64x64"`` (test ids and group names)."""
    return "x".join(str(n) for n in shape)


# ---------------------------------------------------------------------------- checking


def assert_close_rel(
    name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4
) -> None:
    """``max|actual - expected| <= rtol * max|expected|``, NaN-safe, with a useful message.

    A relative-to-the-largest-value check: float32 kernels that sum in a different order
    (atomics, fused loops) differ from the reference by a few ulps of the large values.
    """
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    scale = e.abs().max().item()
    err = diff.max().item()
    if err <= rtol * scale:
        return
    flat = int(torch.nan_to_num(diff, nan=math.inf).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    bad = int((~(diff <= rtol * scale)).sum())
    raise AssertionError(
        f"{name}: max abs error {err:.3g} > {rtol:g} x max|expected| ({scale:.3g}); worst at "
        f"{where}: got {a[where].item():.6g}, expected {e[where].item():.6g}; "
        f"{bad} of {diff.numel()} elements out of tolerance"
    )


def reference_with_grads(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The oracle side of a benchmark: ``fn`` in float64 and its gradients.

    Args:
        fn: the reference, called as ``fn(*leaves)``.
        inputs: the tensors to differentiate; each is copied to float64 as a leaf that
            requires grad (on its own device).
        grad_out: the gradient fed to ``backward`` (cast to float64); None for a scalar.

    Returns:
        ``fn``'s result, detached, and one gradient per input, all float64.
    """
    leaves = [t.double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(None if grad_out is None else grad_out.double())
    grads = [leaf.grad for leaf in leaves]
    assert all(g is not None for g in grads)
    return out.detach(), grads


# ---------------------------------------------------------------------------- timing


def bench_forward(
    benchmark: Any,
    impl_name: str,
    fn: Callable[[], torch.Tensor],
    expected: torch.Tensor,
    *,
    rtol: float,
    label: str = "forward",
    group: str,
    rounds: tuple[int, int],
    device: torch.device | str,
    ideal_bytes: int | None = None,
    baseline: bool = False,
    extra_info: dict[str, Any],
) -> None:
    """Checks ``fn()`` against ``expected`` (:func:`assert_close_rel`), then times ``fn``.

    Args:
        benchmark: the pytest-benchmark fixture.
        impl_name: the row, for messages.
        fn: one forward pass, no arguments.
        expected: the reference result of ``fn()``.
        rtol: tolerance relative to ``max|expected|``.
        label: what ``fn()`` returns, for messages (``"forward"``, ``"loss"``).
        group: ``benchmark.group``, e.g. ``"warp-fwd-cpu-1x1x64x64x64"``.
        rounds: (timed, warmup) rounds, as in each suite's ``ROUNDS[device]``.
        device, ideal_bytes, baseline, extra_info: as :func:`run_benchmark`.
    """
    assert_close_rel(f"{impl_name} {label}", fn(), expected, rtol)
    benchmark.group = group
    timed, warmup = rounds
    run_benchmark(benchmark, fn, rounds=timed, warmup_rounds=warmup, device=device,
                  ideal_bytes=ideal_bytes, baseline=baseline, extra_info=extra_info)


def bench_forward_backward(
    benchmark: Any,
    impl_name: str,
    fn: Callable[[], torch.Tensor],
    expected: torch.Tensor,
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    grad_out: torch.Tensor | None = None,
    rtol: float,
    label: str = "forward",
    group: str,
    rounds: tuple[int, int],
    device: torch.device | str,
    ideal_bytes: int | None = None,
    baseline: bool = False,
    extra_info: dict[str, Any],
) -> None:
    """Checks ``fn()`` and its gradients, then times ``fn().backward(grad_out)``.

    Every leaf's ``.grad`` is cleared before each round, untimed, so every round allocates
    and writes its gradients like a training step.

    Args:
        fn: one forward pass, no arguments, over the leaves of ``grads``.
        expected: the reference result of ``fn()``.
        grads: ``{name: (leaf, expected gradient)}`` for every input that requires grad.
        grad_out: the gradient fed to ``backward``; None for a scalar loss.
        Others: as :func:`bench_forward`.
    """
    leaves = [leaf for leaf, _ in grads.values()]

    def clear_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    def step() -> None:
        fn().backward(grad_out)

    out = fn()
    assert_close_rel(f"{impl_name} {label}", out, expected, rtol)
    out.backward(grad_out)
    assert all(leaf.grad is not None for leaf in leaves), f"{impl_name}: no gradient"
    for name, (leaf, want) in grads.items():
        assert_close_rel(f"{impl_name} grad {name}", leaf.grad, want, rtol)
    del out
    clear_grads()

    benchmark.group = group
    timed, warmup = rounds
    run_benchmark(benchmark, step, setup=clear_grads, rounds=timed, warmup_rounds=warmup,
                  device=device, ideal_bytes=ideal_bytes, baseline=baseline,
                  extra_info=extra_info)


# ---------------------------------------------------------------------------- rows


# Torch warns about itself while compiling; not ours to fix, and `filterwarnings = error`
# would fail the compiled rows on it: inductor's imports (torch.utils.mkldnn uses the
# deprecated jit.script_method); dynamo instantiating a custom autograd.Function it traces
# (INNReg's translation network has one); inductor's lowering of aten.diagonal calling its
# own deprecated torch._prims_common.check.
COMPILE_MARKS = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
    pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not "
                               "be instantiated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch._prims_common.check` is deprecated:FutureWarning"),
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every ``compiled`` or ``*_compiled`` row of every suite, however it is parametrised,
    # gets COMPILE_MARKS
    # (the first torch.compile of a process pays those imports, whichever row it is).
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(
            isinstance(v, str) and v.endswith("compiled") for v in callspec.params.values()
        ):
            for mark in COMPILE_MARKS:
                item.add_marker(mark)


def bench_cases(cpu_shapes, gpu_shapes, cpu_impls, gpu_impls) -> list:
    """pytest params (shape, device, impl) for every CPU and GPU size and row: GPU rows are
    marked ``cuda`` (``compiled`` rows get :data:`COMPILE_MARKS` at collection)."""
    rows = [("cpu", s, impl) for s in cpu_shapes for impl in cpu_impls]
    rows += [("cuda", s, impl) for s in gpu_shapes for impl in gpu_impls]
    params = []
    for device, shape, impl in rows:
        marks = [pytest.mark.cuda] if device == "cuda" else []
        params.append(
            pytest.param(shape, device, impl, id=f"{device}-{shape_id(shape)}-{impl}", marks=marks)
        )
    return params


def skip_unless_backend(backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skips the benchmark when ``backend`` cannot serve a call on ``device`` and ``dtype``."""
    from mrus_kernels.backends import call_reason

    reason = call_reason(backend, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot serve this call: {reason}")


def row_info(op: str, name: str, shape: tuple[int, ...], dtype: torch.dtype, pass_: str,
             **extra: object) -> dict[str, object]:
    """The ``extra_info`` that names a row: operator, implementation, backend (``mrus_<backend>``
    or ``mrus_<backend>_<variant>`` rows; None for baselines), size, dtype, pass, ``extra``."""
    return {
        "op": op,
        "impl": name,
        "backend": name.removeprefix("mrus_").split("_")[0] if name.startswith("mrus_") else None,
        "size": shape_id(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "pass": pass_,
        **extra,
    }


def run_benchmark(
    benchmark: Any,
    fn: Callable[[], object],
    *,
    setup: Callable[[], None] | None = None,
    rounds: int,
    warmup_rounds: int = 2,
    device: torch.device | str,
    ideal_bytes: int | None = None,
    baseline: bool = False,
    second_baseline: bool = False,
    extra_info: dict[str, Any],
) -> object:
    """Times ``fn()`` with ``benchmark.pedantic`` and records what the suite reports.

    Args:
        benchmark: the pytest-benchmark fixture; set ``benchmark.group`` before calling.
        fn: the work to time, no arguments. The device is synchronised inside the timed
            call (after ``fn``) and before it (after ``setup``), so a time is the whole
            kernel time, not its launch.
        setup: run before every round, untimed (e.g. clear ``.grad`` so every round
            allocates and writes its gradients like a training step).
        rounds: timed rounds; ``warmup_rounds`` untimed ones run first (JIT, autotuning,
            caches, ``torch.compile``).
        device: where ``fn`` runs.
        ideal_bytes: the least traffic the operation can do (inputs read once, outputs
            written once); gives GB/s and the fraction of the copy bandwidth.
        baseline: this row is what the group's speed-ups are relative to.
        second_baseline: this row is what the summary's ``vs 2nd`` column is relative to
            (e.g. ``torch.compile`` of the baseline).
        extra_info: what the row is (backend or implementation, size, dtype, ...); the
            measurements are added to it: ``device``, ``peak_extra_mib``,
            ``ideal_bytes``, ``gbs``, ``copy_gbs``, ``fraction_of_copy``.

    Returns:
        What the last call of ``fn`` returned.
    """
    device = torch.device(device)

    def prepare() -> None:
        if setup is not None:
            setup()
        synchronize(device)

    def timed() -> object:
        out = fn()
        synchronize(device)
        return out

    result = benchmark.pedantic(
        timed, setup=prepare, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1
    )
    if benchmark.disabled:  # a correctness run: nothing was measured
        return result
    info = benchmark.extra_info  # the dict pytest-benchmark stores; update it in place
    info.update(extra_info)
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    prepare()
    info["peak_extra_mib"] = peak_extra_memory(fn, device)  # steady state, after warmup
    median = benchmark.stats.stats.median
    info["median_ms"] = 1e3 * median
    info["ideal_bytes"] = ideal_bytes
    if ideal_bytes is not None and median > 0:
        copy = copy_bandwidth_gbs(device)
        info["gbs"] = ideal_bytes / median / 1e9
        info["copy_gbs"] = copy
        info["fraction_of_copy"] = info["gbs"] / copy
    _ROWS.append({"group": benchmark.group, "name": benchmark.name, "baseline": baseline,
                  "second_baseline": second_baseline, **info})
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("mrus benchmarks: median, memory and bandwidth")
    write(
        "speed-up: baseline median / row median; vs 2nd: the same over the group's second "
        "baseline (e.g. torch.compile); GB/s: ideal bytes / median; % copy: of the device's "
        "measured copy bandwidth; peak MiB: CUDA allocator peak, CPU peak resident set growth"
    )
    for device in sorted({row["device"] for row in _ROWS}):
        copy = next((r.get("copy_gbs") for r in _ROWS if r["device"] == device), None)
        if copy is not None:
            write(f"copy bandwidth of {device}: {copy:.1f} GB/s")
    header = (
        f"{'name':<58} {'median ms':>10} {'speed-up':>9} {'vs 2nd':>7} {'peak MiB':>9} "
        f"{'GB/s':>8} {'% copy':>7}"
    )
    for group in sorted({row["group"] or "" for row in _ROWS}):
        rows = [r for r in _ROWS if (r["group"] or "") == group]
        base = next((r["median_ms"] for r in rows if r["baseline"]), None)
        base2 = next((r["median_ms"] for r in rows if r.get("second_baseline")), None)
        write("")
        write(f"group {group}")
        write(header)
        for r in sorted(rows, key=lambda r: r["median_ms"]):
            speed = f"{base / r['median_ms']:.2f}x" if base else "-"
            speed2 = f"{base2 / r['median_ms']:.2f}x" if base2 else "-"
            peak = f"{r['peak_extra_mib']:.1f}" if r["peak_extra_mib"] is not None else "-"
            gbs = f"{r['gbs']:.1f}" if r.get("gbs") is not None else "-"
            frac = (
                f"{100 * r['fraction_of_copy']:.1f}"
                if r.get("fraction_of_copy") is not None
                else "-"
            )
            write(
                f"{r['name']:<58} {r['median_ms']:>10.3f} {speed:>9} {speed2:>7} {peak:>9} "
                f"{gbs:>8} {frac:>7}"
            )
