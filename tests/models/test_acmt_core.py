"""ACMT's core: the translation network, the Schrödinger-bridge process and the losses.

References are written here independently of the code: the pool from its closed form, the
diffusion process against the exact mean / variance recursion of eq. 4 (float64), the
boundary loss against a conv3d Sobel written in this file, the texture loss against a
conv3d with the filters normalised here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close_verbose, backend_params, backend_reason, bad_input_test, randn
from mrus_models.acmt import bridge, losses
from mrus_models.acmt.network import ACMTNet

SMALL = {"widths": (4, 8, 8), "time_dim": 8}


def _net(**kw) -> ACMTNet:
    torch.manual_seed(0)
    return ACMTNet(**{**SMALL, **kw})


# ---------------------------------------------------------------------------- network


def test_network_shapes_3d(gen):
    net = _net(shallow_level=0, deep_level=2)
    x = randn(gen, 2, 1, 16, 24, 8)
    out, feats = net(x, torch.tensor([0.0, 0.5]), return_features=True)
    assert out.shape == x.shape
    assert feats["shallow"].shape == (2, 4, 8, 12, 4)
    assert feats["deep"].shape == (2, 8, 2, 3, 1)
    assert (net.stride, net.shallow_channels, net.deep_channels) == (8, 4, 8)
    # encode: the same features from the encoder alone, at the same time.
    fs, fd = net.encode(x, torch.tensor([0.0, 0.5]))
    assert_close_verbose(fs, feats["shallow"], name="shallow")
    assert_close_verbose(fd, feats["deep"], name="deep")
    # The default widths: 32 shallow and 64 deep channels (the 32-64).
    big = ACMTNet()
    assert (big.stride, big.shallow_channels, big.deep_channels) == (16, 32, 64)
    # One code path for slices too.
    flat = ACMTNet(2, **SMALL)
    out2, feats2 = flat(randn(gen, 2, 1, 16, 8), 0.5, return_features=True)
    assert out2.shape == (2, 1, 16, 8) and feats2["deep"].shape == (2, 8, 2, 1)


def test_network_is_time_conditioned_and_near_identity(gen):
    net = _net(head_std=0.1)
    x = randn(gen, 1, 1, 16, 16, 16)
    a, b = net(x, 0.0), net(x, 0.86)
    assert (a - b).abs().max().item() > 1e-4
    # A near-zero head: the untrained network is close to the identity.
    ident = _net()
    assert (ident(x, 0.5) - x).abs().max().item() < 0.05 * x.abs().max().item()


test_network_bad_input = bad_input_test({
    "odd size": (lambda: _net()(torch.zeros(1, 1, 8, 8, 7), 0.0), ValueError,
                 r"divisible by the stride 8 .* got \(8, 8, 7\)"),
    "channels": (lambda: _net()(torch.zeros(1, 2, 8, 8, 8), 0.0), ValueError,
                 r"x must be \[B, 1, \*S\] \(3D\), got \(1, 2, 8, 8, 8\)"),
    "2d input": (lambda: _net()(torch.zeros(1, 1, 8, 8), 0.0), ValueError,
                 r"x must be \[B, 1, \*S\] \(3D\)"),
    "t shape": (lambda: _net()(torch.zeros(2, 1, 8, 8, 8), torch.zeros(3)), ValueError,
                r"t must be a scalar or a Tensor \[B\] = \[2\], got shape \(3,\)"),
    "x type": (lambda: _net()(np.zeros((1, 1, 8, 8, 8)), 0.0), TypeError,
               r"x must be a torch.Tensor, got ndarray"),
    "levels": (lambda: ACMTNet(widths=(4, 8), shallow_level=1, deep_level=1), ValueError,
               r"shallow_level must be below deep_level 1, got 1"),
    "deep level": (lambda: ACMTNet(widths=(4, 8), deep_level=2), ValueError,
                   r"deep_level must be an encoder level in \[0, 1\] .* got 2"),
    "widths": (lambda: ACMTNet(widths=()), ValueError, r"widths must have at least one level"),
    "head_std": (lambda: ACMTNet(head_std=-1.0), ValueError, r"head_std must be a number >= 0"),
})


# ---------------------------------------------------------------------------- bridge


def test_time_pool_is_unsbs():
    # [K24]'s pool for T = 5 in closed form: t_k = 1/2 + 1/2 H_{k-1} / H_4 with H_4 = 25/12.
    expected = [0.0, 0.5, 0.74, 0.86, 0.94, 1.0]
    assert np.abs(bridge.time_pool(5).numpy() - expected).max() <= 1e-12
    assert bridge.time_pool(1).tolist() == [0.0, 1.0]
    pool = bridge.time_pool(9).numpy()
    h = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, 9))])
    assert np.abs(pool[1:] - (0.5 + 0.5 * h / h[-1])).max() <= 1e-12 and pool[0] == 0.0
    g = torch.Generator().manual_seed(0)
    draws = {bridge.draw_index(5, g) for _ in range(200)}
    assert draws == {0, 1, 2, 3, 4}


def test_bridge_step_formula(gen):
    x, x1, z = (randn(gen, 2, 1, 3, 4, 5, dtype=torch.float64) for _ in range(3))
    t, t_next, sigma = 0.5, 0.74, 0.01
    w = (t_next - t) / (1 - t)
    alpha = w * (1 - w) * (1 - t) * sigma
    expected = w * x1 + (1 - w) * x + math.sqrt(alpha) * z
    got = bridge.bridge_step(x, x1, t, t_next, sigma, noise=z)
    assert_close_verbose(got, expected, name="eq. 4")
    assert bridge.bridge_weights(0.5, 0.75, 0.01) == pytest.approx((0.5, 0.00125), abs=1e-15)


class _Affine(nn.Module):
    """x̂_1 = a x + c: a fixed predictor, recording its calls (time, mode, grad mode)."""

    def __init__(self, a: float, c: float) -> None:
        super().__init__()
        self.a, self.c = a, c
        self.scale = nn.Parameter(torch.ones(()))  # a parameter that must not change
        self.calls: list[tuple[list[float], bool, bool]] = []

    def forward(self, x, t):
        self.calls.append((t.tolist(), self.training, torch.is_grad_enabled()))
        return self.scale * (self.a * x + self.c)


def _moments(a: float, c: float, x0: float, index: int, sigma: float, times) -> tuple[float, float]:
    """Exact mean and variance of x_{t_i} for x̂_1 = a x + c (float64 recursion)."""
    m, v = x0, 0.0
    for j in range(index):
        t, tn = float(times[j]), float(times[j + 1])
        w = (tn - t) / (1 - t)
        alpha = w * (1 - w) * (1 - t) * sigma
        k = w * a + 1 - w
        m, v = k * m + w * c, k * k * v + alpha
    return m, v


@pytest.mark.parametrize("index", [1, 3, 4])
def test_diffuse_mean_and_variance(index):
    # A large σ so that the noise is measurable; many independent voxels as draws.
    a, c, x0v, sigma = 0.5, 2.0, -1.0, 0.8
    times = bridge.time_pool(5)
    pred = _Affine(a, c)
    x0 = torch.full((64, 1, 16, 16, 16), x0v, dtype=torch.float64)
    g = torch.Generator().manual_seed(123)
    xt = bridge.diffuse(pred, x0, index, sigma, generator=g)
    m, v = _moments(a, c, x0v, index, sigma, times)
    n = xt.numel()
    assert abs(xt.mean().item() - m) <= 5 * math.sqrt(v / n), (xt.mean().item(), m)
    assert abs(xt.var().item() - v) <= 5 * v * math.sqrt(2 / n), (xt.var().item(), v)
    # The predictor saw t_0 … t_{i-1}, in eval mode, without gradients.
    assert [call[0][0] for call in pred.calls] == pytest.approx(times[:index].tolist())
    assert all(not training and not grad for _, training, grad in pred.calls)
    assert pred.training


def test_diffuse_per_item_index_and_reproducibility(gen):
    pred = _Affine(0.5, 1.0)
    x0 = randn(gen, 3, 1, 4, 4, 4, dtype=torch.float64)
    a = bridge.diffuse(pred, x0, torch.tensor([0, 2, 4]), 0.01,
                       generator=torch.Generator().manual_seed(1))
    b = bridge.diffuse(pred, x0, torch.tensor([0, 2, 4]), 0.01,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a[0], x0[0])  # index 0: x_0 itself
    # Without noise, the item stopped at t_2 is the deterministic recursion to t_2.
    c = bridge.diffuse(pred, x0, torch.tensor([0, 2, 4]), 0.0)
    m2, _ = _moments(0.5, 1.0, 0.0, 2, 0.0, bridge.time_pool(5))
    k = 1.0
    times = bridge.time_pool(5)
    for j in range(2):
        w = float((times[j + 1] - times[j]) / (1 - times[j]))
        k *= w * 0.5 + 1 - w
    assert_close_verbose(c[1], k * x0[1] + m2, name="item 1 at t_2")
    assert torch.equal(bridge.diffuse(pred, x0, 0, 0.01), x0)


def test_bridge_leaves_modes_and_parameters_unchanged(gen):
    torch.manual_seed(0)
    net = ACMTNet(widths=(4, 8), time_dim=8, norm="batch")
    net.train()
    net.unet.encoder[0].eval()  # a submodule the caller left in eval mode stays so
    modes = {name: m.training for name, m in net.named_modules()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x0 = randn(gen, 2, 1, 8, 8, 8)
    xt = bridge.diffuse(net, x0, 4, 0.01)
    out = bridge.sample(net, x0, 0.01)
    assert {name: m.training for name, m in net.named_modules()} == modes
    # BatchNorm running statistics would move in train mode: the state is untouched.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not xt.requires_grad and not out.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_sample_without_noise_is_the_deterministic_chain(gen):
    a, c = 0.25, 3.0
    pred = _Affine(a, c)
    x0 = randn(gen, 2, 1, 4, 4, 4, dtype=torch.float64)
    out = bridge.sample(pred, x0, 0.0)
    times = bridge.time_pool(5).tolist()
    x = x0.clone()
    for j in range(5):
        x1 = a * x + c
        if j < 4:
            w = (times[j + 1] - times[j]) / (1 - times[j])
            x = w * x1 + (1 - w) * x
    assert_close_verbose(out, x1, name="sample")
    assert len(pred.calls) == 5 and pred.calls[-1][0][0] == pytest.approx(0.94)


test_bridge_bad_input = bad_input_test({
    "pool": (lambda: bridge.time_pool(0), ValueError, r"num_timesteps must be an int >= 1"),
    "index range": (lambda: bridge.diffuse(_Affine(1, 0), torch.zeros(1, 1, 2, 2, 2), 5, 0.01),
                    ValueError, r"index must be in \[0, 4\] \(T = 5\), got \[5\]"),
    "index float": (lambda: bridge.diffuse(_Affine(1, 0), torch.zeros(1, 1, 2, 2, 2),
                                           torch.tensor([1.0]), 0.01),
                    TypeError, r"index must be an int or an integer Tensor"),
    "sigma": (lambda: bridge.diffuse(_Affine(1, 0), torch.zeros(1, 1, 2, 2, 2), 1, -0.1),
              ValueError, r"sigma must be a finite number >= 0, got -0.1"),
    "times": (lambda: bridge.sample(_Affine(1, 0), torch.zeros(1, 1, 2, 2, 2), 0.01,
                                    times=[0.0, 0.7, 0.5, 1.0]),
              ValueError, r"times must increase within \[0, 1\]"),
    "step": (lambda: bridge.bridge_weights(1.0, 1.0, 0.01), ValueError,
             r"expected 0 <= t < t_next <= 1"),
})


# ---------------------------------------------------------------------------- losses


def _sobel_conv3d_magnitude(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain Sobel magnitude: three 3×3×3 conv3d kernels (derivative [-1, 0, 1] along one
    axis, smoothing [1, 2, 1] along the others), replicate padding, per channel."""
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype)
    s = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    c = x.shape[1]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    sq = 0
    for axis in range(3):
        vecs = [d if i == axis else s for i in range(3)]
        k = torch.einsum("i,j,k->ijk", *vecs)
        g = F.conv3d(xp, k.expand(c, 1, 3, 3, 3).contiguous(), groups=c)
        sq = sq + g * g
    return torch.sqrt(sq + eps)


