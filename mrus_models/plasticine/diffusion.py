"""Plasticine's diffusion intensity module: noise schedule, ε_θ1, its loss and the sampler.

Sources:
    [Z] Zhang et al., "Plasticine: A Traceable Diffusion Model for Medical Image
        Translation", ../shared/papers/plasticine.txt; equations and sections refer to it.
    [P] Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022, which
        [Z] §III-C follows for ε_θ1, and the Palette code [Z]'s network is "based on"
        (github.com/Janspiry/Palette-Image-to-Image-Diffusion-Models: the guided-diffusion
        U-Net, ``config/*.json``) for what [Z] leaves open.
    [SR3] Saharia et al., "Image Super-Resolution via Iterative Refinement", TPAMI 2022
        (§2.4: training on a continuous noise level).
    [DDPM] Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020.

Notation as [Z]: β_k the noise added at step k, α_k = 1 − β_k, γ_k = Π_{i≤k} α_i the noise
level (``q(y_k | y_0) = N(√γ_k y_0, (1 − γ_k) I)``, eq. A.3), K the number of steps.

- :class:`NoiseSchedule`: [Z] §III-C: K_train = 2000 steps, β linear from 1e-6 to 1e-2 (the
  "linear" schedule of [P]'s code); :meth:`NoiseSchedule.respace` keeps S evenly spaced
  steps for sampling on a CPU budget.
- :class:`IntensityUNet`: ε_θ1(ỹ, γ, y_s) ([Z] Appendix, Fig. 13 left): [P]'s U-Net.
- :func:`intensity_step`: one training draw and L_IN (eq. 1 / A.6, Algorithm 2).
- :func:`sample`: Algorithm 1 / 3 (eq. 2, 3, 5): from the noised source image x_K to ŷ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrus_models.nn import TimeEmbedding
from mrus_models.nn.blocks import check_channels, check_ndim, conv

#: [Z] §III-C "Training Details": K_train = 2000 forward steps, the noise level (β)
#: linear from 1e-6 to 1e-2 ([P]'s code: ``make_beta_schedule("linear", 2000, 1e-6, 0.01)``).
TRAIN_STEPS = 2000
BETA_START = 1e-6
BETA_END = 1e-2

#: [Z] §III-C: "the sample size for each input in inference step is set to 50".
SAMPLE_STEPS = 50

#: [P]'s U-Net configuration (``config/colorization_mirflickr25k.json``, "unet"), which
#: [Z] §III-C says ε_θ1 follows: 64 base channels, multipliers (1, 2, 4, 8) (four encoder
#: and four decoder levels, [Z] Appendix), 2 residual blocks per level, attention at
#: downsampling factor 16, 32 channels per attention head, dropout 0.2.
PALETTE_CHANNELS = 64
PALETTE_MULTS = (1, 2, 4, 8)
PALETTE_RES_BLOCKS = 2
PALETTE_ATTENTION_RES = (16,)
PALETTE_HEAD_CHANNELS = 32
PALETTE_DROPOUT = 0.2
#: GroupNorm(32) in every block ([P]'s guided-diffusion ``normalization``; [Z] Appendix:
#: "group normalization [63]").
NORM_GROUPS = 32
#: The embedding sees ``scale · γ``. Not in [Z]; [P]'s code embeds γ ∈ [0, 1] itself, where
#: a sinusoidal embedding with periods up to 10⁴ turns almost every channel into a nearly
#: constant or linear function of γ; WaveGrad (Chen et al. 2021, [Z]'s [15]) scales its
#: noise level by 5000 for that reason. 1000 spreads γ over the range DDPM's step indices
#: (0 … 1000) gave the same embedding.
NOISE_EMBEDDING_SCALE = 1000.0


def _generator_device(generator: torch.Generator | None, device) -> torch.device:
    return torch.device(device) if generator is None else generator.device


def _randn(shape: Sequence[int], *, generator: torch.Generator | None, device,
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normal draws; with a generator, drawn on its device and moved, so that a
    CPU generator seeds a run on any device reproducibly."""
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype,
                    device=_generator_device(generator, device))
    return z.to(device)


