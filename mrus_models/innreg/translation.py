"""INNReg's translation network T (../shared/papers/innreg.txt, Sec. 3.2): an invertible
network that maps the source modality to the target (eq. 1) and back exactly (eq. 2).

Layout, from the image to the image::

    x [B, C, H, W] ──lift──▶ m [B, 4C, H/2, W/2] ──InvBlock × k──▶ n ──lift⁻¹──▶ T(x)

- **lift**: an affine coupling needs at least two channels to split, and an MR slice has
  one. The orthonormal 2×2 Haar transform (or the plain 2×2 squeeze, pixel-unshuffle)
  turns each 2×2 patch into four channels; it is an exact bijection (its inverse is its
  transpose), so it keeps T invertible. Haar puts the C low-pass channels first, so the
  default split separates the low-pass band from the 3C detail bands (the convention of
  the invertible rescaling / hiding networks the INN literature builds on).
- **InvBlock** (eq. 3–6): an optional invertible 1×1 convolution that mixes the channels
  (the authors' released code has one in front of every coupling; the paper is silent),
  then the affine coupling ``n₁ = m₁ + F(m₂)``, ``n₂ = m₂ ⊙ exp(s) + G(n₁)`` with
  ``s = c·tanh(H(n₁)/c)``: the scale H is clamped smoothly to (−c, c) so exp(s) stays in
  (e^−c, e^c) whatever the weights. The clamp is applied identically in both directions,
  so the inverse (eq. 5–6) stays exact.
- **DenseBlock** (F, H, G): the densely connected block of ESRGAN's RRDB the paper cites
  ([32, 37]): four 3×3 convolutions with ``hidden`` growth channels and LeakyReLU(0.2),
  each seeing the concatenation of all before it, then the local attention
  (:class:`DDWConv`, eq. 7–8) on that concatenation, and a fifth 3×3 convolution to the
  output. The paper's Fig. 2 is not in its text; the DDWConv sits where the released code
  puts it (after the dense convolutions, before the last one). The coupling functions
  need not be invertible, so the attention costs T nothing in exactness.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LIFTS = ("haar", "squeeze")

# ESRGAN's LeakyReLU slope in the dense block (Wang et al. 2018, Sec. 3.1).
LEAKY_SLOPE = 0.2
# The last convolution of each DenseBlock starts at this fraction of its default
# initialisation: each coupling starts close to the identity (as zero initialisation of
# the invertible rescaling networks does) while every parameter still receives a gradient
# from the first step.
LAST_CONV_SCALE = 0.1


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _odd_positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{owner}: {name} must be an odd positive int, got {value!r}")
    return value


def _check_clamp(owner: str, clamp) -> None:
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) \
            or not math.isfinite(clamp) or clamp <= 0:
        raise ValueError(f"{owner}: clamp must be a positive finite number, got {clamp!r}")


def _check_image(owner: str, name: str, x, channels: int, *, even: bool) -> None:
    """Raises TypeError / ValueError unless ``x`` is a floating [B, channels, H, W] tensor
    (with even H and W when ``even``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating tensor, got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{owner}: {name} must be [B, {channels}, H, W], got {tuple(x.shape)}")
    if even and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(
            f"{owner}: {name} must have even H and W (the 2×2 lift), got "
            f"{tuple(x.shape[2:])}")


# --------------------------------------------------------------------------- lift


class HaarLift(nn.Module):
    """The 2×2 lift: [B, C, H, W] → [B, 4C, H/2, W/2], an exact bijection.

    ``kind="haar"``: the orthonormal 2D Haar transform of every 2×2 patch (a, b / c, d):
    ``LL = (a+b+c+d)/2``, ``LH = (a−b+c−d)/2``, ``HL = (a+b−c−d)/2``,
    ``HH = (a−b−c+d)/2``; channels ordered band-major (C low-pass channels first, then the
    C channels of each detail band). ``kind="squeeze"``: the four pixels themselves
    (pixel-unshuffle), ordered the same band-major way. Both are orthogonal, so
    :meth:`inverse` (the transpose) undoes :meth:`forward` to rounding.

    Args:
        kind: "haar" or "squeeze".
    """

    def __init__(self, kind: str = "haar") -> None:
        super().__init__()
        if kind not in LIFTS:
            raise ValueError(f"HaarLift: lift must be one of {LIFTS}, got {kind!r}")
        self.kind = kind
        if kind == "haar":
            matrix = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                                   [1.0, -1.0, 1.0, -1.0],
                                   [1.0, 1.0, -1.0, -1.0],
                                   [1.0, -1.0, -1.0, 1.0]]) / 2
        else:
            matrix = torch.eye(4)
        # Rows: bands; columns: the 2×2 positions in pixel-unshuffle order (a, b, c, d).
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, C, H, W], H and W even. Returns [B, 4C, H/2, W/2]."""
        b, c, h, w = x.shape
        u = F.pixel_unshuffle(x, 2).view(b, c, 4, h // 2, w // 2)
        v = torch.einsum("kj,bcjhw->bkchw", self.matrix.to(x.dtype), u)
        return v.reshape(b, 4 * c, h // 2, w // 2)

    def inverse(self, v: torch.Tensor) -> torch.Tensor:
        """Args: v [B, 4C, h, w]. Returns [B, C, 2h, 2w]."""
        b, c4, h, w = v.shape
        c = c4 // 4
        u = torch.einsum("kj,bkchw->bcjhw", self.matrix.to(v.dtype), v.view(b, 4, c, h, w))
        return F.pixel_shuffle(u.reshape(b, 4 * c, h, w), 2)


# --------------------------------------------------------------------------- DDWConv


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise "same" convolution of a [1, N, H, W] tensor with [N, 1, k, k] kernels,
    with a backward made of two forward convolutions.

    PyTorch's CPU backward of a depthwise convolution is about ten times slower than its
    forward (measured at 129 channels, 32×32, 7×7 kernels: 8.8 ms against 0.2 ms on one
    core), and it dominated the translation network's training step. Both gradients are
    depthwise convolutions themselves:

    - input: ``∂x = conv(∂out, flip(W))`` (stride 1, "same" padding, odd k);
    - kernel: ``∂W[c, p, q] = Σ_ij ∂out[c, i, j] · x_pad[c, i + p, j + q]``, the depthwise
      convolution of the padded input with ``∂out`` as an H×W kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.pad = weight.shape[-1] // 2
        return F.conv2d(x, weight, bias, padding=ctx.pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n, pad = x.shape[1], ctx.pad
        # Under autocast the forward ran in a lower precision than x and W are kept in.
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(2, 3), padding=pad, groups=n)
        if ctx.needs_input_grad[1]:
            grad_w = F.conv2d(F.pad(x, (pad, pad, pad, pad)),
                              grad.reshape(n, 1, *grad.shape[2:]), groups=n).view_as(weight)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise "same" convolution (eq. 7) of every channel with its own kernel.

    Args:
        x: Tensor [1, N, H, W].
        weight: Tensor [N, 1, k, k], k odd.
        bias: Tensor [N].

    Returns:
        Tensor [1, N, H, W], ``F.conv2d(x, weight, bias, padding=k // 2, groups=N)``; on the
        CPU its backward runs as two depthwise convolutions (:class:`_DepthwiseConv`).
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"depthwise_conv: x must be [1, N, H, W], got {tuple(x.shape)}")
    n = x.shape[1]
    if weight.dim() != 4 or weight.shape[:2] != (n, 1) or weight.shape[2] != weight.shape[3] \
            or weight.shape[2] % 2 == 0:
        raise ValueError(f"depthwise_conv: weight must be [{n}, 1, k, k] with k odd, got "
                         f"{tuple(weight.shape)}")
    if bias.shape != (n,):
        raise ValueError(f"depthwise_conv: bias must be [{n}], got {tuple(bias.shape)}")
    if x.device.type == "cpu":
        return _DepthwiseConv.apply(x, weight, bias)
    # cuDNN's depthwise backward is already fast.
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


class DDWConv(nn.Module):
    """Dynamic depthwise convolution, INNReg's local attention (eq. 7–8).

    A depthwise ``kernel_size``² convolution (eq. 7) whose weight depends on the input:
    ``W(x) = Σ_k π_k(x) W_k`` over ``kernels`` learned kernels (eq. 8), the bias likewise.
    ``π(x)`` is a softmax over k of a two-layer MLP on the globally average-pooled input
    (the attention over kernels of dynamic convolution, Chen et al., CVPR 2020). Each item
    of the batch gets its own kernel, applied in one call as a grouped convolution over
    the batch folded into the channels.

    Args:
        channels: channels of the input (and output).
        kernels: K, the number of aggregated kernels.
        kernel_size: odd side of the depthwise kernel.
        reduction: hidden width of the π MLP is ``max(channels // reduction, 4)``.

    Example:
        >>> ddw = DDWConv(8, kernels=4, kernel_size=7)
        >>> ddw(torch.rand(2, 8, 20, 24)).shape
        torch.Size([2, 8, 20, 24])
    """

    def __init__(self, channels: int, kernels: int = 4, kernel_size: int = 7,
                 reduction: int = 4) -> None:
        super().__init__()
        _positive_int("DDWConv", "channels", channels)
        _positive_int("DDWConv", "kernels", kernels)
        _positive_int("DDWConv", "reduction", reduction)
        _odd_positive_int("DDWConv", "kernel_size", kernel_size)
        self.channels, self.kernels, self.kernel_size = channels, kernels, kernel_size
        hidden = max(channels // reduction, 4)
        self.attention = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                       nn.Linear(hidden, kernels))
        # W_k: K depthwise kernels, each drawn as a depthwise Conv2d's default would be,
        # so the aggregate starts at the usual scale whatever π is.
        bound = 1.0 / math.sqrt(kernel_size * kernel_size)
        self.weight = nn.Parameter(
            torch.empty(kernels, channels, 1, kernel_size, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(kernels, channels).uniform_(-bound, bound))

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """π(x): Tensor [B, K], rows summing to one (eq. 8)."""
        return torch.softmax(self.attention(x.mean(dim=(2, 3))), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, channels, H, W]. Returns [B, channels, H, W]."""
        b, c, h, w = x.shape
        pi = self.mixing_weights(x)  # [B, K]
        k = self.kernel_size
        # eq. 8: W(x) = Σ_k π_k(x) W_k, one kernel set per item.
        weight = torch.einsum("bk,kcpq->bcpq", pi, self.weight.view(self.kernels, c, k, k))
        bias = pi @ self.bias  # [B, C]
        # eq. 7, per item: the batch folded into the channel axis, one group per
        # (item, channel), so a single depthwise call serves every item's own kernel.
        out = depthwise_conv(x.reshape(1, b * c, h, w), weight.reshape(b * c, 1, k, k),
                             bias.reshape(b * c))
        return out.view(b, c, h, w)


# --------------------------------------------------------------------------- DenseBlock


class DenseBlock(nn.Module):
    """F, H or G of the coupling (eq. 3–4): a densely connected block with local attention.

    ``u₀ = x``; ``uᵢ = LeakyReLU(convᵢ([u₀, …, uᵢ₋₁]))`` for i = 1…4 (``hidden`` channels
    each); ``a = LeakyReLU(DDWConv([u₀, …, u₄]))`` (eq. 7–8, or skipped with
    ``ddw=False``); output ``conv₅(a)``. All convolutions 3×3 with zero padding.

    Args:
        in_channels: channels of the input half.
        out_channels: channels of the half it acts on.
        hidden: growth channels of each dense convolution.
        ddw: whether the DDWConv local attention is used (the paper's ablation, Table 2).
        ddw_kernels: K of eq. 8.
        ddw_kernel_size: side of the DDWConv kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 32, *,
                 ddw: bool = True, ddw_kernels: int = 4, ddw_kernel_size: int = 7) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels + i * hidden, hidden, 3, padding=1) for i in range(4))
        width = in_channels + 4 * hidden
        self.ddw = DDWConv(width, ddw_kernels, ddw_kernel_size) if ddw else None
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        for layer in self.convs:
            nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.out.weight.mul_(LAST_CONV_SCALE)
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, in_channels, h, w]. Returns [B, out_channels, h, w]."""
        features = x
        for layer in self.convs:
            features = torch.cat(
                (features, F.leaky_relu(layer(features), LEAKY_SLOPE)), dim=1)
        if self.ddw is not None:
            features = F.leaky_relu(self.ddw(features), LEAKY_SLOPE)
        return self.out(features)


# --------------------------------------------------------------------------- InvBlock


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1×1 convolution (Kingma & Dhariwal 2018), LU-parametrised.

    ``W = L (U + diag(exp(log_s)))`` with L unit lower triangular and U strictly upper
    triangular (the strict triangles of two full parameter matrices): W stays invertible
    for every parameter value, its determinant being exp(Σ log_s). It starts as the
    identity (Glow starts from a random rotation and keeps a fixed permutation): T then
    starts close to the identity map, the DenseBlocks' outputs being small, and the
    mixing is learned.

    Args:
        channels: channels it mixes.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(channels, channels))
        self.upper = nn.Parameter(torch.zeros(channels, channels))
        self.log_s = nn.Parameter(torch.zeros(channels))

    def matrix(self) -> torch.Tensor:
        """W, Tensor [channels, channels]."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.log_s.exp())
        return lower @ upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, channels, h, w]. Returns W x per pixel."""
        return torch.einsum("ij,bjhw->bihw", self.matrix().to(x.dtype), x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Args: y [B, channels, h, w]. Returns W⁻¹ y per pixel."""
        # Inverted in float64: W is tiny, and the round trip should lose nothing to it.
        inv = torch.linalg.inv(self.matrix().double()).to(y.dtype)
        return torch.einsum("ij,bjhw->bihw", inv, y)


class InvBlock(nn.Module):
    """One InvBlock T_i: (1×1 mixing) + affine coupling, eq. 3–4, inverse eq. 5–6.

    With m = (m₁, m₂) split at ``split`` channels::

        n₁ = m₁ + F(m₂)                       (3)
        n₂ = m₂ ⊙ exp(s) + G(n₁)              (4)    s = c·tanh(H(n₁)/c)
        m₂ = (n₂ − G(n₁)) ⊙ exp(−s)           (5)
        m₁ = n₁ − F(m₂)                       (6)

    Args:
        channels: D, channels of m.
        split: d, channels of m₁ (1 ≤ d < D).
        hidden, ddw, ddw_kernels, ddw_kernel_size: of the three :class:`DenseBlock`.
        clamp: c, the bound of the log-scale s.
        mixing: whether an :class:`InvertibleConv1x1` precedes the coupling.
    """

    def __init__(self, channels: int, split: int, hidden: int = 32, *, clamp: float = 0.8,
                 mixing: bool = True, ddw: bool = True, ddw_kernels: int = 4,
                 ddw_kernel_size: int = 7) -> None:
        super().__init__()
        if not 1 <= split < channels:
            raise ValueError(
                f"InvBlock: split must be in [1, {channels}) for {channels} channels, got "
                f"{split!r}")
        _check_clamp("InvBlock", clamp)
        self.channels, self.split, self.clamp = channels, split, float(clamp)
        d1, d2 = split, channels - split
        dense = {"hidden": hidden, "ddw": ddw, "ddw_kernels": ddw_kernels,
                 "ddw_kernel_size": ddw_kernel_size}
        self.mix = InvertibleConv1x1(channels) if mixing else None
        self.F = DenseBlock(d2, d1, **dense)
        self.H = DenseBlock(d1, d2, **dense)
        self.G = DenseBlock(d1, d2, **dense)

    def log_scale(self, n1: torch.Tensor) -> torch.Tensor:
        """s = c·tanh(H(n₁)/c): H's output clamped smoothly to (−c, c)."""
        return self.clamp * torch.tanh(self.H(n1) / self.clamp)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        """Args: m [B, channels, h, w]. Returns n [B, channels, h, w] (eq. 3–4)."""
        if self.mix is not None:
            m = self.mix(m)
        m1, m2 = m[:, :self.split], m[:, self.split:]
        n1 = m1 + self.F(m2)                                     # eq. 3
        n2 = m2 * torch.exp(self.log_scale(n1)) + self.G(n1)     # eq. 4
        return torch.cat((n1, n2), dim=1)

    def inverse(self, n: torch.Tensor) -> torch.Tensor:
        """Args: n [B, channels, h, w]. Returns m with ``forward(m) == n`` (eq. 5–6)."""
        n1, n2 = n[:, :self.split], n[:, self.split:]
        m2 = (n2 - self.G(n1)) * torch.exp(-self.log_scale(n1))  # eq. 5
        m1 = n1 - self.F(m2)                                      # eq. 6
        m = torch.cat((m1, m2), dim=1)
        return self.mix.inverse(m) if self.mix is not None else m


# --------------------------------------------------------------------------- T


class TranslationNet(nn.Module):
    """INNReg's translation network T (Sec. 3.2): ``forward`` is eq. 1, ``inverse`` eq. 2.

    ``T = lift⁻¹ ∘ T_k ∘ … ∘ T_1 ∘ lift`` with k = ``blocks`` :class:`InvBlock` on the
    2×2-lifted image (4·channels channels at half the size); the paper's eq. 1 numbers
    the blocks from the outside in, here ``blocks[0]`` acts first. Every piece is a
    bijection with an exact inverse, so ``inverse(forward(x))`` returns x to float
    rounding for any weights: in float64 to ~1e-14, in float32 to the rounding amplified
    by how well conditioned the trained T⁻¹ is (~3e-6 after 400 Adam steps at the paper's
    learning rate 2e-4; ten times that rate gave 7e-4 after 20 steps: measured).

    Size and cost with the defaults: 2,167,680 parameters (8 blocks × (F: 90,616, of
    which DDWConv 30,556; H and G: 90,154 each, DDWConv 30,092; mixing: 36)); forward +
    backward of one 64×64 image ≈ 0.15 s of one CPU core, of a batch of three 192×192
    images ≈ 3.3 s (forward, inverse and backward, as the training step runs them: ≈ 6.3
    s).

    Args:
        channels: channels of the image (1 for an MR / US slice).
        blocks: number of InvBlocks (8 in the paper, Sec. 4).
        split: d, channels of the first half after the lift; None takes ``channels`` (the
            Haar low-pass band against the detail bands).
        hidden: growth channels of each DenseBlock convolution (32 in ESRGAN's block).
        ddw_kernels: K of eq. 8.
        ddw_kernel_size: side of the DDWConv kernel (7, the released code's window).
        ddw: whether DenseBlocks use the DDWConv local attention (Table 2's ablation).
        clamp: c of ``s = c·tanh(H/c)``, the bound of each coupling's log-scale (0.8, the
            released code's).
        lift: "haar" (orthonormal 2×2 Haar) or "squeeze" (pixel-unshuffle).
        mixing: whether each InvBlock starts with an invertible 1×1 convolution (the
            released code's; the paper is silent).

    Example:
        >>> net = TranslationNet(channels=1, blocks=2, hidden=8)
        >>> x = torch.rand(2, 1, 32, 48)
        >>> y = net(x)
        >>> y.shape, bool((net.inverse(y) - x).abs().max() < 1e-4)
        (torch.Size([2, 1, 32, 48]), True)
    """

    def __init__(self, channels: int = 1, blocks: int = 8, split: int | None = None,
                 hidden: int = 32, ddw_kernels: int = 4, ddw_kernel_size: int = 7, *,
                 ddw: bool = True, clamp: float = 0.8, lift: str = "haar",
                 mixing: bool = True) -> None:
        super().__init__()
        owner = "TranslationNet"
        _positive_int(owner, "channels", channels)
        _positive_int(owner, "blocks", blocks)
        _positive_int(owner, "hidden", hidden)
        _positive_int(owner, "ddw_kernels", ddw_kernels)
        _odd_positive_int(owner, "ddw_kernel_size", ddw_kernel_size)
        if lift not in LIFTS:
            raise ValueError(f"{owner}: lift must be one of {LIFTS}, got {lift!r}")
        _check_clamp(owner, clamp)
        width = 4 * channels
        if split is None:
            split = channels
        if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split < width:
            raise ValueError(f"{owner}: split must be an int in [1, {width}) (4 × channels "
                             f"after the lift), got {split!r}")
        self.channels, self.split = channels, split
        self.lift = HaarLift(lift)
        self.blocks = nn.ModuleList(
            InvBlock(width, split, hidden, clamp=clamp, mixing=mixing, ddw=ddw,
                     ddw_kernels=ddw_kernels, ddw_kernel_size=ddw_kernel_size)
            for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fake_y = T(x), eq. 1.

        Args:
            x: Tensor [B, channels, H, W], H and W even; source-modality image.

        Returns:
            Tensor [B, channels, H, W] in the parameters' dtype (computed with autocast
            off, see :meth:`_full_precision`), the translation to the target modality.
        """
        _check_image("TranslationNet", "x", x, self.channels, even=True)
        # Autocast and TF32 off, in the parameters' dtype: see _full_precision.
        with self._full_precision(x.device):
            m = self.lift(x.to(self._dtype()))
            for block in self.blocks:
                m = block(m)
            return self.lift.inverse(m)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """recon_x = T⁻¹(y), eq. 2: the blocks' inverses in reverse order.

        Args:
            y: Tensor [B, channels, H, W], H and W even; target-modality image.

        Returns:
            Tensor [B, channels, H, W] with ``forward(inverse(y)) == y`` to rounding.
        """
        _check_image("TranslationNet", "y", y, self.channels, even=True)
        with self._full_precision(y.device):
            n = self.lift(y.to(self._dtype()))
            for block in reversed(self.blocks):
                n = block.inverse(n)
            return self.lift.inverse(n)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @staticmethod
    @contextlib.contextmanager
    def _full_precision(device: torch.device) -> Iterator[None]:
        """Autocast off, and on CUDA TF32 off: T runs in its parameters' precision.

        Under bf16 / fp16 autocast the lift (an einsum) and the DenseBlocks would round
        to 8 or 11 significant bits, and F(m₂) recomputed in the inverse from an m₂ that
        differs by a rounding could round the other way: T⁻¹(T(x)) would miss x by ~1e-2
        (measured under CPU bf16 autocast). TF32 convolutions (cuDNN's default) do the
        same at ~1e-4 to 1e-3 once the weights have trained (measured by emulating TF32's
        10-bit mantissa on the CPU). In full float32 the round trip holds to float32
        rounding; T is small next to the registration network, so the cost is small too.
        Backward passes run outside this context: gradients need no exactness.
        """
        with torch.autocast(device.type, enabled=False):
            if device.type != "cuda":
                yield
                return
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                yield
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
