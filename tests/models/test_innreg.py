"""mrus_models.innreg: configuration, network, losses on the fused ops, the Task, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _registration_batch import check_one_step, smooth_field, synthetic_batch, translation_batch

import mrus_kernels
from conftest import bad_input_test
from mrus_models.innreg import InnReg, InnRegConfig, InnRegTask, TranslationNet, losses, model
from mrus_models.train.config import apply_overrides
from mrus_models.train.registry import get_task

SIZE = (32, 32)
#: A network small enough for seconds per test: 2 InvBlocks, U-Net of two levels.
SMALL = {"size": (32,), "encoder": (8, 8), "decoder": (8, 8, 8), "inn_blocks": 2,
         "inn_hidden": 8}
SMALL_SET = ["size=32", "encoder=8,8", "decoder=8,8,8", "inn_blocks=2", "inn_hidden=8"]


def _config(**kw) -> InnRegConfig:
    return InnRegConfig(**{**SMALL, **kw})


def _batch(gen: torch.Generator, b: int = 2, size=SIZE) -> dict[str, torch.Tensor]:
    """A batch in SlicePairs' item format (mask 3 pixels in, displacements of scale 1.5)."""
    return synthetic_batch(gen, b, size, margin=3, ddf_scale=1.5)


def _warp_by_grid_sample(img: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """img(p + u(p)), bilinear, zeros outside: the warp convention written with torch's
    grid_sample (component i of u along array axis i, align_corners=True)."""
    h, w = img.shape[2:]
    ii, jj = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype),
                            indexing="ij")
    gi = 2 * (ii + ddf[:, 0]) / (h - 1) - 1
    gj = 2 * (jj + ddf[:, 1]) / (w - 1) - 1
    return F.grid_sample(img, torch.stack([gj, gi], dim=-1), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


# --------------------------------------------------------------------------- configuration


def test_defaults_are_the_papers():
    c = InnRegConfig()
    assert (c.lr, c.betas, c.batch_size, c.scheduler) == (2e-4, (0.5, 0.999), 3, "linear")
    assert c.image_size == (192, 192) and c.ndim == 2
    assert (c.lam_recon, c.lam_barrier, c.barrier, c.lam_inn, c.lam_smooth) == \
        (1.0, 1.0, 5.0, 0.1, 10.0)
    assert (c.barrier_form, c.barrier_bins) == ("released", 19)
    assert c.inn_blocks == 8 and c.steps_integration == 7 and c.bidirectional
    assert c.modality == "t2" and c.steps == 200 * 74  # 200 epochs of 222 slices / 3
    assert c.encoder == (16, 32, 32, 64, 64, 64) and c.decoder == (64, 64, 64, 32, 32, 32, 16)
    assert set(InnRegConfig.architecture_fields()) >= {
        "inn_blocks", "inn_hidden", "ddw_kernels", "ddw", "encoder", "decoder", "residual",
        "output_residual"}


def test_the_training_split_has_the_slices_an_epoch_assumes():
    from mrus_models.data import SlicePairs

    assert math.ceil(len(SlicePairs("t2", size=192, split="train")) / 3) == 74


def test_overrides_are_typed():
    c = apply_overrides(InnRegConfig(), ["barrier_form=paper", "size=64", "lam_smooth=1",
                                         "modality=us", "backend=torch", "encoder=8,8",
                                         "decoder=8,8,8", "bidirectional=false"])
    assert (c.barrier_form, c.image_size, c.lam_smooth, c.modality, c.backend) == \
        ("paper", (64, 64), 1.0, "us", "torch")
    assert not c.bidirectional


test_bad_config = bad_input_test({
    "form": (lambda: apply_overrides(InnRegConfig(), ["barrier_form=plain"]), ValueError,
             r"barrier_form.*'released', 'paper'.*'plain'"),
    "size divisibility": (lambda: InnRegConfig(size=(96, 64)), ValueError,
                          r"divisible by 2 \*\* len\(encoder\) = 64, got \(96, 64\)"),
    "size length": (lambda: InnRegConfig(size=(64, 64, 64)), ValueError,
                    r"size: expected 2 positive sizes"),
    "decoder": (lambda: InnRegConfig(decoder=(32, 32)), ValueError,
                r"decoder: expected more widths"),
    "barrier": (lambda: InnRegConfig(barrier=0.0), ValueError,
                r"barrier: expected a finite positive number, got 0.0"),
    "barrier nan": (lambda: InnRegConfig(barrier=float("nan")), ValueError,
                    r"barrier: expected a finite positive number, got nan"),
    "weight": (lambda: InnRegConfig(lam_inn=-0.1), ValueError,
               r"lam_inn: expected a number >= 0, got -0.1"),
    "blocks": (lambda: InnRegConfig(inn_blocks=0), ValueError,
               r"inn_blocks: expected a positive integer, got 0"),
    "bins": (lambda: InnRegConfig(barrier_bins=1), ValueError,
             r"barrier_bins: expected an integer >= 2, got 1"),
    "model input": (lambda: InnRegTask().build(_config())(torch.rand(1, 1, 32, 32),
                                                          torch.rand(1, 1, 32, 16)),
                    ValueError, r"same shape, got \(1, 1, 32, 32\) and \(1, 1, 32, 16\)"),
    "predict input": (lambda: InnRegTask().predict(InnRegTask().build(_config()),
                                                  torch.rand(1, 1, 8, 8, 8),
                                                  torch.rand(1, 1, 8, 8, 8), _config()),
                      ValueError, r"predict: fixed and moving must both be \[B, 1, H, W\]"),
    "split": (lambda: InnRegTask().dataset(_config(), "training"), ValueError,
              r"split: expected 'train', 'val' or 'test', got 'training'"),
})


def test_registered():
    task = get_task("innreg")
    assert isinstance(task, InnRegTask) and task.config_class is InnRegConfig


# --------------------------------------------------------------------------- the network


def test_shapes_and_the_untrained_network_is_near_the_identity():
    torch.manual_seed(0)
    batch = _batch(torch.Generator().manual_seed(1), b=2)
    net = InnRegTask().build(_config())
    assert isinstance(net, InnReg) and isinstance(net.translation, TranslationNet)
    assert len(net.translation.blocks) == 2
    assert isinstance(net.output, torch.nn.Module) and net.stride == 4
    out = net(batch["moving"], batch["fixed"])
    assert sorted(out) == ["ddf", "inverse_ddf", "reconstructed", "source", "target",
                           "translated", "velocity", "warped", "warped_target",
                           "warped_translated"]
    for key, value in out.items():
        assert value.shape == ((2, 2, *SIZE) if "ddf" in key or key == "velocity"
                               else (2, 1, *SIZE)), key
        assert value.dtype == torch.float32 and bool(torch.isfinite(value).all()), key
    assert out["ddf"].abs().max().item() < 1e-2
    assert (out["warped"] - out["source"]).abs().max().item() < 1e-2
    # Normalised to [0, 1] per item, and T⁻¹(T(x)) = x.
    assert out["source"].amin().item() == 0.0 and out["source"].amax().item() == 1.0
    assert (out["reconstructed"] - out["source"]).abs().max().item() <= 1e-4
    # Bidirectional: φ⁻¹ = exp(−v).
    inverse = mrus_kernels.integrate_velocity(-out["velocity"], 7)
    assert torch.equal(out["inverse_ddf"], inverse)
    assert torch.equal(out["warped_target"], mrus_kernels.warp(out["target"], inverse))
    plain = net(batch["moving"], batch["fixed"], translate=False)
    assert "translated" not in plain and torch.equal(plain["ddf"], out["ddf"])
    one_way = InnRegTask().build(_config(bidirectional=False))(batch["moving"], batch["fixed"])
    assert "inverse_ddf" not in one_way


# --------------------------------------------------------------------------- training step


@pytest.mark.parametrize("form", ["released", "paper"])
def test_one_step_lowers_the_loss_and_every_parameter_gets_a_gradient(form):
    torch.manual_seed(0)
    config = _config(barrier_form=form)
    task = InnRegTask()
    net = task.build(config)
    batch = _batch(torch.Generator().manual_seed(2))
    check_one_step(task, net, batch, config, {"recon", "barrier", "inn", "smooth"})


def _entropies(fixed, moving, bins, sigma):
    """H(f), H(g), MI in nats per item, float64, from the joint Parzen histogram."""
    p = mrus_kernels.joint_histogram(fixed.double(), moving.double(), bins=bins, sigma=sigma,
                                     value_range=(0.0, 1.0))
    pf, pg = p.sum(2), p.sum(1)

    def h(q):
        return -(q * torch.log(q.clamp_min(1e-300))).sum(-1)

    hfg = -(p * torch.log(p.clamp_min(1e-300))).sum((1, 2))
    return h(pf), h(pg), h(pf) + h(pg) - hfg


@pytest.mark.parametrize("form", ["released", "paper"])
def test_each_loss_term_against_its_formula(form):
    torch.manual_seed(0)
    config = _config(barrier_form=form, lam_recon=0.7, lam_barrier=1.3, lam_inn=0.4,
                     lam_smooth=3.0, backend="torch")
    net = InnRegTask().build(config)
    torch.nn.init.normal_(net.flow.conv.weight, std=0.05)  # a visible deformation
    batch = _batch(torch.Generator().manual_seed(3))
    out = net(batch["moving"], batch["fixed"])
    loss, logs = losses.innreg_loss(out, config)
    x, y, ddf = out["source"].double(), out["target"].double(), out["ddf"].double()
    assert ddf.abs().max().item() > 0.1
    # eq. 9: ‖T(x)∘φ − y‖₁ (mean), the warp written with grid_sample.
    fake_y = net.translation(x.float()).double()
    recon = (_warp_by_grid_sample(fake_y, ddf) - y).abs().mean()
    # eq. 10-11 on (y, x∘φ).
    warped = _warp_by_grid_sample(x, ddf)
    hy, hx, mi = _entropies(y, warped, 19, 0.5)
    d = 1 - mi if form == "released" else (hy + hx) / mi
    # -log(b - d), continued by its tangent past d = b - margin (NMILoss's extended barrier:
    # the paper form's I >= 2 can start near b = 5 on a misaligned multi-modal pair).
    b, margin = config.barrier, mrus_kernels.NMILoss(barrier=config.barrier).margin
    inside = d <= b - margin
    barrier = torch.where(inside, -torch.log((b - d).clamp_min(margin)),
                          -math.log(margin) + (d - (b - margin)) / margin).mean()
    # eq. 12: ‖T⁻¹(T(x)) − x‖₁: T is invertible, so the term is rounding-sized.
    inn = (net.translation.inverse(fake_y.float()).double() - x).abs().mean()
    # eq. 13: mean over pixels and axes of the squared forward differences of u.
    smooth = ((ddf[:, :, 1:] - ddf[:, :, :-1]).square().mean()
              + (ddf[..., 1:] - ddf[..., :-1]).square().mean()) / 2
    want = {"recon": recon, "barrier": barrier, "inn": inn, "smooth": smooth}
    tol = {"recon": 1e-5, "barrier": 1e-4, "inn": 1e-6, "smooth": 1e-6}
    for k, v in want.items():
        assert abs(logs[k].item() - v.item()) <= tol[k], (k, logs[k].item(), v.item())
    assert inn.item() <= 1e-5 and recon.item() > 0.01 and smooth.item() > 1e-4
    total = 0.7 * recon + 1.3 * barrier + 0.4 * inn + 3.0 * smooth
    assert abs(loss.item() - total.item()) <= 2e-4


def test_the_barrier_falls_as_the_images_align():
    # An inverted-contrast pair (T2-like vs T1): the barrier loss on (y, x∘φ) is lowest at
    # the true alignment, for both forms, so minimising it aligns the images.
    gen = torch.Generator().manual_seed(4)
    y = torch.sigmoid(smooth_field(gen, 1, 1, (48, 48), 4.0))
    x = 1 - y
    for form in ("released", "paper"):
        config = _config(barrier_form=form, size=(48,), encoder=(8, 8))
        values = []
        for shift in (0, 2, 4, 8):
            moved = torch.roll(x, shift, dims=3)
            values.append(losses.barrier_loss(y, moved, config).item())
        assert values == sorted(values) and values[0] < values[-1] - 0.01, (form, values)


def _spy(monkeypatch, owner, name: str, calls: list):
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append((name, kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)


def test_losses_and_model_call_the_fused_ops(monkeypatch):
    calls: list = []
    _spy(monkeypatch, losses, "grad_l2", calls)
    _spy(monkeypatch, losses, "NMILoss", calls)
    for name in ("integrate_velocity", "warp"):
        _spy(monkeypatch, model, name, calls)
    torch.manual_seed(0)
    config = _config(backend="torch", bidirectional=False)
    net = InnRegTask().build(config)
    InnRegTask().training_step(net, _batch(torch.Generator().manual_seed(5), b=1), config)
    assert calls == [("integrate_velocity", "torch"), ("warp", "torch"), ("NMILoss", "torch"),
                     ("grad_l2", "torch")]


# --------------------------------------------------------------------------- evaluation


class _Truth(torch.nn.Module):
    """Predicts a fixed displacement (the truth): the metrics must then be perfect."""

    stride = 4

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.ddf = ddf
        self.inner = InnRegTask().build(_config())

    def forward(self, moving, fixed, translate=True):
        out = self.inner(moving, fixed, translate=translate)
        out["ddf"] = self.ddf.expand(moving.shape[0], *self.ddf.shape[1:]).contiguous()
        out["warped"] = mrus_kernels.warp(out["source"], out["ddf"])
        return out


def test_metrics_of_a_known_translation():
    # moving = fixed shifted by 3 pixels along axis 1: the truth is a constant displacement
    # of 3 pixels = 3 x 2 mm, and warping by it restores the fixed labels exactly.
    batch = translation_batch()
    truth = batch["ddf"]
    metrics = InnRegTask().evaluate(_Truth(truth), [batch], _config(size=(32, 48)),
                                    torch.device("cpu"))
    assert metrics["epe_mm"] == 0.0 and abs(metrics["epe_mm_identity"] - 6.0) <= 1e-6
    for tissue in ("csf", "gm", "wm"):
        assert metrics[f"dice_{tissue}"] == 1.0 and metrics[f"hd95_{tissue}"] == 0.0
    assert metrics["dice"] == 1.0 and metrics["hd95"] == 0.0
    assert abs(metrics["ssim"] - 1) <= 1e-12 and abs(metrics["ncc"] - 1) <= 1e-12
    # Unwarped: WM overlaps in 16 x 7 of 2 x 16 x 10 pixels; the CSF box (4 wide) in 4 x 1.
    assert abs(metrics["dice_wm_identity"] - 2 * 16 * 7 / (2 * 160)) <= 1e-12
    assert abs(metrics["dice_csf_identity"] - 2 * 4 * 1 / (2 * 16)) <= 1e-12
    # Every surface pixel of a box shifted 3 pixels (6 mm) along its rows is at most 6 mm
    # from the other's surface, the two side faces exactly 6 mm.
    assert 0 < metrics["hd95_wm_identity"] <= 6.0 + 1e-9
    assert metrics["ssim_identity"] < 0.9 and metrics["ncc_identity"] < 0.9
    assert metrics["folding_fraction"] == 0.0


def test_evaluate_returns_finite_metrics():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    loader = [_batch(gen, b=2), _batch(gen, b=1)]
    task, config = InnRegTask(), _config()
    net = task.build(config).eval()
    metrics = task.evaluate(net, loader, config, torch.device("cpu"))
    keys = ["loss", "recon", "barrier", "inn", "smooth", "epe_mm", "epe_mm_identity",
            "folding_fraction"]
    for base in ("ssim", "ncc", "dice", "dice_csf", "dice_gm", "dice_wm", "hd95", "hd95_csf",
                 "hd95_gm", "hd95_wm"):
        keys += [base, base + "_identity"]
    assert sorted(metrics) == sorted(keys)
    for key in keys:
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    # An untrained network is the identity: its error is the identity's.
    assert abs(metrics["epe_mm"] - metrics["epe_mm_identity"]) <= 1e-2
    assert metrics["epe_mm_identity"] > 0.5 and metrics["folding_fraction"] == 0.0


# --------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("size", [(32, 32), (30, 41)])
def test_predict_shapes(size):
    torch.manual_seed(0)
    config = _config()
    task = InnRegTask()
    net = task.build(config).eval()
    torch.nn.init.normal_(net.flow.conv.weight, std=0.05)
    gen = torch.Generator().manual_seed(7)
    fixed = 100 * torch.rand(2, 1, *size, generator=gen)
    moving = 100 * torch.rand(2, 1, *size, generator=gen)
    out = task.predict(net, fixed, moving, config)
    assert sorted(out) == ["ddf", "inverse_ddf", "velocity", "warped"]
    for key in ("ddf", "inverse_ddf", "velocity"):
        assert out[key].shape == (2, 2, *size) and out[key].is_contiguous(), key
        assert bool(torch.isfinite(out[key]).all()), key
    assert torch.equal(out["warped"], mrus_kernels.warp(moving, out["ddf"]))
    # exp(−v) undoes exp(v): u(p) + u⁻¹(p + u(p)) ≈ 0 (a wrong sign would leave 2u).
    assert out["ddf"].abs().max().item() > 0.05
    if size == (32, 32):
        assert torch.equal(out["ddf"], net(moving, fixed, translate=False)["ddf"])
        back = out["ddf"] + mrus_kernels.warp(out["inverse_ddf"], out["ddf"], padding="border")
        assert back.abs().max().item() <= 0.15 * out["ddf"].abs().max().item()


def test_dataset_items_fit_the_task():
    torch.manual_seed(0)
    config = _config(train_items=2, planes=("axial",))
    task = InnRegTask()
    train = task.dataset(config, "train")
    assert len(train) == 2 and type(train).__name__ == "SlicePairs"
    assert train.warp == "bspline"
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))
    assert batch["ddf"].shape == (2, 2, 32, 32)
    loss, _ = task.training_step(task.build(config), batch, config)
    assert bool(torch.isfinite(loss))
    # The dataset's truth is what the task's metrics score as perfect.
    val = task.dataset(config, "val")
    vbatch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(val, [0, 1]),
                                                   batch_size=2)))
    metrics = task.evaluate(_Truth(vbatch["ddf"]), [vbatch], config, torch.device("cpu"))
    assert metrics["epe_mm"] == 0.0 and metrics["epe_mm_identity"] > 0.5
    assert metrics["dice"] > metrics["dice_identity"]


