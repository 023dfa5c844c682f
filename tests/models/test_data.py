"""mrus_models.data: NIfTI I/O, the MNI152 template, simulated modalities, known warps."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats

from mrus_kernels import compose, ddf_to_mm, integrate_velocity, warp
from mrus_models.data import (
    affine_ddf,
    default_pair,
    known_warp,
    mni152,
    pseudo_ultrasound,
    random_affine,
    rayleigh_speckle,
    read_displacement,
    read_nifti,
    t2_like,
    write_displacement,
    write_nifti,
)
from mrus_models.data.modalities import T2_INTENSITY

# --------------------------------------------------------------------------- NIfTI


def _affine(seed=0):
    rng = np.random.default_rng(seed)
    a = np.eye(4)
    a[:3, :3] = np.diag([1.5, 2.0, 2.5]) + 0.1 * rng.standard_normal((3, 3))
    a[:3, 3] = rng.uniform(-50, 50, 3)
    return a


def test_nifti_round_trip_keeps_data_and_affine(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(1, 1, 7, 9, 11)
    write_nifti(tmp_path / "a.nii.gz", data, _affine())
    back = read_nifti(tmp_path / "a.nii.gz")
    assert back.data.shape == (1, 1, 7, 9, 11) and back.data.dtype == torch.float32
    assert torch.equal(back.data, data)
    assert np.abs(back.affine - _affine()).max() <= 1e-5  # stored as float32 sform/qform
    assert back.spacing == pytest.approx(np.linalg.norm(_affine()[:3, :3], axis=0), rel=1e-5)


def test_nifti_labels_round_trip(tmp_path):
    labels = torch.randint(0, 4, (1, 1, 5, 6, 7))
    write_nifti(tmp_path / "l.nii", labels, np.eye(4), labels=True)
    assert nib.load(tmp_path / "l.nii").get_data_dtype() == np.uint8
    back = read_nifti(tmp_path / "l.nii", labels=True)
    assert back.data.dtype == torch.int64 and torch.equal(back.data, labels)


def test_nifti_2d_and_trailing_singletons(tmp_path):
    arr = np.random.default_rng(1).standard_normal((6, 8, 1, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, _affine()), tmp_path / "s.nii.gz")
    img = read_nifti(tmp_path / "s.nii.gz")
    assert img.data.shape == (1, 1, 6, 8) and img.ndim == 2
    assert img.affine_nd.shape == (3, 3)
    assert np.array_equal(img.data[0, 0].numpy(), arr[:, :, 0, 0])


def test_nifti_integer_image_is_scaled_to_float(tmp_path):
    arr = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, tmp_path / "i.nii")
    back = read_nifti(tmp_path / "i.nii")
    assert back.data.dtype == torch.float32
    assert torch.allclose(back.data[0, 0], torch.from_numpy(arr * 0.5 + 10).float())


def test_displacement_round_trip_in_mm(tmp_path):
    torch.manual_seed(0)
    ddf = torch.randn(1, 3, 5, 6, 7)
    write_displacement(tmp_path / "d.nii.gz", ddf, _affine())
    img = nib.load(tmp_path / "d.nii.gz")
    assert img.shape == (5, 6, 7, 1, 3) and img.header.get_intent()[0] == "vector"
    mm = ddf_to_mm(ddf.double(), _affine())[0].movedim(0, -1).numpy()
    assert np.abs(np.asarray(img.dataobj)[..., 0, :] - mm).max() <= 1e-4
    back = read_displacement(tmp_path / "d.nii.gz")
    assert (back.data - ddf).abs().max() <= 1e-4


def test_displacement_round_trip_2d(tmp_path):
    ddf = torch.randn(1, 2, 5, 6)
    write_displacement(tmp_path / "d2.nii", ddf, np.diag([2.0, 3.0, 1.0, 1.0]))
    assert nib.load(tmp_path / "d2.nii").shape == (5, 6, 1, 1, 2)
    assert (read_displacement(tmp_path / "d2.nii").data - ddf).abs().max() <= 1e-5


def test_nifti_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="NIfTI file not found.*nope.nii"):
        read_nifti(tmp_path / "nope.nii")


def test_nifti_rejects_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(
        ValueError, match=r"expected a 2D or 3D image, got a 4D image of shape \(4, 4, 4, 3\)"
    ):
        read_nifti(tmp_path / "t.nii")


def test_nifti_rejects_complex(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4)), tmp_path / "c.nii")
    with pytest.raises(TypeError, match="expected real-valued .* got data type complex64"):
        read_nifti(tmp_path / "c.nii")


def test_nifti_rejects_non_nifti(tmp_path):
    (tmp_path / "x.nii").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*x.nii.* as NIfTI"):
        read_nifti(tmp_path / "x.nii")


def test_nifti_rejects_non_integer_labels_and_nan(tmp_path):
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), tmp_path / "f.nii")
    with pytest.raises(ValueError, match="label map must hold integer values"):
        read_nifti(tmp_path / "f.nii", labels=True)
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), np.nan, np.float32), np.eye(4)), tmp_path / "n.nii")
    with pytest.raises(ValueError, match="NaN or infinite voxels"):
        read_nifti(tmp_path / "n.nii")


def test_write_nifti_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="an image must be a floating tensor, got torch.int64"):
        write_nifti(tmp_path / "a.nii", torch.zeros(1, 1, 3, 3, 3, dtype=torch.long), np.eye(4))
    with pytest.raises(TypeError, match="label map must be an integer or bool tensor"):
        write_nifti(tmp_path / "a.nii", torch.zeros(1, 1, 3, 3, 3), np.eye(4), labels=True)
    with pytest.raises(ValueError, match=r"data must be \[1, C, \*S\].*got shape \(3, 3, 3\)"):
        write_nifti(tmp_path / "a.nii", torch.zeros(3, 3, 3), np.eye(4))
    with pytest.raises(TypeError, match="data must be a torch.Tensor, got ndarray"):
        write_nifti(tmp_path / "a.nii", np.zeros((1, 1, 3, 3, 3)), np.eye(4))
    with pytest.raises(ValueError, match=r"affine must be 4 x 4.*got shape \(2, 2\)"):
        write_nifti(tmp_path / "a.nii", torch.zeros(1, 1, 3, 3, 3), np.eye(2))
    with pytest.raises(ValueError, match="data must have one channel"):
        write_nifti(tmp_path / "a.nii", torch.zeros(1, 2, 3, 3, 3), np.eye(4))


# --------------------------------------------------------------------------- template


@pytest.fixture(scope="module")
def template():
    return mni152(2)


def test_mni152_shapes_affine_labels(template):
    tpl = template
    s = tpl.shape
    assert len(s) == 3 and all(40 <= n <= 117 for n in s)
    for t in (tpl.t1, tpl.gm, tpl.wm, tpl.csf, tpl.mask, tpl.labels):
        assert t.shape == (1, 1, *s)
    assert tpl.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert set(torch.unique(tpl.labels).tolist()) == {0, 1, 2, 3}
    assert torch.equal(tpl.labels > 0, tpl.mask)
    assert 0 <= float(tpl.t1.min()) and float(tpl.t1.max()) <= 1
    # Uncropped 2 mm grid: block centres at -97.5 + 2k mm (the 1 mm file starts at -98).
    full = mni152(2, crop=False)
    assert full.shape == (99, 117, 95)
    assert np.allclose(full.affine[:3, 3], [-97.5, -133.5, -71.5])
    # Cropping keeps world positions: the voxel at the crop's origin is the same world point.
    lo = np.linalg.solve(full.affine, tpl.affine[:, 3])[:3]
    assert np.allclose(lo, np.round(lo)) and (lo >= 0).all()
    i, j, k = (int(round(x)) for x in lo)
    assert torch.equal(full.t1[0, 0, i:i + s[0], j:j + s[1], k:k + s[2]], tpl.t1[0, 0])


def test_mni152_tissue_statistics(template):
    tpl = template
    # The brain mask is the nilearn definition (T1 > 0.2); T1 contrast: WM > GM > CSF.
    t1 = tpl.t1[0, 0]
    means = [float(t1[tpl.labels[0, 0] == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    probs = tpl.tissues()
    assert torch.all(probs >= 0)
    assert float((probs.sum(1) - tpl.mask[:, 0].float()).abs().max()) <= 1e-5 + 1


def test_mni152_bad_resolution():
    with pytest.raises(ValueError, match="resolution must be 1 or 2 .mm., got 3"):
        mni152(3)


# --------------------------------------------------------------------------- modalities


def _toy_tissues(size=(24, 28, 20)):
    """Concentric spheres: WM core, GM shell, CSF shell, background."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    r = torch.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grids, size)))
    wm = (r < 6).float()
    gm = ((r >= 6) & (r < 11)).float()
    csf = ((r >= 11) & (r < 14)).float()
    return torch.stack([csf, gm, wm])[None]


