"""A tiny model for the Trainer's tests: a two-layer regression on synthetic items.

Importable as ``_toy_task`` with tests/models on ``sys.path`` (pytest puts it there; the
subprocess tests set ``PYTHONPATH`` and ``MRUS_EXTRA_MODELS=toy=_toy_task:ToyTask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from mrus_kernels import warp
from mrus_models.train import Task, TrainConfig, arch_field, unwrap

SPLIT_OFFSET = {"train": 0, "val": 10_000, "test": 20_000}


@dataclass
class ToyConfig(TrainConfig):
    """The toy's fields: ``hidden`` and ``ndim`` are architecture fields."""

    features: int = arch_field(5)
    hidden: int = arch_field(8)
    ndim: int = arch_field(2)
    items: int = 40
    noise: float = 0.0
    steps: int = 4
    lr: float = 1e-2
    log_every: int = 1
    checkpoint_every: int = 100
    amp: bool = False


class ToyData(Dataset):
    """Item i: x ~ N(0, 1) [features], y = sin(x · w) + x_0² [1], seeded by (split, i)."""

    def __init__(self, config: ToyConfig, split: str) -> None:
        self.config, self.split = config, split
        self.w = torch.linspace(-1.0, 1.0, config.features)

    def __len__(self) -> int:
        return self.config.items

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(SPLIT_OFFSET[self.split] + i)
        x = torch.randn(self.config.features, generator=g)
        y = torch.sin(x @ self.w)[None] + x[:1] ** 2
        return {"x": x, "y": y, "index": i}


class ToyTask(Task):
    """Regression with a random-noise term in the loss (so the RNG state matters)."""

    name = "toy"
    config_class = ToyConfig

    def build(self, config):
        return nn.Sequential(nn.Linear(config.features, config.hidden), nn.Tanh(),
                             nn.Linear(config.hidden, 1))

    def dataset(self, config, split):
        return ToyData(config, split)

    def training_step(self, model, batch, config):
        pred = model(batch["x"])
        target = batch["y"]
        if config.noise:
            target = target + config.noise * torch.randn_like(target)
        mse = (pred - target).square().mean()
        reg = 1e-3 * sum(p.square().sum() for p in unwrap(model).parameters())
        return mse + reg, {"mse": mse.detach(), "reg": float(reg.detach())}

    def evaluate(self, model, loader, config, device):
        total, n = 0.0, 0
        for batch in loader:
            pred = model(batch["x"].to(device))
            total += float((pred - batch["y"].to(device)).square().sum())
            n += len(pred)
        torch.rand(3)  # validation must leave the training's random stream alone
        return {"mse": total / n, "items": float(n)}

    def predict(self, model, fixed, moving, config):
        # A constant displacement, component i = (i + 1) × the output bias: a known answer
        # for the command-line test.
        bias = float(model[2].bias)
        ndim = fixed.dim() - 2
        ddf = torch.stack([torch.full_like(fixed[:, 0], bias * (i + 1)) for i in range(ndim)], 1)
        return {"ddf": ddf, "warped": warp(moving, ddf)}
