"""Smoothness regularisers of displacement fields: grad_l2 and harmonic_energy.

First version: the public API on the reference implementation; the fused kernels replace
the body of these functions behind the same signatures.
"""

from __future__ import annotations

import torch

from . import reference


def grad_l2(u, *, spacing=None, backend=None) -> torch.Tensor:
    """Mean squared forward difference of u [B, C, *S], averaged over the axes (scalar)."""
    return reference.grad_l2(u, spacing)


def harmonic_energy(u, *, reduction="sum", backend=None) -> torch.Tensor:
    """Σ‖∇²u‖² on interior voxels; reduction "sum", "mean" or "none" ([B])."""
    return reference.harmonic_energy(u, reduction)
