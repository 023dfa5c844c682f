"""mrus_models.metrics against scikit-image, NumPy and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bad_input_test
from mrus_models.metrics import dice, endpoint_error_mm, hd95, ncc, ssim


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


@pytest.mark.parametrize("size, spacing", [((23, 19), (1.0, 1.0)), ((21, 26), (0.7, 1.9)),
                                           ((9, 11, 8), (1.0, 2.0, 0.5))])
def test_hd95_matches_brute_force(size, spacing):
    gen = torch.Generator().manual_seed(4)
    a = (_smooth(gen, (2, *size), coarse=4) * 3).floor().long()
    b = (_smooth(gen, (2, *size), coarse=4) * 3).floor().long()
    sp = torch.tensor([spacing, spacing], dtype=torch.float64)
    for value in (0, 1, 2):
        got = hd95(a, b, value, sp)
        for i in range(2):
            ma, mb = (a[i, 0] == value).numpy(), (b[i, 0] == value).numpy()
            if not ma.any() or not mb.any():
                assert got[i].isnan()
                continue
            want = _brute_hd95(ma, mb, spacing)
            assert abs(got[i].item() - want) <= 1e-9, (value, i, got[i].item(), want)


def test_hd95_cases():
    lab = torch.zeros(2, 1, 12, 12, dtype=torch.long)
    lab[:, :, 3:8, 3:8] = 1
    moved = torch.roll(lab, 2, dims=3)
    moved[1] = 0  # the second item lost the label
    h = hd95(moved, lab, 1, torch.tensor([[1.0, 1.5], [1.0, 1.0]]))
    assert h[1].isnan()
    assert abs(h[0].item() - 3.0) <= 1e-12  # shifted 2 voxels of 1.5 mm: 95th pct 3 mm
    assert hd95(lab, lab, 1).eq(0).all()


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
})
