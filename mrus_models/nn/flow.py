"""The flow head: the last convolution of a registration network, initialised near zero.

VoxelMorph (Balakrishnan et al., IEEE TMI 2019) initialises its flow convolution with
weights from N(0, 1e-5) and zero bias, so that an untrained network predicts a field close
to the identity map and the first steps do not fold the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import check_channels, check_ndim, conv


class FlowHead(nn.Module):
    """3×3(×3) convolution to ``ndim`` channels: a velocity or displacement field.

    Args:
        ndim: 2 or 3; the output has ``ndim`` channels (component i along spatial axis i,
            voxel units, as :mod:`mrus_kernels` expects).
        in_channels: input channels (the last decoder width, 16 in VoxelMorph).
        init_std: standard deviation of the initial weights (VoxelMorph: 1e-5); the bias
            starts at 0. 0 gives an exactly zero field (and zero gradients for everything
            before the head at the first step).

    Example:
        >>> head = FlowHead(3, 16)
        >>> head(torch.rand(1, 16, 8, 8, 8)).abs().max() < 1e-3
        tensor(True)
    """

    def __init__(self, ndim: int, in_channels: int, *, init_std: float = 1e-5) -> None:
        super().__init__()
        self.ndim = check_ndim("FlowHead", ndim)
        check_channels("FlowHead", "in_channels", in_channels)
        if not init_std >= 0:
            raise ValueError(f"FlowHead: init_std must be >= 0, got {init_std!r}")
        self.conv = conv(ndim, in_channels, ndim, 3)
        nn.init.normal_(self.conv.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.conv.bias)
        self.in_channels, self.out_channels = in_channels, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, in_channels, *S]. Returns [B, ndim, *S]."""
        return self.conv(x)
