"""Plasticine's deformation loss L_DF ([Z25] eq. 6–7, Appendix F) on ``mrus_kernels`` ops.

``L_DF = L_data + λ1·L_smooth + λ_align·L_align (+ λ_inv·L_inverse)`` with, on the images
in the model's intensity range [-1, 1] (x the source, y the target):

- ``L_data = L_MI(x∘φ, y) + L_MI(x, y∘φ⁻¹)``: both directions, each the negative of
  eq. A.13's ``(H(y) + H(x∘φ)) / H(y, x∘φ)`` (:func:`mrus_kernels.nmi`, ``mi_form="nmi"``)
  or of Shannon MI (:func:`mrus_kernels.mutual_information`, ``"mi"``), Gaussian Parzen
  windows with ``mi_bins`` bins of width ``2 / mi_bins`` over the fixed range [-1, 1] and
  σ = ``mi_sigma`` bins, averaged over the batch;
- ``L_smooth = grad_l2(v) + grad_l2(v⁻¹)``: "encourage the learned velocities to be smooth"
  (§III-B) with "first-order gradient implemented using the finite differences"
  (Appendix F): :func:`mrus_kernels.grad_l2`, the mean squared forward difference;
- ``L_align = mean (A(stem_x(x)) − sg[stem_ye(y, ê)])²``: feature alignment ([Z25]
  ref. [47], SynDeMo): the auxiliary block A learns to predict, from x alone, the features
  that (y, ê) contribute, so that inference needs only x. The target is detached (sg,
  stop-gradient) because the loss is meant to move the predictor, not the target: with
  gradients into stem_ye the cheapest way to lower L_align would be to shrink the (y, ê)
  features towards what x alone predicts, i.e. to make f_θ2 ignore y and ê, against
  L_data; with the target fixed the registration path alone shapes the (y, ê) features;
- ``L_inverse = mean ‖φ∘φ⁻¹ − Id‖²`` (off by default, not in the paper): the
  displacement of :func:`mrus_kernels.compose` of the two fields, pixels².
"""

from __future__ import annotations

import torch

from mrus_kernels import compose, grad_l2, mutual_information, nmi

from .config import PlasticineConfig

#: The model's intensity range: each image is min-max scaled to [-1, 1] ([Palette]'s).
VALUE_RANGE = (-1.0, 1.0)


def similarity(a: torch.Tensor, b: torch.Tensor, config: PlasticineConfig) -> torch.Tensor:
    """NMI (eq. A.13) or MI of each item of ``a`` and ``b`` ([B, 1, H, W] in [-1, 1]): [B]."""
    fn = nmi if config.mi_form == "nmi" else mutual_information
    return fn(a.float(), b.float(), bins=config.mi_bins, sigma=config.mi_sigma,
              value_range=VALUE_RANGE, backend=config.backend)


def data_loss(out: dict[str, torch.Tensor], source: torch.Tensor, target: torch.Tensor,
              config: PlasticineConfig) -> torch.Tensor:
    """``L_MI(x∘φ, y) + L_MI(x, y∘φ⁻¹)``, each the batch mean of −similarity: 0-d."""
    forward = similarity(target, out["warped"], config).mean()
    backward = similarity(source, out["warped_target"], config).mean()
    return -(forward + backward)


def smoothness_loss(out: dict[str, torch.Tensor], config: PlasticineConfig) -> torch.Tensor:
    """``grad_l2(v) + grad_l2(v⁻¹)`` (pixel units): 0-d."""
    return (grad_l2(out["velocity"], backend=config.backend)
            + grad_l2(out["velocity_inverse"], backend=config.backend))


def align_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared difference of A's prediction and the detached (y, ê) features: 0-d."""
    return (out["features_predicted"].float()
            - out["features_target"].detach().float()).square().mean()


def inverse_error(ddf: torch.Tensor, ddf_inverse: torch.Tensor,
                  backend: str | None = None) -> torch.Tensor:
    """The displacement of φ∘φ⁻¹ (apply φ⁻¹, then φ): [B, 2, H, W], zero for exact
    inverses. ``φ∘φ⁻¹(p) = p + u_inv(p) + u(p + u_inv(p))``."""
    return compose(ddf, ddf_inverse, backend=backend)


def inverse_loss(out: dict[str, torch.Tensor], config: PlasticineConfig) -> torch.Tensor:
    """``mean ‖φ∘φ⁻¹ − Id‖²`` in pixels² (mean over pixels and items): 0-d."""
    r = inverse_error(out["ddf"], out["ddf_inverse"], config.backend)
    return r.square().sum(dim=1).mean()


def deformation_loss(out: dict[str, torch.Tensor], source: torch.Tensor,
                     target: torch.Tensor, config: PlasticineConfig
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_DF of one batch (eq. 7).

    Args:
        out: :class:`~mrus_models.plasticine.deformation.DeformationNet`'s output with y
            and ê given.
        source: x [B, 1, H, W] in [-1, 1].
        target: y [B, 1, H, W] in [-1, 1].
        config: ``lam_smooth``, ``lam_align``, ``lam_inverse`` and the MI settings.

    Returns:
        (loss, logs): a 0-d tensor, and the detached unweighted terms ``data``, ``smooth``,
        ``align`` (and ``inverse`` when ``lam_inverse`` > 0).
    """
    terms = {"data": data_loss(out, source, target, config),
             "smooth": smoothness_loss(out, config),
             "align": align_loss(out)}
    weights = {"data": 1.0, "smooth": config.lam_smooth, "align": config.lam_align}
    if config.lam_inverse > 0:
        terms["inverse"] = inverse_loss(out, config)
        weights["inverse"] = config.lam_inverse
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {k: v.detach() for k, v in terms.items()}
