"""mrus_kernels: fused, differentiable operators for deformable multi-modal registration.

Every operator is a ``torch.library`` custom op with ``torch``, ``cpu``, ``triton`` and
``cuda`` backends (see :mod:`mrus_kernels.backends`). Displacements are ``[B, ndim, *S]``
in voxel units, component i along spatial axis i.
"""

from .backends import BackendUnavailableError, available_backends, backend_status
from .compose import Compose, IntegrateVelocity, compose, integrate_velocity
from .convert import ddf_from_mm, ddf_to_grid, ddf_to_mm, grid_to_ddf
from .grid_sample import grid_sample
from .jacobian import JacobianDet, folding_fraction, jacobian_det
from .lncc import LNCCLoss, lncc
from .mi import MutualInformationLoss, NMILoss, joint_histogram, mutual_information, nmi
from .regularisers import bending_energy, grad_l2, harmonic_energy
from .sobel import SobelL1Loss, sobel, sobel_l1
from .warp import Warp, warp

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Compose",
    "IntegrateVelocity",
    "JacobianDet",
    "LNCCLoss",
    "MutualInformationLoss",
    "NMILoss",
    "SobelL1Loss",
    "Warp",
    "available_backends",
    "backend_status",
    "bending_energy",
    "compose",
    "ddf_from_mm",
    "ddf_to_grid",
    "ddf_to_mm",
    "folding_fraction",
    "grad_l2",
    "grid_sample",
    "grid_to_ddf",
    "harmonic_energy",
    "integrate_velocity",
    "jacobian_det",
    "joint_histogram",
    "lncc",
    "mutual_information",
    "nmi",
    "sobel",
    "sobel_l1",
    "warp",
]