# --------------------------------------------------------------------------- the command


def test_cli_train_evaluate_predict(tmp_path, capsys):
    from mrus_models.cli import main
    from mrus_models.data import read_displacement, read_nifti, write_nifti

    out = tmp_path / "run"
    assert main(["--quiet", "train", "innreg", "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--set", *SMALL_SET,
                 "planes=axial", "train_items=4", "val_batches=0"]) == 0
    config = InnRegConfig.from_json((out / "config.json").read_text())
    assert (config.steps, config.batch_size, config.inn_blocks) == (2, 2, 2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"recon", "barrier", "inn", "smooth"} <= set(log[-1])
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "innreg", "--checkpoint", str(out / "checkpoint.pt"),
                 "--split", "test", "--json", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["model"] == "innreg" and metrics["step"] == 2
    for key in ("epe_mm", "ssim", "ncc", "dice", "hd95"):
        assert math.isfinite(metrics[key]) and math.isfinite(metrics[key + "_identity"]), key
    assert metrics["folding_fraction"] == 0.0
    # predict: 2D NIfTI in (a size the network's stride does not divide), warped image and
    # displacement (mm) out, on the fixed grid.
    gen = torch.Generator().manual_seed(8)
    img = F.interpolate(torch.rand(1, 1, 5, 5, generator=gen), size=(30, 26), mode="bilinear",
                        align_corners=True)
    affine = np.diag([2.0, 3.0, 1.0, 1.0])
    write_nifti(tmp_path / "f.nii.gz", img, affine)
    write_nifti(tmp_path / "m.nii.gz", img.flip(-1).contiguous(), affine)
    assert main(["--quiet", "predict", "innreg", "--checkpoint", str(out / "checkpoint.pt"),
                 str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "w.nii.gz"), "--ddf", str(tmp_path / "d.nii.gz"),
                 "--device", "cpu"]) == 0
    ddf = read_displacement(tmp_path / "d.nii.gz").data
    warped = read_nifti(tmp_path / "w.nii.gz").data
    assert ddf.shape == (1, 2, 30, 26) and warped.shape == (1, 1, 30, 26)
    assert bool(torch.isfinite(ddf).all()) and bool(torch.isfinite(warped).all())
    # The written image is the moving image warped by the written displacement.
    want = mrus_kernels.warp(img.flip(-1), ddf)
    assert float((warped - want).abs().max()) <= 1e-4


