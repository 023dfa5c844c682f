"""Shared test helpers: tolerances, a verbose NaN-safe comparison, backends, markers, RNG.

Triton runs on CPU tensors here under ``TRITON_INTERPRET=1``, which must be set before
anything imports triton (``triton.jit`` picks the interpreter when a kernel is defined).
Where a CUDA device is present and the variable is not set, it is left off, so that
``pytest -m cuda`` runs the compiled Triton kernels on the GPU; the CPU-tensor Triton tests
then skip with the reason.

Test modules import the helpers with ``from conftest import ...`` (pytest puts tests/ on
``sys.path`` when it loads this file; tests/ is not a package).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from mrus_kernels import backends as _backends

# --------------------------------------------------------------------------- tolerances

# dtype -> (atol, rtol). atol is relative to the magnitude of the expected tensor
# (max(1, max |expected|)); rtol to each expected element.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Short parametrize ids: ``ids=DTYPE_IDS.get``.
DTYPE_IDS = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
}


def _fmt_index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    idx = []
    for n in reversed(shape):
        idx.append(flat % n)
        flat //= n
    return tuple(reversed(idx))


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "",
    max_report: int = 5,
) -> None:
    """Asserts |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|.

    NaN-safe: where ``expected`` is NaN, ``actual`` must be NaN too; where it is finite, a NaN
    (or inf) in ``actual`` fails; an infinite ``expected`` needs the same infinity. On failure
    the message says how many elements differ, where (index), the values and by how much.

    Args:
        actual, expected: tensors of the same shape (any float dtype, any device).
        dtype: the dtype whose ``TOLERANCES`` apply (default: ``expected.dtype``).
        atol, rtol: override the table.
        name: what is compared, for the message.
    """
    assert isinstance(actual, torch.Tensor), f"{name}: actual is {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    table_atol, table_rtol = TOLERANCES[dtype or expected.dtype]
    atol = table_atol if atol is None else atol
    rtol = table_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    finite = torch.isfinite(e)
    scale = max(1.0, e[finite].abs().max().item()) if bool(finite.any()) else 1.0
    err = (a - e).abs()
    tol = atol * scale + rtol * e.abs()
    ok = err <= tol  # NaN in actual (or inf) gives NaN err: not ok
    ok = torch.where(e.isnan(), a.isnan(), ok)
    ok = torch.where(e.isinf(), a == e, ok)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero().reshape(-1)
    excess = torch.where(err.isnan() | ~finite, torch.full_like(err, float("inf")), err - tol)
    worst = bad[excess[bad].argmax()].item()
    shape = tuple(expected.shape)
    max_err = err[finite].nan_to_num(float("inf")).max().item() if bool(finite.any()) else 0.0
    header = (
        f"{name or 'tensors'} differ at {bad.numel()} of {e.numel()} elements (dtype "
        f"{dtype or expected.dtype}, atol {atol:g} x scale {scale:g}, rtol {rtol:g}); "
        f"max |err| where expected is finite: {max_err:g}"
    )
    lines = [header]
    for flat in [worst] + [i for i in bad[:max_report].tolist() if i != worst]:
        lines.append(
            f"  at {_fmt_index(flat, shape)}: actual {a[flat].item()!r}, expected "
            f"{e[flat].item()!r}, |err| {err[flat].item():g} > tol {tol[flat].item():g}"
        )
    raise AssertionError("\n".join(lines))


# --------------------------------------------------------------------------- backends


def backend_reason(name: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> str | None:
    """Why backend `name` cannot run on tensors of this device and dtype here (None: it can)."""
    return _backends.call_reason(name, torch.device(device), dtype)


def backends_here() -> list[str]:
    """Backends usable on CPU tensors in this process: torch, cpu (if built), triton (if
    importable, interpreted)."""
    return [name for name in ("torch", "cpu", "triton") if backend_reason(name) is None]


def backend_params(names: Sequence[str] = ("torch", "cpu", "triton"),
                   device: str = "cpu") -> list:
    """``pytest.param`` per backend, skipped (with the reason) where it cannot run."""
    params = []
    for name in names:
        if device != "cpu" and not torch.cuda.is_available():
            reason: str | None = "no CUDA device"
        else:
            reason = backend_reason(name, device)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def require_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    reason = backend_reason(name, device, dtype)
    if reason is not None:
        pytest.skip(f"{name} on {device} {dtype}: {reason}")


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request) -> str:
    """A GPU backend (cuda, triton) usable on CUDA tensors here; skips otherwise."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend(request.param, "cuda", torch.float32)
    return request.param