def test_t2_like_contrast_and_seed():
    tissues = _toy_tissues()
    a = t2_like(tissues, bias=0.0, noise=0.0)
    for k, name in enumerate(("csf", "gm", "wm")):
        assert torch.allclose(a[0, 0][tissues[0, k] > 0], torch.tensor(T2_INTENSITY[name]))
    assert float(a[0, 0][tissues.sum(1)[0] == 0].abs().max()) == 0
    b1, b2, b3 = (t2_like(tissues, seed=s) for s in (3, 3, 4))
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    # The bias field is multiplicative and bounded by exp(±bias).
    ratio = t2_like(tissues, bias=0.2, noise=0.0) / a.clamp_min(1e-6)
    inside = tissues.sum(1, keepdim=True) > 0
    assert float(ratio[inside].min()) >= math.exp(-0.2) - 1e-5
    assert float(ratio[inside].max()) <= math.exp(0.2) + 1e-5


def test_rayleigh_speckle_statistics():
    s = rayleigh_speckle((64, 64, 32), seed=1).flatten().double().numpy()
    assert abs(s.mean() - 1) <= 0.01
    # Rayleigh with unit mean: σ = sqrt(2/π); Kolmogorov–Smirnov against that law.
    assert stats.kstest(s, "rayleigh", args=(0, math.sqrt(2 / math.pi))).pvalue >= 1e-3
    # ... and not an exponential or a half-normal of the same mean.
    assert stats.kstest(s, "expon", args=(0, 1)).pvalue <= 1e-6
    corr = rayleigh_speckle((64, 64, 32), correlation=1.5, seed=1)
    assert abs(float(corr.mean()) - 1) <= 0.03
    # Neighbouring voxels are correlated with a grain, independent without.
    def lag1(x):
        x = x[0, 0] - x.mean()
        return float((x[1:] * x[:-1]).mean() / (x * x).mean())
    assert lag1(corr) >= 0.5 and abs(lag1(rayleigh_speckle((64, 64, 32), seed=2))) <= 0.02


