"""A comparison like MR2US-Pro's Table II ([P25] §IV) on our data: held-out 3D MNI crops, the
T1 as the moving MR, the pseudo-ultrasound as the fixed US, under known warps; the same items
for every row.

Rows:

- ``identity``: a zero displacement;
- ``register_mi``: :func:`mrus_models.register.register` (Parzen mutual information,
  optimisation per pair: an SVF, the similarity inside the US field of view);
- ``voxelmorph``: the ``voxelmorph`` model (3D, MI loss) trained briefly on the same
  swapped pairs (US fixed, T1 moving);
- ``anatomy_aware``: anatomy-aware registration on the raw images (no translation);
- ``acmt_anatomy_aware``: ACMT + anatomy-aware (MR2US-Pro): both volumes translated by an
  ACMT checkpoint, the network trained on the translated pairs, evaluated through
  :func:`mrus_models.anatomy_aware.pipeline.mr2us` (the ``mrus mr2us`` pipeline).

Columns (:func:`pair_scores`): mean over CSF, GM and WM of Dice, IoU and ASD (mm) of the
moving labels warped (nearest) against the fixed labels; harmonic energy (eq. 20,
:func:`mrus_kernels.harmonic_energy`, voxel units); folding fraction; endpoint error (mm)
against the known warp inside the fixed brain. Means over the items.

Usage::

    python -m mrus_models.anatomy_aware.table2 --out DIR [--size 32 32 16] [--steps 600]
        [--acmt ACMT_CKPT] [--acmt-steps N] [--test-items 16] [--train-items 256]

(the defaults: the README's run, 6 min on one CPU thread with a reused ACMT checkpoint).

Checkpoints go to ``DIR/<row>/`` and are reused when a finished one is there; ``--acmt``
reuses an ACMT checkpoint (otherwise one is trained for ``--acmt-steps`` at the table's
size). The table is written as ``DIR/table2.json`` and ``DIR/table2.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mrus_kernels import folding_fraction, harmonic_energy, warp
from mrus_models.metrics import average_surface_distance, dice, endpoint_error_mm, iou

from .task import TISSUES, AnatomyAwareTask, USFixedPairs

__all__ = ["COLUMNS", "ROWS", "held_out_items", "main", "pair_scores", "run_table"]

#: The table's rows, in order.
ROWS = ("identity", "register_mi", "voxelmorph", "anatomy_aware", "acmt_anatomy_aware")
#: The rows' labels in the Markdown table.
ROW_LABELS = {"identity": "identity", "register_mi": "`mrus register` (MI, optimisation)",
              "voxelmorph": "`voxelmorph` (MI)", "anatomy_aware": "anatomy-aware, raw images",
              "acmt_anatomy_aware": "ACMT + anatomy-aware (MR2US-Pro)"}
#: The table's columns, in order, and their labels.
COLUMNS = ("dice", "iou", "asd_mm", "harmonic_energy", "folding_fraction", "epe_mm")
COLUMN_LABELS = {"dice": "DSC ↑", "iou": "IoU ↑", "asd_mm": "ASD (mm) ↓",
                 "harmonic_energy": "harmonic energy ↓", "folding_fraction": "folding ↓",
                 "epe_mm": "EPE (mm) ↓"}
#: Settings of the data shared by every row (the datasets' defaults).
MAX_DISPLACEMENT = 6.0


# --------------------------------------------------------------------------- data


def _dataset(size: Sequence[int], split: str, data_seed: int, length: int | None,
             augment: bool) -> USFixedPairs:
    from mrus_models.data import Crops3D

    base = Crops3D("us", size=tuple(size), split=split, seed=data_seed,
                   max_displacement=MAX_DISPLACEMENT, augment=False, length=length)
    return USFixedPairs(base, augment=augment)


def held_out_items(size: Sequence[int], n: int, data_seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` held-out (test split) swapped pairs, each batched [1, ...]: ``fixed``
    the pseudo-US, ``moving`` the T1, ``ddf`` the known warp (voxel units), labels, mask,
    spacing."""
    ds = _dataset(size, "test", data_seed, None, False)
    if not 1 <= n <= len(ds):
        raise ValueError(f"held_out_items: n (--test-items): expected 1..{len(ds)}, got {n}")
    items = []
    for i in range(n):
        item = ds[i]
        items.append({k: v[None] if isinstance(v, torch.Tensor) else v
                      for k, v in item.items()})
    return items