def _unit_weight(conv: losses.UnitConv) -> torch.Tensor:
    w = conv.weight.detach()
    return w / torch.sqrt((w * w).sum(dim=(1, 2, 3, 4), keepdim=True))


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu", "triton")))
def test_boundary_loss_is_sobel_then_l1(backend, gen):
    dtype = torch.float64 if backend_reason(backend, "cpu", torch.float64) is None \
        else torch.float32
    torch.manual_seed(0)
    c3 = losses.boundary_conv(3, 3).to(dtype)
    f1 = randn(gen, 2, 3, 5, 6, 7, dtype=dtype).requires_grad_()
    f0 = randn(gen, 2, 3, 5, 6, 7, dtype=dtype).requires_grad_()
    got = losses.boundary_loss(c3, f1, f0, backend=backend)
    g_got = torch.autograd.grad(got, (f1, f0, c3.weight))

    w = c3.weight.detach().clone().requires_grad_()
    wn = w / torch.sqrt((w * w).sum(dim=(1, 2, 3, 4), keepdim=True))
    a, b = f1.detach().clone().requires_grad_(), f0.detach().clone().requires_grad_()
    m1 = _sobel_conv3d_magnitude(F.conv3d(a, wn, padding=1))
    m0 = _sobel_conv3d_magnitude(F.conv3d(b, wn, padding=1))
    expected = (m1 - m0).abs().mean()
    g_exp = torch.autograd.grad(expected, (a, b, w))
    tol = {} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    assert_close_verbose(got, expected, name="boundary", **tol)
    for name, g1, g2 in zip(("f1", "f0", "C3"), g_got, g_exp):
        assert_close_verbose(g1, g2, name=f"d/d{name}", **tol)


