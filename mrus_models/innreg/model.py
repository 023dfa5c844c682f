"""The INNReg network: invertible translation T and registration R (velocity → exp → warp).

[G24] Fig. 1: T translates the source x into the target's modality (``fake_y = T(x)``,
eq. 1) and back (``recon_x = T⁻¹(fake_y)``, eq. 2); R predicts the deformation φ from
(x, y), and φ warps both x and fake_y. T is
:class:`~mrus_models.innreg.translation.TranslationNet`; R is :class:`mrus_models.nn.UNet`
with a residual encoder, a residual output block and :class:`mrus_models.nn.FlowHead`,
whose stationary velocity is integrated by :func:`mrus_kernels.integrate_velocity`
(7 steps) and applied with :func:`mrus_kernels.warp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrus_kernels import integrate_velocity, warp
from mrus_models.nn import FlowHead, ResidualBlock, UNet
from mrus_models.voxelmorph.model import normalise_intensity

from .config import INNREG_DECODER, INNREG_ENCODER
from .translation import TranslationNet


class InnReg(nn.Module):
    """INNReg's two networks, trained jointly; only R registers at test time ([G24] §3).

    R: ``UNet(x, y)`` (residual encoder blocks) → one :class:`~mrus_models.nn.ResidualBlock`
    at full resolution (the residual "output path" of [G24] §4.1; ``output_residual``) →
    :class:`~mrus_models.nn.FlowHead` → velocity v → φ = exp(v) as a displacement. With
    ``bidirectional`` (the released code's ``VxmDense(bidir=True)``) also φ⁻¹ = exp(−v).

    Args:
        inn_blocks: InvBlocks of T (8).
        inn_hidden: growth channels of T's DenseBlocks.
        ddw_kernels: K of T's DDWConv (eq. 8).
        ddw: T's DDWConv local attention on or off.
        encoder: R's U-Net encoder widths.
        decoder: R's U-Net decoder widths.
        residual: residual encoder blocks.
        output_residual: the residual block before the flow head.
        steps: scaling and squaring steps (7).
        bidirectional: also integrate −v (φ⁻¹) and warp the target with it.
        memory: :func:`mrus_kernels.integrate_velocity`'s backward memory mode.
        init_std: the flow head's initial weight standard deviation (1e-5).
        backend: ``mrus_kernels`` backend of the integration and the warps.

    Example:
        >>> net = InnReg(inn_blocks=2, inn_hidden=8, encoder=(8, 8), decoder=(8, 8, 8))
        >>> out = net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
        >>> out["ddf"].shape, out["translated"].shape
        (torch.Size([1, 2, 32, 32]), torch.Size([1, 1, 32, 32]))
    """

    def __init__(self, *, inn_blocks: int = 8, inn_hidden: int = 32, ddw_kernels: int = 4,
                 ddw: bool = True, encoder: Sequence[int] = INNREG_ENCODER,
                 decoder: Sequence[int] = INNREG_DECODER, residual: bool = True,
                 output_residual: bool = True, steps: int = 7, bidirectional: bool = True,
                 memory: str = "store", init_std: float = 1e-5,
                 backend: str | None = None) -> None:
        super().__init__()
        self.translation = TranslationNet(1, inn_blocks, hidden=inn_hidden,
                                          ddw_kernels=ddw_kernels, ddw=ddw)
        self.unet = UNet(2, 2, encoder=encoder, decoder=decoder, residual=residual)
        width = self.unet.out_channels
        self.output = ResidualBlock(2, width, width) if output_residual else nn.Identity()
        self.flow = FlowHead(2, width, init_std=init_std)
        self.ndim = 2
        self.steps, self.bidirectional, self.memory, self.backend = \
            steps, bidirectional, memory, backend

    @property
    def stride(self) -> int:
        """Every spatial size must be divisible by it (``2 ** len(encoder)``)."""
        return self.unet.stride

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """T(x), in float32 even under autocast: bf16 rounding in the couplings would make
        T⁻¹(T(x)) ≠ x by far more than the cross-translation loss is meant to see."""
        with torch.autocast(x.device.type, enabled=False):
            return self.translation(x.float())

    def untranslate(self, y: torch.Tensor) -> torch.Tensor:
        """T⁻¹(y), in float32 (see :meth:`translate`)."""
        with torch.autocast(y.device.type, enabled=False):
            return self.translation.inverse(y.float())

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, *,
                translate: bool = True) -> dict[str, torch.Tensor]:
        """Registers ``moving`` (x) to ``fixed`` (y) and, with ``translate``, runs T.

        Args:
            moving: Tensor [B, 1, H, W], any intensity units (each item is min-max
                normalised to [0, 1]: every output image is in those units).
            fixed: Tensor [B, 1, H, W], same grid; H and W divisible by :attr:`stride`.
            translate: run T and T⁻¹ (training); False: R alone (registration at test time).

        Returns:
            dict of float32 tensors: ``"source"`` x and ``"target"`` y (normalised),
            ``"velocity"`` v and ``"ddf"`` u of φ = exp(v) [B, 2, H, W] (voxel units,
            ``x∘φ(p) = x(p + u(p))``), ``"warped"`` x∘φ; with ``translate``:
            ``"translated"`` T(x), ``"warped_translated"`` T(x)∘φ, ``"reconstructed"``
            T⁻¹(T(x)); with ``bidirectional``: ``"inverse_ddf"`` of exp(−v) and
            ``"warped_target"`` y∘φ⁻¹.
        """
        if moving.dim() != 4 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(
                f"InnReg: moving and fixed must both be [B, 1, H, W] of the same shape, got "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        x, y = normalise_intensity(moving.float()), normalise_intensity(fixed.float())
        h = self.output(self.unet(torch.cat([x, y], dim=1)))
        velocity = self.flow(h).float()
        ddf = integrate_velocity(velocity, self.steps, memory=self.memory, backend=self.backend)
        out = {"source": x, "target": y, "velocity": velocity, "ddf": ddf}
        if translate:
            fake_y = self.translate(x)
            # One warp of both images: φ moves x and fake_y alike ([G24] Fig. 1).
            both = warp(torch.cat([x, fake_y], dim=1), ddf, backend=self.backend)
            out.update(warped=both[:, :1], translated=fake_y, warped_translated=both[:, 1:],
                       reconstructed=self.untranslate(fake_y))
        else:
            out["warped"] = warp(x, ddf, backend=self.backend)
        if self.bidirectional:
            inverse = integrate_velocity(-velocity, self.steps, memory=self.memory,
                                         backend=self.backend)
            out.update(inverse_ddf=inverse, warped_target=warp(y, inverse, backend=self.backend))
        return out
