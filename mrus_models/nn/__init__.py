"""Network blocks shared by the models, 2D and 3D from one code path (``ndim`` = 2 or 3).

- :class:`ConvBlock`, :class:`ResidualBlock`: convolution blocks (VoxelMorph's defaults:
  3×3(×3) kernels, LeakyReLU(0.2), no normalisation), optional time conditioning;
- :class:`UNet`: VoxelMorph's U-Net layout with a residual encoder, optional time
  embedding and cross-attention guidance between decoders;
- :func:`sinusoidal_embedding`, :class:`TimeEmbedding`: diffusion step / noise level;
- :class:`CrossAttention`: FSDiffReg-style guidance, the identity at initialisation;
- :class:`FlowHead`: the velocity / displacement output, initialised near zero.
"""

from .attention import CrossAttention
from .blocks import ConvBlock, ResidualBlock, TimeShift
from .embedding import TimeEmbedding, sinusoidal_embedding
from .flow import FlowHead
from .unet import VOXELMORPH_DECODER, VOXELMORPH_ENCODER, UNet

__all__ = [
    "VOXELMORPH_DECODER",
    "VOXELMORPH_ENCODER",
    "ConvBlock",
    "CrossAttention",
    "FlowHead",
    "ResidualBlock",
    "TimeEmbedding",
    "TimeShift",
    "UNet",
    "sinusoidal_embedding",
]
