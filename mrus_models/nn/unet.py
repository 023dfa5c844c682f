"""A U-Net with a residual encoder, 2D and 3D from one code path.

The layout and default widths are VoxelMorph's (Balakrishnan et al., "VoxelMorph: A
Learning Framework for Deformable Medical Image Registration", IEEE TMI 2019, Fig. 3,
"VoxelMorph-2"): encoder widths (16, 32, 32, 32), each level a stride-2 convolution that
halves the size; decoder widths (32, 32, 32, 32, 32, 16, 16), the first ``len(encoder)``
of them each followed by a ×2 nearest-neighbour upsampling and the concatenation of the
encoder feature map of the same size (the input itself at full resolution), the rest
full-resolution convolutions. With ``residual=True`` (the default) each encoder level is a
:class:`~mrus_models.nn.blocks.ResidualBlock` instead of VoxelMorph's single convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import CrossAttention
from .blocks import ConvBlock, ResidualBlock, check_channels, check_ndim

# VoxelMorph-2 widths (Balakrishnan et al. 2019, Sec. IV-B / Fig. 3).
VOXELMORPH_ENCODER = (16, 32, 32, 32)
VOXELMORPH_DECODER = (32, 32, 32, 32, 32, 16, 16)


def _widths(name: str, value) -> tuple[int, ...]:
    try:
        widths = tuple(value)
    except TypeError:
        raise ValueError(
            f"UNet: {name} must be a sequence of positive ints, got {value!r}") from None
    for w in widths:
        check_channels("UNet", name, w)
    return widths


class UNet(nn.Module):
    """VoxelMorph-layout U-Net: strided (residual) encoder, upsampling decoder with skips.

    Encoder level i maps its input to ``encoder[i]`` channels at half the size. Decoder
    block j (width ``decoder[j]``) runs on the coarsest map first; for
    ``j < len(encoder)`` its output is upsampled ×2 (nearest) and concatenated with the
    encoder map of that size (the network input at full resolution); the remaining
    decoder blocks run at full resolution. Every spatial size must be divisible by
    :attr:`stride` = ``2 ** len(encoder)``.

    Args:
        ndim: 2 or 3.
        in_channels: input channels (2 for a moving/fixed pair).
        encoder: encoder widths, one per level (VoxelMorph: (16, 32, 32, 32)).
        decoder: decoder widths; more than ``len(encoder)`` of them so that at least one
            block runs at full resolution (VoxelMorph: (32, 32, 32, 32, 32, 16, 16)).
        residual: residual encoder blocks (True) or VoxelMorph's single convolutions.
        time_channels: width of a time / noise-level embedding ``t_emb`` (e.g.
            :class:`~mrus_models.nn.TimeEmbedding`'s ``out_channels``) that every block
            adds as a per-channel shift; None for an unconditioned network.
        norm: None (VoxelMorph), "instance", "group" or "batch".
        context_channels: None, or one entry per decoder block: the channels of the
            context map that a :class:`~mrus_models.nn.CrossAttention` after that block
            attends to, or None for no attention there. Use coarse levels: attention is
            quadratic in the voxel count.

    Attributes:
        out_channels: ``decoder[-1]``.
        stride: ``2 ** len(encoder)``.
        decoder_strides: the downsampling factor of each decoder block's output (its
            feature map is ``S / factor``), coarse to fine.

    Example:
        >>> net = UNet(2, 2)
        >>> net(torch.rand(1, 2, 64, 64)).shape
        torch.Size([1, 16, 64, 64])
    """

    def __init__(self, ndim: int, in_channels: int, *,
                 encoder: Sequence[int] = VOXELMORPH_ENCODER,
                 decoder: Sequence[int] = VOXELMORPH_DECODER, residual: bool = True,
                 time_channels: int | None = None, norm: str | None = None,
                 context_channels: Sequence[int | None] | None = None) -> None:
        super().__init__()
        self.ndim = check_ndim("UNet", ndim)
        check_channels("UNet", "in_channels", in_channels)
        encoder, decoder = _widths("encoder", encoder), _widths("decoder", decoder)
        if not encoder:
            raise ValueError("UNet: encoder must have at least one level, got ()")
        if len(decoder) <= len(encoder):
            raise ValueError(
                f"UNet: decoder needs more widths than encoder (len(encoder) upsampling blocks "
                f"and at least one at full resolution), got {len(encoder)} encoder widths "
                f"{encoder} and {len(decoder)} decoder widths {decoder}"
            )
        if time_channels is not None:
            check_channels("UNet", "time_channels", time_channels)
        levels = len(encoder)
        self.in_channels, self.encoder_widths, self.decoder_widths = in_channels, encoder, decoder
        self.time_channels = time_channels
        self.out_channels = decoder[-1]
        self.stride = 2 ** levels
        self.decoder_strides = tuple(2 ** max(levels - j, 0) for j in range(len(decoder)))

        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in encoder:
            if residual:
                block: nn.Module = ResidualBlock(ndim, prev, width, stride=2,
                                                 time_channels=time_channels, norm=norm)
            else:
                block = ConvBlock(ndim, prev, width, stride=2, norm=norm,
                                  time_channels=time_channels)
            self.encoder.append(block)
            prev = width

        # Skip j joins decoder block j's upsampled output: encoder maps fine to coarse,
        # with the network input as the full-resolution one; the coarsest map is the
        # decoder's input, not a skip.
        skip_channels = (in_channels, *encoder[:-1])
        self.decoder = nn.ModuleList()
        for j, width in enumerate(decoder):
            self.decoder.append(
                ConvBlock(ndim, prev, width, norm=norm, time_channels=time_channels))
            prev = width + skip_channels[levels - 1 - j] if j < levels else width
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

        self.attention = nn.ModuleDict()
        if context_channels is not None:
            context_channels = tuple(context_channels)
            if len(context_channels) != len(decoder):
                raise ValueError(
                    f"UNet: context_channels needs one entry (int or None) per decoder block "
                    f"({len(decoder)}), got {len(context_channels)}: {context_channels}"
                )
            for j, cc in enumerate(context_channels):
                if cc is not None:
                    self.attention[str(j)] = CrossAttention(ndim, decoder[j], cc)
        self.context_channels = context_channels

    def _check(self, x: torch.Tensor, t_emb, context) -> None:
        n = self.ndim
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != n + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: x must be [B, {self.in_channels}, *S] ({n}D), got "
                             f"{tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(s % self.stride for s in size):
            raise ValueError(
                f"UNet: every spatial size must be divisible by the stride {self.stride} "
                f"(2 ** {len(self.encoder_widths)} encoder levels), got {size}"
            )
        if (t_emb is None) != (self.time_channels is None):
            raise ValueError(
                "UNet: t_emb [B, time_channels] is required" if t_emb is None else
                "UNet: got t_emb but the network was built with time_channels=None"
            )
        if self.attention and context is None:
            raise ValueError("UNet: context (one feature map per decoder block) is required: "
                             "the network was built with context_channels")
        if context is not None:
            if not self.attention:
                raise ValueError("UNet: got context but the network was built with "
                                 "context_channels=None")
            if len(context) != len(self.decoder):
                raise ValueError(f"UNet: context needs one entry per decoder block "
                                 f"({len(self.decoder)}), got {len(context)}")
            for key in self.attention:
                if not isinstance(context[int(key)], torch.Tensor):
                    raise TypeError(f"UNet: context[{key}] must be a tensor (attention at "
                                     f"decoder block {key}), got "
                                     f"{type(context[int(key)]).__name__}")

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None,
                context: Sequence[torch.Tensor | None] | None = None,
                return_features: bool = False):
        """Runs the network.

        Args:
            x: Tensor [B, in_channels, *S], every size of S divisible by :attr:`stride`.
            t_emb: Tensor [B, time_channels] when built with ``time_channels``, else None.
            context: when built with ``context_channels``: one entry per decoder block,
                coarse to fine (e.g. another UNet's ``features["decoder"]``); a tensor
                [B, context_channels[j], *S_j] where block j has attention (resized to
                block j's size if needed), anything (None) elsewhere.
            return_features: also return the intermediate feature maps.

        Returns:
            Tensor [B, out_channels, *S]; with ``return_features``, ``(out, features)``
            where ``features["encoder"]`` holds each encoder level's output (fine to
            coarse, S / 2 … S / stride) and ``features["decoder"]`` each decoder block's
            output after its attention, before upsampling (coarse to fine, sizes
            S / :attr:`decoder_strides`); the last one is ``out``.
        """
        self._check(x, t_emb, context)
        levels = len(self.encoder)
        h = x
        encoded = []
        for block in self.encoder:
            h = block(h, t_emb)
            encoded.append(h)
        skips = [x, *encoded[:-1]]
        decoded = []
        for j, block in enumerate(self.decoder):
            h = block(h, t_emb)
            if str(j) in self.attention:
                h = self.attention[str(j)](h, context[j])
            decoded.append(h)
            if j < levels:
                h = torch.cat([self.upsample(h), skips[levels - 1 - j]], dim=1)
        if return_features:
            return h, {"encoder": encoded, "decoder": decoded}
        return h
