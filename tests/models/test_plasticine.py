"""Plasticine: the deformation module f_θ2, its losses (eq. 6-7), the model, the task and the
``mrus train / evaluate / translate`` commands (the diffusion module ε_θ1 and the structure
maps have their own file, test_plasticine_diffusion.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _registration_batch import smooth_field

import mrus_kernels
from conftest import bad_input_test
from mrus_models.plasticine import losses
from mrus_models.plasticine.config import PlasticineConfig
from mrus_models.plasticine.deformation import (
    PLASTICINE_DECODER,
    PLASTICINE_ENCODER,
    AlignmentBlock,
    DeformationNet,
)

SIZE = (32, 32)
#: Networks small enough for seconds per test.
SMALL_DEF = {"width": 8, "encoder": (8, 8), "decoder": (8, 8, 8)}


def _net(**kw) -> DeformationNet:
    torch.manual_seed(0)
    return DeformationNet(**{**SMALL_DEF, "backend": "torch", **kw})


def _images(gen: torch.Generator, b: int = 2, size=SIZE):
    """Source x, target y (an inverted, shifted x), a cue ê: [b, 1, *size] in [-1, 1]."""
    x = torch.tanh(smooth_field(gen, b, 1, size, 3.0))
    y = -torch.roll(x, 2, dims=3)
    cue = torch.randn(b, 1, *size, generator=gen)
    return x, y, cue


def _warp_by_grid_sample(img: torch.Tensor, ddf: torch.Tensor,
                         padding: str = "border") -> torch.Tensor:
    """img(p + u(p)), bilinear: the warp convention written with torch's grid_sample
    (component i of u along array axis i, align_corners=True)."""
    h, w = img.shape[2:]
    ii, jj = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype),
                            indexing="ij")
    gi = 2 * (ii + ddf[:, 0]) / (h - 1) - 1
    gj = 2 * (jj + ddf[:, 1]) / (w - 1) - 1
    return F.grid_sample(img, torch.stack([gj, gi], dim=-1), mode="bilinear",
                         padding_mode=padding, align_corners=True)


def _visible(net: DeformationNet, x: torch.Tensor, peak: float = 1.0) -> DeformationNet:
    """Random head weights, scaled so that the largest velocity component on ``x`` (at
    inference) is ``peak`` pixels: deformations large enough to see."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for head in (net.head, net.head_inverse):
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
        out = net(x)
        for head, key in ((net.head, "velocity"), (net.head_inverse, "velocity_inverse")):
            head.weight.mul_(peak / out[key].abs().max())
    return net


# --------------------------------------------------------------------------- f_θ2


def test_paper_architecture():
    """[Z25] Appendix: 64 start channels, four encoder / four decoder levels, two 1 x 1
    heads 64 -> 2, a 4-layer alignment block of 3 x 3 convolutions 64 -> 64."""
    net = DeformationNet(encoder=PLASTICINE_ENCODER, decoder=PLASTICINE_DECODER)
    assert net.stem_x.in_channels == 1 and net.stem_ye.in_channels == 2
    assert net.stem_x.out_channels == net.stem_ye.out_channels == 64
    assert len(net.unet.encoder) == 4 and net.stride == 16
    for head in (net.head, net.head_inverse):
        assert (head.in_channels, head.out_channels, head.kernel_size) == (64, 2, (1, 1))
    convs = [m for m in net.align.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(64, 64, (3, 3))] * 4
    assert net.steps == 7


def test_shapes_and_the_untrained_network_is_near_the_identity():
    net = _net()
    x, y, cue = _images(torch.Generator().manual_seed(0))
    train = net(x, y, cue)
    infer = net(x)
    for out in (train, infer):
        for key in ("velocity", "velocity_inverse", "ddf", "ddf_inverse"):
            assert out[key].shape == (2, 2, *SIZE) and out[key].dtype == torch.float32
            assert out[key].abs().max().item() < 1e-2, key
        assert out["warped"].shape == (2, 1, *SIZE)
        assert (out["warped"] - x).abs().max().item() < 1e-2
    assert train["warped_target"].shape == (2, 1, *SIZE)
    assert "warped_target" not in infer and "features_target" not in infer


def test_the_input_layer_is_one_three_channel_convolution():
    """stem_x(x) + stem_ye(y, ê) is the 3-channel 3 x 3 convolution of (x, y, ê) that the
    paper's input layer is, with its weights split by input channel."""
    net = _net()
    x, y, cue = _images(torch.Generator().manual_seed(1))
    f = net.features(x, y, cue)
    weight = torch.cat([net.stem_x.weight, net.stem_ye.weight], dim=1).double()
    want = F.conv2d(torch.cat([x, y, cue], 1).double(), weight, net.stem_x.bias.double(),
                    padding=1)
    got = (f["x"] + f["target"]).double()
    assert (got - want).abs().max().item() <= 1e-5


