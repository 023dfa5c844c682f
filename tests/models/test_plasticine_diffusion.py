"""mrus_models.plasticine: noise schedule, ε_θ1, L_IN, the sampler and the structure maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import bad_input_test
from mrus_models.plasticine.diffusion import (
    IntensityUNet,
    NoiseSchedule,
    add_noise,
    intensity_loss,
    intensity_step,
    sample,
)
from mrus_models.plasticine.structure import kmeans_labels, structure_map

#: A network small enough for a fraction of a second per call: two levels, width 8.
SMALL = {"channels": 8, "mults": (1, 2), "res_blocks": 1, "dropout": 0.0, "head_channels": 4}


def _small_net(**kw) -> IntensityUNet:
    torch.manual_seed(0)
    return IntensityUNet(**{**SMALL, **kw})


# --------------------------------------------------------------------------- schedule


def test_linear_schedule_is_the_papers_and_matches_numpy():
    s = NoiseSchedule.linear()
    betas = np.linspace(1e-6, 1e-2, 2000)  # Plasticine §III-C: K = 2000, 1e-6 … 1e-2
    gammas = np.cumprod(1.0 - betas)
    assert len(s) == 2000 and s.betas.dtype == torch.float64
    assert np.abs(s.betas.numpy() - betas).max() <= 1e-17
    assert np.abs(s.alphas.numpy() - (1.0 - betas)).max() <= 1e-15
    assert np.abs(s.gammas.numpy() - gammas).max() <= 1e-14
    assert s.timesteps.tolist() == list(range(1, 2001))


def test_from_gammas_inverts_the_cumulative_product():
    s = NoiseSchedule.linear(37, 1e-4, 0.3)
    back = NoiseSchedule.from_gammas(s.gammas.numpy())
    assert np.abs(back.betas.numpy() - s.betas.numpy()).max() <= 1e-13
    assert np.abs(back.gammas.numpy() - s.gammas.numpy()).max() <= 1e-15


@pytest.mark.parametrize("k, steps, kept", [(10, 3, [3, 7, 10]), (2000, 50, None),
                                            (7, 1, [7]), (9, 9, list(range(1, 10)))])
def test_respace_keeps_evenly_spaced_steps_and_their_marginals(k, steps, kept):
    # The paper's betas at K = 2000 (larger ones would drive γ_K below float64's epsilon).
    s = NoiseSchedule.linear(k, 1e-4, 0.05) if k < 100 else NoiseSchedule.linear(k)
    r = s.respace(steps)
    if kept is None:
        kept = [40 * j for j in range(1, 51)]  # K / S = 40
    assert r.timesteps.tolist() == kept and len(r) == steps
    g = s.gammas.numpy()[np.array(kept) - 1]
    # The respaced chain has the marginals of the kept steps: Π α' = γ at each kept step.
    assert np.abs(np.cumprod(r.alphas.numpy()) - g).max() <= 1e-14
    assert np.abs(r.alphas.numpy() - g / np.concatenate([[1.0], g[:-1]])).max() <= 1e-15
    # A respaced schedule respaces on its own steps.
    if steps >= 2:
        assert r.respace(1).timesteps.tolist() == [kept[-1]]


def test_respace_with_every_step_is_the_schedule():
    s = NoiseSchedule.linear(50, 1e-3, 0.1)
    r = s.respace(50)
    assert r.timesteps.tolist() == s.timesteps.tolist()
    assert (r.betas - s.betas).abs().max().item() <= 1e-15


def test_sample_gammas_is_uniform_over_steps_and_within_them():
    # SR3: k ~ U{1..K}, sqrt(γ) ~ U(sqrt(γ_k), sqrt(γ_{k-1})), γ_0 = 1.
    s = NoiseSchedule.linear(5, 0.05, 0.4)
    gen = torch.Generator().manual_seed(1)
    n = 50_000
    g = s.sample_gammas(n, generator=gen, dtype=torch.float64)
    assert g.shape == (n,) and g.dtype == torch.float64
    edges = np.sqrt(np.concatenate([[1.0], s.gammas.numpy()]))  # decreasing
    r = g.sqrt().numpy()
    assert r.max() <= 1.0 and r.min() >= edges[-1]
    step = np.searchsorted(-edges, -r, side="right")  # 1 … K
    tol = 5 * math.sqrt(0.2 * 0.8 / n)
    for k in range(1, 6):
        inside = r[step == k]
        assert abs(inside.size / n - 0.2) <= tol, (k, inside.size / n)
        # Uniform within the interval: mean at its midpoint, variance width² / 12.
        lo, hi = edges[k], edges[k - 1]
        assert abs(inside.mean() - (lo + hi) / 2) <= 5 * (hi - lo) / math.sqrt(12 * inside.size)
        assert abs(inside.var() / (hi - lo) ** 2 - 1 / 12) <= 0.01
    again = s.sample_gammas(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(g, again)


def test_forward_chain_has_the_closed_form_marginal():
    # Iterating q(y_k | y_{k-1}) = N(√α_k y_{k-1}, (1 - α_k) I) (eq. A.1) gives
    # q(y_k | y_0) = N(√γ_k y_0, (1 - γ_k) I) (eq. A.3); add_noise draws the latter.
    s = NoiseSchedule.linear(12, 0.01, 0.2)
    gen = torch.Generator().manual_seed(2)
    n = 40_000
    y0 = torch.tensor([-0.8, 0.3, 1.0], dtype=torch.float64)
    y = y0.expand(n, 3).clone()
    a = s.alphas.numpy()
    g = s.gammas.numpy()
    for k in range(12):
        y = math.sqrt(a[k]) * y + math.sqrt(1 - a[k]) * torch.randn(n, 3, generator=gen,
                                                                     dtype=torch.float64)
        if k in (0, 5, 11):
            mean, var = math.sqrt(g[k]) * y0.numpy(), 1 - g[k]
            assert np.abs(y.mean(0).numpy() - mean).max() <= 5 * math.sqrt(var / n)
            assert np.abs(y.var(0).numpy() / var - 1).max() <= 5 * math.sqrt(2 / n)
    gamma = torch.full((n,), g[11], dtype=torch.float64)
    eps = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    direct = add_noise(y0.expand(n, 3).reshape(n, 3, 1), gamma, eps.reshape(n, 3, 1))[..., 0]
    assert np.abs(direct.mean(0).numpy() - math.sqrt(g[11]) * y0.numpy()).max() \
        <= 5 * math.sqrt((1 - g[11]) / n)
    assert np.abs(direct.var(0).numpy() / (1 - g[11]) - 1).max() <= 5 * math.sqrt(2 / n)


def test_add_noise_formula_per_item():
    gen = torch.Generator().manual_seed(3)
    y0 = torch.rand(3, 1, 5, 7, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 1, 5, 7, generator=gen, dtype=torch.float64)
    gamma = torch.tensor([0.9, 0.5, 1e-3], dtype=torch.float64)
    got = add_noise(y0, gamma, eps).numpy()
    g = gamma.numpy()[:, None, None, None]
    assert np.abs(got - (np.sqrt(g) * y0.numpy() + np.sqrt(1 - g) * eps.numpy())).max() <= 1e-15
    scalar = add_noise(y0, 0.25, eps).numpy()
    assert np.abs(scalar - (0.5 * y0.numpy() + math.sqrt(0.75) * eps.numpy())).max() <= 1e-15


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize("ndim, size, kw", [
    (2, (16, 24), {}),
    (2, (8, 12), {"mults": (1, 2, 2), "attention_res": (2,), "scale_shift": False}),
    (3, (8, 8, 4), {}),
])
def test_unet_shapes_and_zero_start(poison, ndim, size, kw):
    net = _small_net(ndim=ndim, **kw)
    gen = torch.Generator().manual_seed(4)
    noisy = torch.randn(3, 1, *size, generator=gen)
    cond = torch.rand(3, 1, *size, generator=gen)
    out = net(noisy, torch.tensor([0.1, 0.5, 0.99]), cond)
    assert out.shape == (3, 1, *size)
    # Palette's zero-initialised output convolution: ε̂ = 0 before training.
    assert out.abs().max().item() == 0.0
    free = _small_net(ndim=ndim, zero_init=False, **kw)
    out = free(noisy, torch.tensor([0.1, 0.5, 0.99]), cond)
    assert bool(torch.isfinite(out).all()) and out.abs().max().item() > 0


def test_unet_paper_layout():
    net = IntensityUNet()
    # Palette: 64 base channels, (1, 2, 4, 8), 2 res blocks, 32-channel heads, dropout 0.2.
    assert (net.channels, net.mults, net.res_blocks, net.dropout) == (64, (1, 2, 4, 8), 2, 0.2)
    assert net.attention_res == (16,) and net.stride == 8
    # Four levels down (three stride-2 convolutions) and four up (three upsamplings).
    strided = [m for m in net.down if isinstance(m, torch.nn.Conv2d)]
    assert len(strided) == 3 and all(m.stride == (2, 2) for m in strided)
    assert sum(isinstance(m, torch.nn.ModuleList) for m in net.up) == 4
    # Factors 1, 2, 4, 8: no level reaches 16, only the middle block attends (8 heads of 32).
    attentions = [m for m in net.modules() if type(m).__name__ == "_SelfAttention"]
    assert len(attentions) == 1 and attentions[0].heads == 512 // 32
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_groups for m in norms} == {32}
    assert {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}


def test_unet_output_depends_on_every_input():
    net = _small_net(zero_init=False)
    gen = torch.Generator().manual_seed(5)
    noisy, cond = torch.randn(2, 1, 16, 16, generator=gen), torch.rand(2, 1, 16, 16, generator=gen)
    gamma = torch.tensor([0.3, 0.7])
    base = net(noisy, gamma, cond)
    for changed in (net(noisy + 0.1, gamma, cond), net(noisy, gamma + 0.01, cond),
                    net(noisy, gamma, cond.flip(-1))):
        assert (changed - base).abs().max().item() > 1e-6
    # Items are independent: the second item's output ignores the first item's input.
    other = net(torch.cat([noisy[:1] + 1, noisy[1:]]), gamma, cond)
    assert (other[1] - base[1]).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- training


def test_intensity_loss_is_the_mean_l1():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 1, 5, 3, generator=gen), torch.randn(2, 1, 5, 3, generator=gen)
    want = np.abs(a.numpy() - b.numpy()).sum() / a.numel()
    assert abs(intensity_loss(a, b).item() - want) <= 1e-6


def test_intensity_step_draws_and_loss():
    s = NoiseSchedule.linear()
    net = _small_net(zero_init=False)
    gen = torch.Generator().manual_seed(7)
    y = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    y_s = structure_map(y, 2)
    out = intensity_step(net, y, y_s, s, generator=torch.Generator().manual_seed(8))
    assert set(out) == {"loss", "eps_hat", "eps", "noisy", "gamma"}
    g = out["gamma"].numpy()[:, None, None, None]
    assert out["gamma"].shape == (3,) and (g > 0).all() and (g <= 1).all()
    assert np.abs(out["noisy"].numpy() - (np.sqrt(g) * y.numpy() + np.sqrt(1 - g)
                                          * out["eps"].numpy())).max() <= 1e-6
    assert abs(out["eps"].std().item() - 1) <= 0.15
    assert torch.allclose(out["eps_hat"], net(out["noisy"], out["gamma"], y_s), atol=1e-6)
    want = np.abs(out["eps"].numpy() - out["eps_hat"].detach().numpy()).mean()
    assert abs(out["loss"].item() - want) <= 1e-6
    again = intensity_step(net, y, y_s, s, generator=torch.Generator().manual_seed(8))
    assert torch.equal(again["eps"], out["eps"]) and torch.equal(again["gamma"], out["gamma"])


@pytest.mark.parametrize("zero_init", [False, True])
def test_one_step_lowers_the_loss_and_reaches_every_parameter(zero_init):
    s = NoiseSchedule.linear()
    net = _small_net(zero_init=zero_init, attention_res=(1,))
    gen = torch.Generator().manual_seed(9)
    y = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    y_s = structure_map(y, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss_on_fixed_draw():
        return intensity_step(net, y, y_s, s, generator=torch.Generator().manual_seed(10))["loss"]

    # Zero-initialised: the first step moves the output convolution only, the second the
    # last convolution of every block; from the third every parameter has a gradient.
    steps = 3 if zero_init else 1
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = loss_on_fixed_draw()
        loss.backward()
        losses.append(loss.item())
        if i == steps - 1:
            for name, p in net.named_parameters():
                assert p.grad is not None, f"{name}: no gradient"
                assert bool(torch.isfinite(p.grad).all()), f"{name}: non-finite gradient"
                assert p.grad.abs().max().item() > 0, f"{name}: zero gradient"
        opt.step()
    with torch.no_grad():
        after = loss_on_fixed_draw().item()
    assert after < losses[-1] - 1e-5, (losses, after)


# --------------------------------------------------------------------------- sampler


def _linear_predictor(y, gamma, cond):
    """A fixed, non-trivial ε̂ that uses all three inputs."""
    return 0.3 * y - 0.2 * cond + 0.1 * gamma.view(-1, 1, 1, 1)


def _reference_sample(x0, cond, gammas, generator):
    """Algorithm 1 of Plasticine in NumPy float64 (eq. 2 and 5), z drawn from ``generator``
    in the sampler's order: x_K's noise, then z for k = K … 2."""
    g = np.asarray(gammas, dtype=np.float64)
    a = g / np.concatenate([[1.0], g[:-1]])
    x0, cond = x0.numpy(), cond.numpy()

    def z():
        return torch.randn(x0.shape, generator=generator, dtype=torch.float64).numpy()

    y = np.sqrt(g[-1]) * x0 + np.sqrt(1 - g[-1]) * z()
    for k in range(len(g), 0, -1):
        eps = 0.3 * y - 0.2 * cond + 0.1 * g[k - 1]
        y = (y - (1 - a[k - 1]) / np.sqrt(1 - g[k - 1]) * eps) / np.sqrt(a[k - 1])
        if k > 1:
            y = y + np.sqrt(1 - a[k - 1]) * z()
    return y


@pytest.mark.parametrize("steps", [None, 6])
def test_sampler_matches_a_numpy_reference(steps):
    s = NoiseSchedule.linear(30, 1e-3, 0.15)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.rand(2, 1, 5, 6, generator=gen, dtype=torch.float64) * 2 - 1
    cond = torch.rand(2, 1, 5, 6, generator=gen, dtype=torch.float64)
    got = sample(_linear_predictor, x0, cond, s, steps=steps,
                 generator=torch.Generator().manual_seed(12))
    gammas = (s if steps is None else s.respace(steps)).gammas.numpy()
    want = _reference_sample(x0, cond, gammas, torch.Generator().manual_seed(12))
    assert got.shape == x0.shape and got.dtype == torch.float64
    assert np.abs(got.numpy() - want).max() <= 1e-10 * max(1.0, np.abs(want).max())


def test_respaced_sampler_with_every_step_equals_the_plain_one():
    s = NoiseSchedule.linear(40, 1e-4, 0.1)
    gen = torch.Generator().manual_seed(13)
    x0 = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64)
    cond = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64)
    plain = sample(_linear_predictor, x0, cond, s, generator=torch.Generator().manual_seed(14))
    full = sample(_linear_predictor, x0, cond, s, steps=40,
                  generator=torch.Generator().manual_seed(14))
    assert (plain - full).abs().max().item() <= 1e-12
    fewer = sample(_linear_predictor, x0, cond, s, steps=8,
                   generator=torch.Generator().manual_seed(14))
    assert (plain - fewer).abs().max().item() > 1e-3  # respacing does change the chain


@pytest.mark.parametrize("steps", [None, 7, 1])
def test_sampler_with_a_noise_oracle_recovers_the_target(steps):
    # ε̂ = the ε that puts the current ŷ_k on the q(y_k | y_0) path of a known y0:
    # ŷ_k = √γ_k y0 + √(1 - γ_k) ε. Eq. 5 at the last step (γ_1 = α_1, z = 0) then returns y0
    # exactly, whatever the source image and the noise drawn on the way.
    s = NoiseSchedule.linear(60, 1e-4, 0.08)
    gen = torch.Generator().manual_seed(15)
    y0 = torch.rand(2, 1, 6, 5, generator=gen, dtype=torch.float64) * 2 - 1
    x0 = torch.rand(2, 1, 6, 5, generator=gen, dtype=torch.float64) * 2 - 1
    calls = []

    def oracle(y, gamma, cond):
        calls.append(gamma[0].item())
        g = gamma.view(-1, 1, 1, 1)
        return (y - g.sqrt() * y0) / (1 - g).sqrt()

    got, first = sample(oracle, x0, torch.zeros_like(x0), s, steps=steps,
                        generator=torch.Generator().manual_seed(16), return_first_eps=True)
    assert (got - y0).abs().max().item() <= 1e-10
    sched = s if steps is None else s.respace(steps)
    assert len(calls) == len(sched)
    assert np.abs(np.array(calls) - sched.gammas.numpy()[::-1]).max() <= 1e-15
    # The first ε̂ is the oracle's at x_K = √γ_K x0 + √(1 - γ_K) z.
    g_k = sched.gammas[-1].item()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    x_k = math.sqrt(g_k) * x0 + math.sqrt(1 - g_k) * z
    assert (first - (x_k - math.sqrt(g_k) * y0) / math.sqrt(1 - g_k)).abs().max().item() <= 1e-12


def test_sampler_with_the_network_is_seeded_and_float32():
    s = NoiseSchedule.linear()
    net = _small_net(zero_init=False).eval()
    gen = torch.Generator().manual_seed(17)
    x0 = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    cond = structure_map(x0, 2)
    a = sample(net, x0, cond, s, steps=3, generator=torch.Generator().manual_seed(1))
    b = sample(net, x0, cond, s, steps=3, generator=torch.Generator().manual_seed(1))
    c = sample(net, x0, cond, s, steps=3, generator=torch.Generator().manual_seed(2))
    assert a.dtype == torch.float32 and a.shape == x0.shape and bool(torch.isfinite(a).all())
    assert torch.equal(a, b) and (a - c).abs().max().item() > 1e-3
    assert not a.requires_grad


# --------------------------------------------------------------------------- structure maps


def _numpy_kmeans(values: np.ndarray, k: int, iters: int = 100) -> np.ndarray:
    """Lloyd's algorithm in 1-D from the k quantile centres (a reference independent of
    scikit-learn)."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        labels = np.abs(values[:, None] - centres[None, :]).argmin(1)
        new = np.array([values[labels == c].mean() for c in range(k)])
        if np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    return labels


