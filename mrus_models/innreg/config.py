"""INNReg's training configuration: the paper's defaults, each field citing its source.

Sources:
    [G24] Guo, "Unsupervised Multi-modal Medical Image Registration via Invertible
        Translation" (INNReg), ../shared/papers/innreg.txt; section numbers and equations
        refer to it.
    [code] The authors' released code (github.com/MeggieGuo/INNReg,
        models/registration_model.py, util/losses.py), for what the paper leaves open.

Roles of the images: the datasets of :mod:`mrus_models.data` pair a T1 slice (``fixed``)
with a simulated second modality warped by a known warp (``moving``), and know the
displacement that maps the moving image back. INNReg's source ``x`` is the image that is
warped, so here ``x`` = ``moving`` (T2-like, or pseudo-ultrasound) and the target ``y`` =
``fixed`` (T1): the translation T maps the moving modality to T1 and φ maps ``x`` onto
``y`` (``x∘φ ≈ y``), which the known warp scores. ([G24] warps T1 onto T2; the direction
of the pair does not change the method.)
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

#: [G24] §4.1: "All images used in the experiments are resized as 192 × 192".
DEFAULT_SIZE = (192, 192)

#: The released code's registration U-Net widths (VxmDense ``nb_features``).
INNREG_ENCODER = (16, 32, 32, 64, 64, 64)
INNREG_DECODER = (64, 64, 64, 32, 32, 32, 16)

#: [G24] §4.1: 200 epochs; with batch 3 over the 222 training slices of the default
#: ``SlicePairs`` split (192², three planes) an epoch is 74 steps.
PAPER_STEPS = 200 * 74


@dataclass
class InnRegConfig(TrainConfig):
    """INNReg: invertible translation T (moving modality → T1) + registration R.

    Loss ([G24] eq. 14): ``λα·L_recon + λβ·L_barrier + λγ·L_INN + λδ·L_smooth`` with
    ``L_recon = ‖T(x)∘φ − y‖₁`` (eq. 9), ``L_barrier`` the barrier NMI loss on
    ``(y, x∘φ)`` (eq. 10–11, :class:`mrus_kernels.NMILoss` with ``barrier=b``),
    ``L_INN = ‖T⁻¹(T(x)) − x‖₁`` (eq. 12) and ``L_smooth = grad_l2(u)`` of the
    displacement u of φ (eq. 13). See :mod:`mrus_models.innreg.losses`.

    Attributes:
        modality: the moving image's modality: "t2" (``t2_like``, [G24]'s T1/T2 set) or
            "us" (``pseudo_ultrasound``, the harder set).
        size: the item size; empty: 192 × 192 ([G24] §4.1); one value: square. Every size
            must be divisible by ``2 ** len(encoder)``.
        data_seed: seeds the datasets' warps and slices (separate from ``seed``).
        train_items: length of the training split (None: the dataset's default, 222).
        max_displacement: largest displacement of the random B-spline warps, mm ([G24]
            §4.1 generates the misalignment with B-spline transformations, [8, 21], and
            states no amplitude; 6 mm as the other models).
        planes: the slice planes of the 2D datasets.
        inn_blocks: InvBlocks of the translation network, 8 ([G24] §4.1).
        inn_hidden: growth channels of the DenseBlocks' convolutions (32, the dense block
            of ESRGAN that [G24] §3.2 cites as [37]; the paper states no width).
        ddw_kernels: K, the kernels that DDWConv aggregates ([G24] eq. 8; ours: 4).
        ddw: the DDWConv local attention in the DenseBlocks ([G24] §3.2; off is Table 2's
            ablation without attention).
        encoder: registration U-Net encoder widths ([code]: 16, 32, 32, 64, 64, 64).
        decoder: decoder widths ([code]: 64, 64, 64, 32, 32, 32, 16).
        residual: residual encoder blocks ([G24] §4.1: "U-NET with residual connections in
            the encoder and output paths").
        output_residual: one residual block between the U-Net and the flow head (the
            residual output path of [G24] §4.1).
        steps_integration: scaling and squaring steps, 7 ([code]: ``int_steps=7``).
        bidirectional: the network also integrates ``−v`` to φ⁻¹ = exp(−v) and warps the
            target with it ([code]: ``VxmDense(bidir=True)``). As in [code] no loss term
            uses that output; :meth:`~mrus_models.innreg.task.InnRegTask.predict` returns
            it as ``inverse_ddf``.
        integration_memory: "store" or "recompute" for the integration's backward.
        flow_init_std: standard deviation of the flow head's initial weights (1e-5, the
            VoxelMorph initialiser the released VxmDense uses).
        lam_recon: λα = 1 ([G24] §4.1).
        lam_barrier: λβ = 1 ([G24] §4.1).
        barrier: b = 5 ([G24] §4.1).
        barrier_form: what the barrier acts on (:class:`mrus_kernels.NMILoss`'s ``form``):
            "released" (default, [code]: ``−log(b − (1 − MI))``) or "paper" ([G24]
            eq. 10–11: ``−log(b − (H(y) + H(x∘φ)) / MI)``).
        barrier_bins: Parzen bins of the barrier's MI, 19 ([code]: bin centres 0.05 …
            0.95).
        barrier_sigma: Gaussian Parzen width in bins, 0.5 ([code]: ``sigma_ratio=0.5``).
        lam_inn: λγ = 0.1 ([G24] §4.1).
        lam_smooth: λδ = 10 ([G24] §4.1).
        backend: the ``mrus_kernels`` backend of every operator the model and its losses
            call; None: ``MRUS_BACKEND`` or auto.
        steps: 200 epochs of 74 steps ([G24] §4.1, :data:`PAPER_STEPS`).
        batch_size: 3 ([G24] §4.1).
        lr: Adam learning rate 2e-4 ([G24] §4.1).
        betas: Adam (β1, β2) = (0.5, 0.999) ([G24] §4.1).
        scheduler: "linear" ([G24] §4.1: "linear learning rate decay after every 20
            epochs": read as a learning rate that falls linearly over the run, stepped
            every 20 epochs; the Trainer's "linear" is its per-step form, from ``lr`` at
            the first step to ``min_lr_ratio · lr`` = 0 at ``steps``).
    """

    modality: str = "t2"
    size: tuple[int, ...] = ()
    data_seed: int = 0
    train_items: int | None = None
    max_displacement: float = 6.0
    planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
    inn_blocks: int = arch_field(8)
    inn_hidden: int = arch_field(32)
    ddw_kernels: int = arch_field(4)
    ddw: bool = arch_field(True)
    encoder: tuple[int, ...] = arch_field(INNREG_ENCODER)
    decoder: tuple[int, ...] = arch_field(INNREG_DECODER)
    residual: bool = arch_field(True)
    output_residual: bool = arch_field(True)
    steps_integration: int = 7
    bidirectional: bool = True
    integration_memory: Literal["store", "recompute"] = "store"
    flow_init_std: float = 1e-5
    lam_recon: float = 1.0
    lam_barrier: float = 1.0
    barrier: float = 5.0
    barrier_form: Literal["released", "paper"] = "released"
    barrier_bins: int = 19
    barrier_sigma: float = 0.5
    lam_inn: float = 0.1
    lam_smooth: float = 10.0
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] | None = None
    steps: int = PAPER_STEPS
    batch_size: int = 3
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unet_size(self, DEFAULT_SIZE)
        for name in ("inn_blocks", "inn_hidden", "ddw_kernels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.steps_integration < 0:
            raise ValueError(f"steps_integration: expected an integer >= 0, got "
                             f"{self.steps_integration}")
        for name in ("flow_init_std", "lam_recon", "lam_barrier", "lam_inn", "lam_smooth"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not self.barrier > 0 or self.barrier == float("inf"):
            raise ValueError(f"barrier: expected a finite positive number, got {self.barrier}")
        if self.barrier_bins < 2:
            raise ValueError(f"barrier_bins: expected an integer >= 2, got {self.barrier_bins}")
        if not self.barrier_sigma > 0:
            raise ValueError(f"barrier_sigma: expected a positive number, got "
                             f"{self.barrier_sigma}")
        check_pair_data(self)

    @property
    def ndim(self) -> int:
        """2: INNReg registers slices (the translation network is 2D)."""
        return 2

    @property
    def image_size(self) -> tuple[int, int]:
        """The item size, ``size`` with the default filled in: (H, W)."""
        return fill_size(self.size, DEFAULT_SIZE)
