"""One Trainer for every model: optimiser, schedule, bf16 autocast on CUDA, clipping,
checkpoint and bit-for-bit resume, a JSON-lines log, validation, and DDP under ``torchrun``.

Files in the run directory (written by rank 0 only):

- ``config.json``: the configuration (:meth:`TrainConfig.to_json`).
- ``checkpoint.pt``: ``{"model": name, "config": dict, "state_dict", "optimizer",
  "scheduler", "rng": {...}, "step", "elapsed", "world_size", "fingerprints" (one SHA-256
  of the parameters per rank), "torch_version"}``, written
  atomically (a temporary file renamed over the old one) every ``checkpoint_every`` steps
  and at the end; it loads with ``torch.load(..., weights_only=True)``.
- ``log.jsonl``: one JSON object per line: ``{"split": "train", "step", "loss", <the task's
  logs>, "lr", "grad_norm" (with clipping), "time"}`` every ``log_every`` steps (averaged
  over those steps and over processes) and ``{"split": "val", "step", <metrics>, "time"}``
  after each validation. ``time`` is the run's wall time in seconds, resumes included.

Data order: a :class:`~torch.utils.data.DistributedSampler` (shuffle, ``drop_last``,
seed = ``config.seed``, epoch by epoch) in every run, one process or N. Epoch ``e`` is one
permutation of the train split; with N processes, step ``k`` of rank ``r`` takes the
permutation's items ``r, r + N, r + 2N, ...`` of the block ``[k N B, (k + 1) N B)``, which is
exactly the batch of step ``k`` of one process with batch N × B. Since the task's loss is the
batch mean and DDP averages gradients over processes, N processes with batch B train like
one with batch N × B (up to float rounding). The position in the data follows from the step,
so resuming needs no saved iterator: the sampler skips the epoch's consumed items.

Resume continues bit-for-bit on the CPU (same world size and batch size): the network,
optimiser and scheduler states, torch / CUDA / NumPy / Python RNG states of every rank, and
the step come back; validation runs with the RNGs saved and restored around it, so it never
changes the training's random stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .config import TrainConfig, apply_overrides, architecture_diff
from .task import Task

__all__ = ["RUN_FILES", "Trainer", "load_checkpoint", "lr_factor", "saved_config"]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
LOG = "log.jsonl"
#: The files that make a directory a run directory.
RUN_FILES = (CHECKPOINT, CONFIG, LOG)


# --------------------------------------------------------------------------- RNG state


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG's state as tensors, lists and ints (``weights_only``-loadable); of CUDA only
    the training device's generator (asking for all would open a context on every GPU)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": [py_version, list(py_internal), py_gauss],
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and run."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _preserved_rng(device: torch.device):
    """Runs the block and puts every RNG back as it was (validation must not move them)."""
    state = _rng_state(device)
    try:
        yield
    finally:
        _set_rng_state(state, device)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; NumPy and Python follow it so
    # that a dataset using them is as reproducible as one using torch.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- data


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch (``start`` items of
    this rank's share are skipped), so that a resumed run sees the data an uninterrupted one
    would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------- schedule


def lr_factor(config: TrainConfig, step: int, warmup_steps: int | None = None) -> float:
    """The learning rate of optimiser step ``step`` (0-based) as a fraction of the peak.

    Linear warm-up over ``warmup_steps`` steps (default ``config.warmup_steps``; a parameter
    group may have its own, see :meth:`Task.param_groups`), then ``constant``, ``linear`` or
    ``cosine`` decay to ``min_lr_ratio`` at ``config.steps``.
    """
    warmup = config.warmup_steps if warmup_steps is None else int(warmup_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.scheduler == "constant":
        return 1.0
    span = max(1, config.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    lo = config.min_lr_ratio
    if config.scheduler == "linear":
        return 1.0 - (1.0 - lo) * progress
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _group_specs(task: Task, net: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The task's parameter groups, each completed with its peak ``lr`` and
    ``warmup_steps`` (the configuration's where the task names none); checked to cover every
    parameter of ``net`` exactly once."""
    groups = [dict(g) for g in task.param_groups(net, config)]
    seen: set[int] = set()
    for i, g in enumerate(groups):
        g["params"] = list(g["params"])
        g.setdefault("lr", config.lr)
        g.setdefault("warmup_steps", config.warmup_steps)
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"{task.name}: param_groups lists a parameter twice (group {i})")
            seen.add(id(p))
    missing = sum(1 for p in net.parameters() if id(p) not in seen)
    if missing:
        raise ValueError(f"{task.name}: param_groups leaves {missing} parameter tensors out")
    return groups


