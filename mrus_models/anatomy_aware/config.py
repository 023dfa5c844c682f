"""The anatomy-aware registration network's configuration: each field cites its source.

Sources:
    [P25] MR2US-Pro, ../shared/papers/mr2us_pro.txt: §II-C (the network, Fig. 5, and its
        loss, eq. 15-19), §III (data: 128 × 128 × 64 volumes, flips and rotations), §IV
        (metrics: DSC, IoU, ASD, harmonic energy eq. 20).
    [Q23] Qin & Li, "FSDiffReg: Feature-wise and Score-wise Diffusion-guided Unsupervised
        Deformable Image Registration for Cardiac Images", MICCAI 2023, and its released
        3D configuration: DDPM forward noise on the fixed image at a uniformly drawn step of
        a linear β schedule (2000 steps, β from 1e-6 to 1e-2), the noisy fixed image as a
        third input channel next to the moving and fixed images, the step through a time
        embedding, similarity and smoothness weighted 20 each against the diffusion loss's
        1, Adam 2e-4; at inference the step is 0 and the third channel is the fixed image.
        [P25] takes its cross-attention from [Q23] and leaves these values open.

Roles of the images: the MR (T1) image is the MOVING image and the US image the FIXED one
([P25] Fig. 5: x_1^MR moving, x_1^US fixed). :class:`~mrus_models.data.Crops3D` pairs
them the other way round; :class:`~mrus_models.anatomy_aware.task.USFixedPairs` swaps the
roles (see there).
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

#: Default item size per dimension: [P25] §III resamples every volume to 128 × 128 × 64;
#: 2D (tests, quick checks) uses 128² slices.
DEFAULT_SIZE = {2: (128, 128), 3: (128, 128, 64)}


@dataclass
class AnatomyAwareConfig(TrainConfig):
    """Anatomy-aware diffusion-based registration ([P25] §II-C).

    Loss ([P25] eq. 19): ``lam_sim · L_sim + lam_smooth · L_smooth + lam_diff · L_diffusion``
    with L_sim the soft Dice of the anatomy maps F_Ana (eq. 15-16), L_smooth =
    ``grad_l2`` of the displacement Φ (eq. 17) and L_diffusion the mean squared error of
    the score against the added noise (eq. 18). See :mod:`mrus_models.anatomy_aware.losses`.

    Attributes:
        ndim: 3 (volumes, the paper's) or 2 (slices, for tests).
        modality: the fixed image's simulated modality: "us" (pseudo-ultrasound, the
            paper's) or "t2".
        size: the item size; empty: :data:`DEFAULT_SIZE` (128 × 128 × 64 in 3D, [P25] §III);
            one value: the same on every axis. Divisible by ``2 ** len(encoder)``.
        data_seed: seeds the datasets' crops, warps and simulations (apart from ``seed``).
        train_items: length of the training split (None: the dataset's default).
        max_displacement: largest displacement of the known random warp, mm (the
            datasets' 6 mm; not in the paper, whose pairs carry unknown real motion).
        augment: flips and rotations of the training items ([P25] §III "random flipping
            and rotation").
        planes: the slice planes of the 2D data.
        encoder: widths of the shared encoder, one per level (not in the paper: Fig. 5
            shows no widths; VoxelMorph-2's 16, 32, 32, 32, as [Q23]'s field encoder).
        decoder: widths of each of the two decoders (VoxelMorph-2's 32, 32, 32, 32, 32, 16,
            16; the first ``len(encoder)`` upsample).
        residual: residual encoder blocks.
        norm: normalisation in the blocks (None, as VoxelMorph; the attention blocks
            group-normalise their inputs themselves).
        time_dim: width of the sinusoidal step embedding (its MLP is 4× wider, DDPM's);
            [Q23] embeds the diffusion step the same way.
        attention_levels: cross-attention from the diffusion decoder into the
            registration decoder after its first ``attention_levels`` blocks (the coarsest
            scales: at 128 × 128 × 64, 8 × 8 × 4 and 16 × 16 × 8 voxels for 2; attention is
            quadratic in the voxel count). [P25]: "multi-scale guidance"; [Q23] fuses at
            every decoder level. 0 turns it off (an ablation).
        heads: attention heads; must divide the widths of the attended blocks.
        transform: "svf": the registration head predicts a stationary velocity field
            integrated by :func:`mrus_kernels.integrate_velocity` (diffeomorphic; the
            default here, the paper does not say); "displacement": it predicts Φ directly
            ([Q23]'s field).
        steps_integration: scaling and squaring steps (7, Dalca et al. 2019).
        integration_memory: "store" or "recompute", the integration's backward memory.
        flow_init_std: initial weight std of the flow head (VoxelMorph's 1e-5).
        num_timesteps: DDPM steps of the forward noise on the fixed image ([Q23]: 2000).
        beta_start, beta_end: the linear β schedule's ends ([Q23]: 1e-6, 1e-2).
        lam_sim: weight of L_sim ([P25] eq. 19 names it, no value; [Q23]'s 20 for its
            similarity).
        lam_smooth: weight of L_smooth ([P25] no value; [Q23]'s 20). The smoothness is the
            mean over voxels (``grad_l2``), as [Q23]'s gradient loss.
        lam_diff: weight of L_diffusion ([P25] no value; [Q23]'s 1).
        dice_eps: ε of the soft Dice, 1e-6 ([P25] eq. 16).
        similarity_mask: "field_of_view" (default): F_Ana's means and the soft Dice's sums
            run over the voxels where the fixed image holds data (above its minimum: the
            simulated ultrasound's fan); "none": over the whole volume (eq. 15-16 as
            written). Not in the paper, whose US volumes are cropped around the prostate:
            the simulated US is zero outside its fan, where F_Ana is near 1 and the loss
            would pull the T1's dark regions (background, CSF) into the empty corners.
        ana_temperature: F_Ana(x) = sigmoid(−(x − mean x) / temperature); 1 is eq. 15 as
            written (not in the paper: a knob for images whose range is not about [-1, 1]).
        translate_checkpoint: an ACMT checkpoint (``mrus train acmt``): when set, both
            images are translated into ACMT's intermediate modality before the network,
            in training, evaluation and prediction ([P25] §III: "ACMT + anatomy-aware",
            MR2US-Pro); empty: the raw images ("anatomy-aware without translation").
            3D only. The displacement always warps the original moving image.
        backend: the ``mrus_kernels`` backend of every operator ("torch", "cpu",
            "triton", "cuda", "auto"); None: ``MRUS_BACKEND`` or auto.
        lr: Adam learning rate ([Q23]: 2e-4; [P25] no value).
    """

    ndim: int = arch_field(3)
    modality: str = "us"
    size: tuple[int, ...] = ()
    data_seed: int = 0
    train_items: int | None = None
    max_displacement: float = 6.0
    augment: bool = True
    planes: tuple[str, ...] = ("axial", "coronal", "sagittal")
    encoder: tuple[int, ...] = arch_field((16, 32, 32, 32))
    decoder: tuple[int, ...] = arch_field((32, 32, 32, 32, 32, 16, 16))
    residual: bool = arch_field(True)
    norm: Literal["instance", "group", "batch"] | None = arch_field(None)
    time_dim: int = arch_field(32)
    attention_levels: int = arch_field(2)
    heads: int = arch_field(4)
    transform: Literal["svf", "displacement"] = "svf"
    steps_integration: int = 7
    integration_memory: Literal["store", "recompute"] = "store"
    flow_init_std: float = 1e-5
    num_timesteps: int = 2000
    beta_start: float = 1e-6
    beta_end: float = 1e-2
    lam_sim: float = 20.0
    lam_smooth: float = 20.0
    lam_diff: float = 1.0
    dice_eps: float = 1e-6
    similarity_mask: Literal["field_of_view", "none"] = "field_of_view"
    ana_temperature: float = 1.0
    translate_checkpoint: str = ""
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] | None = None
    lr: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim: expected 2 or 3, got {self.ndim}")
        if self.modality not in ("us", "t2"):
            raise ValueError(f"modality: expected 'us' or 't2', got {self.modality!r}")
        check_unet_size(self, DEFAULT_SIZE[self.ndim])
        if self.time_dim < 2:
            raise ValueError(f"time_dim: expected an integer >= 2, got {self.time_dim}")
        levels = len(self.encoder)
        if not 0 <= self.attention_levels <= levels:
            raise ValueError(f"attention_levels: expected an integer in [0, len(encoder) = "
                             f"{levels}], got {self.attention_levels}")
        if self.heads < 1 or any(w % self.heads for w in self.decoder[:self.attention_levels]):
            raise ValueError(f"heads: expected a positive divisor of the attended decoder "
                             f"widths {self.decoder[:self.attention_levels]}, got {self.heads}")
        if self.steps_integration < 0:
            raise ValueError(f"steps_integration: expected an integer >= 0, got "
                             f"{self.steps_integration}")
        if not self.flow_init_std >= 0:
            raise ValueError(f"flow_init_std: expected a number >= 0, got {self.flow_init_std}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive integer, got "
                             f"{self.num_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, "
                             f"got {self.beta_start} and {self.beta_end}")
        for name in ("lam_sim", "lam_smooth", "lam_diff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not self.dice_eps > 0:
            raise ValueError(f"dice_eps: expected a positive number, got {self.dice_eps}")
        if not self.ana_temperature > 0:
            raise ValueError(f"ana_temperature: expected a positive number, got "
                             f"{self.ana_temperature}")
        if self.translate_checkpoint and self.ndim != 3:
            raise ValueError(f"translate_checkpoint: ACMT translates volumes, so it needs "
                             f"ndim=3, got ndim={self.ndim}")
        check_pair_data(self)

    @property
    def image_size(self) -> tuple[int, ...]:
        """The item size, ``size`` with the defaults filled in: one value per axis."""
        return fill_size(self.size, DEFAULT_SIZE[self.ndim])