def test_pseudo_ultrasound_is_clean_times_rayleigh_speckle():
    tissues = _toy_tissues((40, 44, 36))
    parts = pseudo_ultrasound(tissues, seed=5, return_parts=True)
    img, clean, speckle, fov = parts["image"], parts["clean"], parts["speckle"], parts["fov"]
    assert torch.equal(img, clean * speckle)
    assert float(img[~fov].abs().max()) == 0
    # The multiplicative noise is unit-mean Rayleigh wherever there is signal.
    ratio = (img[fov & (clean > 1e-3)] / clean[fov & (clean > 1e-3)]).double().numpy()
    assert stats.kstest(ratio, "rayleigh", args=(0, math.sqrt(2 / math.pi))).pvalue >= 1e-3
    assert torch.equal(pseudo_ultrasound(tissues, seed=5), img)
    assert not torch.equal(pseudo_ultrasound(tissues, seed=6), img)


def test_pseudo_ultrasound_physics():
    tissues = _toy_tissues((40, 44, 36))
    parts = pseudo_ultrasound(tissues, return_parts=True)
    fov, refl, depth = parts["fov"], parts["reflectivity"], parts["depth"]
    # Fan: the beam enters at the high end of the last axis and widens with depth.
    assert 0 < int(fov[0, 0, :, :, -1].sum()) < int(fov[0, 0, :, :, 0].sum())
    # Echogenicity order WM > GM > CSF on the clean image away from the boundaries.
    clean = parts["clean"][0, 0] / parts["attenuation"][0, 0] / parts["transmission"][0, 0]
    calm = (refl[0, 0] < 0.1) & fov[0, 0]
    means = [float(clean[(tissues[0, k] > 0) & calm].mean()) for k in (0, 1, 2)]
    assert means[0] < means[1] < means[2]
    # Boundaries are bright: reflectivity peaks on the tissue interfaces.
    inner = tissues[0, 2] > 0
    assert float(refl[0, 0][inner].mean()) < 0.5 * float(refl[0, 0].max())
    # Attenuation falls with depth; shadows only darken (transmission ≤ 1) and more deeply.
    att = parts["attenuation"][0, 0]
    assert float(att[:, :, -1].mean()) > float(att[:, :, 0].mean())
    trans = parts["transmission"][0, 0]
    assert float(trans.max()) <= 1 + 1e-6
    col = trans[20, 22]
    assert float(col[0]) < float(col[-1])  # beneath the sphere's shell vs above it
    assert float(depth.min()) >= 8.0 - 1e-4  # apex 8 voxels beyond the face