#: The CPU-sized run of ``test_short_cpu_training_beats_the_identity`` (3.3 minutes on 2
#: cores): 48 × 48 axial T1 / T2-like slices (4 mm
#: pixels), warps of up to 12 mm, batch 3, a small T (2 InvBlocks, width 8) and a three-level
#: U-Net, Adam 1e-3 (five times the paper's 2e-4: 300 steps instead of 14,800) and λδ = 0.5
#: instead of 10 (at 300 steps the paper's weight keeps φ near the identity). The README's
#: ``innreg`` section lists what it reaches.
SHORT_RUN = ["--steps", "300", "--batch-size", "3", "--device", "cpu", "--set", "size=48",
             "encoder=16,32,32", "decoder=32,32,32,32,16,16", "inn_blocks=2", "inn_hidden=8",
             "max_displacement=12", "planes=axial", "lr=1e-3", "lam_smooth=0.5",
             "val_batches=0"]


@pytest.mark.slow
def test_short_cpu_training_beats_the_identity(tmp_path, capsys):
    """`mrus train innreg` for a short CPU run, then `mrus evaluate --split test --json` on
    held-out slices (other slice positions and warps than training): lower mean endpoint
    error, higher WM, GM and mean Dice and higher SSIM than the identity, and no folding."""
    from mrus_models.cli import main

    out = tmp_path / "run"
    assert main(["--quiet", "train", "innreg", "--out", str(out), *SHORT_RUN]) == 0
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "innreg", "--checkpoint", str(out / "checkpoint.pt"),
                 "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["step"] == int(SHORT_RUN[1])
    # Measured: 4.95 mm against 5.17; Dice WM 0.648 / 0.630, GM 0.770 / 0.749, mean of the
    # three tissues 0.570 / 0.563 (CSF, a few pixels wide at 4 mm, loses 0.015).
    assert metrics["epe_mm"] < 0.98 * metrics["epe_mm_identity"], metrics
    assert metrics["dice_wm"] > metrics["dice_wm_identity"] + 0.01, metrics
    assert metrics["dice_gm"] > metrics["dice_gm_identity"] + 0.01, metrics
    assert metrics["dice"] > metrics["dice_identity"], metrics
    assert metrics["ssim"] > metrics["ssim_identity"] + 0.05, metrics
    assert metrics["folding_fraction"] < 1e-3, metrics


def test_config_roundtrip():
    c = _config(barrier_form="paper")
    assert InnRegConfig.from_json(c.to_json()) == c
    assert dataclasses.replace(c, size=()).image_size == (192, 192)
