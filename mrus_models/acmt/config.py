"""ACMT's training configuration: the papers' defaults, each field citing its source.

Sources:
    [M25] Ma, Anantrasirichai, Bolomytis, Achim, "Modality Translation and Registration of
        MR and Ultrasound Images Using Diffusion Models" (ACMT), ../shared/papers/acmt.txt;
        section numbers and equations refer to it.
    [P25] MR2US-Pro, ../shared/papers/mr2us_pro.txt, §II-B (ACMT again, Algorithm 1).
    [K24] Kim, Kwon, Kim, Ye, "Unpaired image-to-image translation via neural Schrödinger
        bridge" (UNSB), ICLR 2024, and its released code (options ``--num_timesteps 5``,
        ``--tau 0.01``, ``--lambda_SB 0.1``, ``--lambda_NCE 1``, ``--lambda_GAN 1``, Adam
        2e-4 with β1 = 0.5, batch 1, images in [-1, 1]): [M25] builds its bridge on [K24]
        ([M25] §II-A, ref. [4]) and leaves these values open.

Roles of the images: the datasets of :mod:`mrus_models.data` pair a T1 crop (``fixed``,
here "MR") with a pseudo-ultrasound crop of the same anatomy under a known warp
(``moving``, here "US"). Both are translated into the one intermediate modality; the
downstream test registers translated MR to translated US, as [M25] Table II does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mrus_models.train.config import TrainConfig, arch_field, check_pair_data, fill_size

#: [M25] §III-1: "all volumes were standardized to a resolution of 128 × 128 × 64".
DEFAULT_SIZE = (128, 128, 64)


@dataclass
class ACMTConfig(TrainConfig):
    """ACMT: one Schrödinger-bridge translation network f_θ(x_t, t) → x_1 for MR and US.

    Loss ([M25] eq. 14): ``λ_texture·L_texture + λ_boundary·L_boundary + λ_SB·L_SB`` with
    the texture consistency loss (eq. 7, shallow features through a learnable 7×7×7
    convolution), the boundary preservation loss (eq. 8-10, deep features through a 3×3×3
    convolution and :func:`mrus_kernels.sobel_l1`) and the SB loss (eq. 11-13); no
    adversarial loss ([M25] §I removes PMT's). See :mod:`mrus_models.acmt.losses`.

    Attributes:
        modality: the "US" image's modality: "us" (``pseudo_ultrasound``, default) or "t2"
            (``t2_like``, an easier second modality for checks).
        size: the crop size (X, Y, Z); empty: 128 × 128 × 64 ([M25] §III-1); one value:
            the same on every axis. Every size must be divisible by the network's stride.
        data_seed: seeds the datasets' crops, warps and simulations (separate from
            ``seed``, so that changing the training seed keeps the held-out items).
        train_items: length of the training split (None: the dataset's default, 1024).
        max_displacement: largest displacement of the random warp between the MR and the
            US crop, mm (the datasets' 6 mm; the papers' pairs are clinically aligned
            volumes with residual deformation, amplitude not stated).
        augment: flips and rotations of the training crops ([M25] §III-1: "we applied
            data augmentation techniques such as flipping and rotation").
        widths: encoder widths of the 3D U-Net f_θ, one per level (not in the paper: its
            Fig. 1 shows a U-Net without widths; ours are VoxelMorph-sized so that the
            128 × 128 × 64 step fits a CPU test and a GPU comfortably).
        time_dim: width of the time embedding (not in the paper; [K24] embeds the time
            index with a sinusoidal embedding and an MLP).
        shallow_level: the feature map f^s of the texture loss: that encoder level's
            output ([M25] §II-D: "shallow layers ... texture").
        deep_level: the feature map f^d of the boundary loss (deep features, 32-64
            channels).
        feature_extractor: how the losses' features f^s, f^d of x̂_1 and x_0 are taken
            from the network (eq. 5-6): "frozen" (default): by its encoder with the
            step's weights detached, so that L_texture and L_boundary train θ through the
            translation x̂_1 only; "trained": with gradients into the encoder as well.
            [M25] does not say. With "trained" the encoder itself is the cheapest way to
            lower both losses (features that do not depend on the image match
            everywhere): in a 64 × 64 × 32 CPU run (widths 8, 16, 16, Adam 1e-3) the
            texture loss fell four-fold and the boundary loss ten-fold in 40 steps while
            x̂_1 stayed within 2e-3 (RMS) of x_t: nothing was translated.
        energy_widths: levels of the energy network E of the SB loss's entropy estimate
            ([K24]'s PatchGAN-like critic, narrower in 3D; see
            :class:`~mrus_models.acmt.losses.EnergyNet`).
        energy_time_dim: its time embedding width.
        num_timesteps: T, the pool {t_0 … t_T} has T + 1 times ([K24]: T = 5 with its
            harmonic schedule, see :func:`mrus_models.acmt.bridge.time_pool`; [M25] §II-C
            "a predefined time step pool" without values).
        sigma: σ of the Wiener reference measure, eq. 1-4 (``τ`` = 0.01 of [K24]'s code,
            its "entropy parameter").
        lam_texture: λ_texture, eq. 14 ([M25]: "carefully tuned", no value; 1, the weight
            [K24] gives its GAN term, the distribution-matching term that the texture
            loss replaces).
        lam_boundary: λ_boundary, eq. 14 (1, [K24]'s weight of its content-preservation
            PatchNCE term, the role the boundary loss takes).
        lam_sb: λ_SB, eq. 14 (0.1, [K24]'s ``lambda_SB``).
        eval_items: held-out crops that :meth:`~mrus_models.acmt.task.ACMTTask.evaluate`
            scores (None: all of the loader's); the registrations make items costly.
        fid_slices: 2D slices per crop for FID / KID, evenly spaced along the last axis
            (the papers score 2D frames; Inception sees each slice resized to 299²).
        kid_subset_size: KID subset size (at most the number of slices), [K24]'s and
            Bińkowski et al.'s 1000 capped by the slices available.
        kid_subsets: KID subsets (100, Bińkowski et al.'s default).
        register_levels: pyramid factors of the downstream registration
            (:func:`mrus_models.register`, MI, SVF). [M25] registers with FSDiffReg, a
            learned model; an optimisation-based MI registration scores the translations
            without training a second network.
        register_iterations: Adam iterations per level of the downstream registration.
        register_fan_mask: measure the registration's MI inside the ultrasound fan only
            (the voxels where the raw US volume is nonzero); outside it the US holds no
            anatomy, and MI over the whole crop pulls the fan's edge onto MR structures.
        register_smoothness: its ``grad_l2`` weight.
        backend: the ``mrus_kernels`` backend of every operator the model and its losses
            call ("torch", "cpu", "triton", "cuda", "auto"); None: ``MRUS_BACKEND`` or auto.
        steps: optimiser steps (not in the paper; 200 epochs of [K24]'s schedule over the
            1024 training crops would be 204,800 steps at batch 1: 20,000 here).
        batch_size: 2 MR-US pairs per step (training needs 2 or more): [M25] Algorithm 1 steps "for
            each MR-US image pair"; the entropy estimate of the SB loss contrasts a pair
            with an independent one, and [K24], at batch 1, loads a second image for that
            each step: two pairs per step here, each contrasted with the other.
        lr: Adam 2e-4 ([K24], CUT's default).
        betas: Adam (0.5, 0.999) ([K24]).
    """

    modality: Literal["us", "t2"] = "us"
    size: tuple[int, ...] = ()
    data_seed: int = 0
    train_items: int | None = None
    max_displacement: float = 6.0
    augment: bool = True
    widths: tuple[int, ...] = arch_field((32, 64, 64, 64))
    time_dim: int = arch_field(64)
    shallow_level: int = arch_field(0)
    deep_level: int = arch_field(3)
    feature_extractor: Literal["frozen", "trained"] = "frozen"
    energy_widths: tuple[int, ...] = arch_field((16, 32, 64))
    energy_time_dim: int = arch_field(32)
    num_timesteps: int = 5
    sigma: float = 0.01
    lam_texture: float = 1.0
    lam_boundary: float = 1.0
    lam_sb: float = 0.1
    eval_items: int | None = 4
    fid_slices: int = 16
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    register_levels: tuple[int, ...] = (4, 2, 1)
    register_iterations: tuple[int, ...] = (120, 60, 15)
    register_smoothness: float = 50.0
    register_fan_mask: bool = True
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] | None = None
    steps: int = 20000
    batch_size: int = 2
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.size) not in (0, 1, 3) or any(s < 1 for s in self.size):
            raise ValueError(f"size: expected 3 positive sizes (or one, or none for the "
                             f"default {DEFAULT_SIZE}), got {self.size}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths: expected one or more positive widths, got {self.widths}")
        if not self.energy_widths or any(w < 1 for w in self.energy_widths):
            raise ValueError(f"energy_widths: expected one or more positive widths, got "
                             f"{self.energy_widths}")
        for name in ("time_dim", "energy_time_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got "
                                 f"{getattr(self, name)}")
        levels = len(self.widths)
        for name in ("shallow_level", "deep_level"):
            value = getattr(self, name)
            if not 0 <= value < levels:
                raise ValueError(f"{name}: expected an encoder level in [0, {levels - 1}] "
                                 f"(len(widths) = {levels}), got {value}")
        if self.shallow_level >= self.deep_level:
            raise ValueError(f"shallow_level: expected a level below deep_level "
                             f"{self.deep_level}, got {self.shallow_level}")
        stride = self.stride
        if any(s % stride for s in self.image_size):
            raise ValueError(f"size: every size must be divisible by the network's stride "
                             f"2 ** len(widths) = {stride}, got {self.image_size}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive integer, got "
                             f"{self.num_timesteps}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma: expected a number >= 0, got {self.sigma}")
        for name in ("lam_texture", "lam_boundary", "lam_sb", "register_smoothness"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if self.eval_items is not None and self.eval_items < 1:
            raise ValueError(f"eval_items: expected a positive integer or None, got "
                             f"{self.eval_items}")
        for name, least in (("fid_slices", 1), ("kid_subset_size", 2), ("kid_subsets", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got "
                                 f"{getattr(self, name)}")
        if not self.register_levels or any(f < 1 for f in self.register_levels):
            raise ValueError(f"register_levels: expected positive factors, got "
                             f"{self.register_levels}")
        if len(self.register_iterations) not in (1, len(self.register_levels)) or any(
                i < 0 for i in self.register_iterations):
            raise ValueError(f"register_iterations: expected one count >= 0 or one per "
                             f"level ({len(self.register_levels)}), got "
                             f"{self.register_iterations}")
        check_pair_data(self)

    @property
    def ndim(self) -> int:
        """3: ACMT translates volumes."""
        return 3

    @property
    def stride(self) -> int:
        """The network's stride, ``2 ** len(widths)``."""
        return 2 ** len(self.widths)

    @property
    def image_size(self) -> tuple[int, int, int]:
        """The crop size, ``size`` with the default filled in: (X, Y, Z)."""
        return fill_size(self.size, DEFAULT_SIZE)
