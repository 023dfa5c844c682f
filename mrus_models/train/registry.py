"""Model names → their :class:`~mrus_models.train.task.Task`, imported on first use.

Each model adds one line to :data:`MODELS`. Tasks outside the package (tests, plug-ins)
register with :func:`register_task` in-process, or, for processes started by ``torchrun``
or a subprocess, through the environment variable ``MRUS_EXTRA_MODELS``:
``name=module:Class`` entries separated by commas (the module must be importable there).
"""

from __future__ import annotations

import importlib
import os

from .task import Task

__all__ = ["MODELS", "available", "get_task", "register_task"]

#: Model name -> "module:Class" of its Task (lazy: nothing is imported until asked for).
MODELS: dict[str, str] = {
    "acmt": "mrus_models.acmt.task:ACMTTask",
    "anatomy_aware": "mrus_models.anatomy_aware.task:AnatomyAwareTask",
    "innreg": "mrus_models.innreg.task:InnRegTask",
    "plasticine": "mrus_models.plasticine.task:PlasticineTask",
    "voxelmorph": "mrus_models.voxelmorph.task:VoxelMorphTask",
}

ENV_VAR = "MRUS_EXTRA_MODELS"


def register_task(name: str, target: str) -> None:
    """Adds (or replaces) a model: ``target`` is ``"module:Class"`` of a :class:`Task`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task: name must be a non-empty string, got {name!r}")
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"register_task: target must be 'module:Class', got {target!r}")
    MODELS[name] = target


def _from_env() -> dict[str, str]:
    out = {}
    for entry in filter(None, (e.strip() for e in os.environ.get(ENV_VAR, "").split(","))):
        name, sep, target = entry.partition("=")
        if not sep or target.count(":") != 1:
            raise ValueError(f"{ENV_VAR}: expected name=module:Class entries, got {entry!r}")
        out[name.strip()] = target.strip()
    return out


def available() -> list[str]:
    """The registered model names, sorted."""
    return sorted({**MODELS, **_from_env()})


def get_task(name: str) -> Task:
    """A new instance of the Task registered as ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a registered
            task that cannot be imported.
        TypeError: the registered class is no :class:`Task`.
    """
    table = {**MODELS, **_from_env()}
    if name not in table:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(table))}")
    module_name, _, class_name = table[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {name!r} ({table[name]}) cannot be imported: {exc}") from exc
    task = cls()
    if not isinstance(task, Task):
        raise TypeError(f"model {name!r}: {table[name]} is not a mrus_models.train.Task")
    # The registered name is the model's identity (checkpoints record it), also for a
    # class registered under a second name.
    task.name = name
    return task
