"""The Trainer and `mrus train / evaluate / predict` on a toy task (tests/models/_toy_task.py):
typed overrides, schedule, bit-for-bit resume, checkpoint and log contents, the
multi-process data order, and one clear error (exit 2, nothing overwritten) per bad input."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _toy_task import ToyConfig, ToyTask

from mrus_kernels import warp
from mrus_models.cli import main
from mrus_models.data import read_displacement, read_nifti, write_nifti
from mrus_models.train import (
    MODELS,
    TrainConfig,
    Trainer,
    apply_overrides,
    arch_field,
    architecture_diff,
    get_task,
    register_task,
)
from mrus_models.train import trainer as trainer_mod
from mrus_models.train.trainer import _ResumableSampler, lr_factor

TOY = {"toy": "_toy_task:ToyTask", "toy2": "_toy_task:ToyTask"}


@pytest.fixture(scope="module", autouse=True)
def toy_models():
    with pytest.MonkeyPatch.context() as mp:
        for name, target in TOY.items():
            mp.setitem(MODELS, name, target)
        yield


def _config(*overrides: str) -> ToyConfig:
    return apply_overrides(ToyConfig(), list(overrides))


def _read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- configuration


@dataclass
class _Cfg(TrainConfig):
    widths: tuple[int, ...] = arch_field((16, 32))
    mode: str | None = None
    scale: float = 1.0


def test_overrides_are_typed_by_the_fields():
    c = apply_overrides(_Cfg(), ["steps=7", "lr=3e-3", "amp=false", "betas=[0.5, 0.99]",
                                 "scheduler=cosine", "widths=8, 8,4", "mode=none", "scale=2",
                                 "steps=9"])
    assert (c.steps, c.lr, c.amp, c.betas, c.scheduler) == (9, 3e-3, False, (0.5, 0.99), "cosine")
    assert c.widths == (8, 8, 4) and c.mode is None and c.scale == 2.0
    assert isinstance(c.scale, float) and isinstance(c.steps, int)
    assert apply_overrides(c, ["mode=fast"]).mode == "fast"
    assert _Cfg().steps == 1000  # the input is not changed
    assert _Cfg.architecture_fields() == ("widths",)
    assert architecture_diff(c, _Cfg()) == {"widths": ((8, 8, 4), (16, 32))}
    assert _Cfg.from_json(c.to_json()) == c


@pytest.mark.parametrize("text, message", [
    ("foo=1", "unknown key 'foo'; _Cfg has amp, batch_size, betas"),
    ("steps=1.5", "--set steps=1.5: expected int for 'steps', got '1.5'"),
    ("steps=two", "expected int for 'steps', got 'two'"),
    ("lr=fast", "expected float for 'lr', got 'fast'"),
    ("amp=maybe", "expected bool for 'amp', got 'maybe'"),
    ("scheduler=step", "expected one of 'constant', 'linear', 'cosine' for 'scheduler'"),
    ("betas=0.9", "expected 2 comma-separated values (float, float) for 'betas'"),
    ("widths=8,x", "expected comma-separated ints for 'widths', got '8,x'"),
    ("steps", "--set 'steps': expected key=value"),
    ("=3", "expected key=value"),
    ("steps=0", "steps: expected a positive integer, got 0"),
    ("lr=-1", "lr: expected a positive number, got -1.0"),
    ("betas=0.9,1.5", "betas: expected two numbers in [0, 1), got (0.9, 1.5)"),
])
def test_bad_overrides_name_key_type_and_text(text, message):
    with pytest.raises(ValueError) as info:
        apply_overrides(_Cfg(), [text])
    assert message in str(info.value)


def test_config_checks_types_and_json():
    with pytest.raises(TypeError, match=r"_Cfg.steps: expected int, got 2.5"):
        _Cfg(steps=2.5)
    with pytest.raises(ValueError, match=r"_Cfg has no field 'depth'"):
        _Cfg.from_dict({"depth": 3})
    with pytest.raises(ValueError, match=r"_Cfg.widths: expected comma-separated ints, got 'a'"):
        _Cfg.from_dict({"widths": "a"})
    assert _Cfg.from_dict({"widths": [1, 2], "lr": 1}) == _Cfg(widths=(1, 2), lr=1.0)


# --------------------------------------------------------------------------- registry


def test_registry_lists_imports_and_names(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known models: .*toy.*voxel"):
        get_task("nope")
    assert get_task("toy2").name == "toy2" and isinstance(get_task("toy"), ToyTask)
    register_task("broken", "no_such_module_xyz:Task")
    try:
        with pytest.raises(ValueError, match=r"model 'broken' \(no_such_module_xyz:Task\) cannot"):
            get_task("broken")
    finally:
        MODELS.pop("broken")
    monkeypatch.setenv("MRUS_EXTRA_MODELS", "envtoy=_toy_task:ToyTask")
    assert get_task("envtoy").name == "envtoy"
    with pytest.raises(ValueError, match=r"target must be 'module:Class', got 'x'"):
        register_task("x", "x")


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("scheduler, values", [
    # steps 10, warm-up 2 (lr / 3, 2 lr / 3), then decay to 0.1 lr at step 10.
    ("constant", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 1.0, 9: 1.0}),
    ("linear", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.55, 10: 0.1}),
    ("cosine", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.1 + 0.9 * (0.5 + 0.5 * math.sqrt(0.5)),
                6: 0.55, 10: 0.1}),
])
def test_lr_schedule(scheduler, values):
    c = _Cfg(steps=10, warmup_steps=2, min_lr_ratio=0.1, scheduler=scheduler)
    for step, want in values.items():
        assert abs(lr_factor(c, step) - want) <= 1e-12, (step, lr_factor(c, step), want)


def test_trainer_applies_the_schedule(tmp_path):
    c = _config("steps=6", "warmup_steps=2", "scheduler=linear", "lr=0.1", "min_lr_ratio=0.2")
    Trainer(ToyTask(), c, tmp_path, "cpu", progress=False).fit()
    lrs = [r["lr"] for r in _read_log(tmp_path / "log.jsonl") if r["split"] == "train"]
    want = [0.1 / 3, 0.2 / 3, 0.1, 0.1 * 0.8, 0.1 * 0.6, 0.1 * 0.4]
    assert np.allclose(lrs, want, rtol=1e-12, atol=0)


class _TwoRateTask(ToyTask):
    """The toy with its two layers in separate groups: the first at lr / 4 with a 3-step
    warm-up, the second at the configuration's lr and warm-up."""

    def param_groups(self, model, config):
        first, second = model[0], model[2]
        return [{"params": first.parameters(), "lr": config.lr / 4, "warmup_steps": 3},
                {"params": second.parameters()}]