# --------------------------------------------------------------------------- metrics


def pair_scores(ddf: torch.Tensor, item: dict[str, Any], backend: str | None = None
                ) -> dict[str, float]:
    """The table's columns for one pair and displacement.

    Args:
        ddf: Tensor [1, 3, *S], voxel units, ``warp(moving, ddf) ≈ fixed``.
        item: one batched item of :func:`held_out_items`.
        backend: the ``mrus_kernels`` backend.

    Returns:
        ``dice``, ``iou``, ``asd_mm`` (means over CSF, GM, WM; NaN tissues left out),
        ``harmonic_energy``, ``folding_fraction``, ``epe_mm``.
    """
    ddf = ddf.detach().float()
    spacing = item["spacing"]
    fixed_labels = item["fixed_labels"]
    warped = warp(item["moving_labels"].float(), ddf, mode="nearest",
                  backend=backend).round().long()
    out: dict[str, float] = {}
    for name, fn in (("dice", dice), ("iou", iou)):
        values = [float(fn(warped, fixed_labels, v)[0]) for v in TISSUES.values()]
        out[name] = _nanmean(values)
    out["asd_mm"] = _nanmean([float(average_surface_distance(warped, fixed_labels, v,
                                                             spacing)[0])
                              for v in TISSUES.values()])
    out["harmonic_energy"] = float(harmonic_energy(ddf, reduction="none", backend=backend)[0])
    out["folding_fraction"] = float(folding_fraction(ddf, backend=backend)[0])
    out["epe_mm"] = float(endpoint_error_mm(ddf, item["ddf"], item["mask"].bool(),
                                            spacing)[0])
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


# --------------------------------------------------------------------------- rows


def _swapped_voxelmorph_task():
    """The ``voxelmorph`` task on the swapped pairs (US fixed, T1 moving) of the table."""
    from mrus_models.voxelmorph.task import VoxelMorphTask

    class SwappedVoxelMorphTask(VoxelMorphTask):
        def dataset(self, config, split):
            return _dataset(config.image_size, split, config.data_seed,
                            config.train_items if split == "train" else None,
                            augment=split == "train")

    return SwappedVoxelMorphTask()


class _TranslatedPairs(Dataset):
    """Swapped pairs with both images translated once by ACMT (cached: one bridge per image
    per step would cost seconds a step on a CPU)."""

    def __init__(self, base: Dataset, translate: Callable[[torch.Tensor], torch.Tensor]
                 ) -> None:
        self.base, self.translate, self.cache = base, translate, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        if index not in self.cache:
            item = dict(self.base[index])
            for key in ("fixed", "moving"):
                item[key] = self.translate(item[key][None])[0]
            self.cache[index] = item
        return self.cache[index]


