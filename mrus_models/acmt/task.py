"""ACMT as the Trainer and the ``mrus`` command see it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mrus_kernels import warp
from mrus_models.metrics import dice
from mrus_models.train.task import Task, check_split, item_means, pad_to_stride, unwrap

from .bridge import draw_index, sample, time_pool
from .config import ACMTConfig
from .model import ACMT, acmt_loss, normalise_intensity

#: Tissue label values of the datasets' label maps (mrus_models.data.LABELS).
TISSUES = {"csf": 1, "gm": 2, "wm": 3}

__all__ = ["TISSUES", "ACMTTask", "translate_volume"]


def translate_volume(model: nn.Module, x: torch.Tensor, config: ACMTConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Translates normalised volumes [B, 1, *S] (sizes divisible by the network's stride)
    into the intermediate modality by the whole bridge (:func:`~mrus_models.acmt.bridge.sample`,
    UNSB's inference: the last x̂_1)."""
    net = unwrap(model).net
    return sample(net, x, config.sigma, times=time_pool(config.num_timesteps),
                  generator=generator)


def _slices(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` slices [n·B, 1, X, Y] of volumes [B, 1, X, Y, Z], evenly spaced along Z (the
    axial planes of the template's crops; the ultrasound probe sits on the superior face)."""
    z = x.shape[-1]
    index = torch.linspace(0, z - 1, min(n, z)).round().long().unique().to(x.device)
    return x.index_select(-1, index).permute(0, 4, 1, 2, 3).flatten(0, 1)


def _register_labels(fixed: torch.Tensor, moving: torch.Tensor, moving_labels: torch.Tensor,
                     config: ACMTConfig, fixed_mask: torch.Tensor | None) -> torch.Tensor:
    """Registers ``moving`` to ``fixed`` with :func:`mrus_models.register` (MI, SVF; the
    similarity inside ``fixed_mask``) and warps ``moving_labels`` (nearest) with the
    displacement found."""
    from mrus_models.register import register

    iterations = config.register_iterations
    if len(iterations) == 1:
        iterations = iterations * len(config.register_levels)
    # evaluate runs under no_grad; the registration optimises by autograd.
    with torch.enable_grad():
        result = register(fixed, moving, similarity="mi", transform="svf",
                          levels=config.register_levels, iterations=iterations,
                          smoothness=config.register_smoothness, fixed_mask=fixed_mask,
                          backend=config.backend, progress=False)
    return warp(moving_labels.float(), result.ddf, mode="nearest",
                backend=config.backend).round().long()


def _label_scores(labels: torch.Tensor, reference: torch.Tensor, spacing: torch.Tensor,
                  suffix: str, per_item: dict[str, list[torch.Tensor]]) -> None:
    """Dice, IoU and ASD (mm) of each tissue and their means over the three tissues."""
    from mrus_models.metrics import average_surface_distance, iou

    scores: dict[str, list[torch.Tensor]] = {"dice": [], "iou": [], "asd_mm": []}
    for name, value in TISSUES.items():
        d = dice(labels, reference, value).double().cpu()
        scores["dice"].append(d)
        scores["iou"].append(iou(labels, reference, value).double().cpu())
        scores["asd_mm"].append(
            average_surface_distance(labels, reference, value, spacing).double().cpu())
        per_item[f"dice_{name}{suffix}"].append(d)
    for key, values in scores.items():
        per_item[f"{key}{suffix}"].append(torch.stack(values).nanmean(0))


def _paired_ncc(mr: torch.Tensor, us: torch.Tensor, ddf: torch.Tensor, fan: torch.Tensor,
                backend: str | None) -> torch.Tensor:
    """Normalised cross-correlation, one per item, of MR volumes [B, 1, *S] against the US
    volumes [B, 1, *S] brought onto the MR frame by the dataset's known displacement ``ddf``
    [B, 3, *S] (voxels; ``fixed ≈ moving ∘ (id + ddf)``), over the voxels of the US fan
    ``fan`` [B, 1, *S] (bool, on the US frame) moved the same way: a paired measure of the
    MR↔US gap, far less noisy than FID on a few small crops."""
    aligned = warp(us.float(), ddf.float(), backend=backend)
    inside = warp(fan.float(), ddf.float(), backend=backend) > 0.5
    out = []
    for i in range(mr.shape[0]):
        m = inside[i]
        a = mr[i].float()[m].double()
        b = aligned[i][m].double()
        a = a - a.mean()
        b = b - b.mean()
        out.append((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
    return torch.stack(out).cpu()


def _gap(a: torch.Tensor, b: torch.Tensor, config: ACMTConfig,
         device: torch.device) -> dict[str, float]:
    """FID and KID between two sets of 2D slices [N, 1, H, W] in [-1, 1] (Inception pool3
    features of :func:`mrus_models.inception.inception_features`)."""
    from mrus_models.metrics import fid, kid

    fa = _features(a, device)
    fb = _features(b, device)
    k_mean, k_std = kid(fa, fb, subsets=config.kid_subsets,
                        subset_size=config.kid_subset_size, seed=config.seed)
    return {"fid": float(fid(fa, fb)), "kid": float(k_mean), "kid_std": float(k_std)}


def _features(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from mrus_models.inception import inception_features

    return inception_features(images, data_range=(-1.0, 1.0), device=device)


class ACMTTask(Task):
    """ACMT on the T1 ("MR") / pseudo-ultrasound ("US") crops of :mod:`mrus_models.data`.

    Training step ([M25] §II-C, [P25] Algorithm 1): both volumes of the pair are
    normalised to [-1, 1] (:func:`~mrus_models.acmt.model.normalise_intensity`), one pool
    index i is drawn for the step, x_{t_i} is diffused from each volume with the network in
    evaluation mode and without gradients (:func:`~mrus_models.acmt.bridge.diffuse`), then
    the network predicts x̂_1 from x_{t_i} in training mode and eq. 14's loss is taken.

    Metrics of :meth:`evaluate` (the first ``eval_items`` crops of the loader; each volume
    translated by the whole bridge with a generator seeded by ``seed`` and the item's
    position, so two evaluations agree):

    - ``fid``, ``kid`` (``kid_std`` over the subsets): FID / KID between ``fid_slices``
      axial slices per crop of translated MR and translated US ([M25] Table I);
      ``fid_original``, ``kid_original``: the same between the untranslated MR and US
      slices (the gap the translation must narrow);
    - ``ncc_mr_us``: normalised cross-correlation of translated MR with translated US
      brought onto the MR frame by the dataset's known displacement, inside the US fan
      (mean over crops); ``ncc_mr_us_original`` the same for the untranslated pair: a paired measure
      of the gap that needs no Inception statistics;
    - the downstream test ([M25] Table II): translated MR registered to translated US
      (:func:`mrus_models.register`, MI, SVF, the similarity inside the US fan), the MR
      labels warped (nearest) and scored against the US labels: ``dice``, ``iou``,
      ``asd_mm`` (means over CSF, GM and WM) and ``dice_csf``, ``dice_gm``, ``dice_wm``;
      with ``_original`` the same for registering the untranslated (normalised) pair, with
      ``_identity`` for the unregistered labels.
    """

    name = "acmt"
    config_class = ACMTConfig

    def build(self, config: ACMTConfig) -> nn.Module:
        return ACMT(widths=config.widths, time_dim=config.time_dim,
                    shallow_level=config.shallow_level, deep_level=config.deep_level,
                    energy_widths=config.energy_widths,
                    energy_time_dim=config.energy_time_dim)

    def dataset(self, config: ACMTConfig, split: str) -> torch.utils.data.Dataset:
        """3D crops of ``split``: T1 as "MR" (``fixed``), the simulated modality as "US"
        (``moving``); training crops flipped and rotated when ``augment``."""
        from mrus_models.data import Crops3D  # the dataset loads the template lazily

        check_split(split)
        return Crops3D(config.modality, size=config.image_size, split=split,
                       seed=config.data_seed, max_displacement=config.max_displacement,
                       augment=config.augment and split == "train",
                       length=config.train_items if split == "train" else None)

    def training_step(self, model: nn.Module, batch: dict[str, Any],
                      config: ACMTConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        mr = normalise_intensity(batch["fixed"])
        us = normalise_intensity(batch["moving"])
        index = draw_index(config.num_timesteps)
        return acmt_loss(model, mr, us, index, config)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader,
                 config: ACMTConfig, device: torch.device) -> dict[str, float]:
        model = unwrap(model)
        per_item: dict[str, list[torch.Tensor]] = {}
        for suffix in ("", "_original", "_identity"):
            for key in ("dice", "iou", "asd_mm", *(f"dice_{t}" for t in TISSUES)):
                per_item[key + suffix] = []
        per_item["ncc_mr_us"] = []
        per_item["ncc_mr_us_original"] = []
        slices: dict[str, list[torch.Tensor]] = {"mr": [], "us": [], "mr_t": [], "us_t": []}
        seen = 0
        for batch in loader:
            if config.eval_items is not None and seen >= config.eval_items:
                break
            if config.eval_items is not None:
                batch = {k: v[: config.eval_items - seen] if isinstance(v, torch.Tensor)
                         else v for k, v in batch.items()}
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            mr = normalise_intensity(batch["fixed"])
            us = normalise_intensity(batch["moving"])
            b = mr.shape[0]
            gen = torch.Generator(device).manual_seed(config.seed * 100003 + seen)
            mr_t = translate_volume(model, mr, config, gen)
            us_t = translate_volume(model, us, config, gen)
            seen += b
            for key, x in (("mr", mr), ("us", us), ("mr_t", mr_t), ("us_t", us_t)):
                slices[key].append(_slices(x.clamp(-1, 1), config.fid_slices).cpu())
            # [M25] Table II registers MR to US: the MR labels ("fixed_labels" of the pair)
            # are warped onto the US frame and scored against the US labels.
            mr_labels, us_labels = batch["fixed_labels"], batch["moving_labels"]
            spacing = batch["spacing"]
            # The ultrasound fan (where the raw US has signal) bounds both registrations'
            # similarity: outside it the US volume holds no anatomy.
            fan = (batch["moving"] > 0).float() if config.register_fan_mask else None
            inside = batch["moving"] > 0
            for key, (a, c) in (("ncc_mr_us", (mr_t, us_t)), ("ncc_mr_us_original", (mr, us))):
                per_item[key].append(_paired_ncc(a, c, batch["ddf"], inside, config.backend))
            for i in range(b):
                one = slice(i, i + 1)
                mask = None if fan is None else fan[one]
                _label_scores(_register_labels(us_t[one], mr_t[one], mr_labels[one], config,
                                               mask), us_labels[one], spacing[one], "",
                              per_item)
                _label_scores(_register_labels(us[one], mr[one], mr_labels[one], config,
                                               mask), us_labels[one], spacing[one],
                              "_original", per_item)
                _label_scores(mr_labels[one], us_labels[one], spacing[one], "_identity",
                              per_item)
        metrics = item_means(per_item)
        if seen:
            gap = _gap(torch.cat(slices["mr_t"]), torch.cat(slices["us_t"]), config, device)
            gap0 = _gap(torch.cat(slices["mr"]), torch.cat(slices["us"]), config, device)
            metrics.update(gap)
            metrics.update({f"{k}_original": v for k, v in gap0.items()})
        return metrics

    @torch.no_grad()
    def translate(self, model: nn.Module, image: torch.Tensor,
                  config: ACMTConfig) -> dict[str, torch.Tensor]:
        """Translates one MR or US volume [1, 1, X, Y, Z] (any size: padded at the far end of
        each axis, by edge replication, to a multiple of the network's stride and cropped
        back) into the intermediate modality.

        The volume is normalised as in training (:func:`~mrus_models.acmt.model.
        normalise_intensity`: [-1, 1]) and run through the whole bridge with a generator
        seeded by ``config.seed`` (the same input gives the same output).

        Returns:
            ``"translated"``: Tensor [1, 1, X, Y, Z] in the network's range (about [-1, 1]).
        """
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"translate: image must be a torch.Tensor, got "
                            f"{type(image).__name__}")
        if image.dim() != 5 or image.shape[:2] != (1, 1):
            raise ValueError(f"translate: image must be one volume [1, 1, X, Y, Z], got "
                             f"{tuple(image.shape)}")
        net = unwrap(model)
        x, _, crop = pad_to_stride(image, image, net.net.stride)
        gen = torch.Generator(image.device).manual_seed(config.seed)
        out = translate_volume(net, normalise_intensity(x), config, gen)
        return {"translated": out[crop].contiguous()}
