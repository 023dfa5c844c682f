"""VoxelMorph-diff (Balakrishnan et al., IEEE TMI 2019; Dalca et al., MedIA 2019): the
first model of the training layer, a U-Net predicting a stationary velocity field,
integrated by scaling and squaring and applied with :func:`mrus_kernels.warp`."""

from .config import VoxelMorphConfig
from .losses import similarity_loss, smoothness_loss, voxelmorph_loss
from .model import VoxelMorph, normalise_intensity
from .task import VoxelMorphTask

__all__ = [
    "VoxelMorph",
    "VoxelMorphConfig",
    "VoxelMorphTask",
    "normalise_intensity",
    "similarity_loss",
    "smoothness_loss",
    "voxelmorph_loss",
]
