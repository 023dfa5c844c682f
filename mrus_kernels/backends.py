"""Backend discovery and dispatch.

Backends: ``torch`` (plain PyTorch reference, anywhere), ``cpu`` (C++/OpenMP kernels of
``mrus_kernels._C``, CPU tensors), ``triton`` (CUDA tensors; CPU tensors too under
``TRITON_INTERPRET=1``, for tests), ``cuda`` (CUDA C++ kernels of ``mrus_kernels._C``, CUDA
tensors) and ``auto``. Choose with the ``backend=`` keyword of each operator or the
``MRUS_BACKEND`` environment variable. A backend named explicitly that cannot serve a call
raises :class:`BackendUnavailableError` with the reason; there is no silent fallback.
"""

from __future__ import annotations

import os

import torch

from . import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
CHOICES = (*BACKENDS, "auto")

# What ``auto`` tries, in order, for CUDA tensors, per operator. Set from the measured GPU
# benchmarks (benchmarks/RESULTS.md); an operator missing here uses the default order.
AUTO_CUDA_ORDER: dict[str, tuple[str, ...]] = {}
_DEFAULT_CUDA_ORDER = ("cuda", "triton", "torch")
_CPU_ORDER = ("cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORT_ERROR: dict[str, str | None] = {}  # computed once, on first use


# A constant to torch.compile: dynamo calls it rather than tracing it (an lru_cache here
# made dynamo warn, an error under pytest, in every compiled call that asks for triton).
@torch.compiler.assume_constant_result
def _triton_import_error() -> str | None:
    if "reason" not in _TRITON_IMPORT_ERROR:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            _TRITON_IMPORT_ERROR["reason"] = (
                f"triton is not installed ({exc}); `pip install triton`"
            )
        else:
            _TRITON_IMPORT_ERROR["reason"] = None
    return _TRITON_IMPORT_ERROR["reason"]


def install_reason(name: str) -> str | None:
    """Why backend `name` cannot run at all in this install and process (None: it can)."""
    if name == "torch":
        return None
    if name == "cpu":
        return _ext.C_IMPORT_ERROR
    if name == "triton":
        reason = _triton_import_error()
        if reason is None and not torch.cuda.is_available() and not triton_interpret():
            reason = "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
        return reason
    if name == "cuda":
        if _ext.C is None:
            return _ext.C_IMPORT_ERROR
        if not _ext.cuda_built():
            return "mrus_kernels._C was built without CUDA kernels (MRUS_CUDA=OFF or no nvcc)"
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {CHOICES}")


def backend_status() -> dict[str, str | None]:
    """Each backend mapped to None (usable) or the reason it is not."""
    return {name: install_reason(name) for name in BACKENDS}


def available_backends() -> list[str]:
    """Backends usable in this install and process."""
    return [name for name, reason in backend_status().items() if reason is None]


def call_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot serve a call on tensors of this device and dtype."""
    reason = install_reason(name)
    if reason is not None:
        return reason
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a tensor on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a tensor on {device}"
    if name == "triton" and device.type != "cuda":
        if not (device.type == "cpu" and triton_interpret()):
            return (
                f"the triton backend runs on CUDA tensors (CPU tensors only under "
                f"TRITON_INTERPRET=1), got a tensor on {device}"
            )
    if name in ("triton", "cuda") and dtype == torch.float64:
        return "float64 runs on the torch and cpu backends only"
    return None


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that serves this call: `backend`, else MRUS_BACKEND, else auto."""
    name = backend if backend is not None else (os.environ.get("MRUS_BACKEND") or "auto")
    if not isinstance(name, str) or name not in CHOICES:
        source = "backend" if backend is not None else "MRUS_BACKEND"
        raise ValueError(f"{op}: {source} must be one of {', '.join(CHOICES)}, got {name!r}")
    if name != "auto":
        reason = call_reason(name, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} cannot serve this call: {reason}"
            )
        return name
    order = AUTO_CUDA_ORDER.get(op, _DEFAULT_CUDA_ORDER) if device.type == "cuda" else _CPU_ORDER
    for candidate in order:
        if call_reason(candidate, device, dtype) is None:
            return candidate
    return "torch"