def test_inference_uses_the_alignment_blocks_prediction():
    """Without y the network runs on stem_x(x) + A(stem_x(x)): when A predicts the (y, ê)
    features exactly, inference and training give the same velocities; otherwise not."""
    x, y, cue = _images(torch.Generator().manual_seed(2))
    net = _visible(_net(), x)
    with torch.no_grad():
        # A's last convolution outputs 0 and the (y, ê) stem has no weights: both zero.
        last = [m for m in net.align.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.zero_()
        last.bias.zero_()
        net.stem_ye.weight.zero_()
        same = (net(x, y, cue)["velocity"] - net(x)["velocity"]).abs().max().item()
        last.bias.fill_(0.3)  # A now predicts something else
        differ = (net(x, y, cue)["velocity"] - net(x)["velocity"]).abs().max().item()
    assert same == 0.0 and differ > 1e-4


def test_the_deformations_are_the_integrated_velocities():
    """φ = C(v), φ⁻¹ = C(v⁻¹) by scaling and squaring with T = 7 (against a loop of
    grid_sample compositions), and x∘φ, y∘φ⁻¹ are the warps by them."""
    x, y, cue = _images(torch.Generator().manual_seed(3))
    net = _visible(_net(), x)
    out = net(x, y, cue)
    for v_key, d_key in (("velocity", "ddf"), ("velocity_inverse", "ddf_inverse")):
        u = out[v_key].double() / 2 ** 7
        for _ in range(7):
            u = u + _warp_by_grid_sample(u, u)
        assert out[d_key].abs().max().item() > 0.3
        assert (out[d_key].double() - u).abs().max().item() <= 1e-4, d_key
    for img, ddf, key in ((x, out["ddf"], "warped"), (y, out["ddf_inverse"], "warped_target")):
        want = _warp_by_grid_sample(img.double(), ddf.double())
        assert (out[key].double() - want).abs().max().item() <= 1e-5, key


def test_phi_of_phi_inverse_is_the_identity_for_opposite_velocities():
    """The check of φ∘φ⁻¹ that evaluate reports: for v⁻¹ = −v, C(v)∘C(−v) is the identity
    up to the integration's error, below 0.1 px inside (0.08 measured) for a smooth field of
    up to 3 px; the same composition with v⁻¹ = +v is off by about twice the displacement,
    so the composition order and sign are the ones that vanish for true inverses."""
    v = smooth_field(torch.Generator().manual_seed(4), 2, 2, SIZE, 1.0)
    v = v * 3.0 / v.abs().max()
    ddf = mrus_kernels.integrate_velocity(v, 7)
    err = losses.inverse_error(ddf, mrus_kernels.integrate_velocity(-v, 7)).norm(dim=1)
    wrong = losses.inverse_error(ddf, ddf).norm(dim=1)
    disp = ddf.norm(dim=1)
    assert disp.max().item() > 2.0, disp.max().item()
    # Inside: the border clamps both fields, which breaks the group property there.
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert err[inner].max().item() < 0.1, err[inner].max().item()
    assert wrong[inner].mean().item() > 1.5 * disp[inner].mean().item()


def test_alignment_block_layers():
    block = AlignmentBlock(8, layers=3)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) == 3
    assert block(torch.rand(1, 8, 8, 8)).shape == (1, 8, 8, 8)


test_bad_input = bad_input_test({
    "x not 4D": (lambda: _net()(torch.rand(1, 32, 32)), ValueError, r"x must be .*\[B, 1"),
    "y without cue": (lambda: _net()(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)),
                      ValueError, "together"),
    "y shape": (lambda: _net()(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 16, 32),
                               torch.rand(1, 1, 32, 32)), ValueError, "y must be"),
    "stride": (lambda: _net()(torch.rand(1, 1, 30, 32)), ValueError, "divisible by the stride"),
    "steps": (lambda: _net(steps=-1), ValueError, "steps"),
    "init_std": (lambda: _net(init_std=-1.0), ValueError, "init_std"),
    "width": (lambda: _net(width=0), ValueError, "width"),
})


# --------------------------------------------------------------------------- L_DF


def _loss_config(**kw) -> PlasticineConfig:
    return PlasticineConfig(size=SIZE, encoder=(8, 8), decoder=(8, 8, 8),
                            diffusion_mults=(1, 2), backend="torch", **kw)


