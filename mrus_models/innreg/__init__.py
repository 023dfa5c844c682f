"""INNReg (Guo, "Unsupervised Multi-modal Medical Image Registration via Invertible
Translation", ../shared/papers/innreg.txt): an invertible translation network T maps the
moving modality to the fixed one, a U-Net R predicts a stationary velocity integrated with
:func:`mrus_kernels.integrate_velocity` and applied with :func:`mrus_kernels.warp`; both
trained jointly with the reconstruction, barrier NMI, cross-translation and smoothness
losses."""

from .config import InnRegConfig
from .losses import barrier_loss, innreg_loss, l1, smoothness_loss
from .model import InnReg
from .task import InnRegTask
from .translation import TranslationNet

__all__ = [
    "InnReg",
    "InnRegConfig",
    "InnRegTask",
    "TranslationNet",
    "barrier_loss",
    "innreg_loss",
    "l1",
    "smoothness_loss",
]