def test_param_groups_have_their_own_rates_and_warmups(tmp_path):
    c = _config("steps=6", "warmup_steps=1", "scheduler=linear", "lr=0.1", "min_lr_ratio=0.2",
                "checkpoint_every=3")
    trainer = Trainer(_TwoRateTask(), c, tmp_path / "a", "cpu", progress=False)
    seen = []
    for until in range(1, 7):
        trainer.fit(until=until)
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
    # Group 0: warm-up 3 then linear decay to 0.2 over the remaining 3 steps.
    want0 = [0.025 * f for f in (2 / 4, 3 / 4, 1.0, 1 - 0.8 / 3, 1 - 1.6 / 3, 0.2)]
    want1 = [0.1 * f for f in (1.0, 1 - 0.8 / 5, 1 - 1.6 / 5, 1 - 2.4 / 5, 1 - 3.2 / 5, 0.2)]
    assert np.allclose([s[0] for s in seen], want0, rtol=1e-12, atol=0)
    assert np.allclose([s[1] for s in seen], want1, rtol=1e-12, atol=0)
    # A resumed run gives each group back its own rate.
    Trainer(_TwoRateTask(), c, tmp_path / "b", "cpu", progress=False).fit(until=3)
    resumed = Trainer(_TwoRateTask(), c, tmp_path / "b", "cpu", resume=True, progress=False)
    assert np.allclose([g["lr"] for g in resumed.optimizer.param_groups],
                       [want0[2], want1[2]], rtol=1e-12, atol=0)
    resumed.fit()
    assert np.allclose([g["lr"] for g in resumed.optimizer.param_groups],
                       [want0[-1], want1[-1]], rtol=1e-12, atol=0)
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


