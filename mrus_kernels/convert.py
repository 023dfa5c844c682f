"""Converters between displacement conventions.

mrus displacements (ddf) are ``[B, ndim, *S]`` in voxel units, component i along spatial
axis i of the tensor, voxel centres at integer indices. ``grid_sample`` grids are
``[B, *S, ndim]`` in normalised coordinates with the last dimension in reversed axis order
(x = last axis first).
"""

from __future__ import annotations

import numpy as np
import torch

from ._validation import capturing, check_field, check_float, check_tensor

# Largest accepted spatial size in `size`: sizes enter the arithmetic as int64 scalars.
_MAX_SIZE = 2**63 - 1


def _identity(shape: tuple[int, ...], like: torch.Tensor) -> list[torch.Tensor]:
    axes = [torch.arange(n, device=like.device, dtype=like.dtype) for n in shape]
    return list(torch.meshgrid(*axes, indexing="ij"))


def _check_size(op: str, size: object, shape: tuple[int, ...]) -> tuple[int, ...]:
    if size is None:
        return shape
    def is_int(n: object) -> bool:  # Python or NumPy integers; bool is not a size
        return isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))

    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != len(shape)
        or not all(is_int(n) and 1 <= n <= _MAX_SIZE for n in size)
    ):
        raise ValueError(
            f"{op}: size must be {len(shape)} positive ints, got {size!r} (each at most "
            f"2**63 - 1)"
        )
    return tuple(int(n) for n in size)


def _check_align(op: str, align_corners: object, shape: tuple[int, ...]) -> bool:
    if not isinstance(align_corners, (bool, np.bool_)):
        raise TypeError(f"{op}: align_corners must be True or False, got {align_corners!r}")
    align_corners = bool(align_corners)
    if align_corners and min(shape) < 2:
        raise ValueError(
            f"{op}: align_corners=True needs every spatial size >= 2 (a normalised grid "
            f"cannot address a size-1 axis), got spatial shape {shape}"
        )
    return align_corners