def test_boundary_loss_calls_sobel_l1(monkeypatch, gen):
    calls = []

    def spy(a, b, **kw):
        calls.append((a.shape, b.shape, kw))
        return a.sum() * 0

    monkeypatch.setattr(losses, "sobel_l1", spy)
    losses.boundary_loss(losses.boundary_conv(3, 2), randn(gen, 1, 2, 4, 4, 4),
                         randn(gen, 1, 2, 4, 4, 4), backend="torch")
    assert calls == [((1, 2, 4, 4, 4), (1, 2, 4, 4, 4), {"backend": "torch"})]


def test_texture_loss_formula(gen):
    torch.manual_seed(0)
    c7 = losses.texture_conv(3, 3).double()
    assert c7.weight.shape == (3, 3, 7, 7, 7)
    a = randn(gen, 2, 3, 6, 5, 4, dtype=torch.float64)
    b = randn(gen, 2, 3, 6, 5, 4, dtype=torch.float64)
    w = _unit_weight(c7)
    expected = (F.conv3d(a, w, padding=3) - F.conv3d(b, w, padding=3)).square().mean()
    assert_close_verbose(losses.texture_loss(c7, a, b), expected, name="texture")
    # Unit-norm filters: scaling the raw weights changes nothing (no collapse to zero).
    with torch.no_grad():
        c7.weight.mul_(1e-3)
    assert_close_verbose(losses.texture_loss(c7, a, b), expected, name="scaled")
    assert losses.boundary_conv(3, 4).weight.shape == (4, 4, 3, 3, 3)


