"""Convolutional building blocks, 2D and 3D from one code path.

``ndim`` (2 or 3) picks ``Conv2d`` / ``Conv3d`` and the matching normalisation. The
defaults are VoxelMorph's (Balakrishnan et al., "VoxelMorph: A Learning Framework for
Deformable Medical Image Registration", IEEE TMI 2019, Sec. III-B): 3×3(×3) kernels,
LeakyReLU with slope 0.2, no normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = (None, "instance", "group", "batch")
ACTIVATIONS = (None, "leaky_relu", "relu", "silu", "gelu")

# VoxelMorph's LeakyReLU slope (Balakrishnan et al. 2019, Sec. III-B).
LEAKY_SLOPE = 0.2


def check_ndim(owner: str, ndim) -> int:
    """Returns ``ndim`` if it is 2 or 3, else raises ValueError naming ``owner``."""
    if isinstance(ndim, bool) or ndim not in (2, 3):
        raise ValueError(f"{owner}: ndim must be 2 or 3, got {ndim!r}")
    return int(ndim)


def check_channels(owner: str, name: str, value) -> int:
    """Returns ``value`` if it is a positive int, else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3, *,
         stride: int = 1, bias: bool = True) -> nn.Module:
    """``Conv{ndim}d`` with "same" padding for odd kernels (``kernel_size // 2``), so a
    stride-``s`` convolution maps a size ``n`` divisible by ``s`` to ``n / s``."""
    cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    return cls(in_channels, out_channels, kernel_size, stride=stride,
               padding=kernel_size // 2, bias=bias)


def norm_layer(ndim: int, kind: str | None, channels: int) -> nn.Module:
    """A normalisation layer over ``channels`` (identity for ``None``).

    "group" uses ``gcd(channels, 8)`` groups, so any width works (8 groups for the
    VoxelMorph widths 16 and 32); "instance" has learned affine parameters.
    """
    if kind is None:
        return nn.Identity()
    if kind == "instance":
        cls = nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if kind == "batch":
        cls = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
        return cls(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def activation_layer(kind: str | None) -> nn.Module:
    """The activation named ``kind`` (identity for ``None``)."""
    if kind is None:
        return nn.Identity()
    if kind == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    if kind == "relu":
        return nn.ReLU()
    if kind == "silu":
        return nn.SiLU()
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


class TimeShift(nn.Module):
    """Per-channel shift from a time / noise-level embedding: ``x + Linear(SiLU(t))``.

    The additive conditioning of DDPM's residual blocks (Ho et al., NeurIPS 2020).

    Args:
        time_channels: width of the embedding ``t_emb`` [B, time_channels].
        channels: channels of the feature map it shifts.
    """

    def __init__(self, time_channels: int, channels: int) -> None:
        super().__init__()
        check_channels("TimeShift", "time_channels", time_channels)
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(time_channels, channels))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """Args: x [B, C, *S]; t_emb [B, time_channels]. Returns x shifted per channel."""
        if t_emb.dim() != 2 or t_emb.shape[0] not in (1, x.shape[0]) \
                or t_emb.shape[1] != self.proj[1].in_features:
            raise ValueError(
                f"t_emb must be [B or 1, {self.proj[1].in_features}] for a batch of "
                f"{x.shape[0]}, got {tuple(t_emb.shape)}"
            )
        shift = self.proj(t_emb)
        return x + shift.reshape(*shift.shape, *([1] * (x.dim() - 2)))


def _time_shift(owner: str, time_channels, channels: int) -> TimeShift | None:
    if time_channels is None:
        return None
    check_channels(owner, "time_channels", time_channels)
    return TimeShift(time_channels, channels)


def _apply_time(owner: str, shift: TimeShift | None, x: torch.Tensor,
                t_emb: torch.Tensor | None) -> torch.Tensor:
    if shift is None:
        if t_emb is not None:
            raise ValueError(f"{owner}: got t_emb but the block was built without time_channels")
        return x
    if t_emb is None:
        raise ValueError(
            f"{owner}: t_emb [B, time_channels] is required (built with time_channels)")
    return shift(x, t_emb)


class ConvBlock(nn.Module):
    """Convolution → normalisation → (time shift) → activation.

    VoxelMorph's ``conv_block`` (Balakrishnan et al. 2019, Sec. III-B): 3×3(×3)
    convolution, LeakyReLU(0.2), no normalisation by default.

    Args:
        ndim: 2 or 3 (picks Conv2d / Conv3d).
        in_channels: input channels.
        out_channels: output channels.
        stride: convolution stride; a size ``n`` divisible by it becomes ``n / stride``.
        kernel_size: odd kernel side.
        norm: None, "instance", "group" or "batch". The convolution has a bias only
            without normalisation (a norm's shift makes it redundant).
        activation: "leaky_relu" (slope 0.2), "relu", "silu", "gelu" or None.
        time_channels: width of an optional time embedding, added as a per-channel shift
            before the activation (:class:`TimeShift`); None for none.

    Example:
        >>> block = ConvBlock(3, 2, 16, stride=2)
        >>> block(torch.rand(1, 2, 32, 32, 32)).shape
        torch.Size([1, 16, 16, 16, 16])
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, *, stride: int = 1,
                 kernel_size: int = 3, norm: str | None = None,
                 activation: str | None = "leaky_relu", time_channels: int | None = None) -> None:
        super().__init__()
        self.ndim = check_ndim("ConvBlock", ndim)
        check_channels("ConvBlock", "in_channels", in_channels)
        check_channels("ConvBlock", "out_channels", out_channels)
        check_channels("ConvBlock", "stride", stride)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) \
                or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"ConvBlock: kernel_size must be an odd positive int, got {kernel_size!r}")
        self.conv = conv(ndim, in_channels, out_channels, kernel_size, stride=stride,
                         bias=norm is None)
        self.norm = norm_layer(ndim, norm, out_channels)
        self.time = _time_shift("ConvBlock", time_channels, out_channels)
        self.act = activation_layer(activation)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [B, in_channels, *S]; t_emb [B, time_channels] if built with time.
        Returns [B, out_channels, *S / stride]."""
        x = self.norm(self.conv(x))
        return self.act(_apply_time("ConvBlock", self.time, x, t_emb))


class ResidualBlock(nn.Module):
    """Two convolutions with a skip connection: ``act(F(x) + skip(x))``.

    ``F = conv → norm → (time shift) → LeakyReLU → conv → norm``; ``skip`` is the identity,
    or a 1×1(×1) convolution with the block's stride where the width or the size changes
    (He et al., "Deep Residual Learning", CVPR 2016, option B).

    Args:
        ndim: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution and of the skip.
        time_channels: width of an optional time embedding, added per channel after the
            first convolution (DDPM's conditioning, Ho et al. 2020); None for none.
        norm: None, "instance", "group" or "batch".

    Example:
        >>> block = ResidualBlock(2, 16, 32, stride=2, time_channels=64)
        >>> block(torch.rand(4, 16, 64, 64), torch.rand(4, 64)).shape
        torch.Size([4, 32, 32, 32])
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, *, stride: int = 1,
                 time_channels: int | None = None, norm: str | None = None) -> None:
        super().__init__()
        self.ndim = check_ndim("ResidualBlock", ndim)
        check_channels("ResidualBlock", "in_channels", in_channels)
        check_channels("ResidualBlock", "out_channels", out_channels)
        check_channels("ResidualBlock", "stride", stride)
        bias = norm is None
        self.conv1 = conv(ndim, in_channels, out_channels, 3, stride=stride, bias=bias)
        self.norm1 = norm_layer(ndim, norm, out_channels)
        self.time = _time_shift("ResidualBlock", time_channels, out_channels)
        self.act1 = activation_layer("leaky_relu")
        self.conv2 = conv(ndim, out_channels, out_channels, 3, bias=bias)
        self.norm2 = norm_layer(ndim, norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.skip: nn.Module = conv(ndim, in_channels, out_channels, 1, stride=stride,
                                        bias=bias)
        else:
            self.skip = nn.Identity()
        self.act2 = activation_layer("leaky_relu")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [B, in_channels, *S]; t_emb [B, time_channels] if built with time.
        Returns [B, out_channels, *S / stride]."""
        h = self.norm1(self.conv1(x))
        h = self.act1(_apply_time("ResidualBlock", self.time, h, t_emb))
        h = self.norm2(self.conv2(h))
        return self.act2(h + self.skip(x))
