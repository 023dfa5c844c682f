"""Loads the compiled module `mrus_kernels._C` and holds the codes shared with csrc/."""

from __future__ import annotations

import enum

import torch

try:
    from . import _C as C  # type: ignore[attr-defined]

    C_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    C = None
    C_IMPORT_ERROR = f"mrus_kernels._C could not be imported ({exc}); reinstall with `pip install .`"


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
