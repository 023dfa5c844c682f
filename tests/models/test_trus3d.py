"""mrus_models.trus3d: probe-free TRUS 3D reconstruction (MR2US-Pro §II-A).

The simulator against hand-written bilinear sampling and its own truth; DBSCAN against
planted outlier matches (synthetic and on real SIFT matches); stitching against the true
positions, and against frame-to-frame matching on a sweep with a planted bad frame; the
sparse volume, the interpolation fill against ``np.interp`` and the DIP fill; the metrics
against their formulas; ``mrus trus3d`` in both forms and its bad input.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from mrus_models.cli import main
from mrus_models.trus3d import (
    StitchConfig,
    fan_mask,
    interpolate_fill,
    match_points,
    position_errors,
    prostate_phantom,
    psnr,
    read_sweep,
    reconstruct_sweep,
    robust_offset,
    simulate_sweep,
    sparse_volume,
    stitch,
    volume_metrics,
    write_sweep,
)
from mrus_models.trus3d.inpaint import dip_inpaint
from mrus_models.trus3d.metrics import largest_box
from mrus_models.trus3d.reconstruct import SparseVolume

pytest.importorskip("cv2")
pytest.importorskip("sklearn")

#: Stated accuracy of stitching + DBSCAN on the small test sweep (1 mm pixels, 24 frames):
#: measured 0.19 / 0.34 mm (SIFT) and 0.32 / 0.55 mm (ORB), mean / max.
POSITION_TOL_MEAN_MM = 0.5
POSITION_TOL_MAX_MM = 1.0
SMALL = {"size": (72, 40, 40), "spacing": 1.0}
BAD_FRAME = 10


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantom():
    return prostate_phantom(**SMALL, seed=3)


@pytest.fixture(scope="module")
def sweep(phantom):
    return simulate_sweep(phantom, frames=24, seed=3)


@pytest.fixture(scope="module")
def bad_sweep(phantom):
    return simulate_sweep(phantom, frames=24, seed=3, bad_frames=[BAD_FRAME])


# --------------------------------------------------------------------------- simulator


def _bilinear3(vol: np.ndarray, s: float, d: float, lat: float) -> float:
    """Trilinear sample written out corner by corner (independent of scipy)."""
    base = [int(np.floor(x)) for x in (s, d, lat)]
    frac = [x - b for x, b in zip((s, d, lat), base, strict=True)]
    total = 0.0
    for corner in range(8):
        bits = [(corner >> k) & 1 for k in range(3)]
        w = np.prod([f if b else 1 - f for f, b in zip(frac, bits, strict=True)])
        if w == 0:
            continue  # an integer coordinate on the last voxel: that corner is outside
        idx = tuple(b + o for b, o in zip(base, bits, strict=True))
        total += w * vol[idx]
    return float(total)


def test_simulator_cuts_frames_at_the_true_positions(phantom):
    sw = simulate_sweep(phantom, frames=6, decorrelation=0.0, gain_jitter=0.0, seed=1)
    t_n, rows, width = sw.sagittal.shape
    assert sw.transverse.shape == (t_n, rows, phantom.shape[2])
    l_mid = (phantom.shape[2] - 1) // 2
    rng = np.random.default_rng(0)
    for t in range(t_n):
        p, d = sw.positions[t]
        for r, c in rng.integers(0, [rows, width], size=(5, 2)):
            want = _bilinear3(sw.volume, p + c, d + r, l_mid)
            assert abs(sw.sagittal[t, r, c] - want) <= 1e-4 * max(1.0, abs(want))
        for r, c in rng.integers(0, [rows, phantom.shape[2]], size=(5, 2)):
            want = _bilinear3(sw.volume, p + sw.tip_column, d + r, c) * sw.fan[r, c]
            assert abs(sw.transverse[t, r, c] - want) <= 1e-4 * max(1.0, abs(want))
    # Forward sweep, uneven steps, inside the volume, depth jitter within its margin.
    steps = np.diff(sw.positions[:, 0])
    assert steps.std() > 0.05 * steps.mean() and sw.positions[:, 0].max() <= 72 - width - 2
    assert (sw.positions[:, 1] >= 0).all() and (sw.positions[:, 1] <= 4).all()


def test_simulator_is_seeded_and_frames_differ(phantom):
    a = simulate_sweep(phantom, frames=4, seed=5)
    b = simulate_sweep(phantom, frames=4, seed=5)
    c = simulate_sweep(phantom, frames=4, seed=6)
    assert np.array_equal(a.sagittal, b.sagittal) and np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.sagittal, c.sagittal)
    # Per-frame decorrelation: the same pixel of the volume is not the same value twice.
    assert not np.array_equal(a.sagittal[0], a.sagittal[1])


def test_fan_mask_against_its_geometry():
    m = fan_mask(30, 41, half_angle=45.0, apex_fraction=0.2)
    assert m.shape == (30, 41) and m[:, 20].all()  # the middle column is inside throughout
    apex = -6.0
    for r, c in [(0, 0), (0, 25), (0, 27), (10, 35), (10, 37), (29, 20), (25, 40), (20, 3)]:
        dr, dc = r - apex, c - 20
        want = abs(dc) <= dr and np.hypot(dr, dc) <= 29 - apex
        assert bool(m[r, c]) == want, (r, c)


def test_phantom_zones(phantom):
    t = phantom.tissues[0]
    assert t.min() >= 0 and float(t.sum(0).max()) <= 1 + 1e-6
    s_n, d_n, l_n = phantom.shape
    # The urethra runs along S through the middle of the gland: fluid there, not at the edge.
    centre = t[0, s_n // 2, :, l_n // 2]
    assert float(centre.max()) > 0.5 and float(t[0, :, :, 0].max()) < 0.05
    # Peripheral zone (bright) nearer the probe than the transition zone (grey).
    depth = torch.arange(d_n, dtype=torch.float32)
    gland = t[:, s_n // 2 - 4:s_n // 2 + 4, 6:, :]
    grey_depth = (gland[1].sum((0, 2)) * depth[6:]).sum() / gland[1].sum()
    bright_depth = (gland[2].sum((0, 2)) * depth[6:]).sum() / gland[2].sum()
    assert bright_depth < grey_depth
    assert not torch.equal(prostate_phantom(**SMALL, seed=4).tissues, phantom.tissues)


# --------------------------------------------------------------------------- DBSCAN


def test_dbscan_removes_planted_outliers():
    rng = np.random.default_rng(0)
    true = np.array([12.3, -0.7])
    inliers = true + rng.normal(0, 0.2, (40, 2))
    outliers = []
    while len(outliers) < 25:
        o = rng.uniform(-30, 30, 2)
        if np.hypot(*(o - true)) > 3:
            outliers.append(o)
    # Two small groups of consistent outliers too (repeated structure), smaller than the
    # true cluster: DBSCAN finds them as clusters, the largest must win.
    groups = [np.array([-8.0, 2.0]) + rng.normal(0, 0.1, (6, 2)),
              np.array([20.0, 5.0]) + rng.normal(0, 0.1, (5, 2))]
    disp = np.concatenate([inliers, np.array(outliers), *groups])
    order = rng.permutation(len(disp))
    offset, keep = robust_offset(disp[order], eps=1.0, min_samples=4)
    planted = np.zeros(len(disp), bool)
    planted[:40] = True
    assert np.array_equal(keep, planted[order])
    assert np.hypot(*(offset - inliers.mean(0))) <= 1e-9
    plain, keep_all = robust_offset(disp, dbscan=False)
    assert keep_all.all() and np.hypot(*(plain - true)) > 3
    none, k = robust_offset(rng.uniform(-30, 30, (10, 2)), eps=0.1)
    assert none is None and not k.any()


def test_dbscan_on_real_matches_with_planted_outliers(sweep):
    t = 6
    ref, frame = sweep.sagittal[t - 1], sweep.sagittal[t]
    scale = float(np.percentile(sweep.sagittal[0], 99.5))
    pf, pr = match_points(frame, ref, method="sift", scale=scale)
    assert len(pf) >= 10
    rng = np.random.default_rng(1)
    n_bad = len(pf) // 2
    bad_f = rng.uniform(0, frame.shape[::-1], (n_bad, 2))
    bad_r = rng.uniform(0, ref.shape[::-1], (n_bad, 2))
    disp = np.concatenate([pr - pf, bad_r - bad_f])
    offset, keep = robust_offset(disp)
    true = sweep.positions[t] - sweep.positions[t - 1]
    assert np.hypot(*(offset - true)) <= 0.5, (offset, true)
    planted = np.arange(len(disp)) >= len(pf)
    assert not (keep & planted & (np.hypot(*(disp - true).T) > 2)).any()
    plain, _ = robust_offset(disp, dbscan=False)
    assert np.hypot(*(plain - true)) > 1.0


# --------------------------------------------------------------------------- stitching


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_stitching_positions_within_the_stated_error(sweep, method):
    res = stitch(sweep.sagittal, StitchConfig(method=method))
    err = position_errors(res.positions, sweep.positions, sweep.spacing)
    assert res.matched.all()
    assert err.mean() <= POSITION_TOL_MEAN_MM and err.max() <= POSITION_TOL_MAX_MM, err
    # Without DBSCAN the mean over every match is far off.
    plain = stitch(sweep.sagittal, StitchConfig(method=method, dbscan=False))
    assert position_errors(plain.positions, sweep.positions, sweep.spacing).mean() > 5
    # The composite covers the sweep: frame 0's width plus the sweep length.
    width = sweep.sagittal.shape[2]
    assert res.composite.shape[1] >= width + np.ptp(sweep.positions[:, 0]) - 1


def test_stitching_beats_frame_to_frame_with_a_bad_frame(bad_sweep):
    comp = stitch(bad_sweep.sagittal, StitchConfig(method="sift"))
    pair = stitch(bad_sweep.sagittal, StitchConfig(method="sift", mode="pairwise"))
    e_comp = position_errors(comp.positions, bad_sweep.positions, bad_sweep.spacing)
    e_pair = position_errors(pair.positions, bad_sweep.positions, bad_sweep.spacing)
    assert not comp.matched[BAD_FRAME]
    good = np.arange(len(e_comp)) != BAD_FRAME
    after = np.arange(len(e_comp)) > BAD_FRAME
    # Stitching: the bad frame does not move the others.
    assert e_comp[good].max() <= POSITION_TOL_MAX_MM, e_comp
    # Frame to frame: the bad frame's error is carried to every later frame (drift).
    assert e_pair[after].min() >= 2 * e_comp[after].max(), (e_pair, e_comp)
    assert e_pair[after].mean() >= 3 * e_comp[after].mean()


def test_stitch_bad_input():
    with pytest.raises(ValueError, match=r"frames must be \[T >= 2"):
        stitch(np.ones((1, 20, 20)))
    with pytest.raises(ValueError, match="method must be one of"):
        StitchConfig(method="loftr")
    with pytest.raises(ValueError, match="eps must be positive"):
        StitchConfig(eps=0)


def test_missing_opencv_names_the_extra(monkeypatch, sweep, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "mrus\[trus3d\]"'):
        stitch(sweep.sagittal[:3])
    code = main(["--quiet", "trus3d", "--simulate", "--frames", "4", "--out",
                 str(tmp_path / "sim")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mrus: error: ") and "mrus[trus3d]" in err
    assert not (tmp_path / "sim").exists()  # nothing written


# --------------------------------------------------------------------------- volume


def test_sparse_volume_places_frames_at_their_positions():
    rng = np.random.default_rng(2)
    tra = rng.uniform(0.1, 1, (4, 9, 11))
    fan = np.ones((9, 11), bool)
    fan[0, :3] = False
    pos = np.array([[0.0, 1.0], [3.0, 0.0], [4.0, 2.0], [8.0, 1.0]])
    sp = sparse_volume(tra, pos, tip_column=2.0, fan=fan)
    assert np.array_equal(sp.origin, [2.0, 0.0])
    assert sp.values.shape == (8 + 2, 9 + 2 + 2, 11)
    for t, (s, d) in enumerate(pos):
        s_i, d_i = int(s), int(d)
        np.testing.assert_allclose(sp.values[s_i, d_i:d_i + 9][fan], tra[t][fan], rtol=1e-6)
        assert not sp.known[s_i, d_i:d_i + 9][~fan].any()
    assert not sp.known[[1, 2, 5, 6, 7, 9]].any()
    assert sp.region[0:9].any() and not sp.region[9].any()
    # A frame half-way between two slices gives each half of its weight.
    half = sparse_volume(tra[:2], np.array([[0.0, 0.0], [2.5, 0.0]]), tip_column=0.0, fan=fan)
    np.testing.assert_allclose(half.weight[2, :9][fan], 0.5)
    np.testing.assert_allclose(half.values[3, :9][fan], tra[1][fan], rtol=1e-6)


def test_interpolation_fill_against_np_interp():
    rng = np.random.default_rng(3)
    shape = (13, 5, 6)
    values = rng.uniform(0.5, 1.0, shape)
    known = np.zeros(shape, bool)
    for d in range(5):
        for lat in range(6):
            known[rng.choice(13, size=rng.integers(1, 5), replace=False), d, lat] = True
    known[:, 0, 0] = False  # a line with nothing known: outside the region
    region = np.zeros(shape, bool)
    region[2:12] = known.any(0)
    sp = SparseVolume(values=np.where(known, values, 0).astype(np.float32),
                      weight=known.astype(np.float32), known=known, region=region,
                      origin=np.zeros(2))
    out = interpolate_fill(sp)
    for d in range(5):
        for lat in range(6):
            k = np.flatnonzero(known[:, d, lat])
            if k.size == 0:
                assert not out[:, d, lat].any()
                continue
            want = np.interp(np.arange(13), k, values[k, d, lat])
            sel = region[:, d, lat] | known[:, d, lat]
            np.testing.assert_allclose(out[sel, d, lat], want[sel], rtol=1e-6)
            assert not out[~sel, d, lat].any()
    assert (out[region] > 0).all()


def test_dip_fills_the_swept_region():
    # A smooth volume known on every other slice: DIP must fill the rest and beat the
    # constant fill (the mean of the known voxels) on the unknown voxels.
    g = np.meshgrid(*[np.linspace(0, 1, n) for n in (12, 16, 16)], indexing="ij")
    truth = 0.5 + 0.3 * np.sin(3 * g[0] + 2 * g[1]) * np.cos(2 * g[2])
    known = np.zeros(truth.shape, bool)
    known[::2] = True
    region = np.ones(truth.shape, bool)
    region[:, :2] = False
    sp = SparseVolume(values=np.where(known, truth, 0).astype(np.float32),
                      weight=known.astype(np.float32), known=known & region, region=region,
                      origin=np.zeros(2))
    out = dip_inpaint(sp, iterations=150, width=8, lr=0.01, progress=False, device="cpu")
    unknown = region & ~known
    assert np.isfinite(out).all() and (out[unknown] != 0).all() and not out[~region].any()
    np.testing.assert_array_equal(out[known & region], sp.values[known & region])
    err = np.abs(out[unknown] - truth[unknown]).mean()
    const = np.abs(truth[known & region].mean() - truth[unknown]).mean()
    assert err <= 0.6 * const, (err, const)


def test_reconstruction_of_a_simulated_sweep(sweep):
    rec = reconstruct_sweep(sweep, method="sift")
    assert (rec.volume[rec.sparse.region] != 0).all()  # every voxel of the region filled
    assert not rec.volume[~(rec.sparse.region | rec.sparse.known)].any()
    m = volume_metrics(rec, sweep.volume, sweep.positions)
    ref = reconstruct_sweep(sweep, positions=sweep.positions - sweep.positions[0])
    m_ref = volume_metrics(ref, sweep.volume, sweep.positions)
    # Measured: 24.1 dB / 0.65 from the stitched positions, the same from the true ones.
    assert m["psnr"] >= 22 and m["ssim"] >= 0.55, m
    assert m["psnr"] >= m_ref["psnr"] - 0.5, (m, m_ref)
    # Positions off by 3 pixels along the sweep after frame 8 cost accuracy: the metrics
    # see misplacement.
    wrong = rec.positions.copy()
    wrong[8:, 0] += 3
    m_wrong = volume_metrics(reconstruct_sweep(sweep, positions=wrong), sweep.volume,
                             sweep.positions)
    assert m_wrong["psnr"] <= m["psnr"] - 0.5, (m_wrong, m)


# --------------------------------------------------------------------------- metrics


def test_metrics_against_their_formulas():
    est = np.array([[1.0, 1.0], [4.0, 1.0], [7.0, 2.0]])
    truth = np.array([[0.0, 3.0], [3.0, 3.0], [5.0, 3.0]])
    np.testing.assert_allclose(position_errors(est, truth, 0.5),
                               [0.0, 0.0, 0.5 * np.hypot(1.0, 1.0)])
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0, 1, (6, 7)), rng.uniform(0, 2, (6, 7))
    mask = rng.uniform(size=(6, 7)) > 0.3
    peak = b[mask].max() - b[mask].min()
    want = 10 * np.log10(peak ** 2 / np.mean((a[mask] - b[mask]) ** 2))
    assert abs(psnr(a, b, mask) - want) <= 1e-12
    for _ in range(20):
        m = rng.uniform(size=(7, 9)) > 0.25
        rs, cs = largest_box(m)
        assert m[rs, cs].all()
        best = max(((r1 - r0) * (c1 - c0)) for r0 in range(7) for r1 in range(r0 + 1, 8)
                   for c0 in range(9) for c1 in range(c0 + 1, 10) if m[r0:r1, c0:c1].all())
        assert (rs.stop - rs.start) * (cs.stop - cs.start) == best


# --------------------------------------------------------------------------- command


def _run(capsys, *argv):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_simulate_then_reconstruct_the_recorded_sweep(tmp_path, capsys):
    import nibabel as nib

    out_dir = tmp_path / "sim"
    code, out, err = _run(capsys, "trus3d", "--simulate", "--out", str(out_dir), "--frames",
                          "16", "--format", "png", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["position_error_max_mm"] <= POSITION_TOL_MAX_MM
    assert metrics["position_error_mean_mm_no_dbscan"] > metrics["position_error_mean_mm"]
    for name in ("reconstruction.nii.gz", "true_volume.nii.gz", "stitched.png",
                 "metrics.json", "sweep/sweep.json", "sweep/sagittal/0015.png"):
        assert (out_dir / name).is_file(), name
    # The recorded-sweep form on what --simulate wrote (16-bit PNG frames).
    vol = tmp_path / "rec.nii.gz"
    code, out, err = _run(capsys, "trus3d", str(out_dir / "sweep"), "-o", str(vol), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames"] == 16 and summary["unmatched_frames"] == []
    img = nib.load(vol)
    assert list(img.shape) == summary["volume_shape"]
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 0.75)
    sw = read_sweep(out_dir / "sweep")
    assert sw.positions is not None and sw.frames == 16


def _write_frames(folder, shapes, fmt="npy", meta=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for t, (s_shape, t_shape) in enumerate(shapes):
        e = {}
        for view, shape in (("sagittal", s_shape), ("transverse", t_shape)):
            name = f"{view}_{t}.{fmt}"
            np.save(folder / name, rng.uniform(0, 1, shape).astype(np.float32))
            e[view] = name
        entries.append(e)
    if meta:
        (folder / "sweep.json").write_text(json.dumps({"pixel_spacing_mm": 0.5,
                                                       "frames": entries}))


@pytest.mark.parametrize("case", ["empty", "absent", "no-metadata", "different-sizes",
                                  "no-spacing", "missing-frame", "both", "neither",
                                  "bad-output"])
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, case):
    folder = tmp_path / "sweep"
    out = tmp_path / "v.nii.gz"
    argv = ["trus3d", str(folder), "-o", str(out)]
    if case == "empty":
        folder.mkdir()
        expected = "the folder is empty"
    elif case == "absent":
        expected = "no such folder"
    elif case == "no-metadata":
        _write_frames(folder, [((20, 16), (20, 24))] * 3, meta=False)
        expected = "no sweep.json"
    elif case == "different-sizes":
        _write_frames(folder, [((20, 16), (20, 24)), ((20, 17), (20, 24)), ((20, 16), (20, 24))])
        expected = "sagittal frames differ in size"
    elif case == "no-spacing":
        _write_frames(folder, [((20, 16), (20, 24))] * 3)
        meta = json.loads((folder / "sweep.json").read_text())
        del meta["pixel_spacing_mm"]
        (folder / "sweep.json").write_text(json.dumps(meta))
        expected = "missing 'pixel_spacing_mm'"
    elif case == "missing-frame":
        _write_frames(folder, [((20, 16), (20, 24))] * 3)
        (folder / "transverse_1.npy").unlink()
        expected = "transverse frame 1"
    elif case == "both":
        _write_frames(folder, [((20, 16), (20, 24))] * 3)
        argv = ["trus3d", str(folder), "--simulate"]
        expected = "either SWEEP_DIR"
    elif case == "neither":
        argv = ["trus3d"]
        expected = "either SWEEP_DIR"
    else:
        _write_frames(folder, [((20, 16), (20, 24))] * 3)
        out = tmp_path / "v.png"
        argv = ["trus3d", str(folder), "-o", str(out)]
        expected = "expected a .nii or .nii.gz"
    code, stdout, err = _run(capsys, *argv)
    assert code == 2, (stdout, err)
    assert err.startswith("mrus: error: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_write_read_sweep_round_trip(tmp_path, sweep):
    write_sweep(sweep, tmp_path / "s", fmt="npy")
    back = read_sweep(tmp_path / "s")
    np.testing.assert_array_equal(back.sagittal, sweep.sagittal)
    np.testing.assert_array_equal(back.transverse, sweep.transverse)
    np.testing.assert_array_equal(back.fan, sweep.fan)
    np.testing.assert_allclose(back.positions, sweep.positions)
    assert back.tip_column == sweep.tip_column and back.spacing == sweep.spacing


def test_trus3d_extra_is_in_the_test_extra():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml")
                           .read_text())["project"]["optional-dependencies"]

    def names(reqs):
        return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs}

    assert "opencv-python-headless" in names(extras["trus3d"])
    assert names(extras["trus3d"]) <= names(extras["test"])


def test_best_stitch_keeps_the_better_supported_method(sweep):
    from mrus_models.trus3d import best_stitch

    method, res = best_stitch(sweep.sagittal[:8])
    assert method in ("sift", "orb")
    same = stitch(sweep.sagittal[:8], StitchConfig(method=method))
    np.testing.assert_array_equal(res.positions, same.positions)
    other = stitch(sweep.sagittal[:8], StitchConfig(method={"sift": "orb", "orb": "sift"}[method]))

    def support(r):
        return (r.inliers[1:] / np.maximum(r.matches[1:], 1)).mean()

    assert (~res.matched).sum() < (~other.matched).sum() or support(res) >= support(other)


def test_mni_sweep_positions():
    from mrus_models.data import mni152
    from mrus_models.trus3d import mni_volume

    vol = mni_volume()
    tpl = mni152(2)
    # Sweep layout S, D, L = MNI y, -z, x: depth 0 is the top of the head.
    assert vol.shape == (tpl.shape[1], tpl.shape[2], tpl.shape[0]) and vol.spacing == 2.0
    assert torch.equal(vol.tissues[0, :, 7, 0, 11], tpl.tissues()[0, :, 11, 7, -1])
    # 12 frames (steps of about 5 px): measured 0.17 / 0.29 mm mean / max at 2 mm pixels.
    sw = simulate_sweep(vol, frames=12, seed=2)
    res = stitch(sw.sagittal)
    err = position_errors(res.positions, sw.positions, sw.spacing)
    assert err.mean() <= 2 * POSITION_TOL_MEAN_MM and err.max() <= 2 * POSITION_TOL_MAX_MM, err
