"""Anatomy-aware registration (MR2US-Pro §II-C, ../shared/papers/mr2us_pro.txt): a shared
encoder over the moving MR, the fixed US and the noise-perturbed US; a diffusion decoder
(score) guiding a registration decoder (field) by FSDiffReg-style cross-attention; the soft
Dice of the anatomy maps F_Ana, ``grad_l2`` smoothness and the diffusion loss; optional
ACMT translation of both images before the network."""

from .config import AnatomyAwareConfig
from .losses import (
                     anatomy_aware_loss,
                     anatomy_map,
                     diffusion_loss,
                     field_of_view,
                     similarity_loss,
                     smoothness_loss,
                     soft_dice_loss,
)
from .model import AnatomyAwareNet, linear_alphas_cumprod, normalise_intensity
from .task import TISSUES, AnatomyAwareTask, USFixedPairs

__all__ = [
    "TISSUES",
    "AnatomyAwareConfig",
    "AnatomyAwareNet",
    "AnatomyAwareTask",
    "USFixedPairs",
    "anatomy_aware_loss",
    "anatomy_map",
    "diffusion_loss",
    "field_of_view",
    "linear_alphas_cumprod",
    "normalise_intensity",
    "similarity_loss",
    "smoothness_loss",
    "soft_dice_loss",
]