class _PartialGroups(ToyTask):
    def param_groups(self, model, config):
        return [{"params": model[0].parameters()}]


class _TwiceGroups(ToyTask):
    def param_groups(self, model, config):
        return [{"params": model.parameters()}, {"params": model[0].parameters()}]


@pytest.mark.parametrize("task, message", [(_PartialGroups, "leaves 2 parameter tensors out"),
                                           (_TwiceGroups, "lists a parameter twice")])
def test_param_groups_must_cover_every_parameter_once(tmp_path, task, message):
    with pytest.raises(ValueError, match=message):
        Trainer(task(), _config("steps=2"), tmp_path, "cpu", progress=False)


# --------------------------------------------------------------------------- resume


RESUME_CONFIG = ("noise=0.3", "batch_size=3", "items=10", "steps=5", "val_every=2",
                 "scheduler=cosine", "warmup_steps=1", "grad_clip=0.5", "optimizer=adamw",
                 "weight_decay=0.01", "checkpoint_every=100")


def _state(trainer):
    return ({k: v.clone() for k, v in trainer.net.state_dict().items()},
            trainer.optimizer.state_dict())


def _assert_same_training(a, b):
    (pa, oa), (pb, ob) = _state(a), _state(b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    for i in oa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)


# 3 items per step, 3 steps per epoch: stop mid-epoch and at the epoch boundary; with
# DataLoader workers too.
@pytest.mark.parametrize("until, workers", [(2, 0), (3, 0), (2, 2)])
def test_resume_continues_bit_for_bit(tmp_path, until, workers):
    c = _config(*RESUME_CONFIG, f"num_workers={workers}")
    whole = Trainer(ToyTask(), c, tmp_path / "whole", "cpu", progress=False)
    whole.fit()
    first = Trainer(ToyTask(), c, tmp_path / "parts", "cpu", progress=False)
    first.fit(until=until)
    assert first.step == until
    second = Trainer(ToyTask(), c, tmp_path / "parts", "cpu", resume=True, progress=False)
    assert second.step == until
    second.fit()
    _assert_same_training(whole, second)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    log_whole = _read_log(tmp_path / "whole" / "log.jsonl")
    assert strip(log_whole) == strip(_read_log(tmp_path / "parts" / "log.jsonl"))
    assert [r["step"] for r in log_whole if r["split"] == "val"] == [2, 4, 5]


def test_resume_without_the_rng_states_differs(tmp_path, monkeypatch):
    """The comparison above can fail: without restoring the RNG states (the noise in the
    loss) the resumed run leaves the uninterrupted one."""
    c = _config(*RESUME_CONFIG)
    whole = Trainer(ToyTask(), c, tmp_path / "whole", "cpu", progress=False)
    whole.fit()
    Trainer(ToyTask(), c, tmp_path / "parts", "cpu", progress=False).fit(until=2)
    monkeypatch.setattr(trainer_mod, "_set_rng_state", lambda state, device: None)
    second = Trainer(ToyTask(), c, tmp_path / "parts", "cpu", resume=True, progress=False)
    second.fit()
    with pytest.raises(AssertionError):
        _assert_same_training(whole, second)