def _energy(seed: int = 0) -> losses.EnergyNet:
    torch.manual_seed(seed)
    return losses.EnergyNet(3, widths=(4,), time_dim=8).double()


def test_entropy_estimate_formula_and_gradients(gen):
    e = _energy()
    xt = randn(gen, 3, 1, 4, 4, 4, dtype=torch.float64)
    x1 = randn(gen, 3, 1, 4, 4, 4, dtype=torch.float64).requires_grad_()
    t = torch.full((3,), 0.74, dtype=torch.float64)
    h = losses.entropy_estimate(e, xt, x1, t)
    with torch.no_grad():
        z = torch.cat([xt, x1], 1)
        pos = e(z, z, t).numpy()
        neg = e(z, torch.cat([z[2:], z[:2]]), t).numpy()  # item b against item b - 1
    expected = pos.mean() - np.log(np.exp(neg.astype(np.float64)).sum())
    assert abs(h.item() - expected) <= 1e-10 * max(1.0, abs(expected))
    # Explicit negatives equal to the rolled batch give the same estimate.
    h2 = losses.entropy_estimate(e, xt, x1, t, negatives=(xt.roll(1, 0), x1.roll(1, 0)))
    assert abs(h2.item() - h.item()) <= 1e-12
    # The generator's term reaches the images, not E's parameters.
    h.backward()
    assert x1.grad is not None and x1.grad.abs().max() > 0
    assert all(p.grad is None for p in e.parameters())
    # E's own loss reaches E's parameters, not the images.
    x1.grad = None
    le = losses.energy_loss(e, xt, x1, t)
    le.backward()
    assert x1.grad is None
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in e.parameters())
    lse = np.log(np.exp(neg).sum())
    assert abs(le.item() - (-pos.mean() + lse + lse ** 2)) <= 1e-9 * max(1.0, le.item())


