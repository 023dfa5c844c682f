"""Triton helpers shared by the kernels that fold the batch into grid axis 0."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def item_block_offsets(blocks, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's batch item (int64) and the flat indices of its BLOCK voxels inside the
    item, for a grid of B * blocks programs (program k: block k % blocks of item k // blocks,
    so the batch never meets the 65535 limit of grid axes 1 and 2). The indices are int64
    in the IDX64 variant, int32 otherwise."""
    pid = tl.program_id(0)
    item = pid // blocks
    blk = pid - item * blocks
    if IDX64:
        idx = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = blk * BLOCK + tl.arange(0, BLOCK)
    return item.to(tl.int64), idx
