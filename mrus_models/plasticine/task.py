"""Plasticine as the Trainer and the ``mrus`` command see it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mrus_kernels import folding_fraction, warp
from mrus_models.metrics import bhattacharyya, dice, endpoint_error_mm
from mrus_models.train.task import Task, check_split, item_means, pad_to_stride, unwrap

from .config import PlasticineConfig
from .deformation import DeformationNet
from .diffusion import NoiseSchedule
from .losses import deformation_loss, inverse_error
from .model import Plasticine, build_intensity, to_model_range
from .structure import structure_map

#: Tissue label values of the datasets' label maps (mrus_models.data.LABELS).
TISSUES = {"csf": 1, "gm": 2, "wm": 3}


class PlasticinePairs(Dataset):
    """The items of a pair dataset with what Plasticine trains on added.

    Each item of ``pairs`` (:class:`~mrus_models.data.SlicePairs`) gains ``"source"`` x
    (the T1 ``"fixed"`` image) and ``"target"`` y (the simulated ``"moving"`` one), each
    min-max scaled to [-1, 1] (:func:`~mrus_models.plasticine.model.to_model_range`), and
    their structure maps ``"source_structure"`` x_s, ``"target_structure"`` y_s
    (k-means with ``clusters`` clusters, seeded: items stay deterministic by index). The
    clustering runs here, as data preparation (in the DataLoader's workers), not in the
    training step.
    """

    def __init__(self, pairs: Dataset, clusters: int, seed: int = 0) -> None:
        self.pairs, self.clusters, self.seed = pairs, clusters, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.pairs[index])
        x = to_model_range(item["fixed"][None])
        y = to_model_range(item["moving"][None])
        item.update(source=x[0], target=y[0],
                    source_structure=structure_map(x, self.clusters, seed=self.seed)[0],
                    target_structure=structure_map(y, self.clusters, seed=self.seed)[0])
        return item


def unit_range(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model intensities to [0, 1], clipped: the range every image metric and the
    segmenter see (and that ``mrus translate`` writes)."""
    return ((image.float() + 1) / 2).clamp(0, 1)


class PlasticineTask(Task):
    """Plasticine on the 2D T1 → simulated-modality slices of :mod:`mrus_models.data`
    (``SlicePairs``: x the T1 slice, y the T2-like or pseudo-ultrasound slice under a
    random warp).

    Metrics of :meth:`evaluate` (``*_identity``: the same metric for ŷ = x and φ = Id,
    the untranslated source, which the translation must beat):

    - ``fid``, ``sfd`` (with ``fid=True``): Fréchet and simplified Fréchet Inception
      distances between the set of translated images ŷ and the set of held-out target
      images y (:func:`mrus_models.metrics.fid`, :func:`~mrus_models.metrics.sfd`, images in
      [0, 1]); small sets inflate FID: compare with ``fid_identity`` of the same sizes;
    - ``bhattacharyya``: distance of the pooled intensity histograms of ŷ and y (256 bins
      over [0, 1]);
    - traceability ([Z25] §IV-A, Fig. 6, in miniature): a small segmenter is trained once
      per call on the train split's target images and labels
      (:func:`mrus_models.plasticine.traceability.train_segmenter`, ``segmenter_items``
      items, ``segmenter_steps`` steps, seeded), applied to ŷ, and its labels m̂ are
      taken back to x's frame by φ⁻¹ (m̂∘φ⁻¹) and scored against x's labels: ``trace_*``
      (Dice per tissue, mean Dice, mIoU, pixel accuracy, as
      :func:`~mrus_models.plasticine.traceability.traceability` names them); the
      identity is the segmenter on x itself;
    - ``folding_fraction`` of φ (fraction of pixels with det(I + ∇u) <= 0) and
      ``inverse_error_px``: mean ‖φ∘φ⁻¹ − Id‖ in pixels (both 0 for the identity);
    - with y given (the training-mode pass, φ from (x, y, ê)): ``nmi`` of (y, x∘φ)
      (``nmi_identity`` of (y, x)), ``dice_csf`` / ``dice_gm`` / ``dice_wm`` / ``dice``
      of x's labels warped by φ (nearest) against y's labels, and ``epe_mm``, the
      endpoint error of φ⁻¹ against the datasets' known displacement (which maps y back
      onto x) inside the brain;
    - ``loss``, ``intensity``, ``data``, ``smooth``, ``align`` (``inverse``): the
      training loss and its terms.
    """

    name = "plasticine"
    config_class = PlasticineConfig

    def build(self, config: PlasticineConfig) -> nn.Module:
        deformation = DeformationNet(width=config.width, encoder=config.encoder,
                                     decoder=config.decoder, residual=config.residual,
                                     align_layers=config.align_layers,
                                     steps=config.steps_integration,
                                     memory=config.integration_memory,
                                     init_std=config.flow_init_std, backend=config.backend)
        schedule = NoiseSchedule.linear(config.train_timesteps, config.beta_start,
                                        config.beta_end)
        return Plasticine(build_intensity(config), deformation, schedule,
                          clusters=config.clusters, sample_steps=config.sample_steps,
                          clip_denoised=config.clip_denoised)

    def param_groups(self, model: nn.Module, config: PlasticineConfig) -> list[dict[str, Any]]:
        """ε_θ1: Adam 1e-4 with a 10k-step warm-up; f_θ2: 2e-4 with 200 ([Z25] §III-C)."""
        net = unwrap(model)
        return [{"params": list(net.intensity.parameters()), "lr": config.lr_intensity,
                 "warmup_steps": config.warmup_intensity},
                {"params": list(net.deformation.parameters()), "lr": config.lr,
                 "warmup_steps": config.warmup_steps}]

    def dataset(self, config: PlasticineConfig, split: str) -> Dataset:
        """2D slice pairs of ``split`` under random warps, with model-range images and
        structure maps (:class:`PlasticinePairs`)."""
        return PlasticinePairs(self._pairs(config, split), config.clusters, config.data_seed)

    @staticmethod
    def _pairs(config: PlasticineConfig, split: str, length: int | None = None) -> Dataset:
        from mrus_models.data import SlicePairs  # the dataset loads the template lazily

        check_split(split)
        if length is None and split == "train":
            length = config.train_items
        return SlicePairs(config.modality, size=config.image_size, planes=config.planes,
                          split=split, warp=config.warp,
                          max_displacement=config.max_displacement, seed=config.data_seed,
                          length=length)

    def training_step(self, model: nn.Module, batch: dict[str, Any],
                      config: PlasticineConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        """``L_IN + L_DF`` (both batch means); logs ``intensity`` (L_IN) and L_DF's terms."""
        out = model(batch["source"], batch["target"], batch["target_structure"])
        return self._loss(out, batch, config)

    @staticmethod
    def _loss(out, batch, config):
        l_df, logs = deformation_loss(out, batch["source"], batch["target"], config)
        l_in = out["intensity_loss"]
        return l_in + l_df, {"intensity": l_in.detach(), **logs}

    # ------------------------------------------------------------------ evaluation

    def _segmenter(self, config: PlasticineConfig, device: torch.device) -> nn.Module:
        """The traceability segmenter, trained on the train split's target images."""
        from .traceability import train_segmenter

        pairs = self._pairs(config, "train", length=config.segmenter_items)
        items = [pairs[i] for i in range(len(pairs))]
        images = unit_range(to_model_range(torch.stack([it["moving"] for it in items])))
        labels = torch.stack([it["moving_labels"] for it in items])
        with torch.enable_grad():
            return train_segmenter(images, labels, steps=config.segmenter_steps,
                                   seed=config.seed, device=device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader,
                 config: PlasticineConfig, device: torch.device) -> dict[str, float]:
        from .traceability import traceability

        per_item: dict[str, list[torch.Tensor]] = {}

        def add(name: str, value: torch.Tensor) -> None:
            per_item.setdefault(name, []).append(value.detach().double().cpu().reshape(-1))

        net = unwrap(model)
        sets: dict[str, list[torch.Tensor]] = {"translated": [], "target": [], "source": []}
        traced: list[tuple[torch.Tensor, ...]] = []
        for i, batch in enumerate(loader):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            x, y = batch["source"], batch["target"]
            b = x.shape[0]
            # Seeded per batch: the metrics of a checkpoint are reproducible.
            gen = torch.Generator().manual_seed(config.seed * 7919 + i)
            # Training mode pass (y known): the loss terms and the registration metrics.
            out = net(x, y, batch["target_structure"], generator=gen)
            loss, logs = self._loss(out, batch, config)
            for name, value in (("loss", loss), *logs.items()):
                add(name, value.expand(b))
            add("nmi", _nmi(y, out["warped"], config))
            add("nmi_identity", _nmi(y, x, config))
            source_labels, target_labels = batch["fixed_labels"], batch["moving_labels"]
            warped_labels = warp(source_labels.float(), out["ddf"], mode="nearest",
                                 backend=config.backend).round().long()
            for suffix, labels in (("", warped_labels), ("_identity", source_labels)):
                dices = []
                for tissue, value in TISSUES.items():
                    d = dice(labels, target_labels, value)
                    add(f"dice_{tissue}{suffix}", d)
                    dices.append(d)
                add("dice" + suffix, torch.stack(dices).nanmean(0))
            mask, spacing = batch["mask"].bool(), batch["spacing"]
            add("epe_mm", endpoint_error_mm(out["ddf_inverse"], batch["ddf"].float(), mask,
                                            spacing))
            add("epe_mm_identity", endpoint_error_mm(torch.zeros_like(out["ddf"]),
                                                     batch["ddf"].float(), mask, spacing))
            # Inference (x alone): ŷ, φ, φ⁻¹.
            y_hat, ddf, ddf_inv = net.translate(x, generator=gen,
                                                source_structure=batch["source_structure"])
            add("folding_fraction", folding_fraction(ddf, backend=config.backend))
            add("inverse_error_px", inverse_error(ddf, ddf_inv, config.backend)
                .norm(dim=1).flatten(1).mean(1))
            add("folding_fraction_identity", torch.zeros(b))
            add("inverse_error_px_identity", torch.zeros(b))
            sets["translated"].append(unit_range(y_hat).cpu())
            sets["target"].append(unit_range(y).cpu())
            sets["source"].append(unit_range(x).cpu())
            traced.append((ddf_inv.cpu(), source_labels.cpu()))
        metrics = item_means(per_item)
        if not sets["target"]:
            return metrics
        images = {k: torch.cat(v) for k, v in sets.items()}
        for suffix, key in (("", "translated"), ("_identity", "source")):
            metrics["bhattacharyya" + suffix] = bhattacharyya(images[key], images["target"],
                                                              bins=256, value_range=(0.0, 1.0))
        if config.fid and images["target"].shape[0] >= 2:
            metrics.update(_inception_metrics(images, device))
        segmenter = self._segmenter(config, device)
        ddf_inv = torch.cat([t[0] for t in traced])
        source_labels = torch.cat([t[1] for t in traced])
        for suffix, key, field in (("", "translated", ddf_inv),
                                   ("_identity", "source", torch.zeros_like(ddf_inv))):
            scores = traceability(segmenter, images[key].to(device), field.to(device),
                                  source_labels.to(device), backend=config.backend)
            for name, value in scores.items():
                metrics[f"trace_{name}{suffix}"] = float(value)
        return metrics

    # ------------------------------------------------------------------ translate

    @torch.no_grad()
    def translate(self, model: nn.Module, image: torch.Tensor,
                  config: PlasticineConfig) -> dict[str, torch.Tensor]:
        """ŷ, φ and φ⁻¹ of one image (Algorithm 1 / 3), any size: the image is padded at the
        far end of each axis, by edge replication, to a multiple of the networks' stride,
        and the results are cropped back.

        Args:
            model: the trained network.
            image: Tensor [1, 1, H, W], raw intensities (min-max scaled to [-1, 1] here).
            config: ``sample_steps`` (refinement steps) and ``seed`` (seeds the sampler).

        Returns:
            ``"translated"`` ŷ [1, 1, H, W] in [0, 1] (the target domain's intensities,
            min-max normalised as in training), ``"ddf"`` φ and ``"ddf_inverse"`` φ⁻¹
            [1, 2, H, W] in voxel units (``warp(x, ddf)`` = x∘φ).
        """
        net = unwrap(model)
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, 1):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else \
                type(image).__name__
            raise ValueError(f"translate: plasticine translates one 2D image [1, 1, H, W], "
                             f"got {shape}")
        padded, _, crop = pad_to_stride(image, image, net.stride)
        gen = torch.Generator().manual_seed(config.seed)
        y_hat, ddf, ddf_inv = net.translate(to_model_range(padded), steps=config.sample_steps,
                                            generator=gen)
        return {"translated": unit_range(y_hat[crop]).contiguous(),
                "ddf": ddf[crop].contiguous(), "ddf_inverse": ddf_inv[crop].contiguous()}


def _nmi(a: torch.Tensor, b: torch.Tensor, config: PlasticineConfig) -> torch.Tensor:
    """NMI (eq. A.13) per item with the loss's Parzen settings: [B]."""
    from mrus_kernels import nmi

    from .losses import VALUE_RANGE

    return nmi(a.float(), b.float(), bins=config.mi_bins, sigma=config.mi_sigma,
               value_range=VALUE_RANGE, backend=config.backend)


def _inception_metrics(images: dict[str, torch.Tensor], device) -> dict[str, float]:
    """FID and SFD of the translated and the source images against the targets, each set's
    Inception features computed once."""
    from mrus_models.inception import inception_features
    from mrus_models.metrics import fid, sfd

    feats = {k: inception_features(v, data_range=(0.0, 1.0), device=device)
             for k, v in images.items()}
    out = {}
    for suffix, key in (("", "translated"), ("_identity", "source")):
        out["fid" + suffix] = fid(feats["target"], feats[key])
        out["sfd" + suffix] = sfd(feats["target"], feats[key])
    return out
