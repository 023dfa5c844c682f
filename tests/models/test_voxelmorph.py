"""mrus_models.voxelmorph: configuration, network, losses on the fused ops, the Task."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _registration_batch import check_one_step, synthetic_batch, translation_batch

import mrus_kernels
from conftest import bad_input_test
from mrus_models.train.config import apply_overrides
from mrus_models.train.registry import get_task
from mrus_models.voxelmorph import VoxelMorphConfig, VoxelMorphTask, losses, model
from mrus_models.voxelmorph.task import dice, endpoint_error_mm

SIZE = (64, 64)


def _batch(gen: torch.Generator, b: int = 2, size=SIZE) -> dict[str, torch.Tensor]:
    """A batch in the datasets' item format (mask 4 voxels in, displacements of scale 2)."""
    return synthetic_batch(gen, b, size, margin=4, ddf_scale=2.0)


def _config(**kw) -> VoxelMorphConfig:
    return VoxelMorphConfig(size=SIZE, **kw)


# --------------------------------------------------------------------------- configuration


def test_defaults_are_the_papers():
    c = VoxelMorphConfig()
    assert c.lr == 1e-4  # Balakrishnan et al. 2019
    assert c.steps_integration == 7  # Dalca et al. 2019
    assert c.encoder == (16, 32, 32, 32) and c.decoder == (32, 32, 32, 32, 32, 16, 16)
    assert c.lncc_window == 9 and c.flow_init_std == 1e-5
    assert c.smoothness_weight == 1.0
    assert c.regularise == "displacement"
    assert c.image_size == (192, 192)
    assert dataclasses.replace(c, ndim=3).image_size == (128, 128, 64)
    assert set(VoxelMorphConfig.architecture_fields()) >= {"ndim", "encoder", "decoder",
                                                           "residual", "norm"}


def test_overrides_are_typed():
    c = apply_overrides(VoxelMorphConfig(), ["similarity=lncc", "size=64", "lam=0.5",
                                             "backend=torch", "encoder=8,8", "decoder=8,8,8"])
    assert (c.similarity, c.size, c.image_size, c.lam, c.backend) == \
        ("lncc", (64,), (64, 64), 0.5, "torch")
    assert c.smoothness_weight == 0.5
    assert apply_overrides(c, ["backend=none"]).backend is None


test_bad_config = bad_input_test({
    "similarity": (lambda: apply_overrides(VoxelMorphConfig(), ["similarity=ssd"]), ValueError,
                   r"similarity.*'mi', 'lncc'.*'ssd'"),
    "ndim": (lambda: VoxelMorphConfig(ndim=4), ValueError, r"ndim: expected 2 or 3, got 4"),
    "size divisibility": (lambda: VoxelMorphConfig(size=(60, 64)), ValueError,
                          r"divisible by 2 \*\* len\(encoder\) = 16, got \(60, 64\)"),
    "size length": (lambda: VoxelMorphConfig(size=(64, 64, 64)), ValueError,
                    r"size: expected 2 positive sizes"),
    "decoder": (lambda: VoxelMorphConfig(decoder=(32, 32)), ValueError,
                r"decoder: expected more widths"),
    "lam": (lambda: VoxelMorphConfig(lam=-1.0), ValueError, r"lam: expected a number >= 0"),
    "window": (lambda: VoxelMorphConfig(lncc_window=8), ValueError,
               r"lncc_window: expected an odd"),
    "backend": (lambda: apply_overrides(VoxelMorphConfig(), ["backend=gpu"]), ValueError,
                r"backend.*'gpu'"),
    "model input": (lambda: VoxelMorphTask().build(_config())(torch.rand(1, 1, 64, 64),
                                                              torch.rand(1, 1, 64, 32)),
                    ValueError, r"same shape, got \(1, 1, 64, 64\) and \(1, 1, 64, 32\)"),
    "predict input": (lambda: VoxelMorphTask().predict(VoxelMorphTask().build(_config()),
                                                      torch.rand(1, 1, 8, 8, 8),
                                                      torch.rand(1, 1, 8, 8, 8), _config()),
                      ValueError, r"predict: fixed and moving must both be \[B, 1, \*S\] \(2D\)"),
})


