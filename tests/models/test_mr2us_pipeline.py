"""``mrus mr2us`` (mrus_models.anatomy_aware.pipeline): ACMT translation of both volumes,
anatomy-aware registration of the translated pair, the original MR warped; NIfTI in and out,
the displacement in mm; bad input refused with one error line and exit status 2."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch

import mrus_kernels
from mrus_models.anatomy_aware import pipeline as pipeline_module
from mrus_models.anatomy_aware.pipeline import load_pipeline, mr2us
from mrus_models.cli import main
from mrus_models.data import read_nifti, write_nifti

#: The fixed grid: 18 × 14 × 10 voxels (no axis divisible by the networks' stride 4: the
#: pipeline pads), anisotropic spacing, an offset origin.
SIZE = (18, 14, 10)
SPACING = (1.5, 1.0, 2.0)
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.0, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(acmt, anatomy_aware) checkpoints of one tiny training step each, 16 × 16 × 8 crops."""
    root = tmp_path_factory.mktemp("mr2us_ckpt")
    acmt, reg = root / "acmt", root / "reg"
    assert main(["--quiet", "train", "acmt", "--out", str(acmt), "--steps", "1",
                 "--device", "cpu", "--set", "size=16,16,8", "widths=4,8", "time_dim=8",
                 "deep_level=1", "energy_widths=4", "energy_time_dim=8",
                 "val_batches=0"]) == 0
    # flow_init_std large enough that the untrained field is far from zero: a warp of the
    # translated MR and one of the original then differ visibly.
    assert main(["--quiet", "train", "anatomy_aware", "--out", str(reg), "--steps", "1",
                 "--device", "cpu", "--set", "size=16,16,8", "encoder=8,8", "decoder=8,8,8",
                 "time_dim=8", "heads=2", "train_items=1", "val_batches=0",
                 "flow_init_std=0.05"]) == 0
    return str(acmt / "checkpoint.pt"), str(reg / "checkpoint.pt")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """(fixed US path, moving MR path on the same grid, moving MR on another grid, the MR
    array): smooth random volumes with a bright blob."""
    root = tmp_path_factory.mktemp("mr2us_img")
    gen = torch.Generator().manual_seed(3)
    coarse = torch.rand(2, 1, 5, 4, 3, generator=gen, dtype=torch.float64)
    smooth = torch.nn.functional.interpolate(coarse, size=SIZE, mode="trilinear",
                                             align_corners=True).float()
    us, mr = smooth[:1] * 80.0, smooth[1:] * 1000.0 + 50.0
    write_nifti(root / "us.nii.gz", us, AFFINE)
    write_nifti(root / "mr.nii.gz", mr, AFFINE)
    # The MR on a coarser grid covering the same field: another shape and affine.
    other = AFFINE.copy()
    other[:3, :3] *= 2.0
    mr_coarse = torch.nn.functional.interpolate(mr, size=(9, 7, 5), mode="trilinear",
                                                align_corners=False)
    write_nifti(root / "mr_coarse.nii.gz", mr_coarse, other)
    return str(root / "us.nii.gz"), str(root / "mr.nii.gz"), str(root / "mr_coarse.nii.gz"), mr


def _run(checkpoints, fixed, moving, out, *extra):
    acmt, reg = checkpoints
    return main(["mr2us", "--acmt", acmt, "--registration", reg, fixed, moving, "-o", str(out),
                 "--device", "cpu", *extra])


def _ddf_voxels(path) -> torch.Tensor:
    """A displacement NIfTI (mm, (X, Y, Z, 1, 3)) in voxel units [1, 3, *S] of the diagonal
    AFFINE."""
    mm = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)[..., 0, :]
    return torch.from_numpy(np.moveaxis(mm, -1, 0) / np.array(SPACING)[:, None, None, None]
                            )[None]


