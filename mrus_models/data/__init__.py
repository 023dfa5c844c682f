"""Data with a known answer: NIfTI I/O, the MNI152 template shipped in nilearn's wheel,
simulated second modalities (T2-like, pseudo-ultrasound) and known random warps.

:func:`default_pair` puts them together: the MNI T1 as the fixed image, a simulated
modality warped by a known warp as the moving image, with the ground-truth displacement.
:class:`SlicePairs` (2D) and :class:`Crops3D` (3D) make training datasets of such pairs.
"""

from .datasets import Crops3D, SlicePairs
from .modalities import pseudo_ultrasound, rayleigh_speckle, smooth_random_field, t2_like
from .nifti import (
    NiftiImage,
    affine_nd,
    read_displacement,
    read_nifti,
    voxel_spacing,
    write_displacement,
    write_nifti,
)
from .pair import Pair, default_pair
from .templates import LABELS, Template, mni152
from .warps import KnownWarp, affine_ddf, known_warp, random_affine, random_velocity

__all__ = [
    "LABELS",
    "Crops3D",
    "KnownWarp",
    "NiftiImage",
    "Pair",
    "SlicePairs",
    "Template",
    "affine_ddf",
    "affine_nd",
    "default_pair",
    "known_warp",
    "mni152",
    "pseudo_ultrasound",
    "random_affine",
    "random_velocity",
    "rayleigh_speckle",
    "read_displacement",
    "read_nifti",
    "smooth_random_field",
    "t2_like",
    "voxel_spacing",
    "write_displacement",
    "write_nifti",
]
