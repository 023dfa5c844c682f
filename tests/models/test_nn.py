"""mrus_models.nn: conv blocks, U-Net, time embedding, cross-attention, flow head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import bad_input_test
from mrus_models.nn import (
    ConvBlock,
    CrossAttention,
    FlowHead,
    ResidualBlock,
    TimeEmbedding,
    UNet,
    sinusoidal_embedding,
)

SIZES = {2: (32, 48), 3: (16, 32, 16)}


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)  # module initialisation draws from the global generator
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("ndim", [2, 3])
def test_unet_shapes(ndim):
    gen = _seeded()
    size = SIZES[ndim]
    net = UNet(ndim, 2)
    x = torch.rand(2, 2, *size, generator=gen)
    out, features = net(x, return_features=True)
    assert out.shape == (2, 16, *size)
    assert torch.equal(out, features["decoder"][-1])
    assert [f.shape for f in features["encoder"]] == [
        (2, w, *(s // 2 ** (i + 1) for s in size)) for i, w in enumerate((16, 32, 32, 32))
    ]
    factors = (16, 8, 4, 2, 1, 1, 1)
    assert net.decoder_strides == factors
    assert [f.shape for f in features["decoder"]] == [
        (2, w, *(s // f for s in size)) for w, f in zip((32, 32, 32, 32, 32, 16, 16), factors)
    ]
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("ndim, size", [(2, (33, 32)), (2, (32, 40)), (3, (16, 16, 24))])
def test_unet_rejects_sizes_not_divisible_by_the_stride(ndim, size):
    net = UNet(ndim, 2)
    assert net.stride == 16
    with pytest.raises(ValueError, match=r"divisible by the stride 16 .*got \(" +
                       r", ".join(map(str, size)) + r"\)"):
        net(torch.rand(1, 2, *size))
    small = UNet(ndim, 1, encoder=(4, 4), decoder=(4, 4, 4))
    assert small.stride == 4
    assert small(torch.rand(1, 1, *([12] * ndim))).shape == (1, 4, *([12] * ndim))


def test_default_widths_are_voxelmorphs():
    # VoxelMorph-2 (Balakrishnan et al., IEEE TMI 2019): encoder [16, 32, 32, 32],
    # decoder [32, 32, 32, 32, 32, 16, 16].
    net = UNet(3, 2)
    assert net.encoder_widths == (16, 32, 32, 32)
    assert net.decoder_widths == (32, 32, 32, 32, 32, 16, 16)
    assert [b.out_channels for b in net.encoder] == [16, 32, 32, 32]
    assert [b.out_channels for b in net.decoder] == [32, 32, 32, 32, 32, 16, 16]
    assert all(b.stride == 2 for b in net.encoder)
    assert all(b.stride == 1 for b in net.decoder)
    assert net.out_channels == 16
    act = net.decoder[0].act
    assert isinstance(act, torch.nn.LeakyReLU) and act.negative_slope == 0.2


def _conv_params(k: int, ndim: int, cin: int, cout: int) -> int:
    return k ** ndim * cin * cout + cout  # weights + bias


@pytest.mark.parametrize("ndim", [2, 3])
def test_unet_parameter_count_by_hand(ndim):
    # Residual encoder level (cin -> cout, stride 2): 3x3 conv, 3x3 conv, 1x1 skip conv.
    encoder = [(2, 16), (16, 32), (32, 32), (32, 32)]
    # Decoder inputs: the coarsest map (32), then each upsampled output concatenated with
    # the encoder map of that size (32 + 32, 32 + 32, 32 + 16), then the input (32 + 2).
    decoder = [(32, 32), (64, 32), (64, 32), (48, 32), (34, 32), (32, 16), (16, 16)]
    expected = sum(_conv_params(3, ndim, i, o) + _conv_params(3, ndim, o, o)
                   + _conv_params(1, ndim, i, o) for i, o in encoder)
    expected += sum(_conv_params(3, ndim, i, o) for i, o in decoder)
    assert expected == {2: 133008, 3: 392784}[ndim]
    assert sum(p.numel() for p in UNet(ndim, 2).parameters()) == expected
    # VoxelMorph's plain encoder: one 3x3 conv per level.
    plain = sum(_conv_params(3, ndim, i, o) for i, o in encoder + decoder)
    assert sum(p.numel() for p in UNet(ndim, 2, residual=False).parameters()) == plain


@pytest.mark.parametrize("norm", [None, "instance", "group", "batch"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_blocks_shapes_with_every_norm(ndim, norm):
    gen = _seeded()
    x = torch.rand(2, 4, *([8] * ndim), generator=gen)
    assert ConvBlock(ndim, 4, 6, stride=2, norm=norm)(x).shape == (2, 6, *([4] * ndim))
    assert ResidualBlock(ndim, 4, 6, stride=2, norm=norm)(x).shape == (2, 6, *([4] * ndim))
    same = ResidualBlock(ndim, 4, 4, norm=norm)
    assert isinstance(same.skip, torch.nn.Identity)
    assert same(x).shape == x.shape
    net = UNet(ndim, 4, encoder=(8, 8), decoder=(8, 8, 8), norm=norm)
    assert net(x).shape == (2, 8, *x.shape[2:])


# --------------------------------------------------------------------------- flow head


@pytest.mark.parametrize("ndim", [2, 3])
def test_flow_head_starts_near_zero_yet_passes_gradients(ndim):
    _seeded(1)
    head = FlowHead(ndim, 16)
    x = torch.ones(2, 16, *([8] * ndim), requires_grad=True)
    v = head(x)
    assert v.shape == (2, ndim, *([8] * ndim))
    assert v.abs().max().item() < 1e-3
    assert v.abs().max().item() > 0  # N(0, 1e-5) weights, not zeros
    (v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum().backward()
    assert head.conv.weight.grad.abs().max().item() > 1e-3
    assert head.conv.bias.grad.abs().max().item() > 0
    assert x.grad.abs().max().item() > 0  # the network before the head learns too
    assert head.conv.bias.abs().max().item() == 0
    std = head.conv.weight.std().item()
    assert 0.5e-5 <= std <= 2e-5


# --------------------------------------------------------------------------- cross-attention


@pytest.mark.parametrize("ndim", [2, 3])
def test_cross_attention_is_identity_at_init_and_not_after_one_step(ndim):
    gen = _seeded(2)
    attn = CrossAttention(ndim, 8, 12, heads=4)
    x = torch.rand(2, 8, *([6] * ndim), generator=gen)
    context = torch.rand(2, 12, *([3] * ndim), generator=gen)  # resized to x's size
    assert torch.equal(attn(x, context), x)
    target = torch.rand(x.shape, generator=gen)
    opt = torch.optim.Adam(attn.parameters(), lr=1e-2)
    loss = ((attn(x, context) - target) ** 2).mean()
    loss.backward()
    assert attn.proj.weight.grad.abs().max().item() > 0
    opt.step()
    out = attn(x, context)
    assert (out - x).abs().max().item() > 1e-4
    # The refinement depends on the context, not only on x.
    other = attn(x, torch.rand(context.shape, generator=gen))
    assert (other - out).abs().max().item() > 1e-6


def test_cross_attention_matches_a_dense_softmax():
    gen = _seeded(3)
    attn = CrossAttention(2, 8, 4, heads=2)
    torch.nn.init.normal_(attn.proj.weight, generator=gen)
    x = torch.rand(1, 8, 4, 5, generator=gen, dtype=torch.float64)
    ctx = torch.rand(1, 4, 4, 5, generator=gen, dtype=torch.float64)
    attn = attn.double()
    q = attn.q(attn.norm_x(x)).reshape(2, 4, 20)  # heads, d, N
    kv = attn.kv(attn.norm_context(ctx)).reshape(2, 2, 4, 20)
    k, v = kv[0], kv[1]
    w = torch.softmax(torch.einsum("hdn,hdm->hnm", q, k) / math.sqrt(4), dim=-1)
    out = torch.einsum("hnm,hdm->hdn", w, v).reshape(1, 8, 4, 5)
    expected = x + attn.proj(out)
    assert (attn(x, ctx) - expected).abs().max().item() <= 1e-12


# --------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("dim", [16, 7])
def test_sinusoidal_embedding_matches_numpy(dim):
    t = np.array([0.0, 1.0, 7.5, 999.0, 2.5e4])
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((len(t), 1))], axis=1)
    got64 = sinusoidal_embedding(torch.tensor(t), dim)
    assert got64.dtype == torch.float64 and got64.shape == (5, dim)
    assert np.abs(got64.numpy() - expected).max() <= 1e-12
    got32 = sinusoidal_embedding(torch.tensor(t, dtype=torch.float32), dim)
    assert got32.dtype == torch.float32
    # float32 phase error grows with t * freq (about 2.5e4 * 6e-8 at the top value).
    assert np.abs(got32.numpy() - expected).max() <= 5e-3
    ints = sinusoidal_embedding(torch.tensor([0, 1, 999]), dim)
    assert np.abs(ints.double().numpy() - expected[[0, 1, 3]]).max() <= 1e-4


def test_time_conditioning_changes_the_output():
    gen = _seeded(4)
    emb = TimeEmbedding(16)
    assert emb.out_channels == 64
    net = UNet(2, 2, encoder=(8, 8), decoder=(8, 8, 8), time_channels=emb.out_channels)
    x = torch.rand(2, 2, 16, 16, generator=gen)
    a = net(x, emb(torch.tensor([1.0, 1.0])))
    b = net(x, emb(torch.tensor([500.0, 1.0])))
    assert (a[0] - b[0]).abs().max().item() > 1e-4
    assert torch.equal(a[1], b[1])  # per item: only the item whose t changed moves
    for block in (ConvBlock(2, 2, 4, time_channels=64), ResidualBlock(2, 2, 4, time_channels=64)):
        assert (block(x, emb(torch.tensor([1.0, 2.0]))) -
                block(x, emb(torch.tensor([900.0, 2.0])))).abs().max().item() > 1e-4


def test_gradient_reaches_every_parameter():
    gen = _seeded(5)
    emb = TimeEmbedding(8)
    guide = UNet(2, 1, encoder=(8, 16), decoder=(16, 8, 8))
    net = UNet(2, 2, encoder=(8, 16), decoder=(16, 8, 8), time_channels=emb.out_channels,
               context_channels=(16, 8, None), norm="group")
    head = FlowHead(2, 8)
    # Attention projections start at zero, which blocks the gradient to q, k, v at the
    # first step; a trained network has left that point.
    for attn in net.attention.values():
        torch.nn.init.normal_(attn.proj.weight, std=0.1, generator=gen)
    x = torch.rand(2, 2, 16, 16, generator=gen)
    guided, feats = guide(x[:, :1], return_features=True)
    v = head(net(x, emb(torch.tensor([3.0, 40.0])), context=feats["decoder"]))
    # The guide's own output (unused as context) joins the loss, as a second decoder's would.
    loss = (v * torch.randn(v.shape, generator=gen)).sum() + guided.square().mean()
    loss.backward()
    modules = {"emb": emb, "guide": guide, "net": net, "head": head}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{prefix}.{name}: no gradient"
            assert bool(torch.isfinite(p.grad).all()), f"{prefix}.{name}: non-finite gradient"
            assert p.grad.abs().max().item() > 0, f"{prefix}.{name}: zero gradient"


# --------------------------------------------------------------------------- bad input

test_bad_input = bad_input_test({
    "ndim": (lambda: UNet(4, 2), ValueError, r"UNet: ndim must be 2 or 3, got 4"),
    "empty encoder": (lambda: UNet(2, 2, encoder=()), ValueError, r"at least one level"),
    "short decoder": (lambda: UNet(2, 2, decoder=(32, 32, 32, 32)), ValueError,
                      r"decoder needs more widths than encoder"),
    "width": (lambda: UNet(2, 2, encoder=(16, 0)), ValueError,
              r"encoder must be a positive int, got 0"),
    "context_channels length": (lambda: UNet(2, 2, context_channels=(32,)), ValueError,
                                r"one entry .* per decoder block \(7\), got 1"),
    "x channels": (lambda: UNet(2, 2)(torch.rand(1, 3, 16, 16)), ValueError,
                   r"x must be \[B, 2, \*S\] \(2D\), got \(1, 3, 16, 16\)"),
    "x rank": (lambda: UNet(3, 2)(torch.rand(1, 2, 16, 16)), ValueError, r"\(3D\)"),
    "t_emb missing": (lambda: UNet(2, 1, time_channels=8)(torch.rand(1, 1, 16, 16)), ValueError,
                      r"t_emb .* is required"),
    "t_emb unexpected": (lambda: UNet(2, 1)(torch.rand(1, 1, 16, 16), torch.rand(1, 8)),
                         ValueError, r"time_channels=None"),
    "t_emb width": (lambda: ConvBlock(2, 1, 2, time_channels=8)(torch.rand(1, 1, 4, 4),
                                                                torch.rand(1, 5)),
                    ValueError, r"t_emb must be \[B or 1, 8\] .* got \(1, 5\)"),
    "context missing": (lambda: UNet(2, 1, context_channels=(32,) + (None,) * 6)(
        torch.rand(1, 1, 16, 16)), ValueError, r"context .* is required"),
    "norm": (lambda: ConvBlock(2, 1, 2, norm="layer"), ValueError,
             r"norm must be one of .*'layer'"),
    "activation": (lambda: ConvBlock(2, 1, 2, activation="tanh"), ValueError,
                   r"activation must be one of .*'tanh'"),
    "kernel": (lambda: ConvBlock(2, 1, 2, kernel_size=4), ValueError,
               r"kernel_size must be an odd"),
    "heads": (lambda: CrossAttention(2, 30, 8, heads=4), ValueError,
              r"heads must divide channels, got channels 30 and heads 4"),
    "context batch": (lambda: CrossAttention(2, 8, 8)(torch.rand(2, 8, 4, 4),
                                                      torch.rand(1, 8, 4, 4)),
                      ValueError, r"context must be \[2, 8, \*S_c\]"),
    "embedding rank": (lambda: sinusoidal_embedding(torch.zeros(2, 1), 8), ValueError,
                       r"t must be \[B\].*got shape \(2, 1\)"),
    "embedding dim": (lambda: sinusoidal_embedding(torch.zeros(2), 1), ValueError,
                      r"dim must be an int >= 2, got 1"),
    "embedding type": (lambda: sinusoidal_embedding([0.0], 8), TypeError,
                       r"t must be a torch.Tensor"),
    "init_std": (lambda: FlowHead(2, 16, init_std=-1.0), ValueError, r"init_std must be >= 0"),
})
