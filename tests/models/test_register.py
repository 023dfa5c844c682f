"""mrus_models.register recovers known smooth warps (3D and 2D) on synthetic pairs."""

from __future__ import annotations

import pytest
import torch

from mrus_kernels import compose, warp
from mrus_models.data import known_warp
from mrus_models.register import register


def _blobs(size, seed=0):
    """A smooth random image with structure at several scales (multi-modal stand-in)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 1, *size)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    for n in (4, 8):
        coarse = torch.rand(1, 1, *([n] * len(size)), generator=g)
        img += torch.nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=True)
    return img / img.max()


def _epe(u, truth, margin=3):
    inner = (slice(None), slice(None)) + tuple(slice(margin, n - margin) for n in u.shape[2:])
    return float((u - truth)[inner].square().sum(1).sqrt().mean())


@pytest.mark.parametrize("similarity", ["mi", "lncc"])
def test_register_recovers_known_warp_3d(similarity):
    size = (28, 32, 24)
    fixed = _blobs(size)
    truth = known_warp(size, max_displacement=2.5, affine=False, control=3, seed=1)
    # A second "modality": a non-monotone intensity map for MI, the same contrast for LNCC.
    source = 1 - (fixed - 0.6).abs() * 1.5 if similarity == "mi" else fixed
    moving = warp(source, truth.inverse)
    res = register(fixed, moving, similarity=similarity, transform="svf", levels=(2, 1),
                   iterations=(60, 30), smoothness=5.0, lr=0.1, progress=False)
    before, after = _epe(torch.zeros_like(truth.ddf), truth.ddf), _epe(res.ddf, truth.ddf)
    # Endpoint error shrinks at least 2.5-fold.
    assert after <= before / 2.5, (before, after)
    assert res.warped.shape == moving.shape and len(res.loss_history) == 90
    assert res.loss_history[-1] < res.loss_history[0]
    # The inverse is an inverse.
    inner = (slice(None), slice(None)) + tuple(slice(4, n - 4) for n in size)
    assert float(compose(res.ddf, res.inverse)[inner].abs().max()) <= 0.1


def test_register_recovers_affine_and_svf_2d():
    size = (64, 56)
    fixed = _blobs(size, seed=3)
    truth = known_warp(size, max_displacement=3.0, control=4, rotation=4.0, translation=2.0,
                       seed=5)
    moving = warp(fixed * 0.5 + 0.2, truth.inverse)
    res = register(fixed, moving, similarity="nmi", transform="affine+svf", levels=(4, 2, 1),
                   iterations=(60, 40, 20), smoothness=5.0, progress=False)
    before, after = _epe(torch.zeros_like(truth.ddf), truth.ddf), _epe(res.ddf, truth.ddf)
    assert after <= before / 3, (before, after)
    assert res.matrix.shape == (1, 3, 3) and res.velocity is not None
    stages = [(s["stage"], s["factor"]) for s in res.stages]
    assert stages == [("affine", 4), ("affine", 2), ("svf", 4), ("svf", 2), ("svf", 1)]


def test_register_affine_only_and_masks():
    size = (40, 44)
    fixed = _blobs(size, seed=7)
    truth = known_warp(size, max_displacement=0.0, rotation=5.0, translation=3.0, seed=2)
    moving = warp(fixed, truth.inverse)
    mask = torch.ones(1, 1, *size)
    res = register(fixed, moving, transform="affine", levels=(2, 1), iterations=(80, 30),
                   fixed_mask=mask, moving_mask=mask, progress=False)
    assert res.velocity is None
    assert _epe(res.ddf, truth.ddf) <= _epe(torch.zeros_like(truth.ddf), truth.ddf) / 3
    # The affine's displacement is the one of its matrix.
    from mrus_models.data import affine_ddf

    assert torch.allclose(affine_ddf(res.matrix[0], size), res.ddf, atol=1e-4)


def test_register_bad_input():
    a = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="same number of dimensions, got 3D .* and 2D"):
        register(a, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"share a grid .* got \(8, 8, 8\) and \(8, 8, 9\)"):
        register(a, torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(TypeError, match="fixed must be a torch.Tensor, got list"):
        register([1], a)
    with pytest.raises(TypeError, match="moving must be floating, got torch.int64"):
        register(a, torch.zeros(1, 1, 8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"fixed must be \[B, C, H, W\] .* got shape \(8, 8\)"):
        register(torch.rand(8, 8), a)
    with pytest.raises(ValueError, match="similarity must be one of .*got 'ssd'"):
        register(a, a, similarity="ssd")
    with pytest.raises(ValueError, match="transform must be one of .*got 'rigid'"):
        register(a, a, transform="rigid")
    with pytest.raises(ValueError, match=r"levels must go from coarse to fine, got \(1, 2\)"):
        register(a, a, levels=(1, 2))
    with pytest.raises(ValueError, match=r"levels must be downsampling factors >= 1, got \(0,\)"):
        register(a, a, levels=(0,))
    with pytest.raises(
        ValueError, match=r"iterations must be a number or one value per level \(3\)"
    ):
        register(a, a, iterations=(1, 2))
    with pytest.raises(ValueError, match=r"fixed_mask must be \[1 or B, 1, \*S\]"):
        register(a, a, fixed_mask=torch.ones(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"moving_mask must be \[1 or B, 1, \*S\]"):
        register(a, a, moving_mask=torch.ones(1, 2, 8, 8, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_register_on_cuda_matches_cpu_quality():
    size = (28, 32, 24)
    fixed = _blobs(size)
    truth = known_warp(size, max_displacement=2.5, affine=False, control=3, seed=1)
    moving = warp(fixed, truth.inverse)
    res = register(fixed.cuda(), moving.cuda(), transform="svf", levels=(2, 1),
                   iterations=(60, 30), smoothness=5.0, lr=0.1, progress=False)
    assert res.ddf.is_cuda
    assert _epe(res.ddf.cpu(), truth.ddf) <= _epe(torch.zeros_like(truth.ddf), truth.ddf) / 2.5