def _parzen_nmi_and_mi(a: torch.Tensor, b: torch.Tensor, bins: int, sigma: float):
    """NMI (H_a + H_b) / H_ab and MI per item, float64 NumPy: a Gaussian Parzen window of
    width sigma bins over [-1, 1], bin centres lo + (k + 1/2) w (each pixel's weights
    normalised to one)."""
    out_nmi, out_mi = [], []
    w = 2.0 / bins
    centres = -1.0 + (np.arange(bins) + 0.5) * w
    for ai, bi in zip(a.detach().double().numpy(), b.detach().double().numpy(), strict=True):
        def weights(v):
            t = (v.reshape(-1, 1) - centres[None]) / w
            k = np.exp(-t * t / (2 * sigma * sigma))
            return k / k.sum(1, keepdims=True)

        p = weights(ai).T @ weights(bi) / ai.size
        pa, pb = p.sum(1), p.sum(0)

        def h(q):
            q = q[q > 0]
            return -(q * np.log(q)).sum()

        hab = h(p.ravel())
        out_nmi.append((h(pa) + h(pb)) / hab)
        out_mi.append(h(pa) + h(pb) - hab)
    return np.array(out_nmi), np.array(out_mi)


@pytest.mark.parametrize("form", ["nmi", "mi"])
def test_each_loss_term_against_its_formula(form):
    config = _loss_config(mi_form=form, lam_smooth=0.7, lam_align=1.3, lam_inverse=0.4,
                          mi_bins=16)
    x, y, cue = _images(torch.Generator().manual_seed(5))
    net = _visible(_net(), x)
    out = net(x, y, cue)
    loss, logs = losses.deformation_loss(out, x, y, config)
    assert set(logs) == {"data", "smooth", "align", "inverse"}
    xd, yd = x.double(), y.double()
    ddf, ddf_inv = out["ddf"].double(), out["ddf_inverse"].double()
    assert ddf.abs().max().item() > 0.3
    # L_data = -sim(y, x∘φ) - sim(x, y∘φ⁻¹), the warps written with grid_sample.
    nmi_f, mi_f = _parzen_nmi_and_mi(yd, _warp_by_grid_sample(xd, ddf), 16, 0.5)
    nmi_b, mi_b = _parzen_nmi_and_mi(xd, _warp_by_grid_sample(yd, ddf_inv), 16, 0.5)
    data = -((nmi_f.mean() + nmi_b.mean()) if form == "nmi" else (mi_f.mean() + mi_b.mean()))
    # L_smooth: mean squared forward differences of each velocity, averaged over the axes.
    def grad(v):
        return ((v[:, :, 1:] - v[:, :, :-1]).square().mean()
                + (v[..., 1:] - v[..., :-1]).square().mean()).item() / 2

    smooth = grad(out["velocity"].double()) + grad(out["velocity_inverse"].double())
    # L_align: mean squared difference of A's prediction and the (y, ê) features.
    align = (out["features_predicted"].double()
             - out["features_target"].double()).square().mean().item()
    # L_inverse: |φ∘φ⁻¹ - Id|² = |u_inv(p) + u(p + u_inv(p))|², u sampled with border clamp.
    inverse = (ddf_inv + _warp_by_grid_sample(ddf, ddf_inv)).square().sum(1).mean().item()
    want = {"data": data, "smooth": smooth, "align": align, "inverse": inverse}
    tol = {"data": 2e-4, "smooth": 1e-6, "align": 1e-5, "inverse": 1e-4}
    for k, v in want.items():
        assert abs(logs[k].item() - v) <= tol[k] * max(1.0, abs(v)), (k, logs[k].item(), v)
    assert smooth > 1e-5 and inverse > 1e-3 and align > 1e-3
    total = data + 0.7 * smooth + 1.3 * align + 0.4 * inverse
    assert abs(loss.item() - total) <= 1e-3


def test_the_alignment_target_is_detached():
    """L_align trains A (and stem_x, its input), never the (y, ê) stem: the features it
    imitates stay what the registration path makes of them."""
    net = _net()
    x, y, cue = _images(torch.Generator().manual_seed(6))
    losses.align_loss(net(x, y, cue)).backward()
    assert net.stem_ye.weight.grad is None or net.stem_ye.weight.grad.abs().max() == 0
    for p in (*net.align.parameters(), net.stem_x.weight):
        assert p.grad is not None and p.grad.abs().max() > 0


def test_the_data_term_falls_as_the_images_align():
    """L_data is lowest for the deformation that aligns x with y (x shifted by 2 px)."""
    config = _loss_config()
    x, y, _ = _images(torch.Generator().manual_seed(7))

    def data(shift: float) -> float:
        ddf = torch.zeros(2, 2, *SIZE)
        ddf[:, 1] = -shift  # x∘φ(p) = x(p - shift e_1) = roll(x, shift)
        out = {"warped": mrus_kernels.warp(x, ddf, padding="border"),
               "warped_target": mrus_kernels.warp(y, -ddf, padding="border")}
        return losses.data_loss(out, x, y, config).item()

    values = [data(s) for s in (0.0, 1.0, 2.0, 3.0)]
    assert values[2] < values[1] < values[0] and values[2] < values[3], values
