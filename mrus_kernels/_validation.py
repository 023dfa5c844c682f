"""Input checks shared by every operator. Messages name the operator, the argument, what
was expected and what was given."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}"
        )


def check_spatial(op: str, name: str, x: torch.Tensor, layout: str = "C") -> int:
    """Checks `x` is [B, C, H, W] or [B, C, D, H, W] and non-empty; returns ndim (2 or 3)."""
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{op}: {name} must be [B, {layout}, H, W] (2D) or [B, {layout}, D, H, W] (3D), "
            f"got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")
    return x.dim() - 2


def check_same(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Same dtype and device for all tensors."""
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {names[0]} and {name} must have the same dtype, got {first.dtype} and "
                f"{t.dtype}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {names[0]} and {name} must be on the same device, got {first.device} "
                f"and {t.device}"
            )


def check_batch(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> int:
    """Batch sizes equal or one of them 1 (broadcast); returns the common batch size."""
    ba, bb = a.shape[0], b.shape[0]
    if ba != bb and ba != 1 and bb != 1:
        raise ValueError(
            f"{op}: {a_name} and {b_name} batch sizes must match or one must be 1, got {ba} "
            f"and {bb}"
        )
    return max(ba, bb)


def check_choice(op: str, name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{op}: {name} must be {options}, got {value!r}")
    return value


def check_optional_bool(op: str, name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be None, True or False, got {value!r}")


def check_field(op: str, name: str, u: object) -> int:
    """`u` is a float displacement [B, ndim, *S] with ndim channels; returns ndim."""
    check_tensor(op, name, u)
    assert isinstance(u, torch.Tensor)
    check_float(op, name, u)
    ndim = check_spatial(op, name, u, layout="ndim")
    if u.shape[1] != ndim:
        raise ValueError(
            f"{op}: {name} must have {ndim} channels (one per spatial axis) for a {ndim}D field, "
            f"got {u.shape[1]} (shape {tuple(u.shape)})"
        )
    return ndim


def capturing() -> bool:
    """True while torch.compile traces or a CUDA graph captures: no host sync is allowed,
    so checks that read tensor values must be skipped or made asynchronous."""
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    )


def check_mask_nonnegative(op: str, mask: torch.Tensor | None) -> None:
    """The form of the mask check for while :func:`capturing` (eager callers use
    :func:`check_mask_weights`): under torch.compile, ``torch._assert_async`` in the graph
    rejects negative weights (on CPU a RuntimeError carrying the message when the compiled
    function runs; on CUDA a device-side assert). Under a CUDA graph capture outside
    torch.compile the weights are not checked (an assert kernel failing at replay would
    abort the CUDA context). NaN weights are left to propagate.
    """
    if mask is None or mask.dtype == torch.bool or not torch.compiler.is_compiling():
        return
    torch._assert_async(~(mask.detach() < 0).any(), f"{op}: mask weights must be >= 0")


def check_mask_weights(op: str, mask: torch.Tensor, *, nonempty: bool = False) -> None:
    """Eager-mode checks of a mask's values with one host sync for all of them (callers
    skip it while :func:`capturing`; :func:`check_mask_nonnegative` is the compile-time
    form): no negative or infinite weight (a NaN weight is data: NaN in, NaN out) and, with
    `nonempty`, a weight > 0 in every batch item. ValueError naming `mask` and the items."""
    m = mask.detach().flatten(1)
    checks = []  # (per-item flags, message), all fetched by one device-to-host copy
    if m.is_signed():  # float or signed integer: bool and uint8 cannot be negative
        bad = (m < 0) | (m == float("inf")) if m.is_floating_point() else m < 0
        checks.append((bad.any(1), "mask weights must be finite and >= 0, got a negative or "
                                   "infinite weight in batch item(s)"))
    if nonempty:
        checks.append((~(m > 0).any(1), "mask selects no voxel (no value > 0) in batch item(s)"))
    if not checks:
        return
    rows = torch.stack([flags for flags, _ in checks]).tolist()
    for row, (_, message) in zip(rows, checks, strict=True):
        items = [i for i, flag in enumerate(row) if flag]
        if items:
            raise ValueError(f"{op}: {message} {items}")
