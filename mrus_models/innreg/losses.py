"""INNReg's training loss ([G24] eq. 9–14), its image terms on ``mrus_kernels`` operators.

``L = λα·L_recon + λβ·L_barrier + λγ·L_INN + λδ·L_smooth`` with, on the normalised images
of :class:`~mrus_models.innreg.model.InnReg`'s output (x the moving image, y the fixed):

- ``L_recon = mean |T(x)∘φ − y|`` (eq. 9; the warp is :func:`mrus_kernels.warp`);
- ``L_barrier``: :class:`mrus_kernels.NMILoss` with ``barrier=b`` on ``(y, x∘φ)``
  (eq. 10–11), Gaussian Parzen MI over [0, 1] with ``barrier_bins`` bins, form
  ``barrier_form``: "released" ``−log(b − (1 − MI))`` or "paper"
  ``−log(b − (H(y) + H(x∘φ)) / MI)``; both dissimilarities fall as the images align;
- ``L_INN = mean |T⁻¹(T(x)) − x|`` (eq. 12);
- ``L_smooth = grad_l2(u)`` (eq. 13, :func:`mrus_kernels.grad_l2`: the mean over pixels
  and axes of the squared forward differences of φ's displacement u, pixel units).

The L1 terms are means over pixels and items ([G24]'s ‖·‖₁ as the released code's
``torch.mean(|a − b|)``). Where the released code differs from the paper and we follow
the paper: it also adds ``‖T⁻¹(y) − x∘φ‖₁`` and the reverse INN loss ``‖T(T⁻¹(y)) − y‖₁``,
smooths the velocity rather than the displacement and warps fake_y by the velocity.
"""

from __future__ import annotations

import torch

from mrus_kernels import NMILoss, grad_l2

from .config import InnRegConfig


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over every pixel and item: a 0-d tensor."""
    return (a.float() - b.float()).abs().mean()


def barrier_loss(target: torch.Tensor, warped: torch.Tensor,
                 config: InnRegConfig) -> torch.Tensor:
    """The barrier NMI loss of eq. 11 on ``(y, x∘φ)``, averaged over the batch: 0-d.

    Args:
        target: Tensor [B, 1, H, W], y in [0, 1].
        warped: Tensor [B, 1, H, W], x∘φ in [0, 1].
        config: ``barrier`` (b), ``barrier_form``, ``barrier_bins``, ``barrier_sigma`` and
            ``backend``.
    """
    loss = NMILoss(barrier=config.barrier, form=config.barrier_form, bins=config.barrier_bins,
                   sigma=config.barrier_sigma, value_range=(0.0, 1.0), backend=config.backend)
    return loss(target.float(), warped.float())


def smoothness_loss(ddf: torch.Tensor, config: InnRegConfig) -> torch.Tensor:
    """``grad_l2`` of φ's displacement [B, 2, H, W] (eq. 13): a 0-d tensor."""
    return grad_l2(ddf.float(), backend=config.backend)


def innreg_loss(out: dict[str, torch.Tensor],
                config: InnRegConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch (eq. 14).

    Args:
        out: :class:`~mrus_models.innreg.model.InnReg`'s output with ``translate=True``.
        config: the weights (``lam_recon``, ``lam_barrier``, ``lam_inn``, ``lam_smooth``)
            and the barrier's parameters.

    Returns:
        (loss, logs): a 0-d tensor, and the detached unweighted terms ``recon``,
        ``barrier``, ``inn`` and ``smooth``.
    """
    terms = {
        "recon": l1(out["warped_translated"], out["target"]),
        "barrier": barrier_loss(out["target"], out["warped"], config),
        "inn": l1(out["reconstructed"], out["source"]),
        "smooth": smoothness_loss(out["ddf"], config),
    }
    weights = {"recon": config.lam_recon, "barrier": config.lam_barrier,
               "inn": config.lam_inn, "smooth": config.lam_smooth}
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {k: v.detach() for k, v in terms.items()}