class _PreTranslatedTask(AnatomyAwareTask):
    """Anatomy-aware training on :class:`_TranslatedPairs`: the config names the ACMT
    checkpoint (so the saved run is ACMT + anatomy-aware for ``mrus evaluate`` / ``mr2us``)
    but the items come translated already."""

    def __init__(self, translate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self._translate = translate

    def dataset(self, config, split):
        raw = dataclasses.replace(config, translate_checkpoint="")
        return _TranslatedPairs(super().dataset(raw, split), self._translate)

    def translate_images(self, images, config):
        return images


def _train(task, config, out: Path, device: torch.device, progress: bool):
    """The run in ``out`` (trained here unless a finished one is there): (model, config)."""
    from mrus_models.train import Trainer
    from mrus_models.train.trainer import load_checkpoint

    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        model, saved, state = load_checkpoint(task, ckpt, device)
        if state.get("step") == config.steps:
            return model, saved
        raise ValueError(f"{out} holds a run at step {state.get('step')}, not {config.steps}: "
                         "remove it or give another --out")
    trainer = Trainer(task, config, out, device, progress=progress)
    try:
        trainer.fit()
    finally:
        trainer.close()
    model, saved, _ = load_checkpoint(task, ckpt, device)
    return model, saved


def _config(task, sets: list[str]):
    from mrus_models.train.config import apply_overrides

    return apply_overrides(task.default_config(), sets)


def run_table(out: str | Path, *, size: Sequence[int] = (32, 32, 16), steps: int = 600,
              test_n: int = 16, train_items: int = 256, acmt: str | None = None,
              acmt_steps: int = 20, register_iterations: Sequence[int] = (100, 50),
              rows: Sequence[str] = ROWS, tiny: bool = False, data_seed: int = 0,
              device: str = "cpu", progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds the table (see the module's description).

    Args:
        out: folder of the checkpoints and the table files.
        size: crop size (divisible by 4: the networks' stride).
        steps: training steps of each trained registration network (batch 2).
        test_n: held-out items (the same for every row).
        train_items: training items of the trained rows.
        acmt: an ACMT checkpoint to reuse; None trains one for ``acmt_steps``.
        acmt_steps: steps of that ACMT run.
        register_iterations: Adam iterations per level (levels 2, 1) of ``register_mi``.
        rows: the rows to build, a subset of :data:`ROWS` in any order.
        tiny: tiny network widths (tests).
        data_seed: seeds the crops, warps and simulations.
        device: where everything runs.
        progress: tqdm bars of the training runs.
        log: where progress lines go.

    Returns:
        ``{"rows": {row: {column: mean}}, "per_item": {row: [{column: value}]},
        "seconds": {row: s}, "settings": {...}}``.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"rows: expected names among {ROWS}, got {unknown}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or any(s % 4 or s < 8 for s in size):
        raise ValueError(f"size: expected three multiples of 4, each >= 8, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    items = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in it.items()}
             for it in held_out_items(size, test_n, data_seed)]
    size_set = "size=" + ",".join(map(str, size))
    common = [size_set, f"data_seed={data_seed}", f"train_items={train_items}",
              "val_batches=0", f"steps={steps}", "batch_size=2",
              f"checkpoint_every={max(steps, 1)}"]
    arch = ["encoder=4,8", "decoder=8,8,8", "time_dim=8", "heads=2"] if tiny else []
    # B1's CPU-sized settings of the anatomy-aware model (README, anatomy_aware).
    aa_sets = [*common, *arch, "ana_temperature=0.25", "lr=1e-3"]

    predictors: dict[str, Callable[[dict], torch.Tensor]] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, build: Callable[[], Callable[[dict], torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        predictors[name] = build()
        seconds[name] = time.perf_counter() - t0

    def build_identity():
        return lambda item: torch.zeros_like(item["ddf"])

    def build_register():
        from mrus_models.register import register

        def predict(item):
            fov = item["fixed"] > item["fixed"].amin()
            with torch.enable_grad():
                result = register(item["fixed"], item["moving"], similarity="mi",
                                  transform="svf", levels=(2, 1),
                                  iterations=tuple(register_iterations), smoothness=50.0,
                                  fixed_mask=fov, device=dev, progress=False)
            return result.ddf
        return predict

    def build_voxelmorph():
        task = _swapped_voxelmorph_task()
        sets = ["ndim=3", *common, "similarity=mi", "lr=1e-3",
                *(["encoder=4,8", "decoder=8,8,8"] if tiny else [])]
        model, config = _train(task, _config(task, sets), out / "voxelmorph", dev, progress)
        return lambda item: task.predict(model, item["fixed"], item["moving"], config)["ddf"]

    def build_anatomy_aware():
        task = AnatomyAwareTask()
        model, config = _train(task, _config(task, aa_sets), out / "anatomy_aware", dev,
                               progress)
        return lambda item: task.predict(model, item["fixed"], item["moving"], config)["ddf"]

    def build_acmt_anatomy_aware():
        from mrus_models.train.registry import get_task

        from .pipeline import load_pipeline, mr2us

        acmt_path = acmt
        if acmt_path is None:
            acmt_task = get_task("acmt")
            sets = [size_set, f"data_seed={data_seed}", f"train_items={train_items}",
                    "val_batches=0", f"steps={acmt_steps}", "batch_size=2",
                    f"checkpoint_every={max(acmt_steps, 1)}", "widths=8,16,16", "time_dim=16",
                    "deep_level=2", "energy_widths=8,16", "energy_time_dim=32", "lr=1e-3"]
            if tiny:
                sets += ["widths=4,8", "time_dim=8", "deep_level=1", "energy_widths=4",
                         "energy_time_dim=8"]
            t0 = time.perf_counter()
            _train(acmt_task, _config(acmt_task, sets), out / "acmt", dev, progress)
            log(f"  acmt: trained {acmt_steps} steps in {time.perf_counter() - t0:.0f} s")
            acmt_path = str(out / "acmt" / "checkpoint.pt")
        acmt_task = get_task("acmt")
        from mrus_models.train.trainer import load_checkpoint

        acmt_model, acmt_config, _ = load_checkpoint(acmt_task, acmt_path, dev)

        def translate(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return acmt_task.translate(acmt_model, x.to(dev), acmt_config)[
                    "translated"].to(x.device)

        task = _PreTranslatedTask(translate)
        config = _config(task, [*aa_sets, f"translate_checkpoint={acmt_path}"])
        _train(task, config, out / "acmt_anatomy_aware", dev, progress)
        pipe = load_pipeline(acmt_path, out / "acmt_anatomy_aware" / "checkpoint.pt", dev)
        return lambda item: mr2us(pipe, item["fixed"], item["moving"], progress=False)["ddf"]

    builders = {"identity": build_identity, "register_mi": build_register,
                "voxelmorph": build_voxelmorph, "anatomy_aware": build_anatomy_aware,
                "acmt_anatomy_aware": build_acmt_anatomy_aware}
    table: dict[str, dict[str, float]] = {}
    per_item: dict[str, list[dict[str, float]]] = {}
    for name in [r for r in ROWS if r in rows]:
        log(f"{name}: preparing")
        timed(name, builders[name])
        t0 = time.perf_counter()
        scores = []
        with torch.no_grad():
            for item in items:
                scores.append(pair_scores(predictors[name](item), item))
        seconds[name + "_inference"] = time.perf_counter() - t0
        per_item[name] = scores
        table[name] = {c: _nanmean([s[c] for s in scores]) for c in COLUMNS}
        log(f"{name}: " + ", ".join(f"{c} {table[name][c]:.4g}" for c in COLUMNS)
            + f" ({seconds[name]:.0f} s + {seconds[name + '_inference']:.0f} s)")
    settings = {"size": list(size), "steps": steps, "test_items": test_n,
                "train_items": train_items, "acmt": acmt, "acmt_steps": acmt_steps,
                "register_iterations": list(register_iterations), "data_seed": data_seed,
                "max_displacement_mm": MAX_DISPLACEMENT, "threads": torch.get_num_threads(),
                "tiny": tiny}
    result = {"rows": table, "per_item": per_item, "seconds": seconds, "settings": settings}
    (out / "table2.json").write_text(json.dumps(result, indent=1))
    (out / "table2.md").write_text(markdown(table))
    return result


def markdown(table: dict[str, dict[str, float]]) -> str:
    """The rows of ``table`` as a Markdown table."""
    head = "| method | " + " | ".join(COLUMN_LABELS[c] for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    fmt = {"dice": "{:.3f}", "iou": "{:.3f}", "asd_mm": "{:.3f}", "harmonic_energy": "{:.1f}",
           "folding_fraction": "{:.2e}", "epe_mm": "{:.2f}"}
    for name, row in table.items():
        cells = [fmt[c].format(row[c]) for c in COLUMNS]
        lines.append(f"| {ROW_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m mrus_models.anatomy_aware.table2``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m mrus_models.anatomy_aware.table2",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the checkpoints and the table")
    p.add_argument("--size", type=int, nargs=3, default=(32, 32, 16))
    p.add_argument("--steps", type=int, default=600, help="steps of each trained network")
    p.add_argument("--test-items", type=int, default=16)
    p.add_argument("--train-items", type=int, default=256)
    p.add_argument("--acmt", default=None, help="ACMT checkpoint to reuse")
    p.add_argument("--acmt-steps", type=int, default=20)
    p.add_argument("--register-iterations", type=int, nargs=2, default=(100, 50))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = run_table(args.out, size=args.size, steps=args.steps,
                           test_n=args.test_items, train_items=args.train_items,
                           acmt=args.acmt, acmt_steps=args.acmt_steps,
                           register_iterations=args.register_iterations, rows=args.rows,
                           device=args.device, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"table2: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result["rows"]), end="")
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out}/table2.json, table2.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