def _three_levels(gen: np.random.Generator, levels=(0.1, 0.5, 0.9), size=(24, 20)):
    """A piecewise-constant image of three regions plus a little noise, and its regions."""
    h, w = size
    region = np.zeros(size, dtype=np.int64)
    region[:, w // 3:] = 1
    region[h // 2:, 2 * w // 3:] = 2
    image = np.asarray(levels)[region] + 0.03 * gen.standard_normal(size)
    return image, region


def test_structure_map_matches_numpy_kmeans_up_to_order():
    gen = np.random.default_rng(18)
    image, region = _three_levels(gen)
    got = structure_map(torch.from_numpy(image)[None, None], 3)[0, 0].numpy()
    labels = np.rint((got + 1) * (3 - 1) / 2).astype(np.int64)
    ref = _numpy_kmeans(image.ravel(), 3).reshape(image.shape)
    # Equal partitions: each reference cluster maps to exactly one of ours.
    pairs = set(zip(ref.ravel().tolist(), labels.ravel().tolist(), strict=True))
    assert len(pairs) == 3
    assert np.array_equal(labels, region)  # ordered by intensity: 0.1, 0.5, 0.9


def test_structure_map_orders_clusters_by_mean_intensity():
    gen = np.random.default_rng(19)
    # Region 0 is the brightest, region 2 the darkest: labels must follow intensity.
    image, region = _three_levels(gen, levels=(0.9, 0.2, -0.5))
    got = structure_map(torch.from_numpy(image).float()[None, None], 3)[0, 0]
    want = {0: 1.0, 1: 0.0, 2: -1.0}
    assert got.dtype == torch.float32
    for r, v in want.items():
        assert torch.all(got[torch.from_numpy(region == r)] == v), r
    # Mean intensity rises with the map's value.
    means = [image[got.numpy() == v].mean() for v in (-1.0, 0.0, 1.0)]
    assert means == sorted(means)


def test_structure_map_batch_3d_and_two_clusters():
    gen = np.random.default_rng(20)
    a, ra = _three_levels(gen, levels=(0.0, 0.1, 1.0), size=(8, 9))
    vol = np.stack([a, a[::-1]], axis=0)  # [2, 8, 9] as a 3D item
    x = torch.from_numpy(np.stack([vol, -vol]))[:, None]  # [2, 1, 2, 8, 9]
    got = structure_map(x, 2, seed=3)
    assert got.shape == x.shape and got.dtype == torch.float64
    assert set(got.unique().tolist()) == {-1.0, 1.0}
    # Item 0: the bright region (level 1.0) is the foreground; item 1 is the negative image,
    # so its foreground is the complement.
    fg = np.stack([ra == 2, (ra == 2)[::-1]])
    assert np.array_equal(got[0, 0].numpy() == 1.0, fg)
    assert np.array_equal(got[1, 0].numpy() == 1.0, ~fg)
    assert torch.equal(got, structure_map(x, 2, seed=3))


def test_structure_map_fitted_on_a_subsample_labels_every_pixel():
    gen = np.random.default_rng(21)
    image, region = _three_levels(gen, size=(40, 36))
    x = torch.from_numpy(image)[None, None]
    full = structure_map(x, 3, max_samples=None)
    sub = structure_map(x, 3, max_samples=50)  # 50 of 1440 pixels fit the centres
    assert torch.equal(sub, full)
    assert np.array_equal(np.rint(full[0, 0].numpy() + 1).astype(np.int64), region)
    assert torch.equal(structure_map(x, 3, max_samples=50, seed=4),
                       structure_map(x, 3, max_samples=50, seed=4))


def test_structure_map_with_fewer_values_than_clusters():
    x = torch.tensor([[[[2.0, 2.0], [5.0, 2.0]]]], dtype=torch.float64)
    assert structure_map(x, 4).tolist() == [[[[-1.0, -1.0], [-1.0 + 2 / 3, -1.0]]]]
    assert structure_map(torch.full((1, 1, 3, 3), 7.0), 2).unique().tolist() == [-1.0]
    assert kmeans_labels(np.array([3.0, 1.0, 3.0]), 2).tolist() == [1, 0, 1]


# --------------------------------------------------------------------------- bad input


def _net_call(**kw):
    net = _small_net()
    args = {"noisy": torch.zeros(1, 1, 8, 8), "gamma": torch.tensor([0.5]),
            "condition": torch.zeros(1, 1, 8, 8), **kw}
    return lambda: net(args["noisy"], args["gamma"], args["condition"])


_S = NoiseSchedule.linear(10)

test_bad_input = bad_input_test({
    "structure_not_tensor": (lambda: structure_map(np.zeros((1, 1, 4, 4)), 2), TypeError,
                             "image must be a floating-point torch.Tensor, got ndarray"),
    "structure_int": (lambda: structure_map(torch.zeros(1, 1, 4, 4, dtype=torch.long), 2),
                      TypeError, r"floating-point torch.Tensor, got torch.int64"),
    "structure_channels": (lambda: structure_map(torch.zeros(1, 2, 4, 4), 2), ValueError,
                           r"image must be \[B, 1, H, W\] or \[B, 1, D, H, W\], got \(1, 2"),
    "structure_2d": (lambda: structure_map(torch.zeros(4, 4), 2), ValueError,
                     r"got \(4, 4\)"),
    "structure_clusters": (lambda: structure_map(torch.zeros(1, 1, 4, 4), 1), ValueError,
                           "clusters must be an int >= 2, got 1"),
    "structure_nan": (lambda: structure_map(torch.tensor([[[[0.0, float("nan")]]]]), 2),
                      ValueError, "item 0 has NaN or inf"),
    "kmeans_samples": (lambda: kmeans_labels(np.arange(9.0), 3, max_samples=2), ValueError,
                       r"max_samples must be None or an int >= clusters \(3\), got 2"),
    "kmeans_2d": (lambda: kmeans_labels(np.zeros((2, 2)), 2), ValueError,
                  r"values must be a non-empty 1-D array, got shape \(2, 2\)"),
    "betas_range": (lambda: NoiseSchedule([0.1, 1.0]), ValueError,
                    r"every beta must be in \(0, 1\)"),
    "betas_empty": (lambda: NoiseSchedule([]), ValueError, "non-empty 1-D"),
    "timesteps": (lambda: NoiseSchedule([0.1, 0.2], [1]), ValueError,
                  r"one entry per beta \(2\), got shape \(1,\)"),
    "linear_steps": (lambda: NoiseSchedule.linear(0), ValueError,
                     "steps must be a positive int, got 0"),
    "linear_beta": (lambda: NoiseSchedule.linear(10, 0.0, 0.1), ValueError,
                    r"must be in \(0, 1\), got 0.0 and 0.1"),
    "gammas_order": (lambda: NoiseSchedule.from_gammas([0.5, 0.7]), ValueError,
                     "decrease strictly"),
    "respace_zero": (lambda: _S.respace(0), ValueError, r"int in 1 … 10, got 0"),
    "respace_many": (lambda: _S.respace(11), ValueError, r"int in 1 … 10, got 11"),
    "sample_gammas": (lambda: _S.sample_gammas(0), ValueError,
                      "batch must be a positive int, got 0"),
    "add_noise_shape": (lambda: add_noise(torch.zeros(2, 1, 3), torch.ones(2), torch.zeros(2, 1)),
                        ValueError, r"noise must have the shape of y0 \(2, 1, 3\)"),
    "add_noise_gamma": (lambda: add_noise(torch.zeros(2, 1, 3), torch.ones(3),
                                          torch.zeros(2, 1, 3)),
                        ValueError, r"gamma must be \[B\] = \[2\], got \(3,\)"),
    "loss_shape": (lambda: intensity_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3)),
                   ValueError, r"one shape, got \(1, 1, 2\) and \(1, 1, 3\)"),
    "net_size": (_net_call(noisy=torch.zeros(1, 1, 8, 7), condition=torch.zeros(1, 1, 8, 7)),
                 ValueError, r"divisible by 2 \(2 \*\* \(levels - 1\)\), got \(8, 7\)"),
    "net_channels": (_net_call(noisy=torch.zeros(1, 2, 8, 8)), ValueError,
                     r"noisy must be \[B, 1, \*S\] \(2D\), got \(1, 2, 8, 8\)"),
    "net_condition": (_net_call(condition=torch.zeros(1, 1, 8, 16)), ValueError,
                      r"condition must match noisy's batch and size"),
    "net_gamma": (_net_call(gamma=torch.tensor(0.5)), ValueError,
                  r"gamma must be a tensor \[B\] = \[1\], got \(\)"),
    "net_not_tensor": (_net_call(noisy=np.zeros((1, 1, 8, 8))), TypeError,
                       "noisy must be a torch.Tensor, got ndarray"),
    "net_dropout": (lambda: IntensityUNet(dropout=1.0), ValueError,
                    r"dropout must be in \[0, 1\), got 1.0"),
    "net_mults": (lambda: IntensityUNet(mults=()), ValueError, "at least one level"),
    "net_ndim": (lambda: IntensityUNet(ndim=1), ValueError, "ndim must be 2 or 3, got 1"),
    "net_scale": (lambda: IntensityUNet(noise_embedding_scale=0), ValueError,
                  "noise_embedding_scale must be > 0"),
    "step_schedule": (lambda: intensity_step(_linear_predictor, torch.zeros(1, 1, 2),
                                             torch.zeros(1, 1, 2), "linear"),
                      TypeError, "schedule must be a NoiseSchedule, got str"),
    "sample_schedule": (lambda: sample(_linear_predictor, torch.zeros(1, 1, 2),
                                       torch.zeros(1, 1, 2), None),
                        TypeError, "schedule must be a NoiseSchedule, got NoneType"),
    "sample_condition": (lambda: sample(_linear_predictor, torch.zeros(1, 1, 2),
                                        torch.zeros(1, 1, 3), _S),
                         ValueError, r"condition must be \[1, C_s, 2\] like x0, got \(1, 1, 3\)"),
    "sample_steps": (lambda: sample(_linear_predictor, torch.zeros(1, 1, 2),
                                    torch.zeros(1, 1, 2), _S, steps=20),
                     ValueError, r"int in 1 … 10, got 20"),
})
