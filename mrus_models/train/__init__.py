"""One Trainer for every model: configuration, the Task interface, the model registry.

``mrus train MODEL ...`` (or ``torchrun --nproc_per_node N -m mrus_models.train MODEL ...``)
builds the model's :class:`Task` from :mod:`.registry`, its :class:`TrainConfig` from the
defaults and ``--set key=value`` overrides, and runs the :class:`Trainer`.
"""

from .config import TrainConfig, apply_overrides, arch_field, architecture_diff
from .registry import MODELS, available, get_task, register_task
from .task import Task, unwrap

__all__ = [
    "MODELS",
    "Task",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "arch_field",
    "architecture_diff",
    "available",
    "get_task",
    "register_task",
    "unwrap",
]


def __getattr__(name):
    # The Trainer pulls in tqdm and torch.distributed: imported when first asked for.
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
