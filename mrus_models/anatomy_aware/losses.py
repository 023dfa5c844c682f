"""The anatomy-aware registration loss ([P25] §II-C.2, eq. 15-19), on ``mrus_kernels`` ops.

- :func:`anatomy_map`: F_Ana(x) = sigmoid(−(x − mean x)) (eq. 15), the mean taken per item:
  dark regions (the prostate interior after ACMT; CSF and background in the brain crops)
  map towards 1, bright boundaries towards 0;
- :func:`soft_dice_loss`: 1 − (2 Σ a·b + ε) / (Σ a + Σ b + ε) per item (eq. 16);
- :func:`similarity_loss`: the soft Dice of F_Ana(fixed) and F_Ana(moving∘Φ), by default
  inside the fixed image's field of view (:func:`field_of_view`; not in the paper, see
  ``similarity_mask`` in :class:`~mrus_models.anatomy_aware.config.AnatomyAwareConfig`);
- :func:`smoothness_loss`: Σ‖∇Φ‖² (eq. 17) as :func:`mrus_kernels.grad_l2`, the mean squared
  forward difference of the displacement (voxel units);
- :func:`diffusion_loss`: ‖S − N‖² (eq. 18) as the mean squared error of the predicted
  score against the noise added to the fixed image;
- :func:`anatomy_aware_loss`: eq. 19, λ-weighted sum, the mean over the batch.

[P25]: ../shared/papers/mr2us_pro.txt.
"""

from __future__ import annotations

import torch

from mrus_kernels import grad_l2

from .config import AnatomyAwareConfig


def _check_image(op: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"{op}: {name} must be [B, C, *S] with 1 to 3 spatial axes, got shape "
                         f"{tuple(x.shape)}")


def anatomy_map(x: torch.Tensor, temperature: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """F_Ana(x) = sigmoid(−(x − mean(x)) / temperature), the mean over each item's channels
    and voxels ([P25] eq. 15; ``temperature`` = 1 is the equation as written), or over the
    voxels of ``mask`` only.

    Args:
        x: Tensor [B, C, *S].
        temperature: a positive number.
        mask: optional Tensor [B or 1, 1, *S] of 0/1 weights: the mean is taken over them.

    Returns:
        Tensor like ``x`` (float32 at least), values in (0, 1).
    """
    _check_image("anatomy_map", "x", x)
    if not temperature > 0:
        raise ValueError(f"anatomy_map: temperature must be > 0, got {temperature!r}")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = tuple(range(1, x.dim()))
    if mask is None:
        mean = x.mean(dim=dims, keepdim=True)
    else:
        m = mask.to(x.dtype).expand_as(x)
        mean = (x * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True).clamp_min(1.0)
    return torch.sigmoid((mean - x) / temperature)


def soft_dice_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − (2 Σ a·b + ε) / (Σ a + Σ b + ε) per item, the sums over channels and voxels
    ([P25] eq. 16), or over the voxels of ``mask`` only.

    Args:
        a, b: Tensors [B, C, *S] of the same shape, non-negative weights.
        eps: ε > 0 ([P25]: 1e-6).
        mask: optional Tensor [B or 1, 1, *S] of 0/1 weights.

    Returns:
        Tensor [B].
    """
    _check_image("soft_dice_loss", "a", a)
    _check_image("soft_dice_loss", "b", b)
    if a.shape != b.shape:
        raise ValueError(f"soft_dice_loss: a and b must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not eps > 0:
        raise ValueError(f"soft_dice_loss: eps must be > 0, got {eps!r}")
    if mask is not None:
        m = mask.to(a.dtype)
        a, b = a * m, b * m
    dims = tuple(range(1, a.dim()))
    inter = (a * b).sum(dims)
    return 1.0 - (2.0 * inter + eps) / (a.sum(dims) + b.sum(dims) + eps)


def field_of_view(fixed: torch.Tensor) -> torch.Tensor:
    """The voxels where the fixed image holds data: above its minimum (per item), [B, 1, *S]
    bool. For the simulated ultrasound, the fan (exactly 0 outside)."""
    dims = tuple(range(1, fixed.dim()))
    return fixed > fixed.amin(dim=dims, keepdim=True)


def similarity_loss(fixed: torch.Tensor, warped: torch.Tensor, config: AnatomyAwareConfig,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_sim per item: the soft Dice of F_Ana(fixed) and F_Ana(warped moving), both maps'
    means and the Dice's sums over ``mask`` when given, [B]."""
    return soft_dice_loss(anatomy_map(fixed, config.ana_temperature, mask),
                          anatomy_map(warped, config.ana_temperature, mask),
                          config.dice_eps, mask)


def smoothness_loss(ddf: torch.Tensor, config: AnatomyAwareConfig) -> torch.Tensor:
    """L_smooth: :func:`mrus_kernels.grad_l2` of the displacement [B, ndim, *S] (voxel
    units), a scalar: the mean over items, axes and voxels."""
    return grad_l2(ddf.float(), backend=config.backend)


def diffusion_loss(score: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_diffusion per item: mean over voxels of (S − N)², [B]."""
    if score.shape != noise.shape:
        raise ValueError(f"diffusion_loss: score and noise must have the same shape, got "
                         f"{tuple(score.shape)} and {tuple(noise.shape)}")
    return (score.float() - noise.float()).square().flatten(1).mean(1)


def anatomy_aware_loss(out: dict[str, torch.Tensor], config: AnatomyAwareConfig
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch ([P25] eq. 19), the mean over its items.

    Args:
        out: :class:`~mrus_models.anatomy_aware.model.AnatomyAwareNet`'s output with
            ``fixed_input`` (the normalised fixed image), ``warped_input`` (the normalised
            moving image warped by Φ), ``ddf``, ``score`` and ``noise``.
        config: the weights ``lam_sim``, ``lam_smooth``, ``lam_diff``, ``dice_eps``,
            ``ana_temperature`` and ``backend``.

    Returns:
        (loss, logs): a 0-d tensor and the detached batch means ``similarity``,
        ``smoothness`` and ``diffusion``.
    """
    mask = out.get("mask") if config.similarity_mask == "field_of_view" else None
    sim = similarity_loss(out["fixed_input"], out["warped_input"], config, mask).mean()
    smooth = smoothness_loss(out["ddf"], config)
    diff = diffusion_loss(out["score"], out["noise"]).mean()
    loss = config.lam_sim * sim + config.lam_smooth * smooth + config.lam_diff * diff
    return loss, {"similarity": sim.detach(), "smoothness": smooth.detach(),
                  "diffusion": diff.detach()}