def _optimizer(groups: list[dict[str, Any]], config: TrainConfig,
               device: torch.device) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer]
    # The fused CUDA kernel updates all parameters in a few launches; the CPU keeps the
    # default (foreach) path.
    fused = True if device.type == "cuda" else None
    return cls([{"params": g["params"], "lr": g["lr"]} for g in groups], lr=config.lr,
               betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
               fused=fused)


def _lambdas(config: TrainConfig, groups: list[dict[str, Any]]):
    """One learning-rate factor function per parameter group (each with its warm-up)."""
    return [lambda step, w=g["warmup_steps"]: lr_factor(config, step, w) for g in groups]


# --------------------------------------------------------------------------- checkpoints


def _load(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError,
            AttributeError, ImportError, IsADirectoryError) as exc:
        # A truncated or foreign file: say so, not torch's pickle advice.
        raise ValueError(f"{path} is not a mrus checkpoint (torch.load(weights_only=True) "
                         f"cannot read it: {type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "state_dict"} <= set(ckpt):
        raise ValueError(f"{path} is not a mrus checkpoint (no model, config and state_dict)")
    return ckpt


def _check_model(ckpt: dict[str, Any], task: Task, path) -> TrainConfig:
    if ckpt["model"] != task.name:
        raise ValueError(f"{path} is a checkpoint of model {ckpt['model']!r}, not {task.name!r}")
    return task.config_class.from_dict(ckpt["config"])


def load_checkpoint(task: Task, path: str | os.PathLike, device: torch.device | str = "cpu",
                    overrides: list[str] | tuple[str, ...] = ()):
    """The trained network of ``path``, in eval mode on ``device``.

    Args:
        task: the model's task.
        path: a ``checkpoint.pt`` written by the Trainer.
        device: where the network goes.
        overrides: ``key=value`` changes to the saved configuration (the data, the batch
            size; no architecture field).

    Returns:
        (model, config, checkpoint dict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint, a checkpoint of another model, a bad override or one
            that changes the architecture.
    """
    path = Path(path)
    ckpt = _load(path)
    saved = _check_model(ckpt, task, path)
    config = apply_overrides(saved, list(overrides))
    _check_architecture(saved, config, str(path))
    model = task.build(config)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), config, ckpt


def saved_config(task: Task, out_dir: str | os.PathLike) -> TrainConfig:
    """The configuration of the run in ``out_dir``, from its checkpoint.pt (the base that
    ``--resume`` applies its overrides to).

    Raises:
        ValueError: no checkpoint there, not a checkpoint, or one of another model.
    """
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"cannot resume: no {CHECKPOINT} in {Path(out_dir)}")
    return _check_model(_load(path), task, path)