def test_outputs_on_the_fixed_grid_and_the_displacement_in_mm(checkpoints, volumes, tmp_path,
                                                              capsys):
    fixed_path, mr_path, _, mr = volumes
    out, ddf_path = tmp_path / "o" / "warped.nii.gz", tmp_path / "d" / "phi.nii.gz"
    assert _run(checkpoints, fixed_path, mr_path, out, "--ddf", str(ddf_path)) == 0
    captured = capsys.readouterr()
    assert "mr2us" in captured.err  # the stage bar (tqdm writes to stderr)
    warped = read_nifti(out)
    assert tuple(warped.data.shape[2:]) == SIZE
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-6)
    img = nib.load(str(ddf_path))
    assert img.shape == (*SIZE, 1, 3) and img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    # The file holds the predicted voxel field times the spacing (diagonal affine).
    pipe = load_pipeline(*checkpoints)
    fixed = read_nifti(fixed_path).data
    want = mr2us(pipe, fixed, mr, progress=False)
    mm = np.asarray(img.dataobj, dtype=np.float64)[..., 0, :]
    expect = np.moveaxis(want["ddf"][0].double().numpy(), 0, -1) * np.array(SPACING)
    assert float(np.abs(expect).max()) > 0.05  # the field is not trivially zero
    err = float(np.abs(mm - expect).max())
    assert err <= 1e-5, err
    err = float((warped.data - want["warped"]).abs().max())
    assert err <= 1e-3, err


def test_the_original_mr_is_warped_and_the_translated_pair_registered(checkpoints, volumes,
                                                                       tmp_path, monkeypatch):
    fixed_path, mr_path, _, mr = volumes
    fixed = read_nifti(fixed_path).data
    pipe = load_pipeline(*checkpoints)
    calls = []
    real_net = pipe.registration_model.forward

    def spy(moving, fixed_, *a, **kw):
        calls.append((moving.clone(), fixed_.clone()))
        return real_net(moving, fixed_, *a, **kw)

    monkeypatch.setattr(pipe.registration_model, "forward", spy)
    out = mr2us(pipe, fixed, mr, progress=False)
    assert len(calls) == 1
    moving_in, fixed_in = calls[0]
    # The network saw ACMT's translations, padded by edge replication to 20 × 16 × 12.
    assert moving_in.shape == (1, 1, 20, 16, 12)
    with torch.no_grad():
        mt = pipe.acmt_task.translate(pipe.acmt_model, mr, pipe.acmt_config)["translated"]
        ft = pipe.acmt_task.translate(pipe.acmt_model, fixed, pipe.acmt_config)["translated"]
    assert torch.equal(moving_in[..., :18, :14, :10], mt)
    assert torch.equal(fixed_in[..., :18, :14, :10], ft)
    assert torch.equal(moving_in[..., 18:, :14, :10], mt[..., 17:18, :, :].expand(-1, -1, 2, -1,
                                                                                  -1))
    assert not torch.equal(mt, mr)
    # The warped volume is the ORIGINAL MR (intensities about 50-1050) resampled by Φ, not
    # the translated one (about [-1, 1]).
    ref = mrus_kernels.warp(mr, out["ddf"])
    assert torch.equal(out["warped"], ref)
    assert float(out["warped"].max()) > 100.0
    assert not torch.allclose(out["warped"], mrus_kernels.warp(mt, out["ddf"]))
    # Through the command: the written image is the original MR warped by the written field.
    target = tmp_path / "warped.nii"
    monkeypatch.undo()
    assert _run(checkpoints, fixed_path, mr_path, target, "--quiet") == 0
    written = read_nifti(target).data
    field = _ddf_voxels(tmp_path / "warped_ddf.nii").float()  # default: beside the output
    err = float((written - mrus_kernels.warp(mr, field)).abs().max())
    assert err <= 1e-2, err  # float32 mm round trip; intensities up to 1050