def _rand(shape: Sequence[int], *, generator: torch.Generator | None, device,
          dtype: torch.dtype) -> torch.Tensor:
    u = torch.rand(tuple(shape), generator=generator, dtype=dtype,
                   device=_generator_device(generator, device))
    return u.to(device)


# --------------------------------------------------------------------------- schedule


class NoiseSchedule:
    """The variance schedule of the forward process, kept in float64 on the CPU.

    ``betas[k-1]`` is β_k for steps k = 1 … K; ``alphas`` = 1 − β and ``gammas`` = the
    cumulative product of ``alphas`` ([Z] eq. 1: γ_k = Π α). ``timesteps`` names, for
    each step, the step of the training schedule it stands for (1 … K_train): the identity
    for a training schedule, a subset after :meth:`respace`.

    Args:
        betas: 1-D tensor (or sequence) of β_k in (0, 1).
        timesteps: the training-schedule step of each step (default 1 … K).

    Example:
        >>> s = NoiseSchedule.linear()
        >>> len(s), round(float(s.gammas[-1]), 7)
        (2000, 4.39e-05)
    """

    def __init__(self, betas, timesteps: Sequence[int] | torch.Tensor | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"NoiseSchedule: betas must be a non-empty 1-D sequence, got shape "
                             f"{tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"NoiseSchedule: every beta must be in (0, 1), got min "
                             f"{float(betas.min())} and max {float(betas.max())}")
        if timesteps is None:
            timesteps = torch.arange(1, betas.numel() + 1)
        timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        if timesteps.shape != betas.shape:
            raise ValueError(f"NoiseSchedule: timesteps must have one entry per beta "
                             f"({betas.numel()}), got shape {tuple(timesteps.shape)}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.gammas = torch.cumprod(self.alphas, dim=0)
        self.timesteps = timesteps

    @classmethod
    def linear(cls, steps: int = TRAIN_STEPS, beta_start: float = BETA_START,
               beta_end: float = BETA_END) -> NoiseSchedule:
        """β linear from ``beta_start`` to ``beta_end`` over ``steps`` steps ([Z] §III-C:
        2000 steps, 1e-6 to 1e-2; [P]'s and [SR3]'s "linear" schedule).

        Raises:
            ValueError: ``steps`` < 1 or a β outside (0, 1).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"NoiseSchedule.linear: steps must be a positive int, got {steps!r}")
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise ValueError(f"NoiseSchedule.linear: beta_start and beta_end must be in (0, 1), "
                             f"got {beta_start!r} and {beta_end!r}")
        return cls(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))

    @classmethod
    def from_gammas(cls, gammas, timesteps: Sequence[int] | torch.Tensor | None = None
                    ) -> NoiseSchedule:
        """The schedule with these noise levels: α_k = γ_k / γ_{k−1} (γ_0 = 1), β = 1 − α.

        Raises:
            ValueError: ``gammas`` not strictly decreasing in (0, 1).
        """
        gammas = torch.as_tensor(gammas, dtype=torch.float64).detach().cpu()
        if gammas.dim() != 1 or gammas.numel() == 0:
            raise ValueError(f"NoiseSchedule.from_gammas: gammas must be a non-empty 1-D "
                             f"sequence, got shape {tuple(gammas.shape)}")
        prev = torch.cat([gammas.new_ones(1), gammas[:-1]])
        if not bool(((gammas > 0) & (gammas < prev)).all()):
            raise ValueError("NoiseSchedule.from_gammas: gammas must decrease strictly from "
                             "below 1 to above 0")
        return cls(1.0 - gammas / prev, timesteps)

    def __len__(self) -> int:
        return self.betas.numel()

    def __repr__(self) -> str:
        return (f"NoiseSchedule(steps={len(self)}, beta=[{float(self.betas[0]):.3g}, "
                f"{float(self.betas[-1]):.3g}], gamma_K={float(self.gammas[-1]):.3g})")

    def respace(self, steps: int) -> NoiseSchedule:
        """S evenly spaced steps of this schedule, for sampling in S network calls.

        Keeps steps ``k_j = round(j · K / S)``, j = 1 … S (so the last step, K, is always
        kept and x_K is the same), with their noise levels γ_{k_j}, and recomputes
        α'_j = γ_{k_j} / γ_{k_{j−1}} so that the kept steps form a Markov chain with the
        same marginals q(y_{k_j} | y_0) (DDPM respacing: Nichol & Dhariwal, "Improved
        DDPM", ICML 2021, §4). ``steps == len(self)`` gives this schedule back (up to
        rounding of α).

        Args:
            steps: S, 1 ≤ S ≤ K.

        Raises:
            ValueError: ``steps`` outside 1 … K.
        """
        n = len(self)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
            raise ValueError(f"NoiseSchedule.respace: steps must be an int in 1 … {n}, got "
                             f"{steps!r}")
        # Integer arithmetic: round(j K / S) without float ties; strictly increasing since
        # K / S >= 1.
        idx = torch.tensor([(2 * j * n + steps) // (2 * steps) for j in range(1, steps + 1)])
        return NoiseSchedule.from_gammas(self.gammas[idx - 1], self.timesteps[idx - 1])

    def sample_gammas(self, batch: int, *, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Continuous noise levels for training, one per item ([SR3] §2.4, as [P]'s code).

        k ~ U{1 … K}, then √γ ~ U(√γ_k, √γ_{k−1}) (γ_0 = 1): the network learns every noise
        level between the steps, not only the K of the schedule, which is what lets
        :meth:`respace` sample with fewer steps. ([P]'s released code interpolates between
        γ_{k−1} and √γ_k, mixing the two scales; this is [SR3]'s form.)

        Args:
            batch: number of levels.
            generator: seeds the draw (its device is used for drawing).
            device, dtype: of the result.

        Returns:
            Tensor [batch] of γ in [γ_K, 1].
        """
        check_channels("NoiseSchedule.sample_gammas", "batch", batch)
        k = torch.randint(1, len(self) + 1, (batch,), generator=generator,
                          device=_generator_device(generator, device)).cpu()
        sqrt_g = torch.cat([torch.ones(1, dtype=torch.float64), self.gammas]).sqrt()
        lo, hi = sqrt_g[k], sqrt_g[k - 1]
        u = _rand((batch,), generator=generator, device="cpu", dtype=torch.float64)
        return ((lo + (hi - lo) * u) ** 2).to(device, dtype)


# --------------------------------------------------------------------------- forward process


def add_noise(y0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ỹ = √γ y_0 + √(1 − γ) ε ([Z] eq. A.5; a draw of q(y_k | y_0), eq. A.3).

    Args:
        y0: Tensor [B, C, *S], the clean image (scaled to [-1, 1]).
        gamma: Tensor [B] (or a float), the noise level of each item.
        noise: Tensor like ``y0``, ε ~ N(0, I).

    Returns:
        Tensor like ``y0``.

    Example:
        >>> add_noise(torch.ones(1, 1, 2, 2), torch.tensor([0.25]), torch.zeros(1, 1, 2, 2))
        tensor([[[[0.5000, 0.5000],
                  [0.5000, 0.5000]]]])
    """
    if noise.shape != y0.shape:
        raise ValueError(f"add_noise: noise must have the shape of y0 {tuple(y0.shape)}, got "
                         f"{tuple(noise.shape)}")
    gamma = torch.as_tensor(gamma, dtype=y0.dtype, device=y0.device)
    if gamma.dim() == 1:
        if gamma.shape[0] != y0.shape[0]:
            raise ValueError(f"add_noise: gamma must be [B] = [{y0.shape[0]}], got "
                             f"{tuple(gamma.shape)}")
        gamma = gamma.reshape(-1, *([1] * (y0.dim() - 1)))
    elif gamma.dim() != 0:
        raise ValueError(f"add_noise: gamma must be a scalar or [B], got {tuple(gamma.shape)}")
    return gamma.sqrt() * y0 + (1 - gamma).sqrt() * noise


# --------------------------------------------------------------------------- network


def _groups(channels: int, groups: int) -> int:
    # GroupNorm needs groups | channels: [P]'s 32 for the paper's widths (all multiples of
    # 32), the largest common divisor for the small widths of tests.
    return math.gcd(channels, groups)


class _ResBlock(nn.Module):
    """[P]'s residual block: GN → swish → conv, noise embedding, GN → swish → dropout →
    conv (zero-initialised), plus the input (1×1 conv where the width changes).

    The embedding enters as a per-channel scale and shift of the second normalisation
    (``GN(h) · (1 + s) + b``, [P]'s guided-diffusion U-Net default
    ``use_scale_shift_norm=True``) or, with ``scale_shift=False``, as a shift added
    before it ([DDPM], [SR3]).
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, emb_channels: int,
                 dropout: float, groups: int, scale_shift: bool, zero_init: bool) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            nn.GroupNorm(_groups(in_channels, groups), in_channels), nn.SiLU(),
            conv(ndim, in_channels, out_channels, 3))
        self.emb = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_norm = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        conv(ndim, out_channels, out_channels, 3))
        # Zero last convolution: each block starts as the identity (or its skip), as [P]'s
        # ``zero_module``; the first step trains the output layers only.
        if zero_init:
            nn.init.zeros_(self.out_layers[-1].weight)
            nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if in_channels == out_channels else \
            conv(ndim, in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb(emb).to(h.dtype)
        e = e.reshape(*e.shape, *([1] * (h.dim() - 2)))
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class _SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels ([Z] Appendix, [66]; [P]'s
    ``AttentionBlock``): x + proj(softmax(q kᵀ/√d) v), q, k, v from GN(x) by a 1×1 conv,
    the output projection zero-initialised (the block starts as the identity)."""

    def __init__(self, ndim: int, channels: int, head_channels: int, groups: int,
                 zero_init: bool) -> None:
        super().__init__()
        # [P]: heads = channels / head_channels; one head where that does not divide.
        self.heads = channels // head_channels if channels % head_channels == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = conv(ndim, channels, 3 * channels, 1)
        self.proj = conv(ndim, channels, channels, 1)
        if zero_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *size = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, -1).transpose(3, 4) \
            .unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        return x + self.proj(out.transpose(2, 3).reshape(b, c, *size))


class _Step(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, block: _ResBlock, attention: _SelfAttention | None) -> None:
        super().__init__()
        self.block = block
        self.attention = attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb)
        return x if self.attention is None else self.attention(x)


class IntensityUNet(nn.Module):
    """ε_θ1(ỹ, γ, y_s): the noise estimator of Plasticine's intensity module.

    [Z] Appendix, Fig. 13 left, after [P]'s U-Net: the input is the noisy image ỹ and the
    condition (the structure map y_s in training, x_s∘φ at inference) concatenated; the
    output is ε̂. A 3×3 convolution to ``channels · mults[0]``; then per level
    ``res_blocks`` residual blocks (GroupNorm → swish → dropout → convolution, with the
    noise-level embedding) at width ``channels · mult``, self-attention after each block
    at the downsampling factors in ``attention_res``, and a stride-2 convolution to the next
    level (not after the last); a middle of residual block, self-attention, residual block;
    the decoder mirrors the encoder with ``res_blocks + 1`` blocks per level, each on the
    concatenation with the matching encoder output (skip connections), and a nearest ×2
    upsampling followed by a 3×3 convolution between levels; the output is GroupNorm →
    swish → a zero-initialised 3×3 convolution. The noise level γ enters through a
    sinusoidal embedding of ``noise_embedding_scale · γ`` and a two-layer MLP
    (:class:`~mrus_models.nn.TimeEmbedding`, width ``4 · channels`` as [P]).

    With [P]'s ``attention_res = (16,)`` and four levels (factors 1, 2, 4, 8) no level
    attends; only the middle block (factor 8: 32 × 32 of a 256 × 256 image) does, exactly
    as [P]'s configuration runs.

    Args:
        ndim: 2 ([Z]) or 3.
        image_channels: channels of ỹ and of ε̂ (1).
        condition_channels: channels of the condition (1).
        channels: base width (64, [P]).
        mults: width multiplier per level; its length is the number of levels ((1, 2, 4, 8),
            [P]; [Z] Appendix: four encoder and four decoder levels).
        res_blocks: residual blocks per encoder level (2, [P]).
        attention_res: downsampling factors whose blocks attend ((16,), [P]).
        head_channels: channels per attention head (32, [P]).
        dropout: dropout rate in the residual blocks (0.2, [P]).
        norm_groups: GroupNorm groups (32, [P]; fewer where the width is not a multiple).
        scale_shift: the embedding scales and shifts the second normalisation (True, [P]'s
            default) or is added ([DDPM]).
        noise_embedding_scale: the sinusoidal embedding sees ``scale · γ`` (see
            :data:`NOISE_EMBEDDING_SCALE`).
        zero_init: zero-initialise the last convolution of every residual block, of every
            attention projection and of the output ([P]'s ``zero_module``): the network
            starts by predicting ε̂ = 0, and its first optimiser step moves only the output
            convolution (every other gradient is exactly 0 until then). False keeps
            PyTorch's default initialisation everywhere (tests that want every parameter
            to get a gradient at the first step).

    Attributes:
        stride: ``2 ** (len(mults) - 1)``: every spatial size must be divisible by it.

    Example:
        >>> net = IntensityUNet(channels=8, mults=(1, 2), res_blocks=1, dropout=0.0)
        >>> net(torch.rand(2, 1, 16, 16), torch.tensor([0.5, 0.9]),
        ...     torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, ndim: int = 2, *, image_channels: int = 1, condition_channels: int = 1,
                 channels: int = PALETTE_CHANNELS, mults: Sequence[int] = PALETTE_MULTS,
                 res_blocks: int = PALETTE_RES_BLOCKS,
                 attention_res: Sequence[int] = PALETTE_ATTENTION_RES,
                 head_channels: int = PALETTE_HEAD_CHANNELS, dropout: float = PALETTE_DROPOUT,
                 norm_groups: int = NORM_GROUPS, scale_shift: bool = True,
                 noise_embedding_scale: float = NOISE_EMBEDDING_SCALE,
                 zero_init: bool = True) -> None:
        super().__init__()
        owner = "IntensityUNet"
        self.ndim = check_ndim(owner, ndim)
        for name, value in (("image_channels", image_channels),
                            ("condition_channels", condition_channels), ("channels", channels),
                            ("res_blocks", res_blocks), ("head_channels", head_channels),
                            ("norm_groups", norm_groups)):
            check_channels(owner, name, value)
        try:
            mults = tuple(mults)
            attention_res = tuple(attention_res)
        except TypeError:
            raise ValueError(f"{owner}: mults and attention_res must be sequences of positive "
                             f"ints, got {mults!r} and {attention_res!r}") from None
        if not mults:
            raise ValueError(f"{owner}: mults must have at least one level, got ()")
        for m in mults:
            check_channels(owner, "mults", m)
        for r in attention_res:
            check_channels(owner, "attention_res", r)
        if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout!r}")
        if not noise_embedding_scale > 0:
            raise ValueError(f"{owner}: noise_embedding_scale must be > 0, got "
                             f"{noise_embedding_scale!r}")
        self.image_channels, self.condition_channels = image_channels, condition_channels
        self.channels, self.mults, self.res_blocks = channels, mults, res_blocks
        self.attention_res, self.dropout = attention_res, dropout
        self.noise_embedding_scale = float(noise_embedding_scale)
        self.stride = 2 ** (len(mults) - 1)

        self.embedding = TimeEmbedding(channels, 4 * channels)
        emb = self.embedding.out_channels

        def step(cin: int, cout: int, factor: int) -> _Step:
            attention = _SelfAttention(ndim, cout, head_channels, norm_groups, zero_init) \
                if factor in attention_res else None
            return _Step(_ResBlock(ndim, cin, cout, emb, dropout, norm_groups, scale_shift,
                                   zero_init), attention)

        ch = channels * mults[0]
        self.stem = conv(ndim, image_channels + condition_channels, ch, 3)
        skips = [ch]
        self.down = nn.ModuleList()
        factor = 1
        for level, mult in enumerate(mults):
            blocks = nn.ModuleList()
            for _ in range(res_blocks):
                blocks.append(step(ch, channels * mult, factor))
                ch = channels * mult
                skips.append(ch)
            self.down.append(blocks)
            if level < len(mults) - 1:
                # [Z] Appendix: "halves the dimension ... using the convolution operation
                # with 2 strides".
                self.down.append(conv(ndim, ch, ch, 3, stride=2))
                skips.append(ch)
                factor *= 2
        self.middle = nn.ModuleList([
            _Step(_ResBlock(ndim, ch, ch, emb, dropout, norm_groups, scale_shift, zero_init),
                  _SelfAttention(ndim, ch, head_channels, norm_groups, zero_init)),
            _Step(_ResBlock(ndim, ch, ch, emb, dropout, norm_groups, scale_shift, zero_init),
                  None),
        ])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            blocks = nn.ModuleList()
            for _ in range(res_blocks + 1):
                blocks.append(step(ch + skips.pop(), channels * mult, factor))
                ch = channels * mult
            self.up.append(blocks)
            if level > 0:
                # [Z] Appendix: nearest-neighbour ×2 upsampling ([P]: then a 3×3 conv).
                self.up.append(conv(ndim, ch, ch, 3))
                factor //= 2
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch, norm_groups), ch), nn.SiLU(),
                                 conv(ndim, ch, image_channels, 3))
        if zero_init:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def _check(self, noisy, gamma, condition) -> None:
        owner, n = "IntensityUNet", self.ndim
        for name, t, c in (("noisy", noisy, self.image_channels),
                           ("condition", condition, self.condition_channels)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{owner}: {name} must be a torch.Tensor, got "
                                f"{type(t).__name__}")
            if t.dim() != n + 2 or t.shape[1] != c:
                raise ValueError(f"{owner}: {name} must be [B, {c}, *S] ({n}D), got "
                                 f"{tuple(t.shape)}")
        if condition.shape[0] != noisy.shape[0] or condition.shape[2:] != noisy.shape[2:]:
            raise ValueError(f"{owner}: condition must match noisy's batch and size "
                             f"{(noisy.shape[0], *noisy.shape[2:])}, got {tuple(condition.shape)}")
        size = tuple(noisy.shape[2:])
        if any(s % self.stride for s in size):
            raise ValueError(f"{owner}: every spatial size must be divisible by {self.stride} "
                             f"(2 ** (levels - 1)), got {size}")
        if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 \
                or gamma.shape[0] != noisy.shape[0]:
            got = tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__
            raise ValueError(f"{owner}: gamma must be a tensor [B] = [{noisy.shape[0]}], got "
                             f"{got}")

    def forward(self, noisy: torch.Tensor, gamma: torch.Tensor,
                condition: torch.Tensor) -> torch.Tensor:
        """ε̂ = ε_θ1(ỹ, γ, condition).

        Args:
            noisy: Tensor [B, image_channels, *S], ỹ (eq. A.5) or ŷ_k while sampling;
                every size divisible by :attr:`stride`.
            gamma: Tensor [B], the noise level γ of each item, in [0, 1].
            condition: Tensor [B, condition_channels, *S]: y_s in training, x_s∘φ at
                inference.

        Returns:
            Tensor [B, image_channels, *S], ε̂, in the dtype of the layers' output.
        """
        self._check(noisy, gamma, condition)
        emb = self.embedding(gamma * self.noise_embedding_scale)
        # [P] puts the condition first.
        h = self.stem(torch.cat([condition, noisy], dim=1).to(self.stem.weight.dtype))
        skips = [h]
        for module in self.down:
            if isinstance(module, nn.ModuleList):
                for s in module:
                    h = s(h, emb)
                    skips.append(h)
            else:
                h = module(h)
                skips.append(h)
        for s in self.middle:
            h = s(h, emb)
        for module in self.up:
            if isinstance(module, nn.ModuleList):
                for s in module:
                    h = s(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(h)


# --------------------------------------------------------------------------- training


def intensity_loss(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L_IN = mean |ε − ε̂| ([Z] eq. 1 / A.6: the L1 norm, averaged over the pixels and
    the batch).

    Args:
        eps_hat: Tensor [B, C, *S], the network's estimate.
        eps: Tensor of the same shape, the noise that was added.

    Returns:
        Scalar tensor.

    Example:
        >>> intensity_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]]))
        tensor(1.)
    """
    if eps_hat.shape != eps.shape:
        raise ValueError(f"intensity_loss: eps_hat and eps must have one shape, got "
                         f"{tuple(eps_hat.shape)} and {tuple(eps.shape)}")
    return (eps - eps_hat).abs().mean()


def intensity_step(net: Callable[..., torch.Tensor], y: torch.Tensor, y_s: torch.Tensor,
                   schedule: NoiseSchedule, *,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One draw of Algorithm 2: noise level, noise, ỹ, ε̂ and L_IN.

    γ from :meth:`NoiseSchedule.sample_gammas`, ε ~ N(0, I), ỹ = √γ y + √(1 − γ) ε
    (eq. A.5), ε̂ = net(ỹ, γ, y_s), L_IN = mean |ε − ε̂| (eq. 1).

    Args:
        net: ε_θ1, called as ``net(noisy, gamma, condition)`` (an :class:`IntensityUNet`).
        y: Tensor [B, C, *S], the target image scaled to [-1, 1].
        y_s: Tensor [B, C_s, *S], its structure map (:func:`~mrus_models.plasticine.structure.
            structure_map`).
        schedule: the training schedule.
        generator: seeds γ and ε (drawn on its device, moved to ``y``'s).

    Returns:
        dict with "loss" (scalar L_IN), "eps_hat" (ε̂, [B, C, *S], with its graph: detach
        it before it feeds the deformation module), "eps" (ε), "noisy" (ỹ) and "gamma" ([B]).
    """
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"intensity_step: y must be a floating-point tensor, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"intensity_step: schedule must be a NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    gamma = schedule.sample_gammas(y.shape[0], generator=generator, device=y.device,
                                   dtype=y.dtype)
    eps = _randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    noisy = add_noise(y, gamma, eps)
    eps_hat = net(noisy, gamma, y_s)
    return {"loss": intensity_loss(eps_hat, eps), "eps_hat": eps_hat, "eps": eps,
            "noisy": noisy, "gamma": gamma}


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(net: Callable[..., torch.Tensor], x0: torch.Tensor, condition: torch.Tensor,
           schedule: NoiseSchedule, *, steps: int | None = None,
           generator: torch.Generator | None = None, progress: bool = False,
           return_first_eps: bool = False):
    """Translates x0: Algorithm 1 / 3 of [Z] from the noised source image.

    x_K = √γ_K x_0 + √(1 − γ_K) z (eq. 2), then for k = K … 1 (eq. 3 / 5)

        ŷ_{k−1} = (ŷ_k − (1 − α_k) / √(1 − γ_k) · ε_θ1(ŷ_k, γ_k, condition)) / √α_k
                  + √(1 − α_k) z,

    with ŷ_K = x_K, z ~ N(0, I) for k > 1 and z = 0 at the last step. The variance
    1 − α_k = β_k is [Z]'s (DDPM's σ² = β choice); no clipping (none in [Z]).

    The caller puts ``net`` in eval mode (dropout off); this function changes no mode.

    Args:
        net: ε_θ1, called as ``net(noisy, gamma [B], condition)``.
        x0: Tensor [B, C, *S], the source image scaled as the targets were in training
            ([-1, 1]).
        condition: Tensor [B, C_s, *S], x_s∘φ (the source's structure map warped by φ).
        schedule: the training schedule.
        steps: S, sample with :meth:`NoiseSchedule.respace` (S) instead of all K steps
            ([Z] §III-C: 50); None: every step of ``schedule``.
        generator: seeds x_K's noise and every z (drawn on its device, moved to ``x0``'s).
        progress: show a tqdm progress bar.
        return_first_eps: also return the ε̂ of the first step (from x_K).

    Returns:
        ŷ, Tensor like ``x0``; with ``return_first_eps``, ``(ŷ, ε̂_K)``.

    Example:
        >>> s = NoiseSchedule.linear(10, 1e-3, 0.2)
        >>> oracle = lambda y, g, c: (y - g.sqrt().view(-1, 1, 1, 1) * c) / (1 - g).sqrt() \\
        ...     .view(-1, 1, 1, 1)
        >>> y0 = torch.rand(1, 1, 4, 4, dtype=torch.float64)
        >>> bool((sample(oracle, torch.zeros_like(y0), y0, s) - y0).abs().max() < 1e-12)
        True
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"sample: schedule must be a NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"sample: x0 must be a floating-point tensor, got "
                        f"{getattr(x0, 'dtype', type(x0).__name__)}")
    if not isinstance(condition, torch.Tensor) or condition.shape[0] != x0.shape[0] \
            or condition.shape[2:] != x0.shape[2:]:
        got = tuple(condition.shape) if isinstance(condition, torch.Tensor) else \
            type(condition).__name__
        raise ValueError(f"sample: condition must be [{x0.shape[0]}, C_s, "
                         f"{', '.join(map(str, x0.shape[2:]))}] like x0, got {got}")
    if steps is not None:
        schedule = schedule.respace(steps)
    alphas, gammas = schedule.alphas.tolist(), schedule.gammas.tolist()
    b, device, dtype = x0.shape[0], x0.device, x0.dtype

    def randn() -> torch.Tensor:
        return _randn(x0.shape, generator=generator, device=device, dtype=dtype)

    y = math.sqrt(gammas[-1]) * x0 + math.sqrt(1 - gammas[-1]) * randn()
    first_eps = None
    ks = range(len(schedule), 0, -1)
    if progress:
        from tqdm.auto import tqdm

        ks = tqdm(ks, desc="sampling", unit="step")
    for k in ks:
        a, g = alphas[k - 1], gammas[k - 1]
        eps = net(y, torch.full((b,), g, dtype=dtype, device=device), condition)
        if first_eps is None:
            first_eps = eps
        y = (y - (1 - a) / math.sqrt(1 - g) * eps.to(dtype)) / math.sqrt(a)
        if k > 1:
            y = y + math.sqrt(1 - a) * randn()
    return (y, first_eps) if return_first_eps else y
