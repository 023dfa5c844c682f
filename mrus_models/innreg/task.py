"""INNReg as the Trainer and the ``mrus`` command see it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mrus_kernels import folding_fraction, warp
from mrus_models.metrics import dice, endpoint_error_mm, hd95, ncc, ssim
from mrus_models.train.task import Task, check_split, item_means, pad_to_stride, unwrap

from .config import InnRegConfig
from .losses import innreg_loss
from .model import InnReg

#: Tissue label values of the datasets' label maps (mrus_models.data.LABELS).
TISSUES = {"csf": 1, "gm": 2, "wm": 3}


class InnRegTask(Task):
    """INNReg on the 2D T1 / simulated-modality slice pairs of :mod:`mrus_models.data`
    (``SlicePairs``, random B-spline warps: [G24] §4.1's protocol).

    Metrics of :meth:`evaluate` (means over items; ``*_identity``: the same metric for a
    zero displacement, the task's difficulty):

    - ``epe_mm``: mean endpoint error inside the fixed brain mask against the known warp, mm;
    - ``ssim``, ``ncc`` ([G24] Table 1): of x∘φ against x∘φ_true, the moving image moved by
      the known displacement, both min-max normalised to [0, 1] (SSIM with L = 1). The
      moving and fixed images are of different modalities, so the warped image is scored
      against the moving image in the fixed image's frame, as the released evaluation
      scores it against its ground-truth moved source;
    - ``dice_csf``, ``dice_gm``, ``dice_wm`` and their mean ``dice``: the moving labels
      warped (nearest) by φ against the fixed labels (an item counts where the fixed labels
      hold that tissue);
    - ``hd95_csf``, ``hd95_gm``, ``hd95_wm``, mean ``hd95``: 95th-percentile symmetric
      Hausdorff distance of the same label pairs, mm (:func:`mrus_models.metrics.hd95`);
    - ``folding_fraction``: fraction of pixels with det(I + ∇u) <= 0 ([G24] reports it in %);
    - ``loss``, ``recon``, ``barrier``, ``inn``, ``smooth``: the training loss and its terms.
    """

    name = "innreg"
    config_class = InnRegConfig

    def build(self, config: InnRegConfig) -> nn.Module:
        return InnReg(inn_blocks=config.inn_blocks, inn_hidden=config.inn_hidden,
                      ddw_kernels=config.ddw_kernels, ddw=config.ddw, encoder=config.encoder,
                      decoder=config.decoder, residual=config.residual,
                      output_residual=config.output_residual, steps=config.steps_integration,
                      bidirectional=config.bidirectional, memory=config.integration_memory,
                      init_std=config.flow_init_std, backend=config.backend)

    def dataset(self, config: InnRegConfig, split: str) -> torch.utils.data.Dataset:
        """2D slice pairs of ``split`` under random B-spline warps."""
        from mrus_models.data import SlicePairs  # the dataset loads the template lazily

        check_split(split)
        return SlicePairs(config.modality, size=config.image_size, planes=config.planes,
                          split=split, warp="bspline", max_displacement=config.max_displacement,
                          seed=config.data_seed,
                          length=config.train_items if split == "train" else None)

    def training_step(self, model: nn.Module, batch: dict[str, Any],
                      config: InnRegConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["moving"], batch["fixed"])
        return innreg_loss(out, config)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader,
                 config: InnRegConfig, device: torch.device) -> dict[str, float]:
        per_item: dict[str, list[torch.Tensor]] = {}

        def add(name: str, value: torch.Tensor) -> None:
            per_item.setdefault(name, []).append(value.detach().double().cpu())

        model = unwrap(model)
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            b = batch["fixed"].shape[0]
            out = model(batch["moving"], batch["fixed"])
            loss, logs = innreg_loss(out, config)
            # The loss terms are batch means: repeat them per item so that batches of
            # different sizes weigh by their items.
            for name, value in (("loss", loss), *logs.items()):
                add(name, value.expand(b))
            ddf, truth, mask = out["ddf"], batch["ddf"].float(), batch["mask"].bool()
            spacing = batch["spacing"]
            zero = torch.zeros_like(ddf)
            add("epe_mm", endpoint_error_mm(ddf, truth, mask, spacing))
            add("epe_mm_identity", endpoint_error_mm(zero, truth, mask, spacing))
            x = out["source"]
            reference = warp(x, truth, backend=config.backend)
            for name, moved in (("", out["warped"]), ("_identity", x)):
                add("ssim" + name, ssim(moved, reference, data_range=1.0))
                add("ncc" + name, ncc(moved, reference))
            moving_labels, fixed_labels = batch["moving_labels"], batch["fixed_labels"]
            warped_labels = warp(moving_labels.float(), ddf, mode="nearest",
                                 backend=config.backend).round().long()
            for suffix, labels in (("", warped_labels), ("_identity", moving_labels)):
                dices, dists = [], []
                for tissue, value in TISSUES.items():
                    d = dice(labels, fixed_labels, value)
                    h = hd95(labels, fixed_labels, value, spacing)
                    add(f"dice_{tissue}{suffix}", d)
                    add(f"hd95_{tissue}{suffix}", h)
                    dices.append(d)
                    dists.append(h)
                add("dice" + suffix, torch.stack(dices).nanmean(0))
                add("hd95" + suffix, torch.stack(dists).nanmean(0))
            add("folding_fraction", folding_fraction(ddf, backend=config.backend))
        return item_means(per_item)

    @torch.no_grad()
    def predict(self, model: nn.Module, fixed: torch.Tensor, moving: torch.Tensor,
                config: InnRegConfig) -> dict[str, torch.Tensor]:
        """Registers ``moving`` to ``fixed`` with R alone (both [B, 1, H, W], any size: the
        images are padded at the far end of each axis, by edge replication, to a multiple
        of the network's stride and the fields cropped back).

        Returns:
            ``"ddf"`` [B, 2, H, W] (voxel units), ``"velocity"``, ``"warped"`` [B, 1, H, W]
            (the raw moving intensities resampled) and, with ``bidirectional``,
            ``"inverse_ddf"`` (exp(−v): maps ``fixed`` onto ``moving``).
        """
        net = unwrap(model)
        if fixed.dim() != 4 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"predict: fixed and moving must both be [B, 1, H, W] (2D) on the same grid, "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        fixed_p, moving_p, crop = pad_to_stride(fixed, moving, net.stride)
        out = net(moving_p, fixed_p, translate=False)
        result = {"ddf": out["ddf"][crop].contiguous(),
                  "velocity": out["velocity"][crop].contiguous()}
        if "inverse_ddf" in out:
            result["inverse_ddf"] = out["inverse_ddf"][crop].contiguous()
        result["warped"] = warp(moving.float(), result["ddf"], backend=config.backend)
        return result
