"""The ACMT model: the translation network f_θ with the learnable parts of its losses, and
one training step's loss ([M25] §II-C, eq. 14).

The translation network is :class:`~mrus_models.acmt.network.ACMTNet`; the loss modules
(C7 of eq. 7, C3 of eq. 8-9 and UNSB's energy network E of the SB loss's entropy estimate)
live in the same module so that one optimiser trains them and one checkpoint holds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mrus_models.train.task import unwrap

from .bridge import diffuse, time_pool
from .losses import (
    EnergyNet,
    boundary_conv,
    boundary_loss,
    energy_loss,
    sb_loss,
    texture_conv,
    texture_loss,
)
from .network import ACMTNet

__all__ = ["ACMT", "acmt_loss", "acmt_terms", "encode_features", "normalise_intensity"]

#: Upper quantile of :func:`normalise_intensity`: speckle's brightest voxels do not set the
#: scale (the datasets' pseudo-ultrasound peaks near twice its 99.5th percentile).
UPPER_QUANTILE = 0.995


def normalise_intensity(x: torch.Tensor) -> torch.Tensor:
    """Each volume mapped to [-1, 1]: its minimum to -1, its 99.5th percentile to 1,
    brighter voxels clipped ([K24] trains on images in [-1, 1]).

    Args:
        x: Tensor [B, C, *S].

    Returns:
        Tensor [B, C, *S] float32.
    """
    x = x.float()
    flat = x.flatten(1)
    lo = flat.amin(dim=1)
    # torch.quantile refuses more than 2**24 elements: sort-based kthvalue has no limit.
    k = max(1, min(flat.shape[1], round(UPPER_QUANTILE * (flat.shape[1] - 1)) + 1))
    hi = flat.kthvalue(k, dim=1).values
    shape = (-1, *([1] * (x.dim() - 1)))
    scale = (hi - lo).clamp_min(1e-6).reshape(shape)
    return ((x - lo.reshape(shape)) / scale).clamp(0, 1) * 2 - 1


class ACMT(nn.Module):
    """f_θ and the learnable parts of ACMT's losses.

    Args:
        widths, time_dim, shallow_level, deep_level, norm: of the translation network
            (:class:`~mrus_models.acmt.network.ACMTNet`, 3D, one channel).
        energy_widths: the energy network's levels (:class:`~mrus_models.acmt.losses.
            EnergyNet`).
        energy_time_dim: its time embedding width.

    Attributes:
        net: the translation network f_θ(x_t, t) → x̂_1.
        c7: C7 of eq. 7 on f^s; c3: C3 of eq. 8-9 on f^d.
        energy: E of the SB loss's entropy estimate.
        stride: the network's stride (sizes must be divisible by it).
    """

    def __init__(self, *, widths: Sequence[int] = (32, 64, 64, 64), time_dim: int = 64,
                 shallow_level: int = 0, deep_level: int = 3, norm: str | None = "group",
                 energy_widths: Sequence[int] = (16, 32, 64), energy_time_dim: int = 32
                 ) -> None:
        super().__init__()
        self.net = ACMTNet(3, 1, widths=widths, time_dim=time_dim,
                           shallow_level=shallow_level, deep_level=deep_level, norm=norm)
        self.c7 = texture_conv(3, self.net.shallow_channels)
        self.c3 = boundary_conv(3, self.net.deep_channels)
        self.energy = EnergyNet(3, 1, widths=energy_widths, time_dim=energy_time_dim)
        self.stride = self.net.stride

    def forward(self, x: torch.Tensor, t, return_features: bool = False):
        """f_θ(x_t, t): see :meth:`ACMTNet.forward <mrus_models.acmt.network.ACMTNet.forward>`."""
        return self.net(x, t, return_features=return_features)


class _Encode(nn.Module):
    """``net.encode`` as a module's forward (for :func:`torch.func.functional_call`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encode(x)


def encode_features(net: nn.Module, x: torch.Tensor, frozen: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f^s(x), f^d(x)) of eq. 5-6 by the network's encoder
    (:meth:`~mrus_models.acmt.network.ACMTNet.encode`).

    Args:
        net: the translation network.
        x: Tensor [B, 1, *S].
        frozen: compute them with the network's current weights detached, so that a loss
            on the features reaches θ only through ``x`` (x̂_1 = f_θ(x_t)) and not by
            changing the extractor (see :class:`~mrus_models.acmt.config.ACMTConfig`'s
            ``feature_extractor``).
    """
    if not frozen:
        return net.encode(x)
    return _frozen_encode(net, x)


def _frozen_encode(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = {f"net.{k}": v.detach() for k, v in net.named_parameters()}
    state.update({f"net.{k}": v for k, v in net.named_buffers()})
    return functional_call(_Encode(net), state, (x,))


def acmt_loss(model: nn.Module, mr: torch.Tensor, us: torch.Tensor, index: int,
              config: Any, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss ([M25] §II-C and eq. 14) for a batch of MR-US pairs.

    1. x_{t_i} of MR and of US by the diffusion process (eq. 4, network in evaluation mode,
       no gradient: :func:`~mrus_models.acmt.bridge.diffuse`), both modalities in one
       batch;
    2. x̂_1 = f_θ(x_{t_i}, t_i) in training mode;
    3. f^s, f^d of x̂_1 and f^d of x_0 (:meth:`~mrus_models.acmt.network.ACMTNet.encode`);
    4. ``λ_texture L_texture + λ_boundary L_boundary + λ_SB L_SB`` (eq. 7-14), plus the
       energy network's own loss (:func:`~mrus_models.acmt.losses.energy_loss`, which
       reaches only E's parameters, as [K24]'s separate E step; E gets no gradient from
       L_SB).

    The entropy estimate contrasts each item's pair with the next item's of the same
    modality, so the batch needs two pairs or more (:class:`~mrus_models.acmt.config.
    ACMTConfig`'s ``batch_size``).

    Args:
        model: :class:`ACMT` (or a wrapper of it: DDP's is called, so that the gradients
            synchronise).
        mr, us: Tensor [B, 1, X, Y, Z], normalised (:func:`normalise_intensity`).
        index: the pool index i in [0, T − 1] (:func:`~mrus_models.acmt.bridge.draw_index`).
        config: :class:`~mrus_models.acmt.config.ACMTConfig`.
        generator: for the bridge's noise (None: torch's global generator, which the
            Trainer seeds).

    Returns:
        (loss, logs): the total and its terms (``texture``, ``boundary``, ``sb``,
        ``transport`` (the mean of (x_t − x̂_1)²), ``entropy`` (Ĥ), ``energy`` (E's
        loss), ``t``).
    """
    times = time_pool(config.num_timesteps)
    x0 = torch.cat([mr, us])
    x_t = diffuse(unwrap(model).net, x0, index, config.sigma, times=times,
                  generator=generator)
    return acmt_terms(model, x0, x_t, float(times[index]), config)


def acmt_terms(model: nn.Module, x0: torch.Tensor, x_t: torch.Tensor, t: float,
               config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Steps 2-4 of :func:`acmt_loss`: eq. 14 from the sources and their bridge states.

    Args:
        model: :class:`ACMT` (or a wrapper of it).
        x0: Tensor [2B, 1, *S]: the B MR volumes, then the B US volumes (normalised).
        x_t: Tensor [2B, 1, *S]: their states at time t (detached).
        t: the pool time t_i.
        config: :class:`~mrus_models.acmt.config.ACMTConfig`.

    Returns:
        (loss, logs) as :func:`acmt_loss`.
    """
    inner = unwrap(model)
    net = inner.net
    b = x0.shape[0] // 2
    x1 = model(x_t, torch.full((2 * b,), t, device=x0.device))
    frozen = getattr(config, "feature_extractor", "frozen") == "frozen"
    shallow1, deep1 = encode_features(net, x1, frozen)
    _, deep0 = encode_features(net, x0, frozen)
    texture = texture_loss(inner.c7, shallow1[:b], shallow1[b:])
    boundary = 0.5 * (boundary_loss(inner.c3, deep1[:b], deep0[:b], backend=config.backend)
                      + boundary_loss(inner.c3, deep1[b:], deep0[b:], backend=config.backend))
    sb_terms, entropies, energies = [], [], []
    for part in (slice(0, b), slice(b, 2 * b)):
        loss_m, h_m = sb_loss(inner.energy, x_t[part], x1[part], t, config.sigma)
        sb_terms.append(loss_m)
        entropies.append(h_m)
        energies.append(energy_loss(inner.energy, x_t[part], x1[part], t))
    sb = 0.5 * (sb_terms[0] + sb_terms[1])
    energy = 0.5 * (energies[0] + energies[1])
    loss = (config.lam_texture * texture + config.lam_boundary * boundary
            + config.lam_sb * sb + energy)
    transport = (x_t - x1).detach().float().square().mean()
    logs = {"texture": texture.detach(), "boundary": boundary.detach(), "sb": sb.detach(),
            "transport": transport, "entropy": 0.5 * (entropies[0] + entropies[1]),
            "energy": energy.detach(), "t": t}
    return loss, logs
