"""VoxelMorph as the Trainer and the ``mrus`` command see it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mrus_kernels import folding_fraction, warp
from mrus_models.metrics import dice, endpoint_error_mm
from mrus_models.train.task import Task, check_split, item_means, pad_to_stride, unwrap

from .config import VoxelMorphConfig
from .losses import voxelmorph_loss
from .model import VoxelMorph

#: Tissue label values of the datasets' label maps (mrus_models.data.LABELS).
GM, WM = 2, 3

__all__ = ["VoxelMorphTask", "dice", "endpoint_error_mm"]


class VoxelMorphTask(Task):
    """VoxelMorph-diff on the T1 / simulated-modality pairs of :mod:`mrus_models.data`.

    Metrics of :meth:`evaluate` (means over items; an item counts for a Dice only when the
    fixed labels hold that tissue):

    - ``epe_mm``: mean endpoint error inside the fixed brain mask, mm (the item's spacing);
    - ``epe_mm_identity``: the same for a zero displacement (the task's difficulty);
    - ``dice_wm``, ``dice_gm``: Dice of the moving labels warped (nearest) by the predicted
      displacement against the fixed labels; ``dice_wm_identity``, ``dice_gm_identity``:
      of the unwarped moving labels;
    - ``folding_fraction``: fraction of voxels with det(I + ∇u) <= 0
      (:func:`mrus_kernels.folding_fraction`);
    - ``loss``, ``similarity``, ``smoothness``: the training loss and its terms.
    """

    name = "voxelmorph"
    config_class = VoxelMorphConfig

    def build(self, config: VoxelMorphConfig) -> nn.Module:
        return VoxelMorph(config.ndim, encoder=config.encoder, decoder=config.decoder,
                          residual=config.residual, norm=config.norm,
                          steps=config.steps_integration, memory=config.integration_memory,
                          init_std=config.flow_init_std, backend=config.backend)

    def dataset(self, config: VoxelMorphConfig, split: str) -> torch.utils.data.Dataset:
        """2D slice pairs (``ndim=2``) or 3D crops (``ndim=3``) of ``split``."""
        from mrus_models.data import Crops3D, SlicePairs  # the datasets load the template lazily

        check_split(split)
        kwargs: dict[str, Any] = {
            "size": config.image_size, "split": split, "seed": config.data_seed,
            "max_displacement": config.max_displacement,
            "length": config.train_items if split == "train" else None,
        }
        if config.data_warp is not None:
            kwargs["warp"] = config.data_warp
        if config.ndim == 2:
            return SlicePairs(config.modality, planes=config.planes, **kwargs)
        return Crops3D(config.modality, **kwargs)

    def training_step(self, model: nn.Module, batch: dict[str, Any],
                      config: VoxelMorphConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["moving"], batch["fixed"])
        return voxelmorph_loss(batch["fixed"], out, config)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader,
                 config: VoxelMorphConfig, device: torch.device) -> dict[str, float]:
        keys = ("loss", "similarity", "smoothness", "epe_mm", "epe_mm_identity", "dice_wm",
                "dice_gm", "dice_wm_identity", "dice_gm_identity", "folding_fraction")
        per_item: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        model = unwrap(model)
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            fixed, moving = batch["fixed"], batch["moving"]
            b = fixed.shape[0]
            out = model(moving, fixed)
            loss, logs = voxelmorph_loss(fixed, out, config)
            # The loss terms are batch means: repeat them per item so that batches of
            # different sizes weigh by their items.
            for name, value in (("loss", loss), *logs.items()):
                per_item[name].append(value.detach().double().expand(b).cpu())
            ddf, truth, mask = out["ddf"], batch["ddf"], batch["mask"].bool()
            spacing = batch["spacing"]
            per_item["epe_mm"].append(endpoint_error_mm(ddf, truth, mask, spacing).cpu())
            per_item["epe_mm_identity"].append(
                endpoint_error_mm(torch.zeros_like(ddf), truth, mask, spacing).cpu())
            moving_labels = batch["moving_labels"]
            warped_labels = warp(moving_labels.float(), ddf, mode="nearest",
                                 backend=config.backend).round().long()
            fixed_labels = batch["fixed_labels"]
            for name, value in (("wm", WM), ("gm", GM)):
                per_item[f"dice_{name}"].append(dice(warped_labels, fixed_labels, value).cpu())
                per_item[f"dice_{name}_identity"].append(
                    dice(moving_labels, fixed_labels, value).cpu())
            per_item["folding_fraction"].append(
                folding_fraction(ddf, backend=config.backend).double().cpu())
        return item_means(per_item)

    @torch.no_grad()
    def predict(self, model: nn.Module, fixed: torch.Tensor, moving: torch.Tensor,
                config: VoxelMorphConfig) -> dict[str, torch.Tensor]:
        """Registers ``moving`` to ``fixed`` (both [B, 1, *S], any size: the images are
        padded at the far end of each axis, by edge replication, to a multiple of the
        network's stride and the fields cropped back).

        Returns:
            ``"ddf"`` [B, ndim, *S] (voxel units), ``"velocity"`` [B, ndim, *S] and
            ``"warped"`` [B, 1, *S], the raw moving intensities resampled.
        """
        net = unwrap(model)
        ndim = config.ndim
        if fixed.dim() != ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"predict: fixed and moving must both be [B, 1, *S] ({ndim}D) on the same grid, "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        fixed_p, moving_p, crop = pad_to_stride(fixed, moving, net.stride)
        out = net(moving_p, fixed_p)
        ddf = out["ddf"][crop].contiguous()
        velocity = out["velocity"][crop].contiguous()
        warped = warp(moving.float(), ddf, backend=config.backend)
        return {"ddf": ddf, "velocity": velocity, "warped": warped}
