"""The MR2US-Pro pipeline ([P25] §II, Fig. 1): ACMT translation of both volumes, anatomy-aware
registration of the translated pair, and the ORIGINAL MR warped by the field found.

``mrus mr2us --acmt CKPT --registration CKPT FIXED_US MOVING_MR -o OUT`` is
:func:`load_pipeline` + :func:`mr2us` on two volumes on one grid (the command resamples the
moving MR onto the US grid through the affines first, as ``mrus register`` does).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mrus_kernels import warp
from mrus_models.train.task import pad_to_stride, unwrap

__all__ = ["MR2USPipeline", "load_pipeline", "mr2us"]

#: The stages of :func:`mr2us`, in order (the progress bar's steps).
STAGES = ("translate US", "translate MR", "register", "warp MR")


@dataclass
class MR2USPipeline:
    """The two trained networks of the pipeline and their configurations.

    Attributes:
        acmt_task, acmt_model, acmt_config: the ACMT translator (``mrus train acmt``).
        registration_task, registration_model, registration_config: the anatomy-aware
            registration network (``mrus train anatomy_aware``); its ``translate_checkpoint``
            is cleared here: the pipeline translates with ``acmt_model`` itself.
        registration_translate: the ``translate_checkpoint`` the registration network was
            trained with ("" when it was trained on raw images).
    """

    acmt_task: Any
    acmt_model: nn.Module
    acmt_config: Any
    registration_task: Any
    registration_model: nn.Module
    registration_config: Any
    registration_translate: str = ""


def _load(kind: str, flag: str, path: str | os.PathLike, device: torch.device):
    """(task, model, config) of the ``kind`` checkpoint given to ``flag``; ValueError naming
    the flag, what it expects and what it got."""
    from mrus_models.train.registry import get_task
    from mrus_models.train.trainer import load_checkpoint

    task = get_task(kind)
    what = f"a checkpoint.pt of `mrus train {kind}`"
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: expected {what}, got {os.fspath(path)!r}: no such file")
    try:
        model, config, _ = load_checkpoint(task, path, device)
    except ValueError as exc:
        raise ValueError(f"{flag}: expected {what}, got {os.fspath(path)!r}: {exc}") from None
    if getattr(config, "ndim", 3) != 3:
        raise ValueError(f"{flag}: expected {what} for 3D volumes, got {os.fspath(path)!r} "
                         f"trained on {config.ndim}D images")
    return task, model, config


def load_pipeline(acmt: str | os.PathLike, registration: str | os.PathLike,
                  device: torch.device | str = "cpu") -> MR2USPipeline:
    """Loads the ACMT and the anatomy-aware checkpoints.

    Args:
        acmt: checkpoint.pt of ``mrus train acmt`` (``--acmt``).
        registration: checkpoint.pt of ``mrus train anatomy_aware`` (``--registration``).
        device: where both networks go.

    Raises:
        ValueError: a missing file, a file that is no checkpoint, a checkpoint of another
            model (e.g. the two swapped) or one of 2D images; the message names the flag.
    """
    device = torch.device(device)
    a_task, a_model, a_config = _load("acmt", "--acmt", acmt, device)
    r_task, r_model, r_config = _load("anatomy_aware", "--registration", registration, device)
    trained_with = r_config.translate_checkpoint
    r_config = dataclasses.replace(r_config, translate_checkpoint="")
    return MR2USPipeline(a_task, a_model, a_config, r_task, r_model, r_config, trained_with)


@torch.no_grad()
def mr2us(pipeline: MR2USPipeline, fixed_us: torch.Tensor, moving_mr: torch.Tensor,
          progress: bool = True) -> dict[str, torch.Tensor]:
    """Registers an MR volume to a US volume on the same grid ([P25] §II).

    Both volumes are translated by ACMT into the intermediate modality; the anatomy-aware
    network estimates Φ from the translated pair (padded at the far end of each axis by edge
    replication to a multiple of its stride, the field cropped back); the original,
    untranslated MR is warped by Φ ([P25] §II-C.1).

    Args:
        pipeline: :func:`load_pipeline`'s networks.
        fixed_us: the US volume [1, 1, X, Y, Z].
        moving_mr: the MR volume [1, 1, X, Y, Z] on the same grid.
        progress: a tqdm bar over :data:`STAGES`.

    Returns:
        ``"ddf"`` [1, 3, X, Y, Z] (voxel units, ``warp(moving_mr, ddf) ≈ fixed_us``),
        ``"warped"`` [1, 1, X, Y, Z] (the original MR resampled), ``"fixed_translated"``,
        ``"moving_translated"`` [1, 1, X, Y, Z] (ACMT's outputs, the network's inputs).

    Raises:
        TypeError: not tensors.
        ValueError: not two single volumes [1, 1, X, Y, Z] of one shape.
    """
    from tqdm.auto import tqdm

    for name, x in (("fixed_us", fixed_us), ("moving_mr", moving_mr)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mr2us: {name} must be a torch.Tensor, got {type(x).__name__}")
    if fixed_us.dim() != 5 or fixed_us.shape[:2] != (1, 1) or fixed_us.shape != moving_mr.shape:
        raise ValueError(f"mr2us: fixed_us and moving_mr must be single volumes [1, 1, X, Y, Z] "
                         f"on one grid, got {tuple(fixed_us.shape)} and "
                         f"{tuple(moving_mr.shape)}")
    p = pipeline
    config = p.registration_config
    bar = tqdm(total=len(STAGES), desc="mr2us", unit="stage", disable=not progress)
    try:
        bar.set_postfix_str(STAGES[0])
        fixed_t = p.acmt_task.translate(p.acmt_model, fixed_us.float(), p.acmt_config)[
            "translated"]
        bar.update()
        bar.set_postfix_str(STAGES[1])
        moving_t = p.acmt_task.translate(p.acmt_model, moving_mr.float(), p.acmt_config)[
            "translated"]
        bar.update()
        bar.set_postfix_str(STAGES[2])
        net = unwrap(p.registration_model)
        fixed_p, moving_p, crop = pad_to_stride(fixed_t, moving_t, net.stride)
        ddf = net(moving_p, fixed_p)["ddf"][crop].float().contiguous()
        bar.update()
        bar.set_postfix_str(STAGES[3])
        warped = warp(moving_mr.float(), ddf, backend=config.backend)
        bar.update()
    finally:
        bar.close()
    return {"ddf": ddf, "warped": warped, "fixed_translated": fixed_t,
            "moving_translated": moving_t}
