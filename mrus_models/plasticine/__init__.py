"""Plasticine (Zhang, Cheng et al., "Plasticine: A Traceable Diffusion Model for Medical Image
Translation"): a diffusion intensity module ε_θ1 and an SVF deformation module f_θ2, trained
jointly, that translate a source image into the target domain together with the
deformations φ, φ⁻¹ that trace every translated pixel back to the source.

- :mod:`~mrus_models.plasticine.config`: :class:`PlasticineConfig` (the paper's defaults);
- :mod:`~mrus_models.plasticine.diffusion`, :mod:`~mrus_models.plasticine.structure`: ε_θ1,
  its noise schedule and sampler, the k-means structure maps;
- :mod:`~mrus_models.plasticine.deformation`: f_θ2 (:class:`DeformationNet`);
- :mod:`~mrus_models.plasticine.losses`: L_DF;
- :mod:`~mrus_models.plasticine.model`: :class:`Plasticine`, both modules and inference;
- :mod:`~mrus_models.plasticine.task`: :class:`PlasticineTask` (``mrus train / evaluate /
  translate plasticine``).
"""

from .config import PlasticineConfig
from .deformation import DeformationNet
from .model import Plasticine, to_model_range
from .task import PlasticineTask

__all__ = ["DeformationNet", "Plasticine", "PlasticineConfig", "PlasticineTask",
           "to_model_range"]