def _check_architecture(saved: TrainConfig, config: TrainConfig, where: str) -> None:
    diff = architecture_diff(saved, config)
    if diff:
        items = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"{where} holds another architecture ({items})")


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains ``task``'s network with ``config``, writing into ``out_dir``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group (``nccl`` on CUDA,
    ``gloo`` on the CPU), takes the GPU ``LOCAL_RANK`` and wraps the network in
    ``DistributedDataParallel``; ``config.batch_size`` is then per process.

    Args:
        task: the model.
        config: its configuration (``task.config_class``).
        out_dir: the run directory; without ``resume`` it must hold no run (no
            checkpoint.pt, config.json or log.jsonl).
        device: ``"cpu"``, ``"cuda"`` or a torch.device (default: CUDA when available).
        resume: continue the run in ``out_dir`` from its checkpoint.pt; ``config`` may change
            the schedule (``steps``, ``lr``, ...) but no architecture field.
        progress: a tqdm bar (default: on rank 0 when stderr is a terminal and
            ``TQDM_DISABLE`` is unset).

    Raises:
        ValueError: ``out_dir`` holds a run and ``resume`` is off; ``resume`` without a
            checkpoint, with a checkpoint of another model or another architecture; a
            ``config`` that is no ``task.config_class``; a train split smaller than one step.

    Example:
        >>> trainer = Trainer(get_task("voxelmorph"), config, "runs/vm", device="cpu")
        >>> trainer.fit()
    """

    def __init__(self, task: Task, config: TrainConfig, out_dir: str | os.PathLike,
                 device: torch.device | str | None = None, *, resume: bool = False,
                 progress: bool | None = None) -> None:
        if not isinstance(config, task.config_class):
            raise TypeError(f"config: expected {task.config_class.__name__} for model "
                            f"{task.name!r}, got {type(config).__name__}")
        self.task, self.config = task, config
        self.out = Path(out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world > 1 else 0
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", local_rank)
        self.device = device

        # Every check reads only: nothing is written before all processes have passed them.
        ckpt = self._check_out_dir(resume)
        self.train_set = task.dataset(config, "train")
        self.sampler = _ResumableSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=config.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the train split has {len(self.train_set)} items, fewer than one "
                             f"step needs ({config.batch_size} per process x {self.world})")
        self._owns_group = False
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self._owns_group = True
        try:
            self._barrier()
            self._set_up(ckpt, progress)
        except BaseException:
            self.close()
            raise

    def _set_up(self, ckpt: dict[str, Any] | None, progress: bool | None) -> None:
        task, config, device = self.task, self.config, self.device
        _seed_all(config.seed)
        self.net = task.build(config).to(device)
        self.groups = _group_specs(task, self.net, config)
        self.optimizer = _optimizer(self.groups, config, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lambdas(config, self.groups))
        self.step = 0
        self.elapsed = 0.0
        self.model: nn.Module = self.net
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        if ckpt is not None:
            self._restore(ckpt)
        else:
            # The network's initialisation is the same on every rank; the training's
            # random stream (noise levels, dropout) differs per rank.
            _seed_all(_derived_seed(config.seed, self.rank))

        self._loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.train_set, batch_size=config.batch_size, sampler=self.sampler,
            num_workers=config.num_workers, drop_last=True, worker_init_fn=_seed_worker,
            pin_memory=device.type == "cuda", generator=self._loader_generator)
        self._val_loader: DataLoader | None = None
        self.last_metrics: dict[str, float] = {}
        self.progress = progress
        self._t0 = time.perf_counter()

        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG).write_text(config.to_json() + "\n")
            if ckpt is not None:
                self._truncate_log(self.step)

    # ------------------------------------------------------------------ set-up helpers

    def _check_out_dir(self, resume: bool) -> dict[str, Any] | None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out_dir {self.out} exists and is not a directory")
        present = [f for f in RUN_FILES if (self.out / f).exists()]
        if not resume:
            if present:
                raise ValueError(f"{self.out} holds another run ({', '.join(present)}); "
                                 "resume it (--resume) or choose another directory")
            return None
        path = self.out / CHECKPOINT
        if not path.exists():
            raise ValueError(f"cannot resume: no {CHECKPOINT} in {self.out}")
        ckpt = _load(path)
        saved = _check_model(ckpt, self.task, path)
        _check_architecture(saved, self.config, str(path))
        return ckpt

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        # The configuration may change the schedule or the optimiser's settings on resume:
        # the groups take this run's values, computed as an uninterrupted run computes them.
        c = self.config
        self.scheduler.base_lrs = [g["lr"] for g in self.groups]
        for group, spec in zip(self.optimizer.param_groups, self.groups, strict=True):
            group.update(lr=spec["lr"] * lr_factor(c, self.step, spec["warmup_steps"]),
                         betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
            group["initial_lr"] = spec["lr"]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        ranks = ckpt.get("rng", {}).get("ranks", [])
        if len(ranks) == self.world:
            _set_rng_state(ranks[self.rank], self.device)
        else:  # another world size: the stream cannot continue; start a fresh, seeded one
            _seed_all(_derived_seed(c.seed, self.rank, self.step))

    def _truncate_log(self, step: int) -> None:
        """Drops the log lines of steps after the checkpoint (they are trained again)."""
        path = self.out / LOG
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(k + "\n" for k in keep))

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leaves the process group if this Trainer joined it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ data

    def _batches(self):
        """Training batches from ``self.step`` on, epoch after epoch, on the device."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.start = offset * self.config.batch_size
            self._loader_generator.manual_seed(_derived_seed(self.config.seed, epoch, self.rank))
            for batch in self.loader:
                yield _to_device(batch, self.device)
            epoch, offset = epoch + 1, 0

    def val_loader(self) -> DataLoader:
        """The first ``val_batches`` batches of the ``val`` split, in order."""
        if self._val_loader is None:
            c = self.config
            ds = self.task.dataset(c, "val")
            ds = Subset(ds, range(min(len(ds), c.val_batches * c.batch_size)))
            self._val_loader = DataLoader(ds, batch_size=c.batch_size, shuffle=False,
                                          num_workers=c.num_workers)
        return self._val_loader

    # ------------------------------------------------------------------ the loop

    def validate(self) -> dict[str, float]:
        """The task's metrics on the validation batches (rank 0; the others wait)."""
        metrics: dict[str, float] = {}
        if self.rank == 0:
            was_training = self.net.training
            with _preserved_rng(self.device), torch.no_grad():
                self.net.eval()
                try:
                    metrics = {k: float(v) for k, v in self.task.evaluate(
                        self.net, self.val_loader(), self.config, self.device).items()}
                finally:
                    self.net.train(was_training)
            self._log({"split": "val", "step": self.step, **metrics,
                       "time": round(self._time(), 3)})
        self._barrier()
        self.last_metrics = metrics
        return metrics

    def _time(self) -> float:
        return self.elapsed + time.perf_counter() - self._t0

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Trains up to ``config.steps`` (or up to step ``until``, then checkpoints and
        returns as if interrupted there).

        Returns:
            The last validation metrics (empty when none ran).
        """
        from tqdm.auto import tqdm

        c = self.config
        end = c.steps if until is None else min(int(until), c.steps)
        self._t0 = time.perf_counter()
        show = self.progress
        if show is None:
            show = sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")
        bar = tqdm(total=c.steps, initial=self.step, desc=self.task.name, dynamic_ncols=True,
                   disable=not show or self.rank > 0)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        lr = 0.0
        batches = self._batches()
        self.net.train()
        try:
            while self.step < end:
                batch = next(batches)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    loss, logs = self.task.training_step(self.model, batch, c)
                loss.backward()
                terms = {"loss": loss.detach().float()}
                if c.grad_clip > 0:
                    terms["grad_norm"] = nn.utils.clip_grad_norm_(
                        self.net.parameters(), c.grad_clip).detach().float()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                for k, v in logs.items():
                    terms[k] = torch.as_tensor(v).detach().float().to(self.device)
                for k, v in terms.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                count += 1
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == end:
                    means = self._reduce({k: v / count for k, v in sums.items()})
                    sums, count = {}, 0
                    if not math.isfinite(means["loss"]):
                        raise FloatingPointError(
                            f"the loss is {means['loss']} at step {self.step}; the last "
                            f"checkpoint in {self.out} holds the last finite state")
                    bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{lr:.3g}")
                    if self.rank == 0:
                        self._log({"split": "train", "step": self.step, **means, "lr": lr,
                                   "time": round(self._time(), 3)})
                if c.val_batches and ((c.val_every and self.step % c.val_every == 0)
                                      or self.step == c.steps):
                    metrics = self.validate()
                    if metrics:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:3]})
                if self.step % c.checkpoint_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
        return self.last_metrics

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over processes of the logged scalars (same keys on every rank)."""
        keys = sorted(values)
        packed = torch.stack([values[k].to(self.device) for k in keys])
        if self.world > 1:
            dist.all_reduce(packed)
            packed /= self.world
        return dict(zip(keys, packed.tolist(), strict=True))

    def fingerprint(self) -> str:
        """SHA-256 of the network's parameters and buffers (bytes, in state_dict order)."""
        h = hashlib.sha256()
        for name, t in self.net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self) -> None:
        """Writes checkpoint.pt (rank 0). Every rank contributes its RNG state and the
        fingerprint of its parameters (``"fingerprints"``: DDP keeps them identical)."""
        rng = _rng_state(self.device)
        mine = {"rng": rng, "fingerprint": self.fingerprint()}
        gathered = [mine]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
        ranks = [g["rng"] for g in gathered]
        if self.rank == 0:
            state = {
                "model": self.task.name,
                "config": self.config.to_dict(),
                "state_dict": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {**rng, "ranks": ranks},
                "step": self.step,
                "elapsed": self._time(),
                "world_size": self.world,
                "fingerprints": [g["fingerprint"] for g in gathered],
                "torch_version": str(torch.__version__),
            }
            tmp = self.out / (CHECKPOINT + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.out / CHECKPOINT)
        self._barrier()