def ddf_to_grid(
    ddf: torch.Tensor, align_corners: bool = True, size: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Voxel displacement to a ``grid_sample`` sampling grid.

    Args:
        ddf: Tensor [B, ndim, *S], voxel units, component i along spatial axis i.
        align_corners: the ``grid_sample`` setting the grid is meant for.
        size: spatial size of the image the grid will sample (default: S, the ddf's own).

    Returns:
        Tensor [B, *S, ndim], normalised to [-1, 1], last dim in reversed axis order.

    Example:
        >>> grid = ddf_to_grid(torch.zeros(1, 3, 4, 5, 6))
        >>> F.grid_sample(image, grid, align_corners=True)  # == image
    """
    ndim = check_field("ddf_to_grid", "ddf", ddf)
    shape = tuple(ddf.shape[2:])
    target = _check_size("ddf_to_grid", size, shape)
    align_corners = _check_align("ddf_to_grid", align_corners, target)
    base = _identity(shape, ddf)
    comps = []
    for i in reversed(range(ndim)):
        p = base[i] + ddf[:, i]
        n = target[i]
        comps.append(2 * p / (n - 1) - 1 if align_corners else (2 * p + 1) / n - 1)
    return torch.stack(comps, dim=-1)


def grid_to_ddf(
    grid: torch.Tensor, align_corners: bool = True, size: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A ``grid_sample`` sampling grid to a voxel displacement (inverse of ``ddf_to_grid``).

    Args:
        grid: Tensor [B, *S, ndim], normalised, last dim in reversed axis order.
        align_corners: the ``grid_sample`` setting the grid was made for.
        size: spatial size of the image the grid samples (default: S, the grid's own).

    Returns:
        Tensor [B, ndim, *S], voxel units.
    """
    check_tensor("grid_to_ddf", "grid", grid)
    check_float("grid_to_ddf", "grid", grid)
    if grid.dim() not in (4, 5) or grid.shape[-1] != grid.dim() - 2:
        raise ValueError(
            f"grid_to_ddf: grid must be [B, H, W, 2] or [B, D, H, W, 3], got shape "
            f"{tuple(grid.shape)}"
        )
    ndim = grid.shape[-1]
    shape = tuple(grid.shape[1:-1])
    target = _check_size("grid_to_ddf", size, shape)
    align_corners = _check_align("grid_to_ddf", align_corners, target)
    base = _identity(shape, grid)
    comps = []
    for i in range(ndim):
        g = grid[..., ndim - 1 - i]
        n = target[i]
        p = (g + 1) * (n - 1) / 2 if align_corners else ((g + 1) * n - 1) / 2
        comps.append(p - base[i])
    return torch.stack(comps, dim=1)


def _linear_part(op: str, affine: object, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """The [ndim, ndim] or [B, ndim, ndim] linear part of a validated affine, float64 on the
    device of `like`.

    Its values (finite, invertible) are checked on the affine's own device, with one host
    sync in eager mode; under torch.compile by ``torch._assert_async`` in the graph, and not
    at all during a CUDA graph capture (no host sync is allowed there).
    """
    if isinstance(affine, np.ndarray):
        if torch.compiler.is_compiling():
            # Dynamo traces NumPy arrays as tensors (no dtype.kind there); as_tensor of a
            # non-numeric array fails at trace time already.
            affine = torch.as_tensor(affine, dtype=torch.float64)
        else:
            # kind: f float, i signed, u unsigned integer (not bool, complex, object, str...).
            if affine.dtype.kind not in "fiu":
                raise TypeError(
                    f"{op}: affine must hold real numbers (a float or integer array), got a "
                    f"numpy array of dtype {affine.dtype}"
                )
            # A float64 copy: any byte order, strides or integer type.
            affine = torch.from_numpy(np.array(affine, dtype=np.float64))
    if not isinstance(affine, torch.Tensor):
        raise TypeError(
            f"{op}: affine must be a numpy array or torch.Tensor, got {type(affine).__name__}"
        )
    if affine.is_complex() or affine.dtype == torch.bool:
        raise TypeError(
            f"{op}: affine must hold real numbers (a float or integer tensor), got dtype "
            f"{affine.dtype}"
        )
    if affine.device.type == "meta":
        raise ValueError(
            f"{op}: affine must hold values (a CPU or CUDA tensor), got a tensor on device "
            f"{affine.device}"
        )
    k = ndim + 1
    if affine.shape[-2:] != (k, k) or affine.dim() not in (2, 3):
        raise ValueError(
            f"{op}: affine must be [{k}, {k}] or [B, {k}, {k}] for {ndim}D, got shape "
            f"{tuple(affine.shape)}"
        )
    batch = like.shape[0]
    if affine.dim() == 3 and affine.shape[0] not in (1, batch):
        allowed = "1" if batch == 1 else f"1 or {batch}"
        raise ValueError(f"{op}: affine batch size must be {allowed}, got {affine.shape[0]}")
    lin = affine[..., :ndim, :ndim].to(torch.float64)
    det = torch.linalg.det(lin.detach())
    finite = torch.isfinite(lin.detach()).all()
    invertible = (det.abs() >= 1e-12).all()
    if torch.compiler.is_compiling():
        torch._assert_async(
            finite & invertible,
            f"{op}: affine must be finite with an invertible linear part (|det| >= 1e-12)",
        )
    elif not capturing():
        flags = torch.stack([finite, invertible]).tolist()  # one host sync for both
        if not flags[0]:
            raise ValueError(f"{op}: affine must be finite, got {affine.tolist()}")
        if not flags[1]:
            raise ValueError(
                f"{op}: affine must have an invertible linear part, got determinant "
                f"{det.tolist()} (|det| must be >= 1e-12)"
            )
    return lin.to(like.device)


def _apply_linear(lin: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    lin = (
        lin.expand(ddf.shape[0], -1, -1) if lin.dim() == 3 else lin.expand(ddf.shape[0], *lin.shape)
    )
    return torch.einsum("bij,bj...->bi...", lin.to(ddf.dtype), ddf)


def ddf_from_mm(ddf_mm: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Displacement in millimetres (world axes of a NIfTI affine) to voxel units.

    Args:
        ddf_mm: Tensor [B, ndim, *S], mm, component j along world axis j.
        affine: [ndim + 1, ndim + 1] or [B, ndim + 1, ndim + 1] voxel-to-world affine
            (NIfTI: voxel axis i is tensor spatial axis i).

    Returns:
        Tensor [B, ndim, *S], voxel units: ``A⁻¹ · ddf_mm`` per voxel (A the linear part).
    """
    ndim = check_field("ddf_from_mm", "ddf_mm", ddf_mm)
    lin = _linear_part("ddf_from_mm", affine, ndim, ddf_mm)
    return _apply_linear(torch.linalg.inv(lin), ddf_mm)


def ddf_to_mm(ddf: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Displacement in voxel units to millimetres (world axes of a NIfTI affine).

    Args:
        ddf: Tensor [B, ndim, *S], voxel units, component i along spatial axis i.
        affine: [ndim + 1, ndim + 1] or [B, ndim + 1, ndim + 1] voxel-to-world affine.

    Returns:
        Tensor [B, ndim, *S], mm: ``A · ddf`` per voxel.
    """
    ndim = check_field("ddf_to_mm", "ddf", ddf)
    return _apply_linear(_linear_part("ddf_to_mm", affine, ndim, ddf), ddf)
