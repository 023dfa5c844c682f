"""``grid_sample``: ``torch.nn.functional.grid_sample``'s signature and values on the fused
:func:`mrus_kernels.warp`, for code that works with normalised sampling grids.

The normalised grid is turned into a voxel displacement of the grid's own spatial size
(one elementwise pass, by grid_sample's own unnormalisation formula), which the fused warp
then samples in one pass over every channel; gradients reach ``input`` through the warp's
backward kernel and ``grid`` through the warp's displacement gradient and that linear map.

Served: 4D and 5D inputs, ``mode`` "bilinear" (bi/trilinear) and "nearest" (round half to
even, as grid_sample), ``padding_mode`` "zeros" and "border", both ``align_corners``.
Not served (ValueError naming the argument): "bicubic" and "reflection", which the fused
warp has no kernel for.

Where they differ from grid_sample: a NaN grid point gives NaN in every channel (the warp's
rule, "NaN in, NaN out"), where grid_sample returns 0, NaN or a border value depending on
mode and padding; float16 / bfloat16 grids are unnormalised in float32 and the displacement
(not the absolute coordinate) is rounded to the grid's dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from ._validation import check_choice, check_float, check_same, check_spatial, check_tensor
from .warp import warp

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border")
# What grid_sample offers and the fused warp does not: the argument's message says so.
_UNSERVED = {
    "mode": ("bicubic",),
    "padding_mode": ("reflection",),
}
_HALF = (torch.float16, torch.bfloat16)


def _check_served(name: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in _UNSERVED[name]:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(
            f"grid_sample: {name}={value!r} is not served by the fused warp ({name} must be "
            f"{options}); use torch.nn.functional.grid_sample for {value!r}"
        )
    return check_choice("grid_sample", name, value, choices)


def _check_align_corners(align_corners: object) -> bool:
    # None is grid_sample's default (it means False there, with a warning).
    if align_corners is None:
        return False
    if not isinstance(align_corners, (bool, np.bool_)):
        raise TypeError(
            f"grid_sample: align_corners must be True, False or None, got {align_corners!r}"
        )
    return bool(align_corners)


def _validate(input: object, grid: object, mode: object, padding_mode: object,
              align_corners: object) -> bool:
    op = "grid_sample"
    check_tensor(op, "input", input)
    check_tensor(op, "grid", grid)
    assert isinstance(input, torch.Tensor) and isinstance(grid, torch.Tensor)
    check_float(op, "input", input)
    check_float(op, "grid", grid)
    ndim = check_spatial(op, "input", input)
    if grid.dim() != input.dim() or grid.shape[-1] != ndim:
        expected = "[N, H_out, W_out, 2]" if ndim == 2 else "[N, D_out, H_out, W_out, 3]"
        raise ValueError(
            f"grid_sample: grid must be {expected} for a {ndim}D input of shape "
            f"{tuple(input.shape)}, got shape {tuple(grid.shape)}"
        )
    if grid.numel() == 0:
        raise ValueError(f"grid_sample: grid must not be empty, got shape {tuple(grid.shape)}")
    if grid.shape[0] != input.shape[0]:
        raise ValueError(
            f"grid_sample: input and grid must have the same batch size, got {input.shape[0]} "
            f"and {grid.shape[0]}"
        )
    check_same(op, ("input", "grid"), (input, grid))
    _check_served("mode", mode, MODES)
    _check_served("padding_mode", padding_mode, PADDING_MODES)
    return _check_align_corners(align_corners)


def _displacement(grid: torch.Tensor, size_in: tuple[int, ...], align_corners: bool
                  ) -> torch.Tensor:
    """The voxel displacement [N, ndim, *S_out] whose sample points x + u(x) are where
    grid_sample samples ``input`` (spatial size ``size_in``) for ``grid`` [N, *S_out, ndim]."""
    ndim = grid.shape[-1]
    dtype = grid.dtype
    g = grid.float() if dtype in _HALF else grid
    out_shape = g.shape[1:-1]
    comps = []
    for i in range(ndim):
        c = g[..., ndim - 1 - i]  # grid's last dim is x (the last axis) first
        n = size_in[i]
        # grid_sample's unnormalisation, in its order of operations (the same rounding);
        # align_corners with n = 1 gives 0 for every finite coordinate, as there.
        p = ((c + 1) / 2) * (n - 1) if align_corners else ((c + 1) * n - 1) / 2
        view = [1] * (ndim + 1)
        view[i + 1] = out_shape[i]
        x = torch.arange(out_shape[i], dtype=g.dtype, device=g.device).view(view)
        comps.append(p - x)
    return torch.stack(comps, dim=1).to(dtype)


def grid_sample(
    input: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Samples ``input`` at the normalised points of ``grid``, as
    ``torch.nn.functional.grid_sample``, by the fused :func:`mrus_kernels.warp`.

    Differentiable in ``input`` and ``grid`` (bilinear; nearest gives ``grid`` a zero
    gradient, as grid_sample).

    Args:
        input: Tensor [N, C, H_in, W_in] or [N, C, D_in, H_in, W_in], any C.
        grid: Tensor [N, H_out, W_out, 2] or [N, D_out, H_out, W_out, 3] of the input's
            dtype and device, normalised coordinates (-1 and 1: the input's extreme voxel
            centres with ``align_corners=True``, its extreme edges with False), last
            dimension x (the last axis) first.
        mode: "bilinear" (trilinear for 5D) or "nearest"; "bicubic" raises ValueError.
        padding_mode: "zeros" or "border"; "reflection" raises ValueError.
        align_corners: as grid_sample; None (grid_sample's default) means False.
        backend: "auto", "torch", "cpu", "triton" or "cuda" (the warp's); default
            ``MRUS_BACKEND`` or "auto".

    Returns:
        Tensor [N, C, H_out, W_out] or [N, C, D_out, H_out, W_out] of the input's dtype;
        NaN in every channel where the grid is NaN.

    Example:
        >>> image = torch.rand(1, 2, 16, 16, 16)
        >>> grid = torch.rand(1, 8, 8, 8, 3) * 2 - 1
        >>> out = grid_sample(image, grid, align_corners=True)  # [1, 2, 8, 8, 8]
    """
    align = _validate(input, grid, mode, padding_mode, align_corners)
    ddf = _displacement(grid, tuple(input.shape[2:]), align)
    return warp(input, ddf, mode="linear" if mode == "bilinear" else "nearest",
                padding=padding_mode, backend=backend)
