"""The `mrus` command: demo on the CPU, register on NIfTI files, clear errors on bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from mrus_kernels import warp
from mrus_models.cli import main
from mrus_models.data import known_warp, read_displacement, read_nifti, write_nifti


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0 and "mrus_models" in out and "backends:" in out and "torch" in out


def _demo_rows(out: str) -> dict:
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in
            re.finditer(r"(Dice \w+|EPE mean \(mm, brain\))\s+([\d.]+)\s+([\d.]+)", out)}


def test_demo_t2_cpu_2mm(tmp_path, capsys):
    code, out, err = _run(capsys, "demo", "--resolution", "2", "--device", "cpu", "--quiet",
                          "--compare-iterations", "1", "--out", str(tmp_path))
    assert code == 0, err
    assert "Traceback" not in err
    rows = _demo_rows(out)
    # The targets for the T2-like pair: WM Dice >= 0.90, mean EPE <= 1 mm.
    assert rows["Dice wm"][1] >= 0.90 and rows["Dice wm"][1] > rows["Dice wm"][0]
    epe_before, epe_after = rows["EPE mean (mm, brain)"]
    assert epe_after <= 1.0 and epe_after <= 0.5 * epe_before
    assert "folding fraction (det J <= 0): 0.00e+00" in out and "x faster" in out
    for name in ("warped.nii.gz", "ddf.nii.gz", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0
    warped = read_nifti(tmp_path / "warped.nii.gz")
    ddf = read_displacement(tmp_path / "ddf.nii.gz")
    assert ddf.data.shape[2:] == warped.data.shape[2:]


def test_demo_us_cpu_2mm(tmp_path, capsys):
    code, out, err = _run(capsys, "demo", "--modality", "us", "--resolution", "2", "--quiet",
                          "--no-compare", "--out", str(tmp_path))
    assert code == 0, err
    rows = _demo_rows(out)
    # The targets for pseudo-ultrasound: WM Dice >= 0.80, mean EPE >= 60 % lower.
    assert rows["Dice wm"][1] >= 0.80
    epe_before, epe_after = rows["EPE mean (mm, brain)"]
    assert epe_after <= 0.4 * epe_before
    assert "EPE mean (mm, fan)" in out


def _pair_files(tmp_path, affine_moving=None):
    size = (24, 26, 22)
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, 5, 5, 5, generator=g)
    fixed = torch.nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
    truth = known_warp(size, max_displacement=2.0, affine=False, control=3, seed=3)
    moving = warp(1 - fixed, truth.inverse)
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(tmp_path / "fixed.nii.gz", fixed, a)
    write_nifti(tmp_path / "moving.nii.gz", moving, a if affine_moving is None else affine_moving)
    return fixed, moving, truth


def test_register_files(tmp_path, capsys):
    fixed, moving, truth = _pair_files(tmp_path)
    code, out, err = _run(capsys, "register", str(tmp_path / "fixed.nii.gz"),
                          str(tmp_path / "moving.nii.gz"), "-o", str(tmp_path / "w.nii.gz"),
                          "--ddf", str(tmp_path / "d.nii.gz"), "--levels", "2", "1",
                          "--iterations", "40", "20", "--transform", "svf", "--smoothness", "5",
                          "--quiet")
    assert code == 0, err
    w = read_nifti(tmp_path / "w.nii.gz")
    d = read_displacement(tmp_path / "d.nii.gz")
    assert w.data.shape == fixed.shape and np.allclose(w.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    # The registration helps: the warped moving is closer to 1 - fixed than the moving was.
    target = 1 - fixed
    assert float((w.data - target).abs().mean()) < 0.7 * float((moving - target).abs().mean())
    assert float((d.data - truth.ddf).norm()) < float(truth.ddf.norm())


def test_register_resamples_a_moving_image_on_another_grid(tmp_path, capsys):
    # The moving file's grid is shifted by 3 voxels (6 mm) along x: resampled first through
    # the two affines, so that an affine-free registration starts aligned.
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted = a.copy()
    shifted[0, 3] = 6.0
    size = (24, 26, 22)
    g = torch.Generator().manual_seed(1)
    fixed = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 5, 5, generator=g), size=size,
                                            mode="trilinear", align_corners=True)
    moving = torch.roll(fixed, -3, dims=2)  # world point of moving voxel i = fixed voxel i + 3
    write_nifti(tmp_path / "f.nii.gz", fixed, a)
    write_nifti(tmp_path / "m.nii.gz", moving, shifted)
    code, out, err = _run(capsys, "register", str(tmp_path / "f.nii.gz"),
                          str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "w.nii.gz"),
                          "--transform", "affine", "--levels", "1", "--iterations", "1")
    assert code == 0, err
    assert "resampled" in out
    w = read_nifti(tmp_path / "w.nii.gz").data
    inner = (slice(None), slice(None), slice(4, -4), slice(2, -2), slice(2, -2))
    # One Adam step moves the affine by about 0.1 voxel; without the resampling the error
    # would be that of a 3-voxel shift.
    err = float((w - fixed)[inner].abs().mean())
    unshifted = float((moving - fixed)[inner].abs().mean())
    assert err <= 0.01 and err <= unshifted / 10, (err, unshifted)


@pytest.mark.parametrize("case", ["missing", "4d", "dimension"])
def test_register_bad_input_is_one_clear_line(tmp_path, capsys, case):
    _pair_files(tmp_path)
    fixed, moving = str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz")
    if case == "missing":
        moving, expected = str(tmp_path / "absent.nii.gz"), "NIfTI file not found"
    elif case == "4d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)),
                 tmp_path / "t.nii.gz")
        moving, expected = str(tmp_path / "t.nii.gz"), "expected a 2D or 3D image, got a 4D"
    else:
        nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), tmp_path / "s.nii.gz")
        moving, expected = str(tmp_path / "s.nii.gz"), "same dimension, got a 3D fixed image"
    code, out, err = _run(capsys, "register", fixed, moving, "-o", str(tmp_path / "o.nii.gz"))
    assert code == 2
    assert err.startswith("mrus: error: ") and expected in err and "Traceback" not in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_console_script_exit_status(tmp_path):
    # Through a real process: non-zero status, one line on stderr, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "mrus_models.cli", "register", str(tmp_path / "a.nii"),
         str(tmp_path / "b.nii"), "-o", str(tmp_path / "c.nii")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "mrus: error: NIfTI file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_option_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--modality", "ct"])
    assert exc.value.code == 2 and "invalid choice: 'ct'" in capsys.readouterr().err


def test_bench_train_runs_only_the_training_step_suite():
    """`mrus bench --train` runs benchmarks/bench_train_step.py and nothing else (here in
    correctness mode on its quickest check, in a fresh process: pytest inside pytest)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from mrus_models.cli import main; sys.exit(main())",
         "bench", "--train", "--quiet", "-k", "plain_rows", "--collect-only"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = re.findall(r"(\w+\.py)::(\w+)", proc.stdout)
    assert collected, proc.stdout[-2000:]
    assert {f for f, _ in collected} == {"bench_train_step.py"}, collected
    assert [t for _, t in collected] == ["test_plain_rows_match_the_definitions"]


def test_bench_quick_and_train_are_alternatives(capsys):
    code, _, err = _run(capsys, "bench", "--quick", "--train")
    assert code == 2 and err.startswith("mrus: error: --quick and --train")