def test_registered():
    task = get_task("voxelmorph")
    assert isinstance(task, VoxelMorphTask) and task.config_class is VoxelMorphConfig


# --------------------------------------------------------------------------- training step


@pytest.mark.parametrize("similarity", ["mi", "lncc"])
def test_one_step_lowers_the_loss_and_every_parameter_gets_a_gradient(similarity):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    config = _config(similarity=similarity)
    task = VoxelMorphTask()
    net = task.build(config)
    batch = _batch(gen)
    check_one_step(task, net, batch, config, {"similarity", "smoothness"})


def test_network_starts_near_the_identity():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    batch = _batch(gen, b=1)
    out = VoxelMorphTask().build(_config())(batch["moving"], batch["fixed"])
    assert out["ddf"].shape == (1, 2, *SIZE) and out["velocity"].shape == (1, 2, *SIZE)
    assert out["ddf"].abs().max().item() < 1e-2
    assert (out["warped"] - batch["moving"]).abs().max().item() < 1e-2


# --------------------------------------------------------------------------- the fused ops


def _spy(monkeypatch, owner, name: str, calls: list):
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append((name, kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)


@pytest.mark.parametrize("similarity, op", [("mi", "mutual_information"), ("lncc", "lncc")])
@pytest.mark.parametrize("regularise", ["displacement", "velocity"])
def test_losses_and_model_call_the_fused_ops(monkeypatch, similarity, op, regularise):
    calls: list = []
    for name in ("mutual_information", "lncc", "grad_l2"):
        _spy(monkeypatch, losses, name, calls)
    for name in ("integrate_velocity", "warp"):
        _spy(monkeypatch, model, name, calls)
    torch.manual_seed(0)
    config = VoxelMorphConfig(size=(32,), encoder=(8, 8), decoder=(8, 8, 8), lam=2.0,
                              similarity=similarity, backend="torch", regularise=regularise)
    net = VoxelMorphTask().build(config)
    batch = _batch(torch.Generator().manual_seed(3), b=1, size=(32, 32))
    loss, logs = VoxelMorphTask().training_step(net, batch, config)
    assert calls == [("integrate_velocity", "torch"), ("warp", "torch"), (op, "torch"),
                     ("grad_l2", "torch")]
    # The loss is the documented combination of the two terms.
    out = net(batch["moving"], batch["fixed"])
    field = out["ddf"] if regularise == "displacement" else out["velocity"]
    if similarity == "mi":
        sim = -mrus_kernels.mutual_information(batch["fixed"], out["warped"], bins=32, sigma=0.5)
    else:
        sim = 1 - mrus_kernels.lncc(batch["fixed"], out["warped"], window=9)
    expected = sim.mean() + 2.0 * mrus_kernels.grad_l2(field)
    assert abs(loss.item() - expected.item()) <= 1e-5
    assert abs(logs["similarity"].item() - sim.mean().item()) <= 1e-5


@pytest.mark.skipif(mrus_kernels.backends.call_reason("cpu", torch.device("cpu"), torch.float32)
                    is not None, reason="the compiled cpu backend is not built")
def test_backends_agree_on_the_loss():
    torch.manual_seed(0)
    batch = _batch(torch.Generator().manual_seed(4), b=2, size=(32, 32))
    small = {"size": (32,), "encoder": (8, 8), "decoder": (8, 8, 8)}
    net = VoxelMorphTask().build(VoxelMorphConfig(**small))
    torch.nn.init.normal_(net.flow.conv.weight, std=0.05)  # a visible deformation
    values = {}
    for backend in ("torch", "cpu"):
        config = VoxelMorphConfig(backend=backend, **small)
        values[backend] = VoxelMorphTask().training_step(net, batch, config)[0].item()
    assert abs(values["torch"] - values["cpu"]) <= 1e-5, values


# --------------------------------------------------------------------------- evaluation


class _Truth(torch.nn.Module):
    """Predicts a fixed displacement (the truth): the metrics must then be perfect."""

    stride = 16

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.ddf = ddf

    def forward(self, moving, fixed):
        ddf = self.ddf.expand(moving.shape[0], *self.ddf.shape[1:]).contiguous()
        return {"ddf": ddf, "velocity": ddf, "warped": mrus_kernels.warp(moving, ddf)}


def test_metrics_of_a_known_translation():
    # moving = fixed shifted by 3 voxels along axis 1: the truth is a constant displacement
    # of 3 voxels = 3 x 2 mm, and warping by it restores the fixed labels exactly.
    batch = translation_batch()
    truth = batch["ddf"]
    config = _config(similarity="lncc")
    metrics = VoxelMorphTask().evaluate(_Truth(truth), [batch], config, torch.device("cpu"))
    assert metrics["epe_mm"] == 0.0
    assert abs(metrics["epe_mm_identity"] - 6.0) <= 1e-6
    assert metrics["dice_wm"] == 1.0 and metrics["dice_gm"] == 1.0
    # Unwarped: WM overlaps in 16 x 7 of 2 x 16 x 10 voxels; GM in 10 x 9 of 2 x 10 x 12.
    assert abs(metrics["dice_wm_identity"] - 2 * 16 * 7 / (2 * 160)) <= 1e-12
    assert abs(metrics["dice_gm_identity"] - 2 * 10 * 9 / (2 * 120)) <= 1e-12
    assert metrics["folding_fraction"] == 0.0


def test_metric_helpers_by_hand():
    ddf = torch.zeros(2, 2, 4, 4)
    truth = torch.zeros(2, 2, 4, 4)
    truth[0, 0] = 3.0
    truth[0, 1] = 4.0  # |(3, 4) voxels| with spacing (1, 0.5) mm: sqrt(9 + 4) mm
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True
    spacing = torch.tensor([[1.0, 0.5], [1.0, 1.0]])
    epe = endpoint_error_mm(ddf, truth, mask, spacing)
    assert abs(epe[0].item() - 13 ** 0.5) <= 1e-6 and epe[1].isnan()
    a = torch.tensor([[[0, 3, 3, 3]], [[0, 0, 0, 0]]])
    b = torch.tensor([[[3, 3, 0, 0]], [[0, 0, 0, 0]]])
    d = dice(a, b, 3)
    assert abs(d[0].item() - 2 * 1 / 5) <= 1e-12 and d[1].isnan()


def test_evaluate_returns_finite_metrics():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    loader = [_batch(gen, b=2), _batch(gen, b=1)]
    task, config = VoxelMorphTask(), _config()
    net = task.build(config).eval()
    metrics = task.evaluate(net, loader, config, torch.device("cpu"))
    for key in ("epe_mm", "epe_mm_identity", "dice_wm", "dice_gm", "folding_fraction", "loss"):
        assert key in metrics and isinstance(metrics[key], float), key
        assert torch.isfinite(torch.tensor(metrics[key])), (key, metrics[key])
    # An untrained network is the identity: its error is the identity's.
    assert abs(metrics["epe_mm"] - metrics["epe_mm_identity"]) <= 1e-2
    assert metrics["epe_mm_identity"] > 0.5
    assert 0.0 <= metrics["dice_wm"] <= 1.0 and metrics["folding_fraction"] == 0.0


# --------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("ndim, size", [(2, (64, 64)), (2, (50, 70)), (3, (20, 18, 16))])
def test_predict_shapes(ndim, size):
    torch.manual_seed(0)
    config = VoxelMorphConfig(ndim=ndim, size=(16,), encoder=(8, 8), decoder=(8, 8, 8))
    task = VoxelMorphTask()
    net = task.build(config).eval()
    gen = torch.Generator().manual_seed(6)
    fixed = 100 * torch.rand(2, 1, *size, generator=gen)
    moving = 100 * torch.rand(2, 1, *size, generator=gen)
    out = task.predict(net, fixed, moving, config)
    assert out["ddf"].shape == (2, ndim, *size)
    assert out["velocity"].shape == (2, ndim, *size)
    assert out["warped"].shape == (2, 1, *size)
    assert out["ddf"].is_contiguous()
    assert bool(torch.isfinite(out["ddf"]).all())
    assert torch.equal(out["warped"], mrus_kernels.warp(moving, out["ddf"]))
    if all(s % 4 == 0 for s in size):  # no padding: the network's own field
        assert torch.equal(out["ddf"], net(moving, fixed)["ddf"])


# --------------------------------------------------------------------------- the datasets


@pytest.mark.parametrize("ndim", [2, 3])
def test_dataset_items_fit_the_task(ndim):
    torch.manual_seed(0)
    config = VoxelMorphConfig(ndim=ndim, size=(32,), encoder=(8, 8), decoder=(8, 8, 8),
                              train_items=2)
    task = VoxelMorphTask()
    train = task.dataset(config, "train")
    assert len(train) == 2
    assert type(train).__name__ == ("SlicePairs" if ndim == 2 else "Crops3D")
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))
    assert batch["ddf"].shape == (2, ndim, *([32] * ndim))
    net = task.build(config)
    loss, _ = task.training_step(net, batch, config)
    loss.backward()
    assert bool(torch.isfinite(loss))
    # The dataset's truth is what the task's metrics score as perfect: the conventions
    # (warp(moving, ddf) ~ fixed, spacing in mm) agree.
    val = task.dataset(config, "val")
    vbatch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(val, [0, 1]),
                                                   batch_size=2)))
    metrics = task.evaluate(_Truth(vbatch["ddf"]), [vbatch], config, torch.device("cpu"))
    assert metrics["epe_mm"] == 0.0 and metrics["epe_mm_identity"] > 0.5
    assert metrics["dice_wm"] > metrics["dice_wm_identity"]
    assert metrics["dice_gm"] > metrics["dice_gm_identity"]


