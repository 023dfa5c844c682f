"""Parzen-window mutual information, NMI and their losses.

First version: the public API on the reference implementation; the fused kernels replace
the body of these functions behind the same signatures.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference


def joint_histogram(fixed, moving, *, bins=32, kernel="gaussian", sigma=0.5, value_range=None,
                    mask=None, backend=None) -> torch.Tensor:
    """Joint Parzen histogram [B, K, K] of fixed and moving ([B, 1, *S] each)."""
    return reference.joint_histogram(fixed, moving, bins, kernel, sigma, value_range, mask)


def mutual_information(fixed, moving, *, bins=32, kernel="gaussian", sigma=0.5,
                       value_range=None, mask=None, eps=1e-10, backend=None) -> torch.Tensor:
    """Parzen-window mutual information per batch item, [B]."""
    return reference.mutual_information(fixed, moving, bins, kernel, sigma, value_range, mask, eps)


def nmi(fixed, moving, *, bins=32, kernel="gaussian", sigma=0.5, value_range=None, mask=None,
        eps=1e-10, backend=None) -> torch.Tensor:
    """Normalised mutual information (H_f + H_g) / H_fg per batch item, [B]."""
    return reference.nmi(fixed, moving, bins, kernel, sigma, value_range, mask, eps)


class MutualInformationLoss(nn.Module):
    """-MI averaged over the batch."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, fixed, moving, mask=None):
        return -mutual_information(fixed, moving, mask=mask, **self.kwargs).mean()


class NMILoss(nn.Module):
    """-NMI averaged over the batch, or with `barrier=b` the barrier loss -log(b - NMI)."""

    def __init__(self, barrier=None, **kwargs):
        super().__init__()
        self.barrier = barrier
        self.kwargs = kwargs

    def forward(self, fixed, moving, mask=None):
        value = nmi(fixed, moving, mask=mask, **self.kwargs)
        if self.barrier is None:
            return -value.mean()
        return -torch.log(self.barrier - value).mean()
