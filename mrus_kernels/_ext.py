"""Loads the compiled module `mrus_kernels._C` and holds the codes shared with csrc/."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

_F = TypeVar("_F", bound=Callable)

try:
    from . import _C as C  # type: ignore[attr-defined]

    C_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    C = None
    C_IMPORT_ERROR = (
        f"mrus_kernels._C could not be imported ({exc}); reinstall with `pip install .`"
    )


class Interp(enum.IntEnum):
    """Interpolation codes, as `mrus::Interp` in csrc/include/common.h."""

    LINEAR = 0
    NEAREST = 1


class Padding(enum.IntEnum):
    """Padding codes, as `mrus::Padding` in csrc/include/common.h."""

    ZEROS = 0
    BORDER = 1


class WarpFlags(enum.IntFlag):
    """Variants of the warp kernels, as `mrus::warp::WarpFlags` in csrc/include/warp.h."""

    NONE = 0
    ADD_DDF = 1  # out = ddf + sampled image (compose)
    DDF_GRAD_SCATTER = 2  # backward: image is ddf, both gradients into one buffer


DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def cuda_built() -> bool:
    return C is not None and bool(C.build_info()["cuda"])


def build_info() -> dict:
    return dict(C.build_info()) if C is not None else {}


# ---------------------------------------------------------------------------- launch helpers


def cuda_stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer the launchers take."""
    return torch.cuda.current_stream(t.device).cuda_stream


def tensor_device(args) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among `args`, or None."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def on_tensor_device(fn: _F) -> _F:
    """Runs a launcher under the CUDA device of its first CUDA tensor argument.

    Triton launches and the CUDA C++ launchers run on the *current* device; a tensor on
    cuda:1 while cuda:0 is current would otherwise make a kernel dereference another GPU's
    pointers. Autograd sets the device for backward passes, but a forward called directly
    does not, so every launcher (forward and backward) is wrapped.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = tensor_device((*args, *kwargs.values()))
        if device is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    wrapper.__mrus_device_guard__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def ptr(t: torch.Tensor | None) -> int:
    """t's data pointer, or 0 (the kernels' "absent") for None."""
    return t.data_ptr() if t is not None else 0


def cpu_threads(t: torch.Tensor, per_thread: int = 32768) -> int:
    """OpenMP threads for a call on t: one per `per_thread` elements at most (waking a thread
    team costs more than a small input's whole work, milliseconds on a busy machine)."""
    return max(1, min(torch.get_num_threads(), t.numel() // per_thread))


def grads_or_empty(*pairs: tuple[torch.Tensor | None, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(grad, input) pairs to the gradients a backward custom op returns: custom ops cannot
    return None, so an empty tensor like the input stands for a gradient not computed."""
    return tuple(g if g is not None else x.new_empty(0) for g, x in pairs)


def fake_grads(*pairs: tuple[torch.Tensor, bool]) -> tuple[torch.Tensor, ...]:
    """Fake outputs of such a backward op: (input, needed) pairs to input-shaped or empty."""
    return tuple(x.new_empty(x.shape if need else (0,)) for x, need in pairs)