def test_sb_loss_formula(gen):
    e = _energy(1)
    xt = randn(gen, 2, 1, 4, 4, 4, dtype=torch.float64)
    x1 = randn(gen, 2, 1, 4, 4, 4, dtype=torch.float64)
    t, sigma = torch.tensor([0.5, 0.86], dtype=torch.float64), 0.3
    loss, h = losses.sb_loss(e, xt, x1, t, sigma)
    mse = ((xt - x1) ** 2).mean().item()
    h_ref = losses.entropy_estimate(e, xt, x1, t).item()
    expected = mse - 2 * sigma * (1 - (0.5 + 0.86) / 2) * h_ref
    assert abs(loss.item() - expected) <= 1e-12 * max(1.0, abs(expected))
    assert abs(h.item() - h_ref) <= 1e-12
    loss0, _ = losses.sb_loss(e, xt, x1, t, 0.0)
    assert abs(loss0.item() - mse) <= 1e-12


test_losses_bad_input = bad_input_test({
    "batch of 1": (lambda: losses.entropy_estimate(_energy(), torch.zeros(1, 1, 4, 4, 4),
                                                   torch.zeros(1, 1, 4, 4, 4), 0.5),
                   ValueError, r"a batch of 1 has none: pass negatives="),
    "pair shapes": (lambda: losses.sb_loss(_energy(), torch.zeros(2, 1, 4, 4, 4),
                                           torch.zeros(2, 1, 4, 4, 2), 0.5, 0.01),
                    ValueError, r"x_t and x1 must have one shape"),
    "t range": (lambda: losses.sb_loss(_energy(), torch.zeros(2, 1, 4, 4, 4),
                                       torch.zeros(2, 1, 4, 4, 4), 1.5, 0.01),
                ValueError, r"t must lie in \[0, 1\]"),
    "sigma": (lambda: losses.sb_loss(_energy(), torch.zeros(2, 1, 4, 4, 4),
                                     torch.zeros(2, 1, 4, 4, 4), 0.5, -1.0),
              ValueError, r"sigma must be a number >= 0, got -1.0"),
    "kernel": (lambda: losses.UnitConv(3, 2, kernel_size=4), ValueError,
               r"kernel_size must be an odd positive int, got 4"),
    "texture shapes": (lambda: losses.texture_loss(losses.texture_conv(3, 2),
                                                   torch.zeros(1, 2, 4, 4, 4),
                                                   torch.zeros(1, 2, 4, 4, 2)),
                       ValueError, r"shallow_mr and shallow_us must have one shape"),
    "boundary shapes": (lambda: losses.boundary_loss(losses.boundary_conv(3, 2),
                                                     torch.zeros(1, 2, 4, 4, 4),
                                                     torch.zeros(1, 2, 4, 4, 2)),
                        ValueError, r"deep_translated and deep_source must have one shape"),
    "energy input": (lambda: losses.EnergyNet(3, widths=(4,), time_dim=8)(
        torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), torch.zeros(1)),
        ValueError, r"z must be \[B, 2, \*S\] \(3D\), got \(1, 3, 4, 4, 4\)"),
})


# ---------------------------------------------------------------------------- one step


def test_one_step_lowers_the_loss_and_reaches_every_parameter(gen):
    torch.manual_seed(0)
    net = ACMTNet(widths=(4, 8, 8), time_dim=8)
    heads = losses.ACMTLossHeads(net, energy_widths=(4, 8), energy_time_dim=8)
    x0_mr, x0_us = randn(gen, 2, 1, 16, 16, 8), randn(gen, 2, 1, 16, 16, 8)
    index = 2
    t = float(bridge.time_pool(5)[index])
    g = torch.Generator().manual_seed(0)
    xt_mr = bridge.diffuse(net, x0_mr, index, 0.01, generator=g)
    xt_us = bridge.diffuse(net, x0_us, index, 0.01, generator=g)
    weights = {"sigma": 0.01, "lam_texture": 1.0, "lam_boundary": 1.0, "lam_sb": 0.1,
               "backend": "torch"}
    params = [*net.parameters(), *heads.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    loss, logs = losses.acmt_loss(net, heads, x0_mr, x0_us, xt_mr, xt_us, t, **weights)
    assert set(logs) == {"texture", "boundary", "sb", "entropy_mr", "entropy_us", "energy"}
    assert all(bool(torch.isfinite(v)) for v in logs.values())
    loss.backward()
    named = [*net.named_parameters(), *(("heads." + k, v) for k, v in heads.named_parameters())]
    for name, p in named:
        assert p.grad is not None, f"{name}: no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"{name}: non-finite gradient"
        assert p.grad.abs().max().item() > 0, f"{name}: zero gradient"
    opt.step()
    with torch.no_grad():
        after, _ = losses.acmt_loss(net, heads, x0_mr, x0_us, xt_mr, xt_us, t, **weights)
    assert after.item() < loss.item() - 1e-6, (loss.item(), after.item())
