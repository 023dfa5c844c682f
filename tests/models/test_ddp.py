"""`torchrun --nproc_per_node 2 -m mrus_models.train MODEL` on the CPU (gloo): after 3 steps
the parameters are identical on both ranks and equal, within float tolerance, those of one
process trained with the doubled batch (same data order, gradients averaged by DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrus_models.cli import main
from mrus_models.train import MODELS

HERE = Path(__file__).resolve().parent

#: Model -> (registry target or None when the package registers it, extra `mrus train`
#: arguments that make 3 steps small and quick on two CPU processes, whether to also train
#: one process with half the batch to show that the comparison can fail).
CASES = {
    "toy": ("_toy_task:ToyTask", ["--set", "items=64", "noise=0"], True),
    "voxelmorph": (None, ["--set", "size=32,32", "train_items=24", "planes=axial"], False),
}


def _state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max() / max(1.0, float(
        b[k].double().abs().max()))) for k in b if b[k].is_floating_point())


@pytest.mark.parametrize("model", sorted(CASES))
def test_torchrun_two_processes_equal_one_with_the_doubled_batch(model, tmp_path, monkeypatch):
    target, extra, control = CASES[model]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    if target is not None:
        env["MRUS_EXTRA_MODELS"] = f"{model}={target}"
        monkeypatch.setitem(MODELS, model, target)
    common = ["--steps", "3", "--device", "cpu", "--quiet", *extra, "--set", "log_every=1",
              "val_batches=0"]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "mrus_models.train", model, "--out", str(two), "--batch-size", "2",
           *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one = tmp_path / "one"
    assert main(["train", model, "--out", str(one), "--batch-size", "4", *common]) == 0
    s2, s1 = _state(two), _state(one)
    assert s2["world_size"] == 2 and s2["step"] == 3 and len(s2["fingerprints"]) == 2
    assert s2["fingerprints"][0] == s2["fingerprints"][1]  # identical bits on both ranks
    assert len(s2["rng"]["ranks"]) == 2
    err = _max_diff(s2["state_dict"], s1["state_dict"])
    assert err <= 1e-5, err
    if control:  # the comparison can fail: half the batch (a wrong split) trains elsewhere
        half = tmp_path / "half"
        assert main(["train", model, "--out", str(half), "--batch-size", "2", *common]) == 0
        assert _max_diff(_state(half)["state_dict"], s1["state_dict"]) > 100 * max(err, 1e-7)
    l2, l1 = _losses(two), _losses(one)
    assert len(l2) == len(l1) == 3
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(l2, l1, strict=True))
