"""ACMT's losses ([M25] eq. 7-14): texture consistency, boundary preservation, SB loss.

Sources:
    [M25] Ma et al., ACMT, ../shared/papers/acmt.txt (and [P25] MR2US-Pro §II-B).
    [K24] Kim, Kwon, Kim, Ye, "Unpaired image-to-image translation via neural Schrödinger
        bridge" (UNSB), ICLR 2024, and its released code (``models/sb_model.py``).

``L = λ_texture L_texture + λ_boundary L_boundary + λ_SB L_SB`` (eq. 14), no adversarial
term ([M25] §I). With f^s, f^d the shallow and deep features of the translation network
(:meth:`~mrus_models.acmt.network.ACMTNet.encode`), x_0 the source and x̂_1 its translation:

- ``L_texture = mean (C7(f^s(x̂_1^MR)) − C7(f^s(x̂_1^US)))²`` (eq. 7), C7 a learnable
  7×7×7 convolution (:func:`texture_conv`);
- ``L_boundary = ½ (L^MR + L^US)``, ``L^m = mean |S(C3(f^d(x̂_1^m))) − S(C3(f^d(x_0^m)))|``
  (eq. 8-10), C3 a learnable 3×3×3 convolution (:func:`boundary_conv`) and S the Sobel
  magnitude: the whole ``S``-then-L1 is :func:`mrus_kernels.sobel_l1` (one fused pass, no
  magnitude map stored);
- ``L_SB = ½ (L_SB^MR + L_SB^US)``, ``L_SB^m = mean (x_t − x̂_1)² − 2σ(1 − t) Ĥ(x_t, x̂_1)``
  (eq. 11-13), Ĥ the entropy estimate of [K24] (:func:`entropy_estimate`) by an energy
  network E, which trains on its own loss (:func:`energy_loss`, [K24]'s ``loss_E``).

:class:`ACMTLossHeads` holds the learnable parts (C7, C3, E); :func:`acmt_loss` computes one
step's total from the diffused MR and US states (:func:`~mrus_models.acmt.bridge.diffuse`).

The norms of the papers are written as means over voxels, channels and items (so that a
weight does not depend on the crop size), as [K24]'s code writes its SB term
(``torch.mean((x_t − x̂_1)**2)``).

C7 and C3 are learnable ([M25]: "we further process the shallow features ... using a large
convolutional kernel"), and both losses fall to zero when such a convolution's weights do:
the paper does not say what stops that. Here each output filter is kept at unit L2 norm and
has no bias (weight normalisation with a fixed gain, Salimans & Kingma 2016): the filters
still learn which feature directions to compare but cannot switch the comparison off. (A
bias would cancel in both differences anyway.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mrus_kernels import sobel_l1
from mrus_models.nn import ConvBlock, TimeEmbedding
from mrus_models.nn.blocks import check_channels, check_ndim, conv

from .network import TIME_SCALE

#: Kernel sides of eq. 7 (texture, "7×7") and eq. 8-9 (boundary, "3×3"), in 3D.
TEXTURE_KERNEL = 7
BOUNDARY_KERNEL = 3


# ---------------------------------------------------------------------------- modules


class UnitConv(nn.Module):
    """A learnable convolution without bias whose every output filter has unit L2 norm.

    ``y = conv(x, V / ‖V‖)`` with the norm over each output filter's (in_channels × k^ndim)
    weights, "same" padding (zeros).

    Args:
        ndim: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (default ``in_channels``).
        kernel_size: odd kernel side.

    Example:
        >>> c7 = UnitConv(3, 32, kernel_size=7)
        >>> c7(torch.rand(1, 32, 8, 8, 4)).shape
        torch.Size([1, 32, 8, 8, 4])
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int | None = None, *,
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.ndim = check_ndim("UnitConv", ndim)
        check_channels("UnitConv", "in_channels", in_channels)
        out_channels = in_channels if out_channels is None else out_channels
        check_channels("UnitConv", "out_channels", out_channels)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) \
                or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"UnitConv: kernel_size must be an odd positive int, got "
                             f"{kernel_size!r}")
        # PyTorch's default convolution initialisation; only the directions matter.
        self.weight = nn.Parameter(
            conv(ndim, in_channels, out_channels, kernel_size, bias=False).weight.detach())
        self.in_channels, self.out_channels, self.kernel_size = \
            in_channels, out_channels, kernel_size

    def normalised_weight(self) -> torch.Tensor:
        """V / ‖V‖ per output filter: Tensor [out, in, k, …, k]."""
        v = self.weight
        norm = v.flatten(1).norm(dim=1).clamp_min(1e-12)
        return v / norm.reshape(-1, *([1] * (v.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, in_channels, *S]. Returns [B, out_channels, *S]."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"UnitConv: x must be [B, {self.in_channels}, *S] ({self.ndim}D), "
                             f"got {tuple(x.shape)}")
        fn = F.conv3d if self.ndim == 3 else F.conv2d
        w = self.normalised_weight().to(x.dtype)
        return fn(x, w, padding=self.kernel_size // 2)


def texture_conv(ndim: int, channels: int) -> UnitConv:
    """C7 of eq. 7: a learnable 7×7(×7) unit-norm convolution on the shallow features."""
    return UnitConv(ndim, channels, kernel_size=TEXTURE_KERNEL)


def boundary_conv(ndim: int, channels: int) -> UnitConv:
    """C3 of eq. 8-9: a learnable 3×3(×3) unit-norm convolution on the deep features."""
    return UnitConv(ndim, channels, kernel_size=BOUNDARY_KERNEL)


class EnergyNet(nn.Module):
    """[K24]'s energy network E(z, z', t): a time-conditioned patch critic on two pairs.

    A pair is ``z = (x_t, x̂_1)`` concatenated along channels; E sees two pairs
    concatenated (4 × ``channels`` input channels, as [K24]'s ``netE`` built with
    ``output_nc * 4`` inputs) and returns one energy per patch. [K24]'s E is its 2D
    PatchGAN (three stride-2 4×4 convolutions from 64 channels, time-conditioned); here
    stride-2 3×3(×3) :class:`~mrus_models.nn.ConvBlock` levels (LeakyReLU 0.2, the time
    embedding added per channel) with narrower default widths, since 3D volumes cost far
    more per channel.

    Args:
        ndim: 2 or 3.
        channels: image channels (1).
        widths: one stride-2 level per width (default (16, 32, 64): patches of 8 voxels).
        time_dim: width of the sinusoidal time embedding (MLP to ``4 * time_dim``).

    Example:
        >>> e = EnergyNet(3, widths=(8,), time_dim=8)
        >>> z = torch.rand(2, 2, 8, 8, 8)
        >>> e(z, z, torch.tensor([0.5, 0.5])).shape
        torch.Size([2, 1, 4, 4, 4])
    """

    def __init__(self, ndim: int = 3, channels: int = 1, *,
                 widths: Sequence[int] = (16, 32, 64), time_dim: int = 32) -> None:
        super().__init__()
        self.ndim = check_ndim("EnergyNet", ndim)
        self.channels = check_channels("EnergyNet", "channels", channels)
        widths = tuple(widths)
        if not widths:
            raise ValueError("EnergyNet: widths must have at least one level, got ()")
        for w in widths:
            check_channels("EnergyNet", "widths", w)
        self.time = TimeEmbedding(time_dim)
        self.blocks = nn.ModuleList()
        prev = 4 * channels
        for w in widths:
            self.blocks.append(ConvBlock(ndim, prev, w, stride=2,
                                         time_channels=self.time.out_channels))
            prev = w
        self.out = conv(ndim, prev, 1, 3)
        self.stride = 2 ** len(widths)

    def forward(self, z: torch.Tensor, z2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Energies of the pair of pairs (z, z2).

        Args:
            z, z2: Tensor [B, 2 * channels, *S], pairs (x_t, x̂_1) along channels.
            t: Tensor [B], the bridge time of the items.

        Returns:
            Tensor [B, 1, *S / stride], one energy per patch.
        """
        shape = (self.ndim + 2, 2 * self.channels)
        for name, v in (("z", z), ("z2", z2)):
            if not isinstance(v, torch.Tensor) or v.dim() != shape[0] or v.shape[1] != shape[1]:
                raise ValueError(f"EnergyNet: {name} must be [B, {shape[1]}, *S] "
                                 f"({self.ndim}D), got {tuple(getattr(v, 'shape', ()))}")
        if z.shape != z2.shape:
            raise ValueError(f"EnergyNet: z and z2 must have one shape, got {tuple(z.shape)} "
                             f"and {tuple(z2.shape)}")
        t_emb = self.time(t.float() * TIME_SCALE)
        h = torch.cat([z, z2], dim=1)
        for block in self.blocks:
            h = block(h, t_emb)
        return self.out(h)


# ---------------------------------------------------------------------------- terms


def _promote(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features (autocast) to float32 for the sums; float32/64 kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def texture_loss(c7: nn.Module, shallow_mr: torch.Tensor, shallow_us: torch.Tensor) -> torch.Tensor:
    """L_texture of eq. 7: ``mean (C7(f^s_MR) − C7(f^s_US))²`` over every element: 0-d.

    Args:
        c7: the learnable 7×7×7 convolution (:func:`texture_conv`).
        shallow_mr: Tensor [B, C, *S], f^s of the translated MR x̂_1^MR.
        shallow_us: Tensor [B, C, *S], f^s of the translated US x̂_1^US.
    """
    if shallow_mr.shape != shallow_us.shape:
        raise ValueError(f"texture_loss: shallow_mr and shallow_us must have one shape, got "
                         f"{tuple(shallow_mr.shape)} and {tuple(shallow_us.shape)}")
    return (_promote(c7(shallow_mr)) - _promote(c7(shallow_us))).square().mean()


def boundary_loss(c3: nn.Module, deep_translated: torch.Tensor, deep_source: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """L_boundary^m of eq. 8 / 9: ``mean |S(C3(f^d(x̂_1))) − S(C3(f^d(x_0)))|``: 0-d.

    S-then-L1 is :func:`mrus_kernels.sobel_l1` (Sobel magnitude ``sqrt(Σ_i g_i² + 1e-6)``
    of each channel, replicate padding, unnormalised [-1, 0, 1] × [1, 2, 1] × [1, 2, 1]
    kernels, mean over every element). Differentiable in both feature maps.

    Args:
        c3: the learnable 3×3×3 convolution (:func:`boundary_conv`).
        deep_translated: Tensor [B, C, *S], f^d of the translation x̂_1.
        deep_source: Tensor [B, C, *S], f^d of the source x_0.
        backend: the ``mrus_kernels`` backend (None: ``MRUS_BACKEND`` or auto).
    """
    if deep_translated.shape != deep_source.shape:
        raise ValueError(f"boundary_loss: deep_translated and deep_source must have one shape, "
                         f"got {tuple(deep_translated.shape)} and {tuple(deep_source.shape)}")
    return sobel_l1(_promote(c3(deep_translated)), _promote(c3(deep_source)), backend=backend)


def _times(owner: str, t, b: int, device) -> torch.Tensor:
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.full((b,), float(t), device=device)
    if not isinstance(t, torch.Tensor) or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != b):
        raise ValueError(f"{owner}: t must be a float or a Tensor [B] = [{b}], got "
                         f"{getattr(t, 'shape', t)!r}")
    t = t.to(device=device).expand(b)
    # A data-dependent check: skipped while compiling (it would break the graph).
    if not torch.compiler.is_compiling() and (bool((t < 0).any()) or bool((t > 1).any())):
        raise ValueError(f"{owner}: t must lie in [0, 1], got {t.tolist()}")
    return t


def _pairs(owner: str, x_t: torch.Tensor, x1: torch.Tensor,
           negatives: tuple[torch.Tensor, torch.Tensor] | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, z̃): the pairs (x_t, x̂_1) and the independent pairs they are contrasted with."""
    if x_t.shape != x1.shape:
        raise ValueError(f"{owner}: x_t and x1 must have one shape, got {tuple(x_t.shape)} "
                         f"and {tuple(x1.shape)}")
    z = torch.cat([x_t, x1], dim=1)
    if negatives is not None:
        xn_t, xn_1 = negatives
        if xn_t.shape != x_t.shape or xn_1.shape != x_t.shape:
            raise ValueError(f"{owner}: negatives must be two tensors of x_t's shape "
                             f"{tuple(x_t.shape)}, got {tuple(xn_t.shape)} and "
                             f"{tuple(xn_1.shape)}")
        return z, torch.cat([xn_t, xn_1], dim=1)
    if x_t.shape[0] < 2:
        raise ValueError(
            f"{owner}: the entropy estimate contrasts each pair (x_t, x̂_1) with an independent "
            f"one; a batch of 1 has none: pass negatives=(x_t', x̂_1') from a second, "
            f"independent volume ([K24] diffuses a second loader batch) or use a batch of "
            f"2 or more (each item is then contrasted with the previous one), got batch "
            f"{x_t.shape[0]}")
    # Item b against item b - 1 (cyclically): independent draws of the same joint law.
    return z, torch.roll(z, 1, dims=0)


def _frozen(energy: nn.Module):
    """E with its parameters detached: the generator's loss reaches the images through E but
    leaves E's parameters to :func:`energy_loss` ([K24] freezes netE in its generator
    step)."""
    params = {k: v.detach() for k, v in energy.named_parameters()}
    buffers = dict(energy.named_buffers())
    return lambda *args: functional_call(energy, {**params, **buffers}, args)


def entropy_estimate(energy: nn.Module, x_t: torch.Tensor, x1: torch.Tensor, t, *,
                     negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                     train_energy: bool = False) -> torch.Tensor:
    """Ĥ(x_t, x̂_1): [K24]'s energy-based estimate of the entropy term of eq. 11-12: 0-d.

    The estimator (the ``ET_XY`` of [K24]'s code) is a Donsker-Varadhan-style contrast of an
    energy network E (:class:`EnergyNet`) between each pair ``z = (x_t, x̂_1)`` seen with
    itself and seen with an independent pair ``z̃`` (another volume's chain)::

        Ĥ = mean_patches,items E(z, z, t) − log Σ_{patches, items} exp E(z, z̃, t)

    i.e. a log-likelihood ratio whose normaliser, the log-sum-exp over every patch and item
    of the contrasted pairs, stands in for the intractable partition function (a
    Donsker-Varadhan / MINE-type bound, Belghazi et al. 2018); E itself is fitted by
    :func:`energy_loss`. Why this estimator: the joint law of (x_t, x̂_1) has no density in
    closed form, a variational estimate needs only samples and is differentiable in x̂_1,
    and [K24], on whose bridge [M25] builds its SB loss (its ref. [4]), uses exactly this
    one. The estimate has no ``− log N`` offset (a constant: no gradient), so
    an untrained, constant E gives ``− log N`` with N the number of contrasted patches.

    Batch size: the negatives are the batch rolled by one item (item b against item b − 1);
    a batch of 1 has no independent pair, so it needs ``negatives`` (a ValueError says so):
    contrasting a pair with itself would give ``mean E − log Σ exp E``, a quantity that
    measures nothing about the joint law.

    Args:
        energy: E.
        x_t: Tensor [B, C, *S], the bridge states.
        x1: Tensor [B, C, *S], the predictions x̂_1 (with gradient: the generator's term).
        t: the items' times, a float or Tensor [B].
        negatives: (x_t', x̂_1') of independent volumes, each [B, C, *S]; default: the
            batch rolled by one (B >= 2).
        train_energy: False (default): E's parameters get no gradient from this estimate
            (the generator's term); True: they do.
    """
    z, zn = _pairs("entropy_estimate", x_t, x1, negatives)
    t = _times("entropy_estimate", t, x_t.shape[0], x_t.device)
    e = energy if train_energy else _frozen(energy)
    pos = _promote(e(z, z, t))
    neg = _promote(e(z, zn, t))
    return pos.mean() - torch.logsumexp(neg.reshape(-1), dim=0)


def energy_loss(energy: nn.Module, x_t: torch.Tensor, x1: torch.Tensor, t, *,
                negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """E's own loss ([K24]'s ``loss_E``): ``−mean E(z, z) + L + L²``, L = log Σ exp E(z, z̃).

    Minimising it raises E on the pairs against the contrasted ones, i.e. fits the estimator
    of :func:`entropy_estimate`; ``L²`` holds the log-normaliser near 0 (otherwise E could
    drift by a constant). The images are detached: this loss trains E only. Add it to the
    step's total so that one optimiser trains E with the network (E's parameters get no
    gradient from :func:`sb_loss`).

    Args: as :func:`entropy_estimate`. Returns: a 0-d tensor.
    """
    negatives = None if negatives is None else tuple(v.detach() for v in negatives)
    z, zn = _pairs("energy_loss", x_t.detach(), x1.detach(), negatives)
    t = _times("energy_loss", t, x_t.shape[0], x_t.device)
    lse = torch.logsumexp(_promote(energy(z, zn, t)).reshape(-1), dim=0)
    return -_promote(energy(z, z, t)).mean() + lse + lse.square()


def sb_loss(energy: nn.Module, x_t: torch.Tensor, x1: torch.Tensor, t, sigma: float, *,
            negatives: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_SB^m of eq. 11 / 12: ``mean (x_t − x̂_1)² − 2σ(1 − t) Ĥ(x_t, x̂_1)``.

    The transport cost is the mean over voxels and items; Ĥ is :func:`entropy_estimate`
    with E frozen; ``(1 − t)`` is averaged over the batch (Ĥ is one estimate for the batch).
    [M25]'s weights are used as written; [K24]'s code weights its two terms τ and
    τ(T − i)/T instead (the entropy term relatively 1/(2τ) = 50 times heavier): a choice of
    ``lam_sb`` and σ, not of the estimator.

    Args:
        energy: E (:class:`EnergyNet`).
        x_t: Tensor [B, C, *S], the states x_{t_i}.
        x1: Tensor [B, C, *S], the network's predictions x̂_1 from them.
        t: t_i, a float or Tensor [B].
        sigma: σ >= 0.
        negatives: as :func:`entropy_estimate`.

    Returns:
        (loss, entropy): 0-d tensors, the entropy estimate detached (for the logs).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ValueError(f"sb_loss: sigma must be a number >= 0, got {sigma!r}")
    if x_t.shape != x1.shape:
        raise ValueError(f"sb_loss: x_t and x1 must have one shape, got {tuple(x_t.shape)} "
                         f"and {tuple(x1.shape)}")
    t = _times("sb_loss", t, x_t.shape[0], x_t.device)
    transport = (_promote(x_t) - _promote(x1)).square().mean()
    entropy = entropy_estimate(energy, x_t, x1, t, negatives=negatives)
    loss = transport - 2.0 * sigma * (1.0 - t).mean() * entropy
    return loss, entropy.detach()


# ---------------------------------------------------------------------------- the whole loss


class ACMTLossHeads(nn.Module):
    """The learnable parts of the losses: C7 (``texture``), C3 (``boundary``) and E
    (``energy``), sized for a translation network's feature widths.

    Args:
        net: the translation network (:class:`~mrus_models.acmt.network.ACMTNet`: its
            ``ndim``, ``channels``, ``shallow_channels`` and ``deep_channels``).
        energy_widths: :class:`EnergyNet`'s widths.
        energy_time_dim: :class:`EnergyNet`'s time embedding width.

    Example:
        >>> heads = ACMTLossHeads(ACMTNet(widths=(8, 16), time_dim=8))  # network.ACMTNet
    """

    def __init__(self, net: nn.Module, *, energy_widths: Sequence[int] = (16, 32, 64),
                 energy_time_dim: int = 32) -> None:
        super().__init__()
        self.texture = texture_conv(net.ndim, net.shallow_channels)
        self.boundary = boundary_conv(net.ndim, net.deep_channels)
        self.energy = EnergyNet(net.ndim, net.channels, widths=energy_widths,
                                time_dim=energy_time_dim)


def acmt_loss(net: nn.Module, heads: ACMTLossHeads, x0_mr: torch.Tensor, x0_us: torch.Tensor,
              xt_mr: torch.Tensor, xt_us: torch.Tensor, t, *, sigma: float,
              lam_texture: float = 1.0, lam_boundary: float = 1.0, lam_sb: float = 1.0,
              negatives_mr: tuple[torch.Tensor, torch.Tensor] | None = None,
              negatives_us: tuple[torch.Tensor, torch.Tensor] | None = None,
              backend: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss: eq. 14 plus E's own loss, from the diffused states ([M25] Alg. 1).

    In training mode, x̂_1 = net(x_{t_i}, t_i) for MR and US; the features f^s, f^d of
    x̂_1 and of x_0 come from :meth:`~mrus_models.acmt.network.ACMTNet.encode` (t = 0);
    then ``λ_texture L_texture + λ_boundary L_boundary + λ_SB L_SB + L_E`` with
    ``L_E = ½ (energy_loss^MR + energy_loss^US)``, which reaches only E's parameters (and
    L_SB none of them), so that one optimiser over the network and ``heads`` performs both
    of [K24]'s updates.

    Args:
        net: the translation network.
        heads: C7, C3 and E.
        x0_mr, x0_us: Tensor [B, C, *S], the source volumes.
        xt_mr, xt_us: Tensor [B, C, *S], their states x_{t_i} (:func:`~.bridge.diffuse`).
        t: t_i, a float or a Tensor [B].
        sigma: σ.
        lam_texture, lam_boundary, lam_sb: the weights of eq. 14.
        negatives_mr, negatives_us: independent (x_t', x̂_1') pairs for the entropy
            estimates (required for a batch of 1, see :func:`entropy_estimate`).
        backend: the ``mrus_kernels`` backend of :func:`mrus_kernels.sobel_l1`.

    Returns:
        (loss, logs): the 0-d total and the detached terms ``texture``, ``boundary``, ``sb``,
        ``entropy_mr``, ``entropy_us`` and ``energy``.
    """
    x1_mr, x1_us = net(xt_mr, t), net(xt_us, t)
    fs1_mr, fd1_mr = net.encode(x1_mr)
    fs1_us, fd1_us = net.encode(x1_us)
    _, fd0_mr = net.encode(x0_mr)
    _, fd0_us = net.encode(x0_us)
    texture = texture_loss(heads.texture, fs1_mr, fs1_us)
    boundary = 0.5 * (boundary_loss(heads.boundary, fd1_mr, fd0_mr, backend=backend)
                      + boundary_loss(heads.boundary, fd1_us, fd0_us, backend=backend))
    sb_mr, h_mr = sb_loss(heads.energy, xt_mr, x1_mr, t, sigma, negatives=negatives_mr)
    sb_us, h_us = sb_loss(heads.energy, xt_us, x1_us, t, sigma, negatives=negatives_us)
    sb = 0.5 * (sb_mr + sb_us)
    energy = 0.5 * (energy_loss(heads.energy, xt_mr, x1_mr, t, negatives=negatives_mr)
                    + energy_loss(heads.energy, xt_us, x1_us, t, negatives=negatives_us))
    loss = lam_texture * texture + lam_boundary * boundary + lam_sb * sb + energy
    logs = {"texture": texture, "boundary": boundary, "sb": sb, "entropy_mr": h_mr,
            "entropy_us": h_us, "energy": energy}
    return loss, {k: v.detach() for k, v in logs.items()}
