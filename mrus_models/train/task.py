"""What the Trainer calls: one :class:`Task` subclass per model.

The Trainer knows no model; a task knows no Trainer internals. Data flows one way:
``dataset`` → ``training_step`` → losses (``mrus_kernels``) → Trainer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig

__all__ = ["Task", "check_split", "item_means", "pad_to_stride", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or ``torch.compile``) wrapper.

    :meth:`Task.training_step` receives the wrapper under ``torchrun`` (calling it is what
    synchronises the gradients); read the network's attributes through ``unwrap(model)``.
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def check_split(split: str) -> None:
    """Raises ValueError unless ``split`` is "train", "val" or "test"."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")


def pad_to_stride(fixed: torch.Tensor, moving: torch.Tensor, stride: int
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]]:
    """Pads two images [B, C, *S] at the far end of each axis, by edge replication, to a
    multiple of ``stride`` (as float32).

    Returns:
        the padded fixed and moving images and the index that crops a padded field
        [B, C', *S_padded] back to [B, C', *S].
    """
    size = fixed.shape[2:]
    pad = []
    for s in reversed(size):  # F.pad lists the last axis first
        pad += [0, (-s) % stride]
    fixed_p, moving_p = fixed.float(), moving.float()
    if any(pad):
        fixed_p = F.pad(fixed_p, pad, mode="replicate")
        moving_p = F.pad(moving_p, pad, mode="replicate")
    crop = (slice(None), slice(None), *(slice(0, s) for s in size))
    return fixed_p, moving_p, crop


def item_means(per_item: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The mean of each metric's per-item values, NaN items left out (an item where the
    metric is undefined); NaN where no item has a value."""
    metrics = {}
    for name, values in per_item.items():
        v = torch.cat(values).double() if values else torch.empty(0, dtype=torch.float64)
        v = v[~v.isnan()]
        metrics[name] = float(v.mean()) if v.numel() else float("nan")
    return metrics


class Task:
    """A model as the Trainer and the ``mrus`` command see it.

    Subclasses set :attr:`name` (the registry's name) and :attr:`config_class`, and
    implement the five methods. Batches are dicts of tensors, collated by torch's default
    ``collate_fn`` from the items of :meth:`dataset` and moved to the device by the Trainer.

    Attributes:
        name: the model's name on the command line (``mrus train NAME``).
        config_class: the model's :class:`TrainConfig` subclass (its defaults are the paper's).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TrainConfig]] = TrainConfig

    def default_config(self) -> TrainConfig:
        """The model's configuration with its defaults."""
        return self.config_class()

    def build(self, config: TrainConfig) -> nn.Module:
        """The network, freshly initialised from torch's global RNG (seeded by the Trainer)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (default: one group, all of ``model``).

        A model whose parts train at different rates (e.g. two networks with their own
        learning rates and warm-ups) returns several: each a dict with ``"params"`` and
        optionally ``"lr"`` (peak learning rate) and ``"warmup_steps"``; missing keys take
        the configuration's values. Together the groups must list every parameter once.
        The schedule's shape after warm-up (``config.scheduler``) is common to all groups.
        """
        return [{"params": list(model.parameters())}]

    def dataset(self, config: TrainConfig, split: str) -> torch.utils.data.Dataset:
        """The map-style dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``).

        Items must be deterministic by index (the Trainer's resume and its multi-process
        data order rely on it) and splits must not overlap.
        """
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict[str, Any],
                      config: TrainConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one batch, and scalars to log.

        Args:
            model: the module to call: under ``torchrun`` the ``DistributedDataParallel``
                wrapper (see :func:`unwrap` for the network's attributes).
            batch: the collated items, on the training device.
            config: the run's configuration.

        Returns:
            (loss, logs): ``loss`` a 0-d tensor, **the mean over the batch's items** (so
            that N processes with batch B train like one with batch N × B); ``logs`` maps
            names to floats or 0-d tensors (e.g. the loss's terms), averaged over
            ``log_every`` steps and over processes in ``log.jsonl``.
        """
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader,
                 config: TrainConfig, device: torch.device) -> dict[str, float]:
        """Metrics over ``loader``'s batches (on the CPU; move them to ``device``).

        Called in ``eval`` mode under ``torch.no_grad`` with the bare network. Registration
        models report at least ``epe_mm`` (mean endpoint error inside the brain),
        ``epe_mm_identity`` (the same for a zero displacement), ``dice_wm``, ``dice_gm``
        and ``folding_fraction``.
        """
        raise NotImplementedError

    def predict(self, model: nn.Module, fixed: torch.Tensor, moving: torch.Tensor,
                config: TrainConfig) -> dict[str, torch.Tensor]:
        """Registers ``moving`` to ``fixed``: both Tensor [B, 1, *S] on the model's device,
        on the same grid, raw intensities (the task normalises them as in training).

        Returns:
            at least ``"ddf"``: Tensor [B, ndim, *S], voxel units, ``warp(moving, ddf) ~
            fixed``; and ``"warped"``: Tensor [B, 1, *S], the warped moving image.
        """
        raise NotImplementedError

    def translate(self, model: nn.Module, image: torch.Tensor,
                  config: TrainConfig) -> dict[str, torch.Tensor]:
        """Translates one image into the model's target domain (``mrus translate``).

        Args:
            model: the trained network (in ``eval`` mode, called under ``torch.no_grad``).
            image: Tensor [1, 1, *S] on the model's device, raw intensities (the task
                normalises them as in training).
            config: the run's configuration.

        Returns:
            at least ``"translated"``: Tensor [1, 1, *S]; a model that also deforms adds
            ``"ddf"`` (φ: Tensor [1, ndim, *S], voxel units, ``warp(x, ddf)`` = x∘φ) and
            ``"ddf_inverse"`` (φ⁻¹, same layout).

        Raises:
            NotImplementedError: the model does not translate (the message names it).
        """
        raise NotImplementedError(f"model {self.name!r} does not translate images (no "
                                  "Task.translate); `mrus translate` needs a translation "
                                  "model")
