"""The default registration pair: MNI152 T1 (fixed) and a simulated modality under a known
warp (moving), with the ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mrus_kernels import warp

from .modalities import pseudo_ultrasound, t2_like
from .templates import Template, mni152
from .warps import KnownWarp, known_warp

MODALITIES = ("t2", "us")


@dataclass
class Pair:
    """A fixed/moving pair with a known answer, on one grid (the template's).

    Attributes:
        fixed: Tensor [1, 1, *S], the MNI152 T1 in [0, 1].
        moving: Tensor [1, 1, *S], the simulated modality, warped.
        fixed_labels, moving_labels: Tensor [1, 1, *S] int64 tissue labels
            (:data:`mrus_models.data.LABELS`), the moving ones warped with nearest.
        fixed_mask: Tensor [1, 1, *S] bool, the brain in the fixed image.
        moving_fov: Tensor [1, 1, *S] bool, where the moving acquisition has data (the
            ultrasound fan; everywhere for T2).
        truth: :class:`KnownWarp`; ``truth.ddf`` (voxel units) is what a registration of
            moving to fixed should find: ``moving(x + ddf(x)) ≈ fixed-frame anatomy(x)``.
        affine: numpy [4, 4] voxel-to-world affine shared by both images.
        modality: "t2" or "us".
        template: the :class:`Template` the pair was made from.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    fixed_mask: torch.Tensor
    moving_fov: torch.Tensor
    truth: KnownWarp
    affine: np.ndarray
    modality: str
    template: Template

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.template.spacing


def default_pair(modality: str = "t2", *, resolution: int = 2, max_displacement: float = 6.0,
                 seed: int = 0, template: Template | None = None) -> Pair:
    """MNI152 T1 as fixed, a simulated T2-like or pseudo-ultrasound image as moving.

    The tissue maps are first warped into the moving frame with the known warp's inverse
    (linear; labels nearest), then the modality is simulated there, so that the bias field,
    the fan, the shadows and the speckle belong to the moving acquisition. No download:
    everything comes from the template in nilearn's package data.

    Args:
        modality: "t2" (:func:`t2_like`) or "us" (:func:`pseudo_ultrasound`).
        resolution: 2 (default) or 1 mm.
        max_displacement: largest displacement of the SVF part of the known warp, mm (a
            random affine of up to 3°, 3 % and 2 mm comes on top).
        seed: seed of the warp and of the simulation.
        template: a template already loaded (default: :func:`mni152` at ``resolution``).

    Returns:
        :class:`Pair` (CPU tensors).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    tpl = template if template is not None else mni152(resolution)
    truth = known_warp(tpl.shape, max_displacement=max_displacement, spacing=tpl.spacing,
                       seed=seed)
    tissues = warp(tpl.tissues(), truth.inverse)
    labels = warp(tpl.labels.float(), truth.inverse, mode="nearest").long()
    if modality == "t2":
        moving = t2_like(tissues, seed=seed)
        fov = torch.ones_like(tpl.mask)
    else:
        parts = pseudo_ultrasound(tissues, spacing=tpl.spacing[-1], seed=seed, return_parts=True)
        moving, fov = parts["image"], parts["fov"]
    return Pair(tpl.t1, moving.contiguous(), tpl.labels, labels, tpl.mask, fov, truth,
                tpl.affine, modality, tpl)
