"""Anatomy-aware registration as the Trainer and the ``mrus`` command see it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mrus_kernels import folding_fraction, harmonic_energy, warp
from mrus_models.metrics import average_surface_distance, dice, endpoint_error_mm, iou
from mrus_models.train.task import Task, check_split, item_means, pad_to_stride, unwrap

from .config import AnatomyAwareConfig
from .losses import anatomy_aware_loss
from .model import AnatomyAwareNet

#: Tissue label values of the datasets' label maps (mrus_models.data.LABELS).
TISSUES = {"csf": 1, "gm": 2, "wm": 3}

__all__ = ["TISSUES", "AnatomyAwareTask", "USFixedPairs"]


class USFixedPairs(Dataset):
    """A T1 / simulated-modality pair dataset with the roles swapped: the simulated image
    (US) is fixed, the T1 (MR) moving, as [P25] registers MR to US.

    The datasets of :mod:`mrus_models.data` give ``fixed`` = T1 on the item grid and
    ``moving`` = the simulated image of the anatomy warped by a known b (moving anatomy at
    y = fixed anatomy at y + b(y)), with ``ddf`` = b⁻¹. Swapped, the T1 must be pulled by b
    itself to land on the US, so ``ddf`` here is b: the base dataset draws it from the
    item's warp seed (``_random_warp``, the same call the base item makes, so b is exact;
    inverting ``ddf`` numerically is not an option: the fixed-point inverse does not
    converge for these warps at small crop sizes). ``fixed_labels`` / ``moving_labels``
    swap, ``mask`` is the brain of the new fixed image (its labels > 0). With ``augment``
    the swapped item is flipped and rotated with the draws the base would have made
    (:func:`mrus_models.data.datasets.augment`, which turns the images, labels and b
    together), so a training item is the base's augmented pair, swapped.

    Args:
        base: a :class:`~mrus_models.data.Crops3D` or :class:`~mrus_models.data.SlicePairs`
            built with ``augment=False``.
        augment: flips and rotations after the swap.

    Raises:
        ValueError: the base dataset augments its items itself.
    """

    def __init__(self, base: Dataset, augment: bool = False) -> None:
        if getattr(base, "augment", False):
            raise ValueError("USFixedPairs: base must be built with augment=False (the pair "
                             "is augmented after the swap: pass augment=True here)")
        self.base, self.augment = base, bool(augment)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        from mrus_models.data import datasets as ds

        base = self.base
        item = dict(base[index])
        seeds = base._seeds(int(index))
        spacing = tuple(float(h) for h in item["spacing"])
        b, _ = ds._random_warp(base.warp, tuple(base.size), spacing, base.max_displacement,
                               seeds[0])
        item["fixed"], item["moving"] = item["moving"], item["fixed"]
        item["fixed_labels"], item["moving_labels"] = item["moving_labels"], item["fixed_labels"]
        item["mask"] = item["fixed_labels"] > 0
        item["ddf"] = b[0].float().contiguous()
        if self.augment:
            rng = np.random.default_rng(seeds[2])
            ndim = item["ddf"].shape[0]
            flips = [bool(f) for f in rng.random(ndim) < ds.FLIP_PROBABILITY]
            angles = rng.uniform(-ds.AUGMENT_ROTATION, ds.AUGMENT_ROTATION,
                                 1 if ndim == 2 else 3).tolist()
            item = ds.augment(item, flips=flips, angles=angles)
        return item


def _label_scores(labels: torch.Tensor, reference: torch.Tensor, spacing: torch.Tensor,
                  suffix: str, per_item: dict[str, list[torch.Tensor]]) -> None:
    """Dice, IoU and ASD (mm) per tissue and their means over the tissues ([P25] §IV)."""
    scores: dict[str, list[torch.Tensor]] = {"dice": [], "iou": [], "asd_mm": []}
    for name, value in TISSUES.items():
        values = {"dice": dice(labels, reference, value).double().cpu(),
                  "iou": iou(labels, reference, value).double().cpu(),
                  "asd_mm": average_surface_distance(labels, reference, value,
                                                     spacing).double().cpu()}
        for key, v in values.items():
            scores[key].append(v)
            per_item.setdefault(f"{key}_{name}{suffix}", []).append(v)
    for key, values in scores.items():
        per_item.setdefault(f"{key}{suffix}", []).append(torch.stack(values).nanmean(0))


class AnatomyAwareTask(Task):
    """The anatomy-aware registration network of MR2US-Pro ([P25] §II-C) on the T1 ("MR",
    moving) / pseudo-ultrasound ("US", fixed) pairs of :mod:`mrus_models.data`
    (:class:`USFixedPairs`: 3D crops, or 2D slices with ``ndim=2``), optionally after ACMT
    translation of both images (``translate_checkpoint``).

    Training step: both images normalised to [-1, 1], one diffusion step t per item drawn
    uniformly from [0, num_timesteps) and noise N ~ N(0, I) (torch's global generator,
    seeded by the Trainer), the network's score and field, eq. 19's loss.

    Metrics of :meth:`evaluate` (registration pass: t = 0, no noise; means over items):

    - ``dice``, ``iou``, ``asd_mm``: of the moving (MR) labels warped (nearest) by Φ against
      the fixed (US) labels, means over CSF, GM and WM ([P25] §IV: DSC, IoU, ASD), and per
      tissue (``dice_csf``, ``iou_gm``, ``asd_mm_wm``, ...); with ``_identity`` the same for
      the unwarped labels;
    - ``harmonic_energy``: Σ_i ‖∇²φ_i‖² of the displacement per volume, voxel units
      ([P25] eq. 20, :func:`mrus_kernels.harmonic_energy`); ``folding_fraction``: voxels
      with det(I + ∇u) <= 0; both 0 for the identity (reported as ``_identity`` too);
    - ``epe_mm``: endpoint error against the known warp inside the fixed brain, mm;
      ``epe_mm_identity``: for a zero displacement;
    - ``loss``, ``similarity``, ``smoothness``, ``diffusion``: the training loss and its
      terms at one seeded draw of t and N per batch.
    """

    name = "anatomy_aware"
    config_class = AnatomyAwareConfig

    def __init__(self) -> None:
        self._translator: tuple[str, Any, Any, Any] | None = None

    def build(self, config: AnatomyAwareConfig) -> nn.Module:
        return AnatomyAwareNet(
            config.ndim, encoder=config.encoder, decoder=config.decoder,
            residual=config.residual, norm=config.norm, time_dim=config.time_dim,
            attention_levels=config.attention_levels, heads=config.heads,
            transform=config.transform, steps=config.steps_integration,
            memory=config.integration_memory, init_std=config.flow_init_std,
            num_timesteps=config.num_timesteps, beta_start=config.beta_start,
            beta_end=config.beta_end, backend=config.backend)

    def dataset(self, config: AnatomyAwareConfig, split: str) -> Dataset:
        """The swapped pairs (:class:`USFixedPairs`) of ``split``."""
        from mrus_models.data import Crops3D, SlicePairs  # the datasets load the template lazily

        check_split(split)
        kwargs: dict[str, Any] = {
            "size": config.image_size, "split": split, "seed": config.data_seed,
            "max_displacement": config.max_displacement,
            "augment": False,  # USFixedPairs augments after the swap
            "length": config.train_items if split == "train" else None,
        }
        if config.ndim == 2:
            base: Dataset = SlicePairs(config.modality, planes=config.planes, **kwargs)
        else:
            base = Crops3D(config.modality, **kwargs)
        return USFixedPairs(base, augment=config.augment and split == "train")

    # ------------------------------------------------------------------ translation

    def _acmt(self, config: AnatomyAwareConfig, device: torch.device):
        """(task, network, config) of ``translate_checkpoint``, loaded once per path and
        device."""
        path = config.translate_checkpoint
        key = f"{path}@{device}"
        if self._translator is None or self._translator[0] != key:
            from mrus_models.train.registry import get_task
            from mrus_models.train.trainer import load_checkpoint

            acmt = get_task("acmt")
            try:
                model, acmt_config, _ = load_checkpoint(acmt, path, device)
            except (FileNotFoundError, ValueError) as exc:
                raise ValueError(f"translate_checkpoint: expected an ACMT checkpoint.pt of "
                                 f"`mrus train acmt`, got {path!r}: {exc}") from exc
            self._translator = (key, acmt, model, acmt_config)
        return self._translator[1:]

    @torch.no_grad()
    def translate_images(self, images: torch.Tensor, config: AnatomyAwareConfig
                         ) -> torch.Tensor:
        """The network's inputs from raw images [B, 1, *S]: each volume translated by the
        ACMT checkpoint of ``translate_checkpoint`` (its whole bridge, seeded), or the
        images unchanged when it is empty."""
        if not config.translate_checkpoint:
            return images
        acmt, model, acmt_config = self._acmt(config, images.device)
        return torch.cat([acmt.translate(model, x[None], acmt_config)["translated"]
                          for x in images]).to(images.dtype)

    # ------------------------------------------------------------------ training

    def training_step(self, model: nn.Module, batch: dict[str, Any],
                      config: AnatomyAwareConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        fixed = self.translate_images(batch["fixed"], config)
        moving = self.translate_images(batch["moving"], config)
        b = fixed.shape[0]
        t = torch.randint(0, config.num_timesteps, (b,), device=fixed.device)
        noise = torch.randn(fixed.shape, device=fixed.device)
        out = model(moving, fixed, t, noise)
        return anatomy_aware_loss(out, config)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader,
                 config: AnatomyAwareConfig, device: torch.device) -> dict[str, float]:
        per_item: dict[str, list[torch.Tensor]] = {}

        def add(name: str, value: torch.Tensor) -> None:
            per_item.setdefault(name, []).append(value.detach().double().cpu())

        net = unwrap(model)
        gen = torch.Generator(device).manual_seed(config.seed)
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            fixed = self.translate_images(batch["fixed"], config)
            moving = self.translate_images(batch["moving"], config)
            b = fixed.shape[0]
            # The loss at one seeded draw, so that two evaluations agree.
            t = torch.randint(0, config.num_timesteps, (b,), device=device, generator=gen)
            noise = torch.randn(fixed.shape, device=device, generator=gen)
            loss, logs = anatomy_aware_loss(net(moving, fixed, t, noise), config)
            for name, value in (("loss", loss), *logs.items()):
                add(name, value.expand(b))
            ddf = net(moving, fixed)["ddf"]
            truth, mask, spacing = batch["ddf"], batch["mask"].bool(), batch["spacing"]
            add("epe_mm", endpoint_error_mm(ddf, truth, mask, spacing))
            add("epe_mm_identity", endpoint_error_mm(torch.zeros_like(ddf), truth, mask, spacing))
            moving_labels, fixed_labels = batch["moving_labels"], batch["fixed_labels"]
            warped_labels = warp(moving_labels.float(), ddf, mode="nearest",
                                 backend=config.backend).round().long()
            _label_scores(warped_labels, fixed_labels, spacing, "", per_item)
            _label_scores(moving_labels, fixed_labels, spacing, "_identity", per_item)
            add("harmonic_energy", harmonic_energy(ddf, reduction="none", backend=config.backend))
            add("harmonic_energy_identity", torch.zeros(b))
            add("folding_fraction", folding_fraction(ddf, backend=config.backend))
            add("folding_fraction_identity", torch.zeros(b))
        return item_means(per_item)

    @torch.no_grad()
    def predict(self, model: nn.Module, fixed: torch.Tensor, moving: torch.Tensor,
                config: AnatomyAwareConfig) -> dict[str, torch.Tensor]:
        """Registers ``moving`` (MR) to ``fixed`` (US), both [B, 1, *S] on one grid, any size.

        Φ is estimated from the translated images (``translate_checkpoint``; the raw ones
        when empty), padded at the far end of each axis by edge replication to a multiple
        of the network's stride and cropped back, and applied to the ORIGINAL moving image
        ([P25] §II-C.1: "estimated from the translated images but applied to the original,
        unaltered inputs").

        Returns:
            ``"ddf"`` [B, ndim, *S] (voxel units, ``warp(moving, ddf) ≈ fixed``),
            ``"velocity"`` [B, ndim, *S] (the SVF, or the displacement with
            ``transform="displacement"``) and ``"warped"`` [B, 1, *S], the raw moving
            intensities resampled.
        """
        net = unwrap(model)
        ndim = config.ndim
        if not isinstance(fixed, torch.Tensor) or not isinstance(moving, torch.Tensor):
            raise TypeError(f"predict: fixed and moving must be torch.Tensors, got "
                            f"{type(fixed).__name__} and {type(moving).__name__}")
        if fixed.dim() != ndim + 2 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(
                f"predict: fixed and moving must both be [B, 1, *S] ({ndim}D) on the same grid, "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        fixed_in = self.translate_images(fixed.float(), config)
        moving_in = self.translate_images(moving.float(), config)
        fixed_p, moving_p, crop = pad_to_stride(fixed_in, moving_in, net.stride)
        out = net(moving_p, fixed_p)
        ddf = out["ddf"][crop].contiguous()
        velocity = out["velocity"][crop].contiguous()
        warped = warp(moving.float(), ddf, backend=config.backend)
        return {"ddf": ddf, "velocity": velocity, "warped": warped}
