"""Plasticine: traceable diffusion translation (Zhang et al.), intensity and deformation modules."""
