"""Sobel on feature maps and the fused Sobel-L1 boundary loss.

First version: the public API on the reference implementation; the fused kernels replace
the body of these functions behind the same signatures.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference


def sobel(x, *, output="magnitude", padding="replicate", eps=1e-6, backend=None) -> torch.Tensor:
    """Sobel components [B, C, ndim, *S] or magnitude [B, C, *S] of x [B, C, *S]."""
    return reference.sobel(x, output, padding, eps)


def sobel_l1(f1, f0, *, padding="replicate", eps=1e-6, reduction="mean", backend=None):
    """Mean |sobel(f1) - sobel(f0)| of the magnitudes."""
    return reference.sobel_l1(f1, f0, padding, eps, reduction)


class SobelL1Loss(nn.Module):
    """The ACMT boundary loss: sobel_l1(f1, f0)."""

    def __init__(self, padding="replicate", eps=1e-6):
        super().__init__()
        self.padding, self.eps = padding, eps

    def forward(self, f1, f0):
        return sobel_l1(f1, f0, padding=self.padding, eps=self.eps)
