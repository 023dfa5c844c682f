"""ACMT (Ma et al., "Modality Translation and Registration of MR and Ultrasound Images Using
Diffusion Models"; MR2US-Pro §II-B): anatomically coherent modality translation of MR and
US volumes through a Schrödinger bridge into one intermediate modality, trained with
texture, boundary (:func:`mrus_kernels.sobel_l1`) and SB losses."""

from .bridge import diffuse, draw_index, sample, time_pool
from .config import ACMTConfig
from .losses import EnergyNet, boundary_loss, energy_loss, sb_loss, texture_loss
from .model import ACMT, acmt_loss, normalise_intensity
from .network import ACMTNet
from .task import ACMTTask

__all__ = [
    "ACMT",
    "ACMTConfig",
    "ACMTNet",
    "ACMTTask",
    "EnergyNet",
    "acmt_loss",
    "boundary_loss",
    "diffuse",
    "draw_index",
    "energy_loss",
    "normalise_intensity",
    "sample",
    "sb_loss",
    "texture_loss",
    "time_pool",
]