def test_moving_mr_on_another_grid_is_resampled_through_the_affines(checkpoints, volumes,
                                                                    tmp_path, capsys):
    fixed_path, _, coarse_path, _ = volumes
    out = tmp_path / "warped.nii.gz"
    assert _run(checkpoints, fixed_path, coarse_path, out) == 0
    assert "resampled" in capsys.readouterr().out
    warped = read_nifti(out)
    assert tuple(warped.data.shape[2:]) == SIZE
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-6)
    assert (tmp_path / "warped_ddf.nii.gz").is_file()
    assert bool(torch.isfinite(warped.data).all()) and float(warped.data.max()) > 100.0


def _bad_cases(tmp, checkpoints, volumes):
    fixed, mr, _, _ = volumes
    acmt, reg = checkpoints
    text = tmp / "notes.txt"
    text.write_text("not an image")
    fake = tmp / "fake.nii.gz"
    fake.write_bytes(b"not a nifti file at all")
    flat = tmp / "flat.nii.gz"
    write_nifti(flat, torch.rand(1, 1, 16, 16), np.eye(4))
    junk = tmp / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    return {
        "missing fixed": ([fixed + ".missing.nii.gz", mr], acmt, reg, "FIXED_US .*no such file"),
        "missing moving": ([fixed, str(tmp / "none.nii")], acmt, reg, "MOVING_MR .*no such"),
        "not NIfTI by name": ([str(text), mr], acmt, reg, r"FIXED_US .*\.nii or \.nii\.gz"),
        "not NIfTI inside": ([fixed, str(fake)], acmt, reg, "MOVING_MR"),
        "2D image": ([fixed, str(flat)], acmt, reg, "MOVING_MR .*3D volume, got a 2D"),
        "missing checkpoint": ([fixed, mr], str(tmp / "no.pt"), reg, "--acmt: .*no such file"),
        "not a checkpoint": ([fixed, mr], acmt, str(junk), "--registration: .*not a mrus"),
        "registration in --acmt": ([fixed, mr], reg, reg,
                                   ("--acmt: expected a checkpoint.pt of `mrus train acmt`.*"
                                    "model 'anatomy_aware'")),
        "acmt in --registration": ([fixed, mr], acmt, acmt,
                                   "--registration: .*`mrus train anatomy_aware`.*model 'acmt'"),
        "output not NIfTI": ([fixed, mr], acmt, reg, "-o/--output"),
    }


@pytest.mark.parametrize("case", ["missing fixed", "missing moving", "not NIfTI by name",
                                  "not NIfTI inside", "2D image", "missing checkpoint",
                                  "not a checkpoint", "registration in --acmt",
                                  "acmt in --registration", "output not NIfTI"])
def test_bad_input_one_error_line_exit_2_nothing_written(case, checkpoints, volumes, tmp_path,
                                                         capsys):
    images, acmt, reg, message = _bad_cases(tmp_path, checkpoints, volumes)[case]
    out_dir = tmp_path / "out"
    out = out_dir / ("warped.png" if case == "output not NIfTI" else "warped.nii.gz")
    capsys.readouterr()
    rc = main(["--quiet", "mr2us", "--acmt", acmt, "--registration", reg, *images, "-o",
               str(out), "--ddf", str(out_dir / "ddf.nii.gz"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("mrus: error:"), err
    assert re.search(message, err[0]), err[0]
    assert not out_dir.exists()


def test_mr2us_rejects_tensors_of_two_grids(checkpoints):
    pipe = load_pipeline(*checkpoints)
    with pytest.raises(ValueError, match="mr2us: fixed_us and moving_mr must be single "
                                         "volumes"):
        mr2us(pipe, torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9), progress=False)
    with pytest.raises(TypeError, match="moving_mr must be a torch.Tensor"):
        mr2us(pipe, torch.rand(1, 1, 8, 8, 8), np.zeros((1, 1, 8, 8, 8)), progress=False)
    assert pipeline_module.STAGES[-1] == "warp MR"