#: The CPU-sized run of ``test_short_cpu_training_beats_the_identity`` (about 5 minutes on
#: 2 cores): 64 × 64 axial T1 / T2-like slices (3 mm pixels), warps of up to 12 mm, batch 4,
#: Adam 1e-3 (ten times the paper's 1e-4: 300 steps instead of the paper's ~1e5).
SHORT_RUN = ["--steps", "300", "--batch-size", "4", "--device", "cpu", "--set", "size=64",
             "max_displacement=12", "lr=1e-3", "planes=axial", "val_batches=0",
             "checkpoint_every=1000"]


@pytest.mark.slow
def test_short_cpu_training_beats_the_identity(tmp_path, capsys):
    """`mrus train voxelmorph` for a short CPU run, then `mrus evaluate --split test --json`
    on held-out slices (other slice positions and warps than training): lower mean
    endpoint error and higher WM and GM Dice than the identity, and no folding."""
    import json

    from mrus_models.cli import main

    out = tmp_path / "run"
    assert main(["--quiet", "train", "voxelmorph", "--out", str(out), *SHORT_RUN]) == 0
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "voxelmorph", "--checkpoint", str(out / "checkpoint.pt"),
                 "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["step"] == 300
    assert metrics["epe_mm"] < 0.95 * metrics["epe_mm_identity"], metrics
    assert metrics["dice_wm"] > metrics["dice_wm_identity"] + 0.01, metrics
    assert metrics["dice_gm"] > metrics["dice_gm_identity"] + 0.01, metrics
    assert metrics["folding_fraction"] < 1e-3, metrics
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 300