def test_resume_takes_a_longer_schedule(tmp_path):
    """`--steps` may grow on resume: with the constant schedule, 3 + 2 steps = 5 steps."""
    c = _config("batch_size=4", "steps=5", "noise=0.2")
    whole = Trainer(ToyTask(), c, tmp_path / "a", "cpu", progress=False)
    whole.fit()
    Trainer(ToyTask(), apply_overrides(c, ["steps=3"]), tmp_path / "b", "cpu",
            progress=False).fit()
    more = Trainer(ToyTask(), c, tmp_path / "b", "cpu", resume=True, progress=False)
    more.fit()
    _assert_same_training(whole, more)


# --------------------------------------------------------------------------- files


def test_checkpoint_contents(tmp_path, monkeypatch):
    saved = []
    original = Trainer.save

    def save(self):
        saved.append(self.step)
        original(self)

    monkeypatch.setattr(Trainer, "save", save)
    c = _config("steps=5", "checkpoint_every=2", "batch_size=2")
    t = Trainer(ToyTask(), c, tmp_path, "cpu", progress=False)
    t.fit()
    assert saved == [2, 4, 5]
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"model", "config", "state_dict", "optimizer", "scheduler", "rng", "step",
            "elapsed", "world_size", "fingerprints", "torch_version"} <= set(ckpt)
    assert ckpt["model"] == "toy" and ckpt["step"] == 5 and ckpt["world_size"] == 1
    assert ToyConfig.from_dict(ckpt["config"]) == c
    assert ToyConfig.from_json((tmp_path / "config.json").read_text()) == c
    for k, v in t.net.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v)
    assert ckpt["fingerprints"] == [t.fingerprint()]
    assert ckpt["scheduler"]["last_epoch"] == 5
    assert all(int(s["step"]) == 5 for s in ckpt["optimizer"]["state"].values())
    assert {"torch", "cuda", "numpy", "python", "ranks"} <= set(ckpt["rng"])
    assert len(ckpt["rng"]["ranks"]) == 1 and ckpt["elapsed"] > 0
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_log_lines(tmp_path):
    c = _config("steps=5", "val_every=2", "batch_size=2", "grad_clip=10", "val_batches=8")
    Trainer(ToyTask(), c, tmp_path / "every", "cpu", progress=False).fit()
    Trainer(ToyTask(), apply_overrides(c, ["log_every=2"]), tmp_path / "pairs", "cpu",
            progress=False).fit()
    every = _read_log(tmp_path / "every" / "log.jsonl")
    pairs = _read_log(tmp_path / "pairs" / "log.jsonl")
    train = [r for r in every if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for r in train:
        assert set(r) == {"split", "step", "loss", "mse", "reg", "grad_norm", "lr", "time"}
        assert all(math.isfinite(r[k]) for k in ("loss", "mse", "reg", "grad_norm"))
        assert abs(r["loss"] - r["mse"] - r["reg"]) <= 1e-5 * r["loss"]
    val = [r for r in every if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4, 5]
    assert all(set(r) == {"split", "step", "mse", "items", "time"} and r["items"] == 16
               for r in val)
    times = [r["time"] for r in every]
    assert times == sorted(times)
    # log_every=2 averages the per-step values over the steps since the last line.
    by_step = {r["step"]: r for r in train}
    got = {r["step"]: r for r in pairs if r["split"] == "train"}
    assert sorted(got) == [2, 4, 5]
    for step, members in {2: (1, 2), 4: (3, 4), 5: (5,)}.items():
        for k in ("loss", "mse", "grad_norm"):
            want = sum(by_step[s][k] for s in members) / len(members)
            assert abs(got[step][k] - want) <= 1e-6 * abs(want), (step, k)


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    c = _config("steps=4", "checkpoint_every=2")
    Trainer(ToyTask(), c, tmp_path, "cpu", progress=False).fit(until=2)
    with open(tmp_path / "log.jsonl", "a") as f:  # as if killed after step 3
        f.write(json.dumps({"split": "train", "step": 3, "loss": 0.0}) + "\n")
    Trainer(ToyTask(), c, tmp_path, "cpu", resume=True, progress=False).fit()
    steps = [r["step"] for r in _read_log(tmp_path / "log.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


# --------------------------------------------------------------------------- data order


@pytest.mark.parametrize("items", [24, 25, 31])
def test_two_ranks_see_the_batches_of_one_process_with_twice_the_batch(items):
    """Step k of rank r ∪ ... = step k of one process with N x B items, epoch after epoch;
    a resumed sampler (``start``) continues the epoch where it stopped."""
    ds = list(range(items))
    b, world = 3, 2

    def batches(num_replicas, rank, batch, epoch, start=0):
        s = _ResumableSampler(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=7,
                              drop_last=True)
        s.set_epoch(epoch)
        s.start = start
        order = list(s)
        assert len(order) == len(s)
        return [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]

    for epoch in (0, 1):
        one = batches(1, 0, world * b, epoch)
        ranks = [batches(world, r, b, epoch) for r in range(world)]
        assert len(one) == items // (world * b) == len(ranks[0]) == len(ranks[1])
        for k, big in enumerate(one):
            assert sorted(ranks[0][k] + ranks[1][k]) == sorted(big)
            assert not set(ranks[0][k]) & set(ranks[1][k])
        assert batches(world, 1, b, epoch, start=b) == ranks[1][1:]
    assert batches(1, 0, 6, 0) != batches(1, 0, 6, 1)  # a new permutation per epoch


def test_split_smaller_than_a_step(tmp_path):
    with pytest.raises(ValueError, match=r"the train split has 3 items, fewer than one step "
                                         r"needs \(4 per process x 1\)"):
        Trainer(ToyTask(), _config("items=3", "batch_size=4"), tmp_path, "cpu")
    assert not (tmp_path / "config.json").exists()


# --------------------------------------------------------------------------- command line


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step toy run (module-wide; tests copy it before touching it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "toy", "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--device", "cpu", "--quiet", "--set", "items=12", "noise=0.1", "--set",
                 "lr=0.02"]) == 0
    return out


def test_cli_train_evaluate_predict(trained, tmp_path, capsys):
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint.pt", "config.json",
                                                        "log.jsonl"]
    config = ToyConfig.from_json((trained / "config.json").read_text())
    assert (config.items, config.noise, config.lr, config.steps, config.batch_size) == \
        (12, 0.1, 0.02, 2, 4)
    code, out, err = _run(capsys, "evaluate", "toy", "--checkpoint",
                          str(trained / "checkpoint.pt"), "--split", "test", "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["model"] == "toy" and result["split"] == "test" and result["step"] == 2
    assert result["items"] == 12 and math.isfinite(result["mse"])

    code, out, err = _run(capsys, "evaluate", "toy", "--checkpoint",
                          str(trained / "checkpoint.pt"))
    assert code == 0 and "mse" in out and "val split (12 items)" in out

    # predict: 2D NIfTI in, warped image and displacement (mm) out, on the fixed grid.
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(13, 11),
                                          mode="bilinear", align_corners=True)
    affine = np.diag([2.0, 3.0, 1.0, 1.0])
    write_nifti(tmp_path / "f.nii.gz", img, affine)
    write_nifti(tmp_path / "m.nii.gz", img.flip(-1).contiguous(), affine)
    code, out, err = _run(capsys, "predict", "toy", "--checkpoint",
                          str(trained / "checkpoint.pt"), str(tmp_path / "f.nii.gz"),
                          str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "w.nii.gz"),
                          "--ddf", str(tmp_path / "d.nii.gz"), "--quiet", "--device", "cpu")
    assert code == 0, err
    bias = float(torch.load(trained / "checkpoint.pt", weights_only=True)["state_dict"]["2.bias"])
    ddf = read_displacement(tmp_path / "d.nii.gz").data
    assert ddf.shape == (1, 2, 13, 11)
    want = torch.stack([torch.full((13, 11), bias * (i + 1)) for i in range(2)])[None]
    assert float((ddf - want).abs().max()) <= 1e-5 * max(1.0, abs(bias))
    warped = read_nifti(tmp_path / "w.nii.gz").data
    assert float((warped - warp(img.flip(-1), want)).abs().max()) <= 1e-5


