"""Launch limits shared by the Triton launchers: the 64-bit offset switch and grid checks.

Launchers read these through the module (``_common.IDX64_THRESHOLD``, never ``from ._common
import IDX64_THRESHOLD``) so that a test can lower the threshold with ``monkeypatch`` and run
every kernel's 64-bit variant under the interpreter at small sizes.
"""

from __future__ import annotations

# A kernel uses 64-bit offsets (its IDX64 variant) when any offset it can form (the largest
# element index it can touch, plus a block of slack) exceeds this. int32 holds 2**31 - 1.
IDX64_THRESHOLD = 2**31 - 1

# CUDA's limits on grid axes 1 and 2 (axis 0 takes 2**31 - 1 programs).
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


def needs_idx64(*reach: int) -> bool:
    """True when any of `reach` (largest offsets a kernel can form) exceeds the threshold."""
    return max(reach) > IDX64_THRESHOLD


def check_grid(op: str, grid: tuple[int, ...], what: tuple[str, ...] = ()) -> tuple[int, ...]:
    """Returns `grid` or raises ValueError naming the axis that exceeds CUDA's grid limits.

    Args:
        op: the operator, for the message ("warp (triton)").
        grid: program counts per axis (1 to 3 axes).
        what: what each axis counts ("B * C", ...), for the message.
    """
    for axis, n in enumerate(grid):
        limit = MAX_GRID_X if axis == 0 else MAX_GRID_YZ
        if n > limit:
            label = what[axis] if axis < len(what) else f"grid axis {axis}"
            raise ValueError(
                f"{op}: {label} needs {n} programs on grid axis {axis}, at most {limit} fit; "
                f"split the batch"
            )
    return grid
