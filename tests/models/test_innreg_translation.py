"""mrus_models.innreg.translation: INNReg's invertible translation network T (Sec. 3.2).

The lift against the Haar formulas, DDWConv (eq. 7-8) against a loop over items, each
block's inverse (eq. 5-6) and coupling (eq. 3-4) against their formulas, T⁻¹(T(x)) = x
for random, stressed and trained weights, gradients, the parameter count, bad input.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import bad_input_test
from mrus_models.innreg.translation import (
    DDWConv,
    DenseBlock,
    HaarLift,
    InvBlock,
    InvertibleConv1x1,
    TranslationNet,
    depthwise_conv,
)

# The bar for T⁻¹(T(x)) = x: max abs error on inputs in [0, 1], float32.
INVERT_TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these images are tiny, and two OpenMP threads spinning on two
    busy cores made the same calls a hundred times slower (measured: 0.13 s against 7 to
    27 s for a forward and inverse at 2×1×32×40 under a load of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)  # module initialisation draws from the global generator
    return torch.Generator().manual_seed(seed)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _smooth_image(gen: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
    """Images in [0, 1] with structure (coarse noise, upsampled, squashed)."""
    coarse = torch.randn(b, 1, h // 8, w // 8, generator=gen)
    return torch.sigmoid(3 * F.interpolate(coarse, size=(h, w), mode="bilinear",
                                           align_corners=True))


def _stress(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Moves the weights away from their near-identity start, as training would: random
    channel mixing, DenseBlock outputs at full scale, so that T is far from the identity
    and the coupling scales reach their clamp."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, InvertibleConv1x1):
                for p in (module.lower, module.upper, module.log_s):
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif isinstance(module, DenseBlock):
                module.out.weight.mul_(3.0)
                module.out.bias.add_(0.1 * torch.randn(module.out.bias.shape, generator=gen))
            elif isinstance(module, InvBlock):
                module.H.out.weight.mul_(4.0)


# --------------------------------------------------------------------------- T


@pytest.mark.parametrize("channels, split, lift, size", [
    (1, None, "haar", (34, 46)),
    (2, 3, "squeeze", (18, 12)),
    (1, 2, "haar", (8, 10)),
])
def test_shapes(channels, split, lift, size):
    gen = _seeded()
    net = TranslationNet(channels, blocks=2, split=split, hidden=8, ddw_kernels=3,
                         ddw_kernel_size=5, lift=lift)
    x = torch.rand(3, channels, *size, generator=gen)
    y = net(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert bool(torch.isfinite(y).all())
    assert net.inverse(y).shape == x.shape


def test_default_architecture_and_parameter_count():
    """The paper's T (8 InvBlocks, Sec. 4) with ESRGAN's dense block width 32 and the
    released code's 7×7 DDWConv: 2,167,680 parameters, counted here from the layout."""
    _seeded()
    net = TranslationNet()
    assert len(net.blocks) == 8 and net.split == 1

    def dense(c_in: int, c_out: int, hidden: int = 32, kernels: int = 4, k: int = 7) -> int:
        convs = sum((c_in + i * hidden) * hidden * 9 + hidden for i in range(4))
        width = c_in + 4 * hidden
        mlp_hidden = max(width // 4, 4)
        ddw = (width * mlp_hidden + mlp_hidden) + (mlp_hidden * kernels + kernels) \
            + kernels * width * k * k + kernels * width
        return convs + ddw + width * c_out * 9 + c_out

    mixing = 4 * 4 + 4 * 4 + 4  # L, U (full matrices, their strict triangles used), log_s
    per_block = dense(3, 1) + 2 * dense(1, 3) + mixing
    count = sum(p.numel() for p in net.parameters())
    assert count == 8 * per_block == 2_167_680

    no_ddw = TranslationNet(ddw=False)
    assert not any(isinstance(m, DDWConv) for m in no_ddw.modules())
    ddw_params = sum(p.numel() for m in net.modules() if isinstance(m, DDWConv)
                     for p in m.parameters())
    assert sum(p.numel() for p in no_ddw.parameters()) == count - ddw_params


def test_invertible_with_random_weights():
    gen = _seeded(1)
    net = TranslationNet()
    x = torch.rand(2, 1, 32, 40, generator=gen)
    y = torch.rand(2, 1, 32, 40, generator=gen)
    with torch.no_grad():
        assert _max_abs(net.inverse(net(x)), x) <= INVERT_TOL
        assert _max_abs(net(net.inverse(y)), y) <= INVERT_TOL
        # Near the identity at initialisation, but not the identity.
        assert 1e-3 < (net(x) - x).abs().mean().item() < 0.1


def _stressed_net_and_image(seed: int, *shape: int) -> tuple[TranslationNet, torch.Tensor]:
    gen = _seeded(seed)
    net = TranslationNet()
    _stress(net, gen)
    return net, torch.rand(*shape, generator=gen)


def test_invertible_with_stressed_weights():
    net, x = _stressed_net_and_image(2, 2, 1, 32, 32)
    with torch.no_grad():
        y = net(x)
        # Far from the identity, so the round trip below is not a trivial one.
        assert (y - x).abs().mean().item() > 0.3
        first = net.blocks[0]
        m = first.mix(net.lift(x))
        s = first.log_scale(m[:, :1] + first.F(m[:, 1:]))
        assert s.abs().max().item() > 0.25  # exp(s) scales by up to 1.3: they matter
        assert _max_abs(net.inverse(y), x) <= INVERT_TOL
    # In float64 the inverse is exact algebra: what is left is float64 rounding.
    net64 = net.double()
    x64 = x.double()
    with torch.no_grad():
        assert _max_abs(net64.inverse(net64(x64)), x64) <= 1e-11


def test_invertible_after_training():
    """20 Adam steps with the paper's optimiser (lr 2e-4, betas (0.5, 0.999), Sec. 4) on an
    L1 target (contrast inversion, the T1 → T2 direction): the loss halves and
    T⁻¹(T(x)) = x still holds on held-out images.

    The bar holds because training keeps T well conditioned: with ten times the paper's
    learning rate, 20 steps leave a T whose inverse amplifies the float32 rounding of its
    own output alone to ~1e-4 (measured; ~2e-6 after 100 steps at the paper's rate)."""
    gen = _seeded(3)
    net = TranslationNet()
    x = _smooth_image(gen, 2, 32, 32)
    target = 1.0 - x
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999))
    losses = []
    for _ in range(20):
        loss = (net(x) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    held_out = torch.rand(2, 1, 32, 32, generator=gen)
    with torch.no_grad():
        assert _max_abs(net.inverse(net(held_out)), held_out) <= INVERT_TOL
        assert _max_abs(net.inverse(net(x)), x) <= INVERT_TOL
        y = torch.rand(2, 1, 32, 32, generator=gen)
        assert _max_abs(net(net.inverse(y)), y) <= INVERT_TOL


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradient_reaches_every_parameter(direction):
    gen = _seeded(4)
    net = TranslationNet()
    x = torch.rand(2, 1, 16, 16, generator=gen)
    out = net(x) if direction == "forward" else net.inverse(x)
    (out - (1.0 - x)).abs().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum().item() > 0, name


def test_invertible_under_bf16_autocast(monkeypatch):
    """T runs with autocast off: under bf16 autocast the round trip still holds, which it
    does not when T is left to autocast (checked, so the test can fail)."""
    gen = _seeded(5)
    net = TranslationNet(blocks=4)
    _stress(net, gen)
    x = torch.rand(2, 1, 32, 32, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        assert y.dtype == torch.float32
        assert _max_abs(net.inverse(y), x) <= INVERT_TOL
    monkeypatch.setattr(TranslationNet, "_full_precision",
                        staticmethod(lambda device: contextlib.nullcontext()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _max_abs(net.inverse(net(x)), x) > 1e-3


def test_full_precision_context_turns_tf32_off_and_restores_it():
    """On CUDA, T's forward and inverse run without TF32 (cuDNN's default for
    convolutions), whose 10-bit mantissa breaks the round trip once the weights have
    trained; the flags come back as they were, also after an error."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with TranslationNet._full_precision(torch.device("cuda")):
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError, match="inside"), \
                TranslationNet._full_precision(torch.device("cuda")):
            raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with TranslationNet._full_precision(torch.device("cpu")):  # CPU: no TF32 to turn off
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
def test_cuda_matches_cpu_and_inverts():
    net, x = _stressed_net_and_image(6, 3, 1, 64, 64)
    with torch.no_grad():
        y_cpu = net(x)
        net = net.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(x.cuda())
        assert torch.backends.cudnn.allow_tf32  # restored after the call
        assert _max_abs(y.cpu(), y_cpu) <= 1e-3
        assert _max_abs(net.inverse(y).cpu(), x) <= INVERT_TOL


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("kind", ["haar", "squeeze"])
def test_lift_against_formula(kind):
    gen = _seeded(7)
    x = torch.rand(2, 3, 10, 12, generator=gen, dtype=torch.float64)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    if kind == "haar":
        bands = [(a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2,
                 (a - b - c + d) / 2]
    else:
        bands = [a, b, c, d]
    lift = HaarLift(kind)
    v = lift(x)
    assert _max_abs(v, torch.cat(bands, dim=1)) <= 1e-12
    assert abs(v.norm().item() - x.norm().item()) <= 1e-10  # orthonormal
    assert _max_abs(lift.inverse(v), x) <= 1e-12


@pytest.mark.parametrize("mixing", [False, True])
def test_invblock_coupling_and_inverse(mixing):
    """eq. 3-4 against their formula (without mixing), eq. 5-6 undo them."""
    gen = _seeded(8)
    block = InvBlock(4, 1, hidden=8, clamp=0.8, mixing=mixing, ddw_kernels=2,
                     ddw_kernel_size=3)
    _stress(block, gen)
    m = torch.rand(2, 4, 10, 14, generator=gen)
    with torch.no_grad():
        n = block(m)
        if not mixing:
            m1, m2 = m[:, :1], m[:, 1:]
            n1 = m1 + block.F(m2)
            s = 0.8 * torch.tanh(block.H(n1) / 0.8)
            n2 = m2 * torch.exp(s) + block.G(n1)
            assert _max_abs(n, torch.cat((n1, n2), 1)) <= 1e-6
        assert _max_abs(block.inverse(n), m) <= 1e-5
        other = torch.rand(2, 4, 10, 14, generator=gen)
        assert _max_abs(block(block.inverse(other)), other) <= 1e-5


def test_log_scale_is_clamped_and_inverse_stays_exact():
    gen = _seeded(9)
    block = InvBlock(4, 2, hidden=8, clamp=0.5, mixing=False, ddw=False)
    with torch.no_grad():
        block.H.out.weight.mul_(1e3)  # H(n₁) in the hundreds: tanh saturates
    block = block.double()
    m = torch.rand(2, 4, 12, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        s = block.log_scale(m[:, :2] + block.F(m[:, 2:]))
        assert s.abs().max().item() <= 0.5
        assert s.abs().max().item() > 0.49  # saturated: the clamp is what bounds it
        assert block.H(m[:, :2] + block.F(m[:, 2:])).abs().max().item() > 10
        assert _max_abs(block.inverse(block(m)), m) <= 1e-12


def test_invertible_conv1x1():
    gen = _seeded(10)
    conv = InvertibleConv1x1(4)
    x = torch.rand(2, 4, 5, 7, generator=gen)
    assert _max_abs(conv(x), x) == 0.0  # starts as the identity
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    w = conv.matrix().detach().double()
    # det W = exp(Σ log_s): never zero, whatever the parameters.
    assert abs(torch.linalg.det(w).item() - conv.log_s.sum().exp().item()) <= 1e-5
    expected = torch.einsum("ij,bjhw->bihw", w, x.double())
    with torch.no_grad():
        assert _max_abs(conv(x).double(), expected) <= 1e-5
        assert _max_abs(conv.inverse(conv(x)), x) <= 1e-5


# --------------------------------------------------------------------------- DDWConv


def _ddw_by_items(ddw: DDWConv, x: torch.Tensor) -> torch.Tensor:
    """eq. 7-8 item by item: π from its formula, W = Σ_k π_k W_k by a loop over k,
    one plain depthwise convolution per item."""
    lin1, lin2 = ddw.attention[0], ddw.attention[2]
    k = ddw.kernel_size
    outs = []
    for b in range(x.shape[0]):
        pooled = x[b].mean(dim=(1, 2))
        logits = lin2.weight @ torch.relu(lin1.weight @ pooled + lin1.bias) + lin2.bias
        pi = torch.exp(logits - logits.max())
        pi = pi / pi.sum()
        weight = sum(pi[j] * ddw.weight[j] for j in range(ddw.kernels))
        bias = sum(pi[j] * ddw.bias[j] for j in range(ddw.kernels))
        outs.append(F.conv2d(x[b:b + 1], weight, bias, padding=k // 2, groups=x.shape[1]))
    return torch.cat(outs)


def test_ddwconv_against_loop_over_items():
    gen = _seeded(11)
    ddw = DDWConv(6, kernels=3, kernel_size=5).double()
    x = torch.rand(3, 6, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    out = ddw(x)
    ref = _ddw_by_items(ddw, x)
    assert _max_abs(out, ref) <= 1e-12
    pi = ddw.mixing_weights(x)
    assert _max_abs(pi.sum(1), torch.ones(3, dtype=torch.float64)) <= 1e-12
    assert (pi[0] - pi[1]).abs().max().item() > 1e-4  # the kernel depends on the input
    # Gradients (the custom depthwise backward) against autograd through the loop.
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    params = [x, *ddw.parameters()]
    grads = torch.autograd.grad(out, params, g)
    grads_ref = torch.autograd.grad(ref, params, g)
    for got, want in zip(grads, grads_ref):
        assert _max_abs(got, want) <= 1e-10


def test_depthwise_conv_against_eq7():
    """eq. 7 written out as a sum of shifted copies, and gradcheck of its backward."""
    gen = _seeded(12)
    x = torch.rand(1, 5, 7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    padded = F.pad(x, (1, 1, 1, 1))
    expected = b.view(1, 5, 1, 1) + sum(
        w[:, 0, p, q].view(1, 5, 1, 1) * padded[..., p:p + 7, q:q + 9]
        for p in range(3) for q in range(3))
    assert _max_abs(depthwise_conv(x, w, b), expected) <= 1e-12
    assert torch.autograd.gradcheck(depthwise_conv, (x, w, b))
    w5 = torch.randn(5, 1, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(depthwise_conv, (x, w5, b))


# --------------------------------------------------------------------------- bad input

test_bad_input = bad_input_test({
    "channels": (lambda: TranslationNet(0), ValueError,
                 r"TranslationNet: channels must be a positive int, got 0"),
    "blocks": (lambda: TranslationNet(blocks=True), ValueError,
               r"TranslationNet: blocks must be a positive int, got True"),
    "hidden": (lambda: TranslationNet(hidden=2.5), ValueError,
               r"TranslationNet: hidden must be a positive int, got 2.5"),
    "ddw_kernels": (lambda: TranslationNet(ddw_kernels=0), ValueError,
                    r"TranslationNet: ddw_kernels must be a positive int, got 0"),
    "ddw_kernel_size": (lambda: TranslationNet(ddw_kernel_size=4), ValueError,
                        r"TranslationNet: ddw_kernel_size must be an odd positive int, got 4"),
    "split": (lambda: TranslationNet(split=4), ValueError,
              r"TranslationNet: split must be an int in \[1, 4\) .*got 4"),
    "lift": (lambda: TranslationNet(lift="dct"), ValueError,
             r"TranslationNet: lift must be one of \('haar', 'squeeze'\), got 'dct'"),
    "clamp": (lambda: TranslationNet(clamp=0.0), ValueError,
              r"TranslationNet: clamp must be a positive finite number, got 0.0"),
    "x channels": (lambda: TranslationNet(blocks=1, hidden=4)(torch.rand(1, 2, 8, 8)),
                   ValueError, r"TranslationNet: x must be \[B, 1, H, W\], got \(1, 2, 8, 8\)"),
    "x odd size": (lambda: TranslationNet(blocks=1, hidden=4)(torch.rand(1, 1, 9, 8)),
                   ValueError, r"TranslationNet: x must have even H and W .*got \(9, 8\)"),
    "x dtype": (lambda: TranslationNet(blocks=1, hidden=4)(torch.ones(1, 1, 8, 8,
                                                                     dtype=torch.int64)),
                TypeError, r"TranslationNet: x must be a floating tensor, got torch.int64"),
    "x type": (lambda: TranslationNet(blocks=1, hidden=4)([[0.0]]), TypeError,
               r"TranslationNet: x must be a torch.Tensor, got list"),
    "y 3D": (lambda: TranslationNet(blocks=1, hidden=4).inverse(torch.rand(1, 1, 8, 8, 8)),
             ValueError, r"TranslationNet: y must be \[B, 1, H, W\], got \(1, 1, 8, 8, 8\)"),
    "InvBlock split": (lambda: InvBlock(4, 0), ValueError,
                       r"InvBlock: split must be in \[1, 4\) for 4 channels, got 0"),
    "DDWConv kernel_size": (lambda: DDWConv(4, kernel_size=0), ValueError,
                            r"DDWConv: kernel_size must be an odd positive int, got 0"),
    "depthwise_conv batch": (lambda: depthwise_conv(torch.rand(2, 3, 5, 5), torch.rand(3, 1, 3, 3),
                                                    torch.rand(3)), ValueError,
                             r"depthwise_conv: x must be \[1, N, H, W\], got \(2, 3, 5, 5\)"),
    "depthwise_conv kernel": (lambda: depthwise_conv(torch.rand(1, 3, 5, 5),
                                                     torch.rand(3, 1, 2, 2), torch.rand(3)),
                              ValueError, r"weight must be \[3, 1, k, k\] with k odd, got \(3, 1"),
    "depthwise_conv bias": (lambda: depthwise_conv(torch.rand(1, 3, 5, 5),
                                                   torch.rand(3, 1, 3, 3), torch.rand(4)),
                            ValueError, r"depthwise_conv: bias must be \[3\], got \(4,\)"),
    "HaarLift kind": (lambda: HaarLift("db2"), ValueError,
                      r"HaarLift: lift must be one of \('haar', 'squeeze'\), got 'db2'"),
})