def test_resume_continues_bit_for_bit(tmp_path):
    """voxelmorph trained 4 steps in one go equals 2 steps, a checkpoint, and 2 resumed steps,
    bit for bit (weights and Adam moments), with augmentation and validation in the run."""
    from mrus_models.train import Trainer

    task = get_task("voxelmorph")
    config = apply_overrides(VoxelMorphConfig(), [
        "size=32", "batch_size=2", "steps=4", "lr=1e-3", "planes=axial", "train_items=6",
        "val_every=2", "val_batches=1", "checkpoint_every=2"])

    def state(t):
        return t.model.state_dict(), t.optimizer.state_dict()["state"]

    whole = Trainer(task, config, tmp_path / "whole", "cpu", progress=False)
    whole.fit()
    Trainer(task, config, tmp_path / "parts", "cpu", progress=False).fit(until=2)
    resumed = Trainer(task, config, tmp_path / "parts", "cpu", resume=True, progress=False)
    assert resumed.step == 2
    resumed.fit()
    (wa, oa), (wb, ob) = state(whole), state(resumed)
    assert wa.keys() == wb.keys()
    start = Trainer(task, config, tmp_path / "start", "cpu", progress=False).net.state_dict()
    moved = [k for k in wa if not torch.equal(wa[k], start[k])]
    assert moved, "training changed no weight: the comparison would be vacuous"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
