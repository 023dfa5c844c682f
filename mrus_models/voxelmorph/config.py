"""VoxelMorph's training configuration: the papers' defaults, each field citing its source.

Sources:
    [B19] Balakrishnan, Zhao, Sabuncu, Guttag, Dalca, "VoxelMorph: A Learning Framework for
        Deformable Medical Image Registration", IEEE TMI 38(8), 2019.
    [D19] Dalca, Balakrishnan, Guttag, Sabuncu, "Unsupervised learning of probabilistic
        diffeomorphic registration for images and surfaces", Medical Image Analysis 57,
        2019 (the SVF variant: scaling and squaring of a stationary velocity field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mrus_models.train.config import (
    TrainConfig,
    arch_field,
    check_pair_data,
    check_unet_size,
    fill_size,
)

#: Default image size per dimension when ``size`` is left empty: 192² slices (INNReg's
#: protocol, ../shared/papers/innreg.txt) and 128×128×64 crops (ACMT's,
#: ../shared/papers/acmt.txt).
DEFAULT_SIZE = {2: (192, 192), 3: (128, 128, 64)}

#: Weight of the smoothness term per similarity (see :class:`VoxelMorphConfig.lam`).
DEFAULT_LAM = {"lncc": 1.0, "mi": 1.0}


@dataclass
class VoxelMorphConfig(TrainConfig):
    """VoxelMorph-diff: U-Net → velocity → ``integrate_velocity`` → ``warp``.

    Loss (per batch item, averaged over the batch):
    ``similarity(fixed, warped) + lam · grad_l2(field)`` with ``similarity`` = ``1 − LNCC``
    ("lncc", [B19]'s squared local cross-correlation, window 9) or ``−MI`` in nats ("mi",
    Parzen mutual information: [B19] registers same-modality MRI with MSE or CC; MI is the
    usual similarity when the intensities of the two modalities are not linearly related).

    Attributes:
        ndim: 2 (slice pairs) or 3 (volume crops).
        modality: the moving image's modality: "t2" (T1 vs ``t2_like``) or "us" (T1 vs
            ``pseudo_ultrasound``), passed to the dataset.
        size: the item size; empty: 192² (2D) or 128×128×64 (3D), see
            :data:`DEFAULT_SIZE`; one value: the same on every axis. Every size must be
            divisible by ``2 ** len(encoder)``.
        data_seed: seeds the datasets' warps and slices (separate from ``seed``, so that
            changing the training seed keeps the validation items).
        train_items: length of the training split (None: the dataset's default).
        data_warp: the random warp of the moving images, "bspline" or "svf"; None: the
            dataset's default (B-spline for 2D slices, INNReg's protocol; SVF for 3D).
        max_displacement: largest displacement of the random warps, mm.
        planes: the slice planes of the 2D datasets ("axial", "coronal", "sagittal").
        encoder: U-Net encoder widths, [B19] Fig. 3 (VoxelMorph-2): 16, 32, 32, 32.
        decoder: decoder widths, [B19] Fig. 3 (VoxelMorph-2): 32, 32, 32, 32, 32, 16, 16.
        residual: residual encoder blocks (mrus's U-Net) instead of [B19]'s single
            strided convolutions.
        norm: normalisation in the blocks; [B19] uses none.
        similarity: "mi" (default: T1 vs T2 / ultrasound is multi-modal) or "lncc".
        lam: weight of ``grad_l2``. None: :data:`DEFAULT_LAM` of the similarity. LNCC:
            λ = 1, the best Dice of [B19]'s λ sweep for cross-correlation. MI: λ = 1 as
            well: on a middle T1 / T2-like slice of the default pair (2 mm, known
            warp), ``−MI`` (32 bins) drops by 0.126 nats from the identity to the true
            displacement and ``1 − LNCC`` by 0.125, with gradient norms with respect to
            the displacement within a factor 2 (MI 1.4e-2, LNCC 6.7e-3 at the identity),
            so the balance that [B19] tuned for CC carries over.
        regularise: "displacement" (``grad_l2`` of the integrated displacement u, [B19]
            L_smooth = Σ‖∇u‖²) or "velocity" (of the velocity v, as [D19]'s prior and the
            voxelmorph library's diffeomorphic training do).
        steps_integration: scaling and squaring steps, T = 7 ([D19]).
        integration_memory: "store" or "recompute" (less memory, more time) for
            :func:`mrus_kernels.integrate_velocity`'s backward.
        flow_init_std: standard deviation of the flow head's initial weights, 1e-5
            ([B19]'s flow convolution initialiser).
        mi_bins: Parzen MI bins (32, mrus's default for registration).
        mi_sigma: Gaussian Parzen window width in bins.
        lncc_window: LNCC window side, 9 voxels ([B19]: 9^n windows).
        backend: the ``mrus_kernels`` backend of every operator the model and its losses
            call ("torch", "cpu", "triton", "cuda", "auto"); None: ``MRUS_BACKEND`` or auto.
        lr: Adam learning rate 1e-4 ([B19]).
    """

    ndim: int = arch_field(2)
    modality: str = "t2"
    size: tuple[int, ...] = ()
    data_seed: int = 0
    train_items: int | None = None
    data_warp: Literal["bspline", "svf"] | None = None
    max_displacement: float = 6.0
    planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
    encoder: tuple[int, ...] = arch_field((16, 32, 32, 32))
    decoder: tuple[int, ...] = arch_field((32, 32, 32, 32, 32, 16, 16))
    residual: bool = arch_field(True)
    norm: Literal["instance", "group", "batch"] | None = arch_field(None)
    similarity: Literal["mi", "lncc"] = "mi"
    lam: float | None = None
    regularise: Literal["displacement", "velocity"] = "displacement"
    steps_integration: int = 7
    integration_memory: Literal["store", "recompute"] = "store"
    flow_init_std: float = 1e-5
    mi_bins: int = 32
    mi_sigma: float = 0.5
    lncc_window: int = 9
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] | None = None
    lr: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim: expected 2 or 3, got {self.ndim}")
        check_unet_size(self, DEFAULT_SIZE[self.ndim])
        if self.lam is not None and not self.lam >= 0:
            raise ValueError(f"lam: expected a number >= 0 or None, got {self.lam}")
        if self.steps_integration < 0:
            raise ValueError(f"steps_integration: expected an integer >= 0, got "
                             f"{self.steps_integration}")
        if not self.flow_init_std >= 0:
            raise ValueError(f"flow_init_std: expected a number >= 0, got {self.flow_init_std}")
        if self.mi_bins < 2:
            raise ValueError(f"mi_bins: expected an integer >= 2, got {self.mi_bins}")
        if not self.mi_sigma > 0:
            raise ValueError(f"mi_sigma: expected a positive number, got {self.mi_sigma}")
        if self.lncc_window < 1 or self.lncc_window % 2 == 0:
            raise ValueError(
                f"lncc_window: expected an odd positive integer, got {self.lncc_window}")
        check_pair_data(self)

    @property
    def image_size(self) -> tuple[int, ...]:
        """The item size, ``size`` with the defaults filled in: one value per axis."""
        return fill_size(self.size, DEFAULT_SIZE[self.ndim])

    @property
    def smoothness_weight(self) -> float:
        """``lam``, or the similarity's default when it is None."""
        return DEFAULT_LAM[self.similarity] if self.lam is None else float(self.lam)
