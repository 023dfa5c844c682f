"""mrus_models._smooth: the Gaussian used to smooth velocities and to anti-alias, against
SciPy and an explicit loop, with its gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mrus_models._smooth import gaussian_blur, gaussian_kernel1d


def _radius(sigma: float, truncate: float = 3.0) -> int:
    return max(1, int(math.ceil(truncate * sigma)))


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((2, 3, 17, 20, 15), 1.5), ((1, 2, 30, 11, 9), (2.0, 0.0, 0.8)), ((3, 1, 25, 19), 1.2)],
    ids=["3d", "3d-per-axis", "2d"],
)
def test_gaussian_blur_matches_scipy(shape, sigma):
    """Replicate padding is SciPy's mode="nearest"; the same taps (radius ceil(3 sigma))."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    ndim = len(shape) - 2
    sigmas = (sigma,) * ndim if isinstance(sigma, float) else sigma
    out = gaussian_blur(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    radius = [_radius(s) if s > 0 else 0 for s in sigmas]
    for b in range(shape[0]):
        for c in range(shape[1]):
            expected = ndimage.gaussian_filter(x[b, c].numpy(), sigmas, mode="nearest",
                                               radius=radius)
            np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=1e-12, atol=1e-12)
    f32 = gaussian_blur(x.float(), sigma)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), out, rtol=1e-5, atol=1e-6)


def test_gaussian_blur_axis_shorter_than_the_radius():
    """An axis of n <= r voxels: indices replicate by at most n - 1 voxels, beyond that the
    taps read 0 (an explicit loop over the taps)."""
    sigma, n = 2.0, 3  # radius 6 > n
    k = gaussian_kernel1d(sigma, dtype=torch.float64).numpy()
    r = (len(k) - 1) // 2
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, n, generator=gen, dtype=torch.float64)
    out = gaussian_blur(x, sigma)[0, 0].numpy()
    signal = x[0, 0].numpy()
    pad = n - 1
    for i in range(n):
        acc = 0.0
        for t, w in enumerate(k):
            p = i + t - r
            if -pad <= p <= n - 1 + pad:
                acc += w * signal[min(max(p, 0), n - 1)]
        assert out[i] == pytest.approx(acc, rel=1e-12)
    # A single voxel: every tap outside reads 0, the centre tap alone remains.
    one = torch.full((1, 1, 1, 4), 2.0, dtype=torch.float64)
    assert gaussian_blur(one, (sigma, 0.0))[0, 0, 0, 0].item() == pytest.approx(2.0 * k[r])


def test_gaussian_blur_gradient():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 5, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: gaussian_blur(v, (1.0, 0.7, 1.3)), (x,))
