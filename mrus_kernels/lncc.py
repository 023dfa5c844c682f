"""Local normalised cross-correlation and its loss.

First version: the public API on the reference implementation; the fused kernels replace
the body of these functions behind the same signatures.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference


def lncc(fixed, moving, *, window=9, eps=1e-5, mask=None, backend=None) -> torch.Tensor:
    """Local NCC (squared-correlation form) per batch item, [B]."""
    return reference.lncc(fixed, moving, window, eps, mask)


class LNCCLoss(nn.Module):
    """-LNCC averaged over the batch."""

    def __init__(self, window=9, eps=1e-5):
        super().__init__()
        self.window, self.eps = window, eps

    def forward(self, fixed, moving, mask=None):
        return -lncc(fixed, moving, window=self.window, eps=self.eps, mask=mask).mean()
