"""Plasticine's deformation module f_θ2: velocities v, v⁻¹ from (x, y, ê), or from x alone.

[Z25] §III-B, §III-C "Network Architecture" and Appendix Fig. 13 (right): a VoxelMorph
U-Net with 64 start channels for 2D, four encoder and four decoder blocks, whose last
convolution is split into two output streams ("the same convolution kernel [64, 2, 1]":
64 → 2 channels, 1 × 1) for the forward and the inverse velocity, each integrated by
scaling and squaring (T = 7) into φ = C(v) and φ⁻¹ = C(v⁻¹) and applied with the spatial
transformer (:func:`mrus_kernels.warp`).

The input layer takes three channels (x, y, ê). A 3-channel 3 × 3 convolution is exactly
the sum of a convolution of x and one of (y, ê), so we write it as
``stem_x(x) + stem_ye(y, ê)``: at inference there is no y (and no ê, which needs y), and
the "4-layer auxiliary convolution block with the same kernel size [64, 64, 3]" A is
trained to predict the (y, ê) features from the x features (feature alignment, [Z25]
ref. [47]): ``features = stem_x(x) + A(stem_x(x))``.

[Z25] Zhang, Cheng et al., "Plasticine: A Traceable Diffusion Model for Medical Image
    Translation", ../shared/papers/plasticine.txt; sections and equations refer to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrus_kernels import integrate_velocity, warp
from mrus_models.nn import UNet
from mrus_models.nn.blocks import LEAKY_SLOPE, check_channels, conv

#: VoxelMorph-2's widths (16, 32, 32, 32 / 32, 32, 32, 32, 32, 16, 16; Balakrishnan et al.
#: 2019, Fig. 3) times four: "64 start channels" ([Z25] Appendix), and the last decoder
#: width 64 that the heads' "[64, 2, 1]" kernels read.
PLASTICINE_ENCODER = (64, 128, 128, 128)
PLASTICINE_DECODER = (128, 128, 128, 128, 128, 64, 64)


def _head(in_channels: int, init_std: float) -> nn.Conv2d:
    """A 1 × 1 convolution to a 2D velocity, initialised near zero as VoxelMorph's flow
    layer (N(0, init_std) weights, zero bias): an untrained network predicts φ ≈ Id."""
    head = nn.Conv2d(in_channels, 2, 1)
    nn.init.normal_(head.weight, mean=0.0, std=init_std)
    nn.init.zeros_(head.bias)
    return head


class AlignmentBlock(nn.Module):
    """A: ``layers`` 3 × 3 convolutions width → width, LeakyReLU(0.2) between them
    ([Z25] Appendix: "a 4-layer auxiliary convolution block with the same kernel size
    [64, 64, 3]"). The last convolution has no activation: its target, the (y, ê) stem's
    output, is a linear convolution and takes any sign.

    Args:
        width: channels in and out (the stem's width, 64).
        layers: convolutions (4).
    """

    def __init__(self, width: int, layers: int = 4) -> None:
        super().__init__()
        check_channels("AlignmentBlock", "width", width)
        check_channels("AlignmentBlock", "layers", layers)
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(conv(2, width, width, 3))
            if i < layers - 1:
                mods.append(nn.LeakyReLU(LEAKY_SLOPE))
        self.net = nn.Sequential(*mods)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h [B, width, H, W]. Returns [B, width, H, W]."""
        return self.net(h)


class DeformationNet(nn.Module):
    """f_θ2: ``(x, y, ê) → (v, v⁻¹)`` in training, ``x → (v, v⁻¹)`` at inference.

    Args:
        width: stem channels, the U-Net's input width (64, [Z25] Appendix).
        encoder: U-Net encoder widths (:data:`PLASTICINE_ENCODER`).
        decoder: U-Net decoder widths (:data:`PLASTICINE_DECODER`); the heads read the last.
        residual: residual encoder blocks; False is VoxelMorph's single convolutions.
        align_layers: convolutions of the alignment block A (4).
        steps: scaling and squaring steps T (7, [Z25] Appendix E).
        memory: :func:`mrus_kernels.integrate_velocity`'s backward memory mode.
        init_std: standard deviation of the heads' initial weights (1e-5, VoxelMorph's).
        backend: ``mrus_kernels`` backend of the integration and the warps.

    Example:
        >>> net = DeformationNet(width=8, encoder=(8, 8), decoder=(8, 8, 8))
        >>> x, y, e = torch.rand(3, 2, 1, 32, 32)
        >>> out = net(x, y, e)
        >>> out["ddf"].shape, out["ddf_inverse"].shape
        (torch.Size([2, 2, 32, 32]), torch.Size([2, 2, 32, 32]))
    """

    def __init__(self, *, width: int = 64, encoder: Sequence[int] = PLASTICINE_ENCODER,
                 decoder: Sequence[int] = PLASTICINE_DECODER, residual: bool = False,
                 align_layers: int = 4, steps: int = 7, memory: str = "store",
                 init_std: float = 1e-5, backend: str | None = None) -> None:
        super().__init__()
        check_channels("DeformationNet", "width", width)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"DeformationNet: steps must be an integer >= 0, got {steps!r}")
        if not init_std >= 0:
            raise ValueError(f"DeformationNet: init_std must be >= 0, got {init_std!r}")
        # One 3-channel convolution over (x, y, ê), split by input channel: the bias lives
        # in stem_x so that inference (x alone) keeps it.
        self.stem_x = conv(2, 1, width, 3)
        self.stem_ye = conv(2, 2, width, 3, bias=False)
        self.align = AlignmentBlock(width, align_layers)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.unet = UNet(2, width, encoder=encoder, decoder=decoder, residual=residual)
        out = self.unet.out_channels
        self.head = _head(out, init_std)
        self.head_inverse = _head(out, init_std)
        self.width, self.steps, self.memory, self.backend = width, steps, memory, backend

    @property
    def stride(self) -> int:
        """Every spatial size must be divisible by it (``2 ** len(encoder)``)."""
        return self.unet.stride

    def _check(self, x: torch.Tensor, y, cue) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DeformationNet: x must be a tensor [B, 1, H, W], got {shape}")
        if (y is None) != (cue is None):
            raise ValueError("DeformationNet: give y and cue (ê) together, or neither "
                             "(inference from x alone)")
        for name, t in (("y", y), ("cue", cue)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != x.shape):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"DeformationNet: {name} must be a tensor of x's shape "
                                 f"{tuple(x.shape)}, got {shape}")
        if any(s % self.stride for s in x.shape[2:]):
            raise ValueError(f"DeformationNet: H and W must be divisible by the stride "
                             f"{self.stride}, got {tuple(x.shape[2:])}")

    def features(self, x: torch.Tensor, y: torch.Tensor | None = None,
                 cue: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The input layer's features.

        Returns:
            ``"x"``: stem_x(x); ``"predicted"``: A(stem_x(x)); with y and cue also
            ``"target"``: stem_ye(y, ê), the features A learns to predict.
        """
        fx = self.stem_x(x)
        out = {"x": fx, "predicted": self.align(fx)}
        if y is not None:
            out["target"] = self.stem_ye(torch.cat([y, cue], dim=1))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                cue: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The velocities and deformations of x towards y (or towards the target domain).

        Args:
            x: Tensor [B, 1, H, W], the source image (the model's intensity units, [-1, 1]);
                H, W divisible by :attr:`stride`.
            y: Tensor [B, 1, H, W] the target image, or None at inference.
            cue: Tensor [B, 1, H, W] ê, ε_θ1's noise estimate (detach it: f_θ2's loss must
                not train ε_θ1), or None at inference.

        Returns:
            dict of float32 tensors: ``"velocity"`` v, ``"velocity_inverse"`` v⁻¹,
            ``"ddf"`` φ = C(v), ``"ddf_inverse"`` φ⁻¹ = C(v⁻¹) (each [B, 2, H, W], voxel
            units, ``warp(x, ddf)`` = x∘φ), ``"warped"`` x∘φ, the features of
            :meth:`features` (``"features_x"``, ``"features_predicted"``, and with y
            ``"features_target"``), and with y ``"warped_target"`` y∘φ⁻¹.
        """
        self._check(x, y, cue)
        f = self.features(x, y, cue)
        # Training runs on the true (y, ê) features; inference on A's prediction of them.
        h = f["x"] + (f["target"] if y is not None else f["predicted"])
        h = self.unet(self.act(h))
        v = self.head(h).float()
        v_inv = self.head_inverse(h).float()
        ddf = integrate_velocity(v, self.steps, memory=self.memory, backend=self.backend)
        ddf_inv = integrate_velocity(v_inv, self.steps, memory=self.memory,
                                     backend=self.backend)
        out = {"velocity": v, "velocity_inverse": v_inv, "ddf": ddf, "ddf_inverse": ddf_inv,
               "features_x": f["x"], "features_predicted": f["predicted"],
               # Border padding: a brain slice's border is background, zeros would be
               # mid-grey in [-1, 1].
               "warped": warp(x.float(), ddf, padding="border", backend=self.backend)}
        if y is not None:
            out["features_target"] = f["target"]
            out["warped_target"] = warp(y.float(), ddf_inv, padding="border",
                                        backend=self.backend)
        return out