def _snapshot(root):
    if not root.exists():
        return None
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write_3d(path):
    write_nifti(path, torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0)),
                np.eye(4))
    return str(path)


@pytest.mark.parametrize("case", [
    "unknown-model", "set-unknown-key", "set-wrong-type", "evaluate-other-model",
    "predict-other-model", "resume-other-architecture", "out-holds-a-run", "resume-no-run",
    "resume-other-model", "evaluate-not-a-checkpoint", "predict-wrong-dimension",
    "evaluate-set-architecture",
])
def test_cli_bad_input(case, trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    fresh = tmp_path / "fresh"
    ckpt = str(run / "checkpoint.pt")
    f3 = _write_3d(tmp_path / "f3.nii.gz")
    argv, message = {
        "unknown-model": (["train", "nope", "--out", str(fresh)],
                          "unknown model 'nope'; known models: "),
        "set-unknown-key": (["train", "toy", "--out", str(fresh), "--set", "depth=3"],
                            "--set depth=3: unknown key 'depth'; ToyConfig has amp, "),
        "set-wrong-type": (["train", "toy", "--out", str(fresh), "--set", "hidden=wide"],
                           "--set hidden=wide: expected int for 'hidden', got 'wide'"),
        "evaluate-other-model": (["evaluate", "toy2", "--checkpoint", ckpt],
                                 f"{ckpt} is a checkpoint of model 'toy', not 'toy2'"),
        "predict-other-model": (["predict", "toy2", "--checkpoint", ckpt, f3, f3, "-o",
                                 str(tmp_path / "w.nii.gz")],
                                f"{ckpt} is a checkpoint of model 'toy', not 'toy2'"),
        "resume-other-architecture": (
            ["train", "toy", "--out", str(run), "--resume", "--steps", "4", "--set",
             "hidden=16"], f"{ckpt} holds another architecture (hidden: 8 there, 16 here)"),
        "out-holds-a-run": (["train", "toy", "--out", str(run), "--steps", "3"],
                            (f"{run} holds another run (checkpoint.pt, config.json, "
                             "log.jsonl); resume it (--resume) or choose another directory")),
        "resume-no-run": (["train", "toy", "--out", str(fresh), "--resume"],
                          f"cannot resume: no checkpoint.pt in {fresh}"),
        "resume-other-model": (["train", "toy2", "--out", str(run), "--resume"],
                               f"{ckpt} is a checkpoint of model 'toy', not 'toy2'"),
        "evaluate-not-a-checkpoint": (
            ["evaluate", "toy", "--checkpoint", str(run / "config.json")],
            f"{run / 'config.json'} is not a mrus checkpoint"),
        "predict-wrong-dimension": (
            ["predict", "toy", "--checkpoint", ckpt, f3, f3, "-o", str(tmp_path / "w.nii.gz")],
            "toy in " + ckpt + " registers 2D images, got 3D images (6, 6, 6)"),
        "evaluate-set-architecture": (
            ["evaluate", "toy", "--checkpoint", ckpt, "--set", "features=3"],
            f"{ckpt} holds another architecture (features: 5 there, 3 here)"),
    }[case]
    before = _snapshot(tmp_path)
    code, out, err = _run(capsys, *argv, "--device", "cpu", "--quiet")
    assert code == 2
    assert err.startswith("mrus: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err and out == ""
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten
    assert not fresh.exists()


def test_val_batches_0_turns_validation_off(tmp_path, monkeypatch):
    def evaluate(*args):
        raise AssertionError("evaluate ran")

    monkeypatch.setattr(ToyTask, "evaluate", evaluate)
    c = _config("steps=3", "val_every=1", "val_batches=0")
    assert Trainer(ToyTask(), c, tmp_path, "cpu", progress=False).fit() == {}
    assert {r["split"] for r in _read_log(tmp_path / "log.jsonl")} == {"train"}