def test_pseudo_ultrasound_2d_and_bad_input():
    t2d = _toy_tissues((30, 34, 1))[..., 0]
    assert pseudo_ultrasound(t2d).shape == (1, 1, 30, 34)
    with pytest.raises(
        ValueError, match=r"tissues must be \[1, 3, \*S\].*got shape \(1, 2, 4, 4\)"
    ):
        pseudo_ultrasound(torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match="tissues must be floating"):
        t2_like(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"half_angle must be in \(0, 90\) degrees, got 95"):
        pseudo_ultrasound(t2d, half_angle=95)
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 1\] for a 2D image, got 2"):
        pseudo_ultrasound(t2d, axis=2)


# --------------------------------------------------------------------------- known warps


@pytest.mark.parametrize("size", [(24, 28, 20), (40, 36)])
def test_known_warp_and_inverse_compose_to_zero(size):
    w = known_warp(size, max_displacement=3.0, spacing=(1.5,) * len(size), seed=2)
    assert w.ddf.shape == (1, len(size), *size)
    # The SVF part has the requested largest displacement (mm) up to about a percent.
    u = integrate_velocity(w.velocity, 7)
    largest = float((u * 1.5).square().sum(1).sqrt().max())
    assert abs(largest - 3.0) <= 0.06
    # Away from the border, where the inverse samples fields outside the grid.
    inner = (slice(None), slice(None)) + tuple(slice(6, n - 6) for n in size)
    for a, b in ((w.ddf, w.inverse), (w.inverse, w.ddf)):
        residual = compose(a, b)[inner].abs().max()
        assert float(residual) <= 0.05, float(residual)
    # Seeded: same seed, same warp.
    again = known_warp(size, max_displacement=3.0, spacing=(1.5,) * len(size), seed=2)
    assert torch.equal(again.ddf, w.ddf)
    assert not torch.equal(known_warp(size, max_displacement=3.0, seed=3).ddf, w.ddf)


def test_known_warp_affine_part_is_exact():
    size = (20, 22, 18)
    w = known_warp(size, max_displacement=0.0, seed=4)
    assert float(w.velocity.abs().max()) == 0
    assert torch.allclose(w.ddf, affine_ddf(w.matrix, size), atol=1e-5)
    m = random_affine(size, rotation=3, scale=0.03, translation=2, seed=4)
    assert torch.equal(m, w.matrix)
    lin = m[:3, :3].numpy()
    assert abs(np.linalg.det(lin) - 1) <= 0.1 and np.abs(lin - np.eye(3)).max() <= 0.1


def test_known_warp_bad_input():
    with pytest.raises(ValueError, match=r"size must be 2D or 3D, got \(4,\)"):
        known_warp((4,))
    with pytest.raises(ValueError, match="max_displacement must be >= 0 mm, got -1"):
        known_warp((8, 8), max_displacement=-1)


def test_default_pair_ground_truth(template):
    pair = default_pair("t2", template=template, seed=1)
    assert pair.moving.shape == pair.fixed.shape
    # Warping the moving labels with the true displacement gives back the fixed labels.
    back = warp(pair.moving_labels.float(), pair.truth.ddf, mode="nearest").long()
    agree = float((back == pair.fixed_labels)[pair.fixed_mask].float().mean())
    before = float((pair.moving_labels == pair.fixed_labels)[pair.fixed_mask].float().mean())
    assert agree >= 0.97 and before <= agree - 0.1
    us = default_pair("us", template=template, seed=1)
    assert us.moving_fov.dtype == torch.bool and 0.3 <= float(us.moving_fov.float().mean()) < 1
    assert torch.equal(us.truth.ddf, pair.truth.ddf)
    with pytest.raises(ValueError, match="modality must be one of .*got 'ct'"):
        default_pair("ct", template=template)
