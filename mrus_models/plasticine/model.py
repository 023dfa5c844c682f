"""Plasticine: the intensity module ε_θ1 and the deformation module f_θ2 in one network.

[Z25] Fig. 2-4, §III: in training, ε_θ1 estimates the noise of a noised target image ỹ
given its structure map y_s (L_IN, Algorithm 2), and f_θ2 registers the source x to the
target y using that estimate ê (detached) as a third input (L_DF, eq. 7). At inference
(Algorithm 1 / 3) f_θ2 sees x alone (through its alignment block) and gives φ and φ⁻¹; the
source's structure map x_s deformed by φ conditions ε_θ1, and the sampler refines the
noised source x_K into ŷ. Every pixel of ŷ traces back to x through φ⁻¹.

Intensities: the network works in [-1, 1] ([Palette]'s range): :func:`to_model_range`
maps each item's minimum and maximum to -1 and 1.
"""

from __future__ import annotations

import torch
from torch import nn

from mrus_kernels import warp

from .deformation import DeformationNet
from .diffusion import IntensityUNet, NoiseSchedule, intensity_step, sample
from .structure import structure_map


def to_model_range(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each item min-max scaled to [-1, 1] (float32): the range of the images the network
    is trained on, whatever the scanner's units."""
    x = image.float()
    dims = tuple(range(1, x.dim()))
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return 2 * (x - lo) / (hi - lo).clamp_min(eps) - 1


class ClippedNoise(nn.Module):
    """ε_θ1 with the clean image it implies clipped to [-1, 1] ([Palette]'s sampler).

    [Palette]'s code samples with ``clip_denoised=True``: it predicts
    ŷ_0 = (ŷ_k − √(1 − γ) ε̂) / √γ, clamps it to the data range [-1, 1] and takes the
    posterior mean of q(y_{k−1} | ŷ_0, ŷ_k) (eq. A.4). The ε-form update of eq. A.10 is that
    same posterior mean with ŷ_0 unclipped, so returning the noise that the clipped ŷ_0
    implies, ε̃ = (ŷ_k − √γ clip(ŷ_0)) / √(1 − γ), makes the paper's update the clipped one
    without changing the sampler. Where ŷ_0 lies in [-1, 1] nothing changes; at the last
    step (γ_0 = 1) the output is clip(ŷ_0) itself. An ε̂ that is off early in training or
    after a short run cannot then carry ŷ far outside the data range over the steps.

    Args:
        net: ε_θ1, called as ``net(noisy, gamma [B], condition)``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, noisy: torch.Tensor, gamma: torch.Tensor,
                condition: torch.Tensor) -> torch.Tensor:
        eps = self.net(noisy, gamma, condition).to(noisy.dtype)
        g = gamma.to(noisy.dtype).reshape(-1, *([1] * (noisy.dim() - 1)))
        y0 = ((noisy - (1 - g).sqrt() * eps) / g.sqrt()).clamp(-1.0, 1.0)
        return (noisy - g.sqrt() * y0) / (1 - g).sqrt()


class Plasticine(nn.Module):
    """ε_θ1 (``intensity``) and f_θ2 (``deformation``), with the noise schedule.

    Args:
        intensity: the noise estimator ε_θ1(ỹ, γ, condition).
        deformation: f_θ2.
        schedule: the training noise schedule (K_train steps).
        clusters: k of the structure maps (:func:`~mrus_models.plasticine.structure.
            structure_map`).
        sample_steps: default refinement steps of :meth:`translate` (None: all K_train).
        clip_denoised: sample through :class:`ClippedNoise` ([Palette]'s sampler).

    Example:
        >>> from mrus_models.plasticine.diffusion import IntensityUNet, NoiseSchedule
        >>> net = Plasticine(IntensityUNet(channels=8, mults=(1, 2), res_blocks=1),
        ...                  DeformationNet(width=8, encoder=(8, 8), decoder=(8, 8, 8)),
        ...                  NoiseSchedule.linear(), sample_steps=3)
        >>> y_hat, ddf, ddf_inv = net.eval().translate(torch.rand(1, 1, 32, 32) * 2 - 1)
        >>> y_hat.shape, ddf.shape
        (torch.Size([1, 1, 32, 32]), torch.Size([1, 2, 32, 32]))
    """

    def __init__(self, intensity: nn.Module, deformation: DeformationNet,
                 schedule: NoiseSchedule, *, clusters: int = 2,
                 sample_steps: int | None = None, clip_denoised: bool = True) -> None:
        super().__init__()
        self.intensity = intensity
        self.deformation = deformation
        self.schedule = schedule
        self.clusters, self.sample_steps = clusters, sample_steps
        self.clip_denoised = clip_denoised

    @property
    def stride(self) -> int:
        """Every spatial size must be divisible by it (both networks' strides)."""
        s1 = getattr(self.intensity, "stride", 1)
        s2 = self.deformation.stride
        return max(s1, s2) if max(s1, s2) % min(s1, s2) == 0 else s1 * s2

    def forward(self, source: torch.Tensor, target: torch.Tensor,
                target_structure: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One training pass of both modules (Algorithm 2 and Fig. 4).

        Args:
            source: x, Tensor [B, 1, H, W] in [-1, 1].
            target: y, Tensor [B, 1, H, W] in [-1, 1].
            target_structure: y_s, Tensor [B, 1, H, W], y's structure map.
            generator: seeds γ and ε (default: torch's global RNG).

        Returns:
            :class:`~mrus_models.plasticine.deformation.DeformationNet`'s output on
            (x, y, ê) with ê = ε̂ detached, plus ``"intensity_loss"`` (L_IN, 0-d),
            ``"eps_hat"``, ``"eps"``, ``"noisy"`` and ``"gamma"`` of the intensity draw.
        """
        draw = intensity_step(self.intensity, target, target_structure, self.schedule,
                              generator=generator)
        # ê feeds f_θ2 as an input only: L_DF must not train ε_θ1 ([Z25] trains the two
        # modules with their own losses and optimiser settings).
        out = self.deformation(source, target, draw["eps_hat"].detach().float())
        out.update(intensity_loss=draw["loss"], eps_hat=draw["eps_hat"], eps=draw["eps"],
                   noisy=draw["noisy"], gamma=draw["gamma"])
        return out

    @torch.no_grad()
    def translate(self, source: torch.Tensor, *, steps: int | None = None,
                  generator: torch.Generator | None = None,
                  source_structure: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ŷ, φ and φ⁻¹ of x (Algorithm 1 / 3). Put the network in eval mode first.

        Args:
            source: x, Tensor [B, 1, H, W] in [-1, 1] (:func:`to_model_range`).
            steps: refinement steps (default :attr:`sample_steps`; None: all K_train).
            generator: seeds x_K's noise and the sampler's (default: torch's global RNG).
            source_structure: x_s if already computed (default: k-means of x here).

        Returns:
            (ŷ [B, 1, H, W] in [-1, 1] with ``clip_denoised``, φ and φ⁻¹ [B, 2, H, W] in voxel
            units).
        """
        out = self.deformation(source)
        ddf, ddf_inv = out["ddf"], out["ddf_inverse"]
        if source_structure is None:
            source_structure = structure_map(source, self.clusters)
        # Nearest: the condition stays a map of cluster values, as the y_s of training.
        condition = warp(source_structure.float(), ddf, mode="nearest", padding="border",
                         backend=self.deformation.backend)
        steps = self.sample_steps if steps is None else steps
        eps_net = ClippedNoise(self.intensity) if self.clip_denoised else self.intensity
        y_hat = sample(eps_net, source.float(), condition, self.schedule, steps=steps,
                       generator=generator)
        return y_hat, ddf, ddf_inv


def build_intensity(config) -> IntensityUNet:
    """ε_θ1 from a :class:`~mrus_models.plasticine.config.PlasticineConfig`."""
    return IntensityUNet(2, channels=config.diffusion_width, mults=config.diffusion_mults,
                         res_blocks=config.diffusion_res_blocks,
                         attention_res=config.diffusion_attention,
                         dropout=config.diffusion_dropout,
                         zero_init=config.diffusion_zero_init)