# --------------------------------------------------------------------------- markers


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A runtest hook in this conftest applies only to items under tests/.
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


# --------------------------------------------------------------------------- RNG


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: reproducible, different per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu", lo: float = 0.5, hi: float = 1.5) -> torch.Tensor:
    """Uniform in [lo, hi) (never zero by default): images."""
    x = torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return x.to(device=device, dtype=dtype)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu", scale: float = 1.0) -> torch.Tensor:
    """Normal(0, scale): displacements, upstream gradients."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


# --------------------------------------------------------------------------- poisoning

_REAL_EMPTY = torch.empty
_REAL_EMPTY_LIKE = torch.empty_like
_REAL_EMPTY_STRIDED = torch.empty_strided
_REAL_NEW_EMPTY = torch.Tensor.new_empty


def _nan_filled(t: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if "out" not in kwargs and (t.is_floating_point() or t.is_complex()) and t.numel():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs):
    return _nan_filled(_REAL_EMPTY(*args, **kwargs), kwargs)


def _poisoned_empty_like(*args, **kwargs):
    return _nan_filled(_REAL_EMPTY_LIKE(*args, **kwargs), kwargs)


def _poisoned_empty_strided(*args, **kwargs):
    return _nan_filled(_REAL_EMPTY_STRIDED(*args, **kwargs), kwargs)


def _poisoned_new_empty(self, *args, **kwargs):
    return _nan_filled(_REAL_NEW_EMPTY(self, *args, **kwargs), kwargs)


# Every allocator of uninitialised memory that the launchers call from Python.
POISONED_ALLOCATORS = (
    (torch, "empty", _poisoned_empty),
    (torch, "empty_like", _poisoned_empty_like),
    (torch, "empty_strided", _poisoned_empty_strided),
    (torch.Tensor, "new_empty", _poisoned_new_empty),
)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Every float ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and
    ``Tensor.new_empty`` called from Python inside the block comes NaN-filled, so an output
    or scratch element a kernel forgot to write shows up as NaN. (Allocations inside C++,
    e.g. ``.to()``, are not covered.)"""
    with contextlib.ExitStack() as stack:
        for owner, name, poisoned in POISONED_ALLOCATORS:
            stack.enter_context(mock.patch.object(owner, name, new=poisoned))
        yield


@pytest.fixture
def poison() -> Iterator[None]:
    """:func:`poisoned_empty` for the whole test."""
    with poisoned_empty():
        yield


# --------------------------------------------------------------------------- determinism


@pytest.fixture
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the test, restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# --------------------------------------------------------------------------- CPU loops


@pytest.fixture(params=["vector", "portable"])
def cpu_loops(request) -> Iterator[str]:
    """Runs the test twice: with the CPU kernels' vector paths (AVX2, where this CPU has it)
    and with the portable loops that serve CPUs without them (``_C.set_cpu_simd``)."""
    from mrus_kernels import _ext

    if _ext.C is None:
        pytest.skip(f"mrus_kernels._C is missing: {_ext.C_IMPORT_ERROR}")
    _ext.C.set_cpu_simd(request.param == "vector")
    try:
        yield request.param
    finally:
        _ext.C.set_cpu_simd(True)


# ---------------------------------------------------------------------------- shared test helpers


def bad_input_test(table: dict) -> Callable[[str], None]:
    """A test parametrized over `table` {case: (call, exception type, message regex)}: every
    call must raise that exception with a matching message. Bind it as `test_bad_input`."""

    @pytest.mark.parametrize("case", list(table))
    def test_bad_input(case: str) -> None:
        call, exc, message = table[case]
        with pytest.raises(exc, match=message):
            call()

    return test_bad_input


