"""VoxelMorph's unsupervised loss, written only with ``mrus_kernels`` operators.

``L = similarity(fixed, warped) + λ · grad_l2(field)`` (Balakrishnan et al., IEEE TMI 2019:
L_us = L_sim(f, m∘φ) + λ L_smooth(φ)):

- ``"lncc"``: ``1 − LNCC`` (:func:`mrus_kernels.lncc`, squared local correlation in
  [0, 1], so the loss lies in [0, 1] and is 0 for a perfect local linear match);
- ``"mi"``: ``−MI`` in nats (:func:`mrus_kernels.mutual_information`, Parzen window).
  The plain negative MI rather than ``1 − MI / H``: dividing by an entropy that itself
  depends on the warp adds a second, competing gradient, and MI's nats already move over
  a range comparable to ``1 − LNCC`` (so one λ suits both, measured in
  :class:`~mrus_models.voxelmorph.config.VoxelMorphConfig`'s ``lam``);
- smoothness: :func:`mrus_kernels.grad_l2`, the mean squared forward difference of the
  displacement (or of the velocity, ``regularise="velocity"``), voxel units.
"""

from __future__ import annotations

import torch

from mrus_kernels import grad_l2, lncc, mutual_information

from .config import VoxelMorphConfig


def similarity_loss(fixed: torch.Tensor, warped: torch.Tensor, config: VoxelMorphConfig,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The dissimilarity of each item, to minimise.

    Args:
        fixed: Tensor [B, 1, *S].
        warped: Tensor [B, 1, *S], the warped moving image.
        config: picks ``similarity`` ("mi": ``−MI`` nats; "lncc": ``1 − LNCC``), its
            parameters (``mi_bins``, ``mi_sigma``, ``lncc_window``) and ``backend``.
        mask: optional Tensor [B or 1, 1, *S] of voxel weights.

    Returns:
        Tensor [B].
    """
    fixed, warped = fixed.float(), warped.float()
    if config.similarity == "mi":
        return -mutual_information(fixed, warped, bins=config.mi_bins, sigma=config.mi_sigma,
                                   mask=mask, backend=config.backend)
    if config.similarity == "lncc":
        return 1.0 - lncc(fixed, warped, window=config.lncc_window, mask=mask,
                          backend=config.backend)
    raise ValueError(f"similarity: expected 'mi' or 'lncc', got {config.similarity!r}")


def smoothness_loss(field: torch.Tensor, config: VoxelMorphConfig) -> torch.Tensor:
    """``grad_l2`` of a displacement or velocity field [B, ndim, *S] (voxel units): a scalar,
    the mean over items, axes and voxels."""
    return grad_l2(field.float(), backend=config.backend)


def voxelmorph_loss(fixed: torch.Tensor, out: dict[str, torch.Tensor],
                    config: VoxelMorphConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch: mean over items of ``similarity + λ · smoothness``.

    Args:
        fixed: Tensor [B, 1, *S].
        out: :class:`~mrus_models.voxelmorph.model.VoxelMorph`'s output (``warped``,
            ``ddf``, ``velocity``).
        config: the similarity, λ (``smoothness_weight``), ``regularise`` and ``backend``.

    Returns:
        (loss, logs): a 0-d tensor, and the detached terms ``similarity`` and
        ``smoothness`` (batch means).
    """
    sim = similarity_loss(fixed, out["warped"], config).mean()
    field = out["ddf"] if config.regularise == "displacement" else out["velocity"]
    smooth = smoothness_loss(field, config)
    loss = sim + config.smoothness_weight * smooth
    return loss, {"similarity": sim.detach(), "smoothness": smooth.detach()}
