"""Cross-attention between feature maps: guidance from one decoder to another.

FSDiffReg (Qin & Li, MICCAI 2023) guides the registration decoder with the features of a
diffusion decoder at every scale; MR2US-Pro (../shared/papers/mr2us_pro.txt, Sec. III-C.1)
reuses that "multi-scale guidance from the diffusion decoder". Queries come from the
features being refined, keys and values from the guiding features, attention runs over
voxels, and the output projection starts at zero so the block is the identity at
initialisation (the zero-initialised residual branch of latent-diffusion transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import check_channels, check_ndim, conv, norm_layer


class CrossAttention(nn.Module):
    """``x + proj(attention(q = x, k = v = context))`` over the voxels of ``x``.

    Both inputs are group-normalised, projected by 1×1(×1) convolutions to ``channels``
    and split into ``heads`` heads; the attention is softmax(q kᵀ / √d) v
    (``F.scaled_dot_product_attention``, memory-efficient kernels where available). Its
    cost is O(N²) in the number of voxels N of ``x``: use it on coarse levels.

    Args:
        ndim: 2 or 3.
        channels: channels of ``x`` (and of the output).
        context_channels: channels of ``context``.
        heads: number of attention heads; must divide ``channels``.

    Example:
        >>> attn = CrossAttention(2, 32, 64)
        >>> x = torch.rand(1, 32, 12, 12)
        >>> torch.equal(attn(x, torch.rand(1, 64, 6, 6)), x)  # identity at initialisation
        True
    """

    def __init__(self, ndim: int, channels: int, context_channels: int, heads: int = 4) -> None:
        super().__init__()
        self.ndim = check_ndim("CrossAttention", ndim)
        check_channels("CrossAttention", "channels", channels)
        check_channels("CrossAttention", "context_channels", context_channels)
        check_channels("CrossAttention", "heads", heads)
        if channels % heads:
            raise ValueError(
                f"CrossAttention: heads must divide channels, got channels {channels} and "
                f"heads {heads}"
            )
        self.channels, self.context_channels, self.heads = channels, context_channels, heads
        self.norm_x = norm_layer(ndim, "group", channels)
        self.norm_context = norm_layer(ndim, "group", context_channels)
        self.q = conv(ndim, channels, channels, 1)
        self.kv = conv(ndim, context_channels, 2 * channels, 1)
        self.proj = conv(ndim, channels, channels, 1)
        # Zero output projection: the block starts as the identity map, so inserting it
        # into a network changes nothing until training moves the projection.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Refines ``x`` with ``context``.

        Args:
            x: Tensor [B, channels, *S].
            context: Tensor [B, context_channels, *S_c]; resized to S (bi/trilinear,
                ``align_corners=True``) when S_c differs.

        Returns:
            Tensor [B, channels, *S].
        """
        n = self.ndim
        if x.dim() != n + 2 or x.shape[1] != self.channels:
            raise ValueError(f"CrossAttention: x must be [B, {self.channels}, *S] ({n}D), "
                             f"got {tuple(x.shape)}")
        if context.dim() != n + 2 or context.shape[1] != self.context_channels \
                or context.shape[0] != x.shape[0]:
            raise ValueError(
                f"CrossAttention: context must be [{x.shape[0]}, {self.context_channels}, *S_c] "
                f"({n}D), got {tuple(context.shape)}"
            )
        size = x.shape[2:]
        if context.shape[2:] != size:
            mode = "bilinear" if n == 2 else "trilinear"
            context = F.interpolate(context, size=size, mode=mode, align_corners=True)
        b, c = x.shape[:2]
        d = c // self.heads
        q = self.q(self.norm_x(x)).reshape(b, self.heads, d, -1).transpose(2, 3)
        k, v = self.kv(self.norm_context(context)).reshape(b, 2, self.heads, d, -1) \
            .transpose(3, 4).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        out = out.transpose(2, 3).reshape(b, c, *size)
        return x + self.proj(out)