def raises_before_dispatch(monkeypatch, call: Callable[[], object], match: str,
                           exc: type[Exception] = ValueError) -> None:
    """`call` reports its bad input even with MRUS_BACKEND naming a backend that is absent
    here: validation runs before backend dispatch."""
    monkeypatch.setenv("MRUS_BACKEND", "cuda")
    with pytest.raises(exc, match=match):
        call()


def skip_without_float64(backend: str, dtype: torch.dtype) -> None:
    """Skips a float64 case on a backend without float64 (test_gpu_backends_reject_float64
    of each operator checks the rejection itself)."""
    if dtype == torch.float64 and backend_reason(backend, "cpu", dtype) is not None:
        pytest.skip(f"{backend} has no float64 (test_gpu_backends_reject_float64 checks it)")


def autograd_grads(out: torch.Tensor, inputs, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d(out · grad_out)/d inputs."""
    return torch.autograd.grad(out, inputs, grad_out)


# ---------------------------------------------------------------------------- triton launches


def spy_launches(monkeypatch, module, *names: str) -> list[tuple[str, tuple, dict]]:
    """Replaces the Triton kernels `names` of `module` with wrappers that record each launch
    as (name, grid, keyword arguments) in the returned list, then launch the kernel."""
    calls: list[tuple[str, tuple, dict]] = []

    class _Spy:
        def __init__(self, name: str, kernel) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append((self.name, tuple(grid), dict(kwargs)))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name in names:
        monkeypatch.setattr(module, name, _Spy(name, getattr(module, name)))
    return calls


def spy_warp_idx64(monkeypatch, triton_warp) -> list[bool]:
    """Records whether each Triton warp launch takes its 64-bit (IDX64) variant."""
    seen: list[bool] = []
    real = triton_warp._launch

    def spy(*args, **kwargs):
        lp = real(*args, **kwargs)
        seen.append(lp.idx64)
        return lp

    monkeypatch.setattr(triton_warp, "_launch", spy)
    return seen


def compile_two_sizes(fn, make, shapes, names, *, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """``fn`` under ``torch.compile(fullgraph=True, dynamic=True)`` against eager mode on
    ``make(shape)`` for each shape in turn: the later shapes must reuse the first graph (no
    recompile; training on crops of varying size), and the outputs and the gradients of the
    floating-point inputs that require grad (zeros for an unused one) must match eager's.
    Inductor's on-disk caches are off, so an entry left by older code cannot hide a guard.

    Args:
        fn: returns a tuple of tensors.
        make: shape -> the inputs of ``fn`` (those that require grad are differentiated).
        shapes: the shapes, in order.
        names: one name per output and per differentiated input, for messages.
    """
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = torch.compile(fn, fullgraph=True, dynamic=True)
            for k, shape in enumerate(shapes):
                inputs = make(shape)
                results = []
                for f in (fn, compiled):
                    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in inputs]
                    with torch._dynamo.config.patch(error_on_recompile=k > 0 and f is compiled):
                        outs = f(*args)
                    diff = [a for a in args if a.requires_grad]
                    total = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64)
                                 .reshape(o.shape)).sum() for o in outs)
                    grads = torch.autograd.grad(total, diff, allow_unused=True) if diff else ()
                    grads = [torch.zeros_like(a) if g is None else g
                             for a, g in zip(diff, grads, strict=True)]
                    results.append((*[o.detach() for o in outs], *grads))
                for name, eager, comp in zip(names, *results, strict=True):
                    assert_close_verbose(comp, eager, atol=atol, rtol=rtol, name=f"{name} {shape}")
    finally:
        torch._dynamo.reset()


#: Marks of the torch.compile tests: inductor's own import of torch.jit warns, and dynamo
#: notes any functools.lru_cache it traces through (pytest turns warnings into errors).
COMPILE_WARNINGS = (
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
)
