"""One training step of a registration network, end to end: mrus ops against plain
PyTorch, eager and compiled.

Two networks, each a *workload* (:class:`Workload`: its model, config, optimiser and the
two ways of computing its loss); one step is forward, backward and ``optimizer.step()``.

- ``voxelmorph``: VoxelMorph-diff (:class:`mrus_models.voxelmorph.model.VoxelMorph`: the
  default U-Net, a velocity, scaling and squaring in 7 steps, a warp), the loss
  ``similarity + λ grad_l2(u)`` (:func:`mrus_models.voxelmorph.losses.voxelmorph_loss`,
  λ = 1, similarity LNCC or MI), Adam.
- ``innreg``: INNReg (:class:`mrus_models.innreg.model.InnReg`: the invertible translation
  network T and its inverse, the residual U-Net, a velocity integrated in 7 steps, both
  directions, warps), all four losses of
  :func:`mrus_models.innreg.losses.innreg_loss` (L1 reconstruction, the barrier NMI loss
  in its default "released" form with 19 bins, the INN cross-translation L1, grad_l2) with
  the paper's weights, Adam with the paper's lr 2e-4 and betas (0.5, 0.999).
- ``plasticine-deformation``: Plasticine's deformation module f_θ2
  (:class:`mrus_models.plasticine.deformation.DeformationNet`: the stems of x and (y, ê),
  the alignment block, the VoxelMorph U-Net at four times VoxelMorph's widths, the two
  velocity heads, scaling and squaring of v and v⁻¹, both warps) and L_DF
  (:func:`mrus_models.plasticine.losses.deformation_loss`: NMI both directions, Parzen, 32
  bins; grad_l2 of both velocities; the feature alignment), Adam at the paper's 2e-4. ê is
  a fixed N(0, I) field (the noise ε̂ of a trained ε_θ1 estimates).
- ``plasticine-diffusion``: one step of Plasticine's ε_θ1
  (:class:`mrus_models.plasticine.diffusion.IntensityUNet`, Palette's U-Net: 64 channels,
  (1, 2, 4, 8), 2 residual blocks, self-attention in the middle) on a fixed noise level and
  noise, L_IN = mean |ε − ε̂|, Adam at the paper's 1e-4. It calls no registration operator:
  its ``mrus`` and ``torch`` rows are one computation (the pair shows the timing noise),
  and ``compiled`` is the comparison that tells.
- ``acmt-deep32`` / ``acmt-deep64``: one ACMT step (:mod:`mrus_models.acmt`: the diffusion
  process to x_{t_i} at i = 2 in evaluation mode without gradients, the network's pass,
  the features f^s / f^d of x̂_1 and x_0, texture, boundary and SB losses and the energy
  network's own loss, Adam at UNSB's 2e-4) with 32- or 64-channel deep features; the
  ``torch`` row computes the boundary loss's Sobel magnitude with ``F.conv3d`` and the L1
  by hand (:func:`plain_sobel_l1`) where ``mrus`` calls ``sobel_l1``. Two MR-US pairs
  (2×1×128×128×64 per modality) on the GPU, 2×1×32×32×16 on the CPU (timed rows skip
  under ``--benchmark-disable``; :func:`test_acmt_rows_agree_with_plain` checks the rows
  on a small network).
- ``anatomy_aware-svf``: one step of MR2US-Pro's anatomy-aware registration
  (:mod:`mrus_models.anatomy_aware`: the shared encoder over the moving, fixed and noisy
  fixed images at one seeded diffusion step, both decoders, the cross-attention, the
  velocity integrated in 7 steps, the warp, eq. 19's soft Dice of F_Ana, ``grad_l2`` and
  diffusion loss), Adam at FSDiffReg's 2e-4; the ``torch`` row integrates, warps and
  smooths in plain PyTorch (:func:`plain_integrate`, :func:`plain_warp`,
  ``reference.grad_l2``). 1×1×128×128×64 on the GPU (MR2US-Pro §III's size), 1×1×32×32×16
  on the CPU (timed rows skip under ``--benchmark-disable``;
  :func:`test_anatomy_aware_rows_agree_with_plain` checks the rows on a small network,
  SVF and displacement).

Rows:

- ``mrus``: the model and loss as shipped, every registration operator fused
  (``integrate_velocity``, ``warp``, ``lncc`` / ``mutual_information`` / ``NMILoss``,
  ``grad_l2``);
- ``torch``: the same network, weights, data and loss with what users write in plain
  PyTorch (the baseline): the VoxelMorph spatial transformer (``F.grid_sample`` on a
  normalised grid), a Python loop of 7 compositions, dense Parzen MI (``[B, N, K]`` weight
  tensors and an einsum, :func:`mrus_kernels.reference.joint_histogram`), LNCC from
  float32 box-filter convolutions (:func:`plain_lncc`, the voxelmorph library's NCC with the
  window normalised by its in-bounds voxel count so that it equals mrus's definition) and
  forward-difference smoothness (:func:`mrus_kernels.reference.grad_l2`);
- ``compiled``: ``torch.compile`` of the ``torch`` row's forward and loss;
- ``mrus_compiled``: ``torch.compile`` of the ``mrus`` row's forward and loss (the fused
  operators are custom ops, opaque to inductor and without graph breaks; inductor fuses the
  network's pointwise work around the convolutions as it does for ``compiled``), so that
  ``mrus_compiled`` against ``compiled`` isolates what the fused operators bring under
  the same compiler.

Before timing, each row's loss and gradients are checked against the ``torch`` row on the
same weights (so ``pytest benchmarks --benchmark-disable`` is a correctness run of all
four). Each row reports the median step time and the peak memory the step adds (CUDA: the
allocator's peak; CPU: the process's peak resident set, see
:func:`benchmarks.conftest.peak_extra_memory`); the summary table gives the speed-up over
``torch`` and, in ``vs 2nd``, over ``compiled``.

Sizes: plasticine 3×1×256×256 on the GPU (the paper's batch and size, [Z25] §III-C) and
3×1×64×64 on the CPU; as for innreg, its timed CPU rows skip under
``--benchmark-disable`` and :func:`test_plasticine_rows_agree_with_plain` checks the rows on
small networks. Both plasticine workloads run with dropout off and without ε_θ1's zero
initialisation (:data:`PLASTICINE_BENCH`). voxelmorph CPU 1×1×64³ and 2×1×96×96×64; GPU
(marked ``cuda``) 1×1×160×192×224,
and :func:`test_train_step_largest_batch`, which finds the largest batch of 160×192×224
volumes each row trains without running out of memory (on an 80 GB card; on a larger one
the search stops at 80 GB of allocations). innreg: the paper's 3×1×192×192 on the CPU and
the GPU. An INNReg step at that size takes about a minute on a 2-core CPU (the
translation network's convolutions), so under ``--benchmark-disable`` its CPU rows are
checked by :func:`test_innreg_rows_agree_with_plain` on a small network and size instead,
and the timed rows skip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrus_kernels import NMILoss, reference
from mrus_models.acmt.bridge import diffuse, time_pool
from mrus_models.acmt.config import ACMTConfig
from mrus_models.acmt.losses import energy_loss, sb_loss, texture_loss
from mrus_models.acmt.model import acmt_terms, encode_features
from mrus_models.acmt.model import normalise_intensity as acmt_normalise
from mrus_models.acmt.task import ACMTTask
from mrus_models.anatomy_aware.config import AnatomyAwareConfig
from mrus_models.anatomy_aware.losses import anatomy_aware_loss
from mrus_models.anatomy_aware.losses import diffusion_loss as anatomy_diffusion
from mrus_models.anatomy_aware.losses import similarity_loss as anatomy_similarity
from mrus_models.anatomy_aware.task import AnatomyAwareTask
from mrus_models.innreg.config import InnRegConfig
from mrus_models.innreg.losses import innreg_loss
from mrus_models.innreg.task import InnRegTask
from mrus_models.plasticine.config import PlasticineConfig
from mrus_models.plasticine.diffusion import NoiseSchedule, add_noise, intensity_loss
from mrus_models.plasticine.losses import VALUE_RANGE, deformation_loss
from mrus_models.plasticine.model import to_model_range
from mrus_models.plasticine.structure import structure_map
from mrus_models.plasticine.task import PlasticineTask
from mrus_models.voxelmorph.config import VoxelMorphConfig
from mrus_models.voxelmorph.losses import voxelmorph_loss
from mrus_models.voxelmorph.model import VoxelMorph, normalise_intensity

from .conftest import assert_close_rel, run_benchmark, shape_id

IMPLS = ("mrus", "mrus_compiled", "torch", "compiled")
SIMILARITIES = ("lncc", "mi")
CPU_SHAPES = [(1, 1, 64, 64, 64), (2, 1, 96, 96, 64)]
GPU_SHAPES = [(1, 1, 160, 192, 224)]
#: INNReg: the paper's batch of 3 slices of 192×192 ([G24] §4.1), on either device.
INNREG_SHAPES = [(3, 1, 192, 192)]
#: The small INNReg of the correctness run (:func:`test_innreg_rows_agree_with_plain`):
#: every part of the network, a fraction of its width and depth.
INNREG_SMALL = {"inn_blocks": 1, "inn_hidden": 4, "ddw_kernels": 2, "encoder": (4, 8),
                "decoder": (8, 8, 4)}
INNREG_SMALL_SHAPE = (2, 1, 16, 16)
#: Plasticine: the paper's batch of 3 slices of 256×256 ([Z25] §III-C) on the GPU; a
#: quarter of the size on the CPU (a full-width step there takes seconds).
PLASTICINE_GPU_SHAPES = [(3, 1, 256, 256)]
PLASTICINE_CPU_SHAPES = [(3, 1, 64, 64)]
#: Config changes of every plasticine row. Dropout off: each row would draw its own masks
#: (inductor its own random stream), so the rows' losses could not be compared; a mask is
#: one pointwise op of the step. ε_θ1 without its zero initialisation: a zero-initialised
#: network passes its first gradients to the output convolution only, which would leave the
#: rows' gradient comparison almost nothing to compare; the step's work is the same.
PLASTICINE_BENCH = {"diffusion_dropout": 0.0, "diffusion_zero_init": False}
#: The small Plasticine of the correctness run (:func:`test_plasticine_rows_agree_with_plain`).
PLASTICINE_SMALL = {"width": 4, "encoder": (4, 8), "decoder": (8, 8, 4), "align_layers": 2,
                    "diffusion_width": 8, "diffusion_mults": (1, 2), "diffusion_res_blocks": 1,
                    "diffusion_attention": (2,)}
PLASTICINE_SMALL_SHAPE = (2, 1, 16, 16)
#: ACMT: [M25]'s 128×128×64 volumes (§III-1) on the GPU, a quarter of each side on the CPU.
#: Two MR-US pairs per step (the smallest batch the SB loss's entropy estimate takes: it
#: contrasts each pair with another, :class:`~mrus_models.acmt.config.ACMTConfig`), so the
#: network sees 4 volumes; the shape is that of each modality's batch.
ACMT_GPU_SHAPES = [(2, 1, 128, 128, 64)]
ACMT_CPU_SHAPES = [(2, 1, 32, 32, 16)]
#: Deep features f^d of 32 and of 64 channels (the boundary loss's sobel_l1 input): the
#: default network (widths 32, 64, 64, 64, f^d its last level) and one at half its widths.
ACMT_VARIANTS = {"deep32": {"widths": (16, 32, 32, 32)}, "deep64": {}}
#: The benchmarked step's pool index: i = 2 of T = 5, two network passes of the diffusion
#: process before the trained pass (UNSB draws i uniformly in 0…4: 2 on average).
ACMT_INDEX = 2
#: Dynamo reads the ``.grad`` of the non-leaf tensors it wraps (x̂_1 entering the frozen
#: feature extractor, :func:`mrus_models.acmt.model.encode_features`) and torch warns about
#: its own access; with ``filterwarnings = error`` that would abort the compiled rows.
ACMT_DYNAMO_WARNING = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
#: The small ACMT of the correctness run (:func:`test_acmt_rows_agree_with_plain`).
ACMT_SMALL = {"widths": (4, 8), "time_dim": 8, "deep_level": 1, "energy_widths": (4,),
              "energy_time_dim": 8}
ACMT_SMALL_SHAPE = (2, 1, 16, 16, 8)
#: anatomy_aware: MR2US-Pro's size (§III) on the GPU, one pair as the paper's batch is not
#: given; 32×32×16 on the CPU; a small network for the correctness run.
ANATOMY_GPU_SHAPES = [(1, 1, 128, 128, 64)]
ANATOMY_CPU_SHAPES = [(1, 1, 32, 32, 16)]
ANATOMY_SMALL = {"encoder": (8, 8), "decoder": (8, 8, 8), "time_dim": 8, "heads": 2}
ANATOMY_SMALL_SHAPE = (2, 1, 16, 16, 8)
ROUNDS = {"cpu": (3, 1), "cuda": (10, 3)}  # (timed, warm-up) steps
#: Loss and gradient agreement of the rows with the ``torch`` row (float32, different
#: summation orders; MI and LNCC are ratios of sums over every voxel).
RTOL = 2e-3
GPU_MEMORY_CAP = 80 * 2**30  # the 80 GB card
#: The flow head's initial weight spread in the benchmark (the models' default is 1e-5):
#: steps are timed, and rows compared, where the displacement is a fraction of a voxel as
#: during training. At 1e-5 the sample points sit within ~1e-5 voxel of the grid, where
#: ``grid_sample``'s round trip through normalised coordinates (float32, ~1e-7·n voxels)
#: moves points across cell boundaries and changes the one-sided interpolation gradient:
#: the ``torch`` row's gradients would then differ from any exact warp's.
FLOW_INIT_STD = 0.03


# ---------------------------------------------------------------------------- plain PyTorch


def plain_warp(image: torch.Tensor, ddf: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """The VoxelMorph spatial transformer: a normalised grid and ``F.grid_sample``."""
    return reference.warp_grid_sample(image, ddf, "linear", padding)


def plain_integrate(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring as a loop: ``u = v / 2**steps``, then ``u = u + u ∘ (x + u)``."""
    u = v / 2**steps
    for _ in range(steps):
        u = u + plain_warp(u, u, "border")
    return u


def _box(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over the in-bounds voxels of a ``window``-wide box around each voxel (zero
    padding), one separable convolution per axis."""
    ndim = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    ones = torch.ones(window, dtype=x.dtype, device=x.device)
    for axis in range(ndim):
        shape = [1, 1] + [window if a == axis else 1 for a in range(ndim)]
        pad = [window // 2 if a == axis else 0 for a in range(ndim)]
        x = conv(x, ones.reshape(shape), padding=pad)
    return x


def plain_lncc(fixed: torch.Tensor, moving: torch.Tensor, window: int = 9,
               eps: float = 1e-5) -> torch.Tensor:
    """LNCC [B] as users write it (float32 box filters of I, J, I², J², IJ), normalised by
    the in-bounds count as :func:`mrus_kernels.lncc`, whose definition it matches."""
    i, j = fixed, moving
    sums = _box(torch.cat([i, j, i * i, j * j, i * j], 0), window)
    si, sj, sii, sjj, sij = sums.split(i.shape[0], 0)
    n = _box(torch.ones_like(i[:1]), window)
    cross = sij - si * sj / n
    var_i = (sii - si * si / n).clamp_min(0)
    var_j = (sjj - sj * sj / n).clamp_min(0)
    cc = torch.minimum(cross * cross, var_i * var_j) / (var_i * var_j + eps)
    return cc.flatten(1).mean(1)


def plain_barrier(fixed: torch.Tensor, moving: torch.Tensor, barrier: float, form: str,
                  bins: int, sigma: float, value_range: tuple[float, float] | None = None,
                  eps: float = 1e-10) -> torch.Tensor:
    """INNReg's barrier loss as users write it: a dense Parzen joint histogram (``[B, N, K]``
    weights and an einsum), its entropies, and ``-log(b - d)`` averaged over the batch, with
    d = 1 - MI ("released") or (H_f + H_g) / MI ("paper"). No tangent past b: it equals
    :class:`mrus_kernels.NMILoss` where d < b - margin (checked by the rows' comparison)."""
    p = reference.joint_histogram(fixed, moving, bins, "gaussian", sigma, value_range)
    pc = p.clamp_min(eps)
    pa, pb = p.sum(2).clamp_min(eps), p.sum(1).clamp_min(eps)
    mi = (pc * (pc.log() - pa.log()[:, :, None] - pb.log()[:, None, :])).sum((1, 2))
    if form == "released":
        d = 1.0 - mi
    else:
        h = -(pa * pa.log()).sum(1) - (pb * pb.log()).sum(1)
        d = h / mi.clamp_min(eps)
    return -torch.log(barrier - d).mean()


# ---------------------------------------------------------------------------- voxelmorph


def voxelmorph_plain_loss(model: VoxelMorph, moving: torch.Tensor, fixed: torch.Tensor,
                          config: VoxelMorphConfig) -> torch.Tensor:
    """The ``torch`` row: :class:`VoxelMorph`'s forward and :func:`voxelmorph_loss` with
    plain-PyTorch operators in place of the fused ones."""
    x = torch.cat([normalise_intensity(moving), normalise_intensity(fixed)], dim=1)
    velocity = model.flow(model.unet(x)).float()
    ddf = plain_integrate(velocity, config.steps_integration)
    warped = plain_warp(moving.float(), ddf)
    if config.similarity == "lncc":
        sim = 1.0 - plain_lncc(fixed.float(), warped, config.lncc_window)
    else:
        sim = -reference.mutual_information(fixed.float(), warped, config.mi_bins,
                                            sigma=config.mi_sigma)
    smooth = reference.grad_l2(ddf)
    return sim.mean() + config.smoothness_weight * smooth


def voxelmorph_mrus_loss(model: VoxelMorph, moving: torch.Tensor, fixed: torch.Tensor,
                         config: VoxelMorphConfig) -> torch.Tensor:
    """The ``mrus`` row: the model and its loss as shipped."""
    return voxelmorph_loss(fixed, model(moving, fixed), config)[0]


def _voxelmorph_build(similarity: str, shape: tuple[int, ...],
                      **overrides: object) -> tuple[VoxelMorphConfig, nn.Module]:
    config = VoxelMorphConfig(ndim=len(shape) - 2, size=tuple(shape[2:]), similarity=similarity,
                              **overrides)
    return config, VoxelMorph(config.ndim, init_std=FLOW_INIT_STD)


# ---------------------------------------------------------------------------- innreg


def innreg_plain_forward(model: nn.Module, moving: torch.Tensor,
                         fixed: torch.Tensor) -> dict[str, torch.Tensor]:
    """:class:`~mrus_models.innreg.model.InnReg`'s forward (translation, registration, both
    directions) with plain-PyTorch integration and warps: the same outputs."""
    x, y = normalise_intensity(moving.float()), normalise_intensity(fixed.float())
    velocity = model.flow(model.output(model.unet(torch.cat([x, y], dim=1)))).float()
    ddf = plain_integrate(velocity, model.steps)
    fake_y = model.translate(x)
    both = plain_warp(torch.cat([x, fake_y], dim=1), ddf)
    out = {"source": x, "target": y, "velocity": velocity, "ddf": ddf, "warped": both[:, :1],
           "translated": fake_y, "warped_translated": both[:, 1:],
           "reconstructed": model.untranslate(fake_y)}
    if model.bidirectional:
        inverse = plain_integrate(-velocity, model.steps)
        out.update(inverse_ddf=inverse, warped_target=plain_warp(y, inverse))
    return out


def innreg_plain_loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                      config: InnRegConfig) -> torch.Tensor:
    """The ``torch`` row: :func:`innreg_plain_forward` and INNReg's four losses (eq. 14)
    with the dense Parzen barrier (:func:`plain_barrier`) and forward-difference
    smoothness."""
    out = innreg_plain_forward(model, moving, fixed)
    recon = (out["warped_translated"] - out["target"]).abs().mean()
    barrier = plain_barrier(out["target"], out["warped"], config.barrier, config.barrier_form,
                            config.barrier_bins, config.barrier_sigma, (0.0, 1.0))
    inn = (out["reconstructed"] - out["source"]).abs().mean()
    smooth = reference.grad_l2(out["ddf"])
    return (config.lam_recon * recon + config.lam_barrier * barrier + config.lam_inn * inn
            + config.lam_smooth * smooth)


def innreg_mrus_loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                     config: InnRegConfig) -> torch.Tensor:
    """The ``mrus`` row: the model and its loss as shipped."""
    return innreg_loss(model(moving, fixed), config)[0]


def _innreg_build(form: str, shape: tuple[int, ...],
                  **overrides: object) -> tuple[InnRegConfig, nn.Module]:
    config = InnRegConfig(size=tuple(shape[2:]), barrier_form=form, batch_size=shape[0],
                          flow_init_std=FLOW_INIT_STD, **overrides)
    return config, InnRegTask().build(config)


# ---------------------------------------------------------------------------- plasticine


def plasticine_prepare(moving: torch.Tensor, fixed: torch.Tensor, config: PlasticineConfig
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What Plasticine's step sees, made once: x (the T1-like ``fixed`` image) and, in a
    dict, y (``moving``) in the model's [-1, 1], y's structure map y_s, and one fixed draw of
    the noise level γ and the noise ε (ε also stands for ê, ε_θ1's estimate of it)."""
    x, y = to_model_range(fixed), to_model_range(moving)
    g = torch.Generator().manual_seed(1)
    schedule = NoiseSchedule.linear(config.train_timesteps, config.beta_start, config.beta_end)
    gamma = schedule.sample_gammas(y.shape[0], generator=g, device=y.device)
    eps = torch.randn(y.shape, generator=g).to(y.device)
    return x, {"target": y, "target_structure": structure_map(y, config.clusters).to(y.device),
               "gamma": gamma, "eps": eps}


def plasticine_plain_forward(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             cue: torch.Tensor) -> dict[str, torch.Tensor]:
    """:class:`~mrus_models.plasticine.deformation.DeformationNet`'s training forward with
    plain-PyTorch integration (both velocities) and warps (border padding): the same
    outputs."""
    f = net.features(x, y, cue)
    h = net.unet(net.act(f["x"] + f["target"]))
    v, v_inv = net.head(h).float(), net.head_inverse(h).float()
    ddf, ddf_inv = plain_integrate(v, net.steps), plain_integrate(v_inv, net.steps)
    return {"velocity": v, "velocity_inverse": v_inv, "ddf": ddf, "ddf_inverse": ddf_inv,
            "features_predicted": f["predicted"], "features_target": f["target"],
            "warped": plain_warp(x.float(), ddf, "border"),
            "warped_target": plain_warp(y.float(), ddf_inv, "border")}


def plasticine_deformation_plain_loss(net: nn.Module, x: torch.Tensor, data: dict,
                                      config: PlasticineConfig) -> torch.Tensor:
    """The ``torch`` row of f_θ2: :func:`plasticine_plain_forward` and L_DF (eq. 7) with
    dense Parzen NMI / MI (:mod:`mrus_kernels.reference`, ``[B, N, K]`` weights and an
    einsum) and forward-difference smoothness."""
    y = data["target"]
    out = plasticine_plain_forward(net, x, y, data["eps"])
    sim = reference.nmi if config.mi_form == "nmi" else reference.mutual_information
    kw = {"bins": config.mi_bins, "sigma": config.mi_sigma, "value_range": VALUE_RANGE}
    l_data = -(sim(y.float(), out["warped"], **kw).mean()
               + sim(x.float(), out["warped_target"], **kw).mean())
    smooth = reference.grad_l2(out["velocity"]) + reference.grad_l2(out["velocity_inverse"])
    align = (out["features_predicted"].float()
             - out["features_target"].detach().float()).square().mean()
    loss = l_data + config.lam_smooth * smooth + config.lam_align * align
    if config.lam_inverse > 0:
        r = reference.compose(out["ddf"], out["ddf_inverse"])
        loss = loss + config.lam_inverse * r.square().sum(dim=1).mean()
    return loss


def plasticine_deformation_mrus_loss(net: nn.Module, x: torch.Tensor, data: dict,
                                     config: PlasticineConfig) -> torch.Tensor:
    """The ``mrus`` row of f_θ2: the module and L_DF as shipped."""
    y = data["target"]
    return deformation_loss(net(x, y, data["eps"]), x, y, config)[0]


def plasticine_diffusion_loss(net: nn.Module, x: torch.Tensor, data: dict,
                              config: PlasticineConfig) -> torch.Tensor:
    """ε_θ1's step on the fixed draw: ỹ = √γ y + √(1 − γ) ε, L_IN = mean |ε − ε_θ1(ỹ, γ,
    y_s)| (eq. A.5, eq. 1); both rows (no registration operator in it)."""
    noisy = add_noise(data["target"], data["gamma"], data["eps"])
    return intensity_loss(net(noisy, data["gamma"], data["target_structure"]), data["eps"])


def _plasticine_build(variant: str, shape: tuple[int, ...],
                      **overrides: object) -> tuple[PlasticineConfig, nn.Module]:
    config = PlasticineConfig(size=tuple(shape[2:]), batch_size=shape[0],
                              flow_init_std=FLOW_INIT_STD, **{**PLASTICINE_BENCH, **overrides})
    model = PlasticineTask().build(config)
    return config, model.deformation if variant == "deformation" else model.intensity


# ---------------------------------------------------------------------------- acmt


def plain_sobel_l1(f1: torch.Tensor, f0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The boundary loss's S-then-L1 as users write it: a 3D Sobel filter bank (three
    3×3×3 kernels, [-1, 0, 1] along the gradient's axis and [1, 2, 1] along the others) by
    ``F.conv3d`` per channel on the replicate-padded maps, the magnitude
    ``sqrt(Σ g² + eps)``, then the mean absolute difference."""
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=f1.dtype, device=f1.device)
    s = torch.tensor([1.0, 2.0, 1.0], dtype=f1.dtype, device=f1.device)
    kernels = []
    for axis in range(3):
        k = [s, s, s]
        k[axis] = d
        kernels.append(torch.einsum("i,j,k->ijk", *k))
    c = f1.shape[1]
    weight = torch.stack(kernels)[:, None].repeat(c, 1, 1, 1, 1)  # [3C, 1, 3, 3, 3]

    def magnitude(x: torch.Tensor) -> torch.Tensor:
        g = F.conv3d(F.pad(x, [1] * 6, mode="replicate"), weight, groups=c)
        return (g.unflatten(1, (c, 3)).square().sum(2) + eps).sqrt()

    return (magnitude(f1) - magnitude(f0)).abs().mean()


def acmt_prepare(moving: torch.Tensor, fixed: torch.Tensor, config: ACMTConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(US, MR) in ACMT's [-1, 1] (the step's normalisation, made once)."""
    return acmt_normalise(moving), acmt_normalise(fixed)


@torch.compiler.disable
def acmt_states(model: nn.Module, x0: torch.Tensor, config: ACMTConfig) -> torch.Tensor:
    """x_{t_i} at :data:`ACMT_INDEX` by the diffusion process (evaluation mode, no
    gradient), one seeded noise draw so that every row sees the same states. Left eager in
    the compiled rows: it switches the network's modes and has no backward."""
    gen = torch.Generator(device=x0.device).manual_seed(0)
    return diffuse(model.net, x0, ACMT_INDEX, config.sigma,
                   times=time_pool(config.num_timesteps), generator=gen)


def _acmt_time(config: ACMTConfig) -> float:
    return float(time_pool(config.num_timesteps)[ACMT_INDEX])


def acmt_mrus_loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                   config: ACMTConfig) -> torch.Tensor:
    """The ``mrus`` row: the diffusion process and eq. 14 as shipped
    (:func:`mrus_models.acmt.model.acmt_terms`, the boundary loss on ``sobel_l1``)."""
    x0 = torch.cat([fixed, moving])
    return acmt_terms(model, x0, acmt_states(model, x0, config), _acmt_time(config), config)[0]


def acmt_plain_loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                    config: ACMTConfig) -> torch.Tensor:
    """The ``torch`` row: the same step with the boundary loss's Sobel magnitude and L1
    written with ``F.conv3d`` (:func:`plain_sobel_l1`); the other terms are plain PyTorch
    in both rows."""
    x0 = torch.cat([fixed, moving])
    x_t = acmt_states(model, x0, config)
    t, b, net = _acmt_time(config), fixed.shape[0], model.net
    x1 = model(x_t, torch.full((2 * b,), t, device=x0.device))
    frozen = config.feature_extractor == "frozen"
    shallow1, deep1 = encode_features(net, x1, frozen)
    _, deep0 = encode_features(net, x0, frozen)
    texture = texture_loss(model.c7, shallow1[:b], shallow1[b:])
    e1, e0 = model.c3(deep1).float(), model.c3(deep0).float()
    boundary = 0.5 * (plain_sobel_l1(e1[:b], e0[:b]) + plain_sobel_l1(e1[b:], e0[b:]))
    sb = energy = 0.0
    for part in (slice(0, b), slice(b, 2 * b)):
        sb = sb + 0.5 * sb_loss(model.energy, x_t[part], x1[part], t, config.sigma)[0]
        energy = energy + 0.5 * energy_loss(model.energy, x_t[part], x1[part], t)
    return (config.lam_texture * texture + config.lam_boundary * boundary
            + config.lam_sb * sb + energy)


def _acmt_build(variant: str, shape: tuple[int, ...],
                **overrides: object) -> tuple[ACMTConfig, nn.Module]:
    config = ACMTConfig(size=tuple(shape[2:]), batch_size=shape[0],
                        **{**ACMT_VARIANTS[variant], **overrides})
    return config, ACMTTask().build(config)


@torch.compiler.disable
def anatomy_draw(fixed: torch.Tensor, config: AnatomyAwareConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's diffusion step t and noise N: one seeded draw, so every row sees the same
    (left eager in the compiled rows: a generator is no graph input)."""
    gen = torch.Generator(device=fixed.device).manual_seed(0)
    t = torch.randint(0, config.num_timesteps, (fixed.shape[0],), device=fixed.device,
                      generator=gen)
    return t, torch.randn(fixed.shape, device=fixed.device, generator=gen)


def anatomy_mrus_loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                      config: AnatomyAwareConfig) -> torch.Tensor:
    """The ``mrus`` row: the network as shipped (``integrate_velocity``, ``warp``) and eq. 19
    (:func:`mrus_models.anatomy_aware.losses.anatomy_aware_loss`, ``grad_l2``)."""
    t, noise = anatomy_draw(fixed, config)
    return anatomy_aware_loss(model(moving, fixed, t, noise), config)[0]


def anatomy_plain_loss(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                       config: AnatomyAwareConfig) -> torch.Tensor:
    """The ``torch`` row: the same network pass (:meth:`AnatomyAwareNet.fields`), the
    velocity integrated by :func:`plain_integrate`, the warp by :func:`plain_warp` (border
    padding, as the shipped loss) and the smoothness by the forward differences of
    :func:`mrus_kernels.reference.grad_l2`; the soft Dice and the diffusion loss are plain
    PyTorch in both rows."""
    t, noise = anatomy_draw(fixed, config)
    out = model.fields(moving, fixed, t, noise)
    v = out["velocity"]
    ddf = plain_integrate(v, config.steps_integration) if config.transform == "svf" else v
    warped = plain_warp(out["moving_input"], ddf, "border")
    mask = out["mask"] if config.similarity_mask == "field_of_view" else None
    sim = anatomy_similarity(out["fixed_input"], warped, config, mask).mean()
    diff = anatomy_diffusion(out["score"], out["noise"]).mean()
    return (config.lam_sim * sim + config.lam_smooth * reference.grad_l2(ddf)
            + config.lam_diff * diff)


def _anatomy_build(variant: str, shape: tuple[int, ...],
                   **overrides: object) -> tuple[AnatomyAwareConfig, nn.Module]:
    config = AnatomyAwareConfig(ndim=len(shape) - 2, size=tuple(shape[2:]),
                                batch_size=shape[0], transform=variant,
                                flow_init_std=FLOW_INIT_STD, **overrides)
    return config, AnatomyAwareTask().build(config)


# ---------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class Workload:
    """One network of the benchmark and its four ways of computing a training step.

    Attributes:
        model: the network's name (``extra_info["model"]``).
        variant: what distinguishes its rows (voxelmorph: the similarity; innreg: the
            barrier form).
        build: ``(variant, shape, **config overrides) -> (config, model)``.
        mrus_loss, plain_loss: ``(model, moving, fixed, config) -> loss`` of the ``mrus``
            and the ``torch`` rows.
        optimizer: ``(parameters, config) -> optimiser``.
        overrides: config fields changed from the model's defaults (a smaller network).
        cpu_compile_options: inductor options of the compiled rows on the CPU.
        head: the parameter whose gradient is compared on its own (where the operators'
            backward passes meet the network).
        prepare: ``(moving, fixed, config) -> (moving, fixed)``: what the losses take in
            place of :func:`make_data`'s pair, made once per row (None: the pair itself).
    """

    model: str
    variant: str
    build: Callable[..., tuple[object, nn.Module]]
    mrus_loss: Callable[..., torch.Tensor]
    plain_loss: Callable[..., torch.Tensor]
    optimizer: Callable[..., torch.optim.Optimizer]
    overrides: tuple[tuple[str, object], ...] = ()
    cpu_compile_options: tuple[tuple[str, object], ...] = ()
    head: str = "flow.conv.weight"
    prepare: Callable[..., tuple] | None = None

    @property
    def name(self) -> str:
        """voxelmorph rows are named by their similarity alone (their historical groups)."""
        return self.variant if self.model == "voxelmorph" else f"{self.model}-{self.variant}"


def voxelmorph_workload(similarity: str) -> Workload:
    """VoxelMorph-diff with ``similarity`` ("lncc" or "mi"), Adam at the config's lr."""
    return Workload("voxelmorph", similarity, _voxelmorph_build, voxelmorph_mrus_loss,
                    voxelmorph_plain_loss, lambda params, c: torch.optim.Adam(params, lr=c.lr))


def innreg_workload(form: str = "released", **overrides: object) -> Workload:
    """INNReg with the barrier ``form`` and InnRegConfig ``overrides``; Adam with the
    config's lr and betas (the paper's 2e-4 and (0.5, 0.999)).

    On the CPU its compiled rows keep the eager (NCHW) layouts: inductor's layout
    optimisation makes the convolutions channels-last, and torch 2.13's CPU
    ``convolution_backward`` of a channels-last input through a 1×1 stride-2 convolution
    (the residual encoder's shortcut) crashes the process with a segmentation fault at
    3×2×192×192 when it computes the weight gradient.
    """
    return Workload("innreg", form, _innreg_build, innreg_mrus_loss, innreg_plain_loss,
                    lambda params, c: torch.optim.Adam(params, lr=c.lr, betas=c.betas),
                    tuple(overrides.items()), (("layout_optimization", False),))


def plasticine_workload(variant: str, **overrides: object) -> Workload:
    """Plasticine's f_θ2 (``variant`` "deformation", Adam at ``lr``, 2e-4) or ε_θ1
    ("diffusion", Adam at ``lr_intensity``, 1e-4), with PlasticineConfig ``overrides``."""
    if variant == "deformation":
        return Workload("plasticine", variant, _plasticine_build,
                        plasticine_deformation_mrus_loss, plasticine_deformation_plain_loss,
                        lambda params, c: torch.optim.Adam(params, lr=c.lr),
                        tuple(overrides.items()), head="head.weight",
                        prepare=plasticine_prepare)
    return Workload("plasticine", variant, _plasticine_build, plasticine_diffusion_loss,
                    plasticine_diffusion_loss,
                    lambda params, c: torch.optim.Adam(params, lr=c.lr_intensity),
                    tuple(overrides.items()), head="out.2.weight", prepare=plasticine_prepare)


def acmt_workload(variant: str, **overrides: object) -> Workload:
    """ACMT's step ([M25] Algorithm 1: the diffusion process to x_{t_i}, the network's
    pass, texture, boundary and SB losses and E's own loss) with the deep features of
    ``variant`` ("deep32" or "deep64", :data:`ACMT_VARIANTS`) and ACMTConfig ``overrides``;
    Adam with the config's lr and betas (UNSB's 2e-4 and (0.5, 0.999))."""
    return Workload("acmt", variant, _acmt_build, acmt_mrus_loss, acmt_plain_loss,
                    lambda params, c: torch.optim.Adam(params, lr=c.lr, betas=c.betas),
                    tuple(overrides.items()), head="c3.weight", prepare=acmt_prepare)


def anatomy_workload(variant: str = "svf", **overrides: object) -> Workload:
    """The anatomy-aware registration step (MR2US-Pro §II-C: the shared encoder over the
    moving, fixed and noisy fixed images at one seeded diffusion step, both decoders, the
    cross-attention, Φ by ``variant`` "svf" (integrated) or "displacement", the warp, eq.
    19's soft Dice of F_Ana, smoothness and diffusion loss) with AnatomyAwareConfig
    ``overrides``; Adam at the config's lr (FSDiffReg's 2e-4)."""
    return Workload("anatomy_aware", variant, _anatomy_build, anatomy_mrus_loss,
                    anatomy_plain_loss, lambda params, c: torch.optim.Adam(params, lr=c.lr),
                    tuple(overrides.items()), head="flow_head.conv.weight")


def make_data(shape: tuple[int, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(moving, fixed) [B, 1, *S]: smooth random images in [0, 1]; the moving one is the
    fixed one under a smooth warp of a few voxels with a non-linear intensity map (so MI
    has a multi-modal pair to align)."""
    g = torch.Generator().manual_seed(0)
    b, _, *size = shape
    coarse = torch.rand(b, 1, *[6] * len(size), generator=g)
    fixed = F.interpolate(coarse, size=size, mode="trilinear" if len(size) == 3 else "bilinear",
                          align_corners=True)
    coarse_u = (torch.rand(b, len(size), *[4] * len(size), generator=g) - 0.5) * 6
    ddf = F.interpolate(coarse_u, size=size, mode="trilinear" if len(size) == 3 else "bilinear",
                        align_corners=True)
    moving = reference.warp(fixed, ddf, "linear", "border")
    moving = 1.0 - moving.square()
    return moving.contiguous().to(device), fixed.contiguous().to(device)


class TrainStep:
    """One optimiser step of one row: ``step()`` runs forward, backward and the optimiser's
    update on fixed data and returns the loss (detached).

    Args:
        impl: the row, one of :data:`IMPLS`.
        workload: the network and its losses.
        shape: [B, 1, *S] of the images.
        device: "cpu" or "cuda".
        data: (moving, fixed); None: :func:`make_data`.
        compile_backend: ``torch.compile``'s backend for the compiled rows.
    """

    def __init__(self, impl: str, workload: Workload, shape: tuple[int, ...], device: str,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 compile_backend: str = "inductor") -> None:
        self.workload = workload
        torch.manual_seed(0)  # every row starts from the same weights
        self.config, model = workload.build(workload.variant, shape, **dict(workload.overrides))
        self.model = model.to(device)
        if data is None:
            data = make_data(shape, device)
            if workload.prepare is not None:
                data = workload.prepare(*data, self.config)
        self.moving, self.fixed = data
        self.optimizer = workload.optimizer(self.model.parameters(), self.config)
        losses = {"mrus": workload.mrus_loss, "torch": workload.plain_loss}
        if impl in losses:
            self.loss_fn = losses[impl]
        elif impl in ("compiled", "mrus_compiled"):
            eager = losses["mrus" if impl == "mrus_compiled" else "torch"]
            options = None
            if compile_backend == "inductor" and device == "cpu":
                options = dict(workload.cpu_compile_options) or None
            self.loss_fn = torch.compile(eager, dynamic=False, backend=compile_backend,
                                         options=options)
        else:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")

    def loss(self) -> torch.Tensor:
        return self.loss_fn(self.model, self.moving, self.fixed, self.config)

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def loss_and_gradients(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its gradients at the current weights (no optimiser step)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in self.model.named_parameters()}
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grads


def _check_against_plain(row: TrainStep, shape, device) -> None:
    """The row's loss and gradients equal the ``torch`` row's on the same weights and data."""
    name = row.workload.name
    plain = TrainStep("torch", row.workload, shape, device, data=(row.moving, row.fixed))
    plain.model.load_state_dict(row.model.state_dict())
    want_loss, want = plain.loss_and_gradients()
    del plain
    got_loss, got = row.loss_and_gradients()
    assert torch.isfinite(got_loss), f"{name}: loss {got_loss}"
    assert_close_rel(f"{name} loss", got_loss, want_loss, RTOL)
    assert got.keys() == want.keys()
    # One check over all parameters, relative to the largest gradient entry (the deep
    # layers' gradients are orders of magnitude below the flow head's), then the flow
    # head's own, where the operators' backward passes meet the network.
    flat_got = torch.cat([g.flatten() for g in got.values()])
    flat_want = torch.cat([g.flatten() for g in want.values()])
    assert_close_rel(f"{name} gradients", flat_got, flat_want, 5 * RTOL)
    head = row.workload.head
    assert_close_rel(f"{name} grad {head}", got[head], want[head], 5 * RTOL)


def _bench(benchmark, impl: str, workload: Workload, shape: tuple[int, ...],
           device: str) -> None:
    row = TrainStep(impl, workload, shape, device)
    if impl != "torch":
        _check_against_plain(row, shape, device)
    loss = float(row.step())
    assert math.isfinite(loss), f"{impl}: loss {loss} after one step"
    benchmark.group = f"train_step-{workload.name}-{device}-{shape_id(shape)}"
    timed, warmup = ROUNDS[device]
    info = {"op": "train_step", "impl": impl, "model": workload.model, "size": shape_id(shape)}
    info["similarity" if workload.model == "voxelmorph" else "variant"] = workload.variant
    run_benchmark(benchmark, row.step, rounds=timed, warmup_rounds=warmup, device=device,
                  baseline=impl == "torch", second_baseline=impl == "compiled",
                  extra_info=info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=shape_id)
def test_train_step_cpu(benchmark, shape, similarity, impl):
    _bench(benchmark, impl, voxelmorph_workload(similarity), shape, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_train_step_gpu(benchmark, shape, similarity, impl):
    _bench(benchmark, impl, voxelmorph_workload(similarity), shape, "cuda")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", INNREG_SHAPES, ids=shape_id)
def test_train_step_innreg_cpu(benchmark, shape, impl):
    if benchmark.disabled:
        pytest.skip("a minute a step on the CPU; the correctness run checks these rows in "
                    "test_innreg_rows_agree_with_plain")
    _bench(benchmark, impl, innreg_workload(), shape, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", INNREG_SHAPES, ids=shape_id)
def test_train_step_innreg_gpu(benchmark, shape, impl):
    _bench(benchmark, impl, innreg_workload(), shape, "cuda")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
def test_innreg_rows_agree_with_plain(impl):
    """The innreg rows' loss and gradients against the ``torch`` row, on a small INNReg
    (:data:`INNREG_SMALL`) at 2×1×16×16, then two finite steps: what the timed CPU rows
    check before timing, at a size the correctness run affords. The compiled rows compile
    with ``aot_eager`` here (dynamo and AOT autograd: the graph capture of the model, the
    fused custom ops and their backward, and the functionalised graph run eagerly):
    inductor's code generation for INNReg takes minutes of CPU, so the inductor rows are
    checked by the timed rows' own comparison before timing."""
    row = TrainStep(impl, innreg_workload(**INNREG_SMALL), INNREG_SMALL_SHAPE, "cpu",
                    compile_backend="aot_eager")
    _check_against_plain(row, INNREG_SMALL_SHAPE, "cpu")
    before = float(row.step())
    assert math.isfinite(before) and math.isfinite(float(row.step())), impl


PLASTICINE_VARIANTS = ("deformation", "diffusion")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", PLASTICINE_VARIANTS)
@pytest.mark.parametrize("shape", PLASTICINE_CPU_SHAPES, ids=shape_id)
def test_train_step_plasticine_cpu(benchmark, shape, variant, impl):
    if benchmark.disabled:
        pytest.skip("seconds a step and minutes of compilation on the CPU; the correctness "
                    "run checks these rows in test_plasticine_rows_agree_with_plain")
    _bench(benchmark, impl, plasticine_workload(variant), shape, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", PLASTICINE_VARIANTS)
@pytest.mark.parametrize("shape", PLASTICINE_GPU_SHAPES, ids=shape_id)
def test_train_step_plasticine_gpu(benchmark, shape, variant, impl):
    _bench(benchmark, impl, plasticine_workload(variant), shape, "cuda")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
@pytest.mark.parametrize("variant", PLASTICINE_VARIANTS)
def test_plasticine_rows_agree_with_plain(variant, impl):
    """The plasticine rows' loss and gradients against the ``torch`` row on a small
    Plasticine (:data:`PLASTICINE_SMALL`) at 2×1×16×16, then two finite steps; compiled
    rows with ``aot_eager`` as :func:`test_innreg_rows_agree_with_plain`."""
    row = TrainStep(impl, plasticine_workload(variant, **PLASTICINE_SMALL),
                    PLASTICINE_SMALL_SHAPE, "cpu", compile_backend="aot_eager")
    _check_against_plain(row, PLASTICINE_SMALL_SHAPE, "cpu")
    before = float(row.step())
    assert math.isfinite(before) and math.isfinite(float(row.step())), (variant, impl)


def test_plasticine_plain_forward_is_the_modules():
    """:func:`plasticine_plain_forward` returns what f_θ2's own forward returns (the fused
    operators replaced), on the small network with a non-trivial velocity."""
    config, net = _plasticine_build("deformation", PLASTICINE_SMALL_SHAPE, **PLASTICINE_SMALL)
    moving, fixed = make_data(PLASTICINE_SMALL_SHAPE, "cpu")
    x, data = plasticine_prepare(moving, fixed, config)
    with torch.no_grad():
        want = net(x, data["target"], data["eps"])
        got = plasticine_plain_forward(net, x, data["target"], data["eps"])
    # FLOW_INIT_STD: velocities of a few hundredths of a pixel, sample points off the grid.
    assert want["velocity"].abs().max() > 0.01
    for key, value in got.items():
        assert_close_rel(f"plasticine {key}", value, want[key], 1e-4)
    # Each term of L_DF weighs in the comparison: at the rows' initial weights the
    # smoothness and inverse terms are too small to show in the total.
    for weights in ({}, {"lam_smooth": 1e4}, {"lam_align": 1e3}, {"lam_inverse": 1e4},
                    {"mi_form": "mi"}):
        c = dataclasses.replace(config, **weights)
        with torch.no_grad():
            want_loss = plasticine_deformation_mrus_loss(net, x, data, c)
            got_loss = plasticine_deformation_plain_loss(net, x, data, c)
        assert_close_rel(f"plasticine L_DF {weights}", got_loss, want_loss, 1e-4)


@ACMT_DYNAMO_WARNING
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(ACMT_VARIANTS))
@pytest.mark.parametrize("shape", ACMT_CPU_SHAPES, ids=shape_id)
def test_train_step_acmt_cpu(benchmark, shape, variant, impl):
    if benchmark.disabled:
        pytest.skip("minutes of compilation on the CPU; the correctness run checks these rows "
                    "in test_acmt_rows_agree_with_plain")
    _bench(benchmark, impl, acmt_workload(variant), shape, "cpu")


@ACMT_DYNAMO_WARNING
@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(ACMT_VARIANTS))
@pytest.mark.parametrize("shape", ACMT_GPU_SHAPES, ids=shape_id)
def test_train_step_acmt_gpu(benchmark, shape, variant, impl):
    _bench(benchmark, impl, acmt_workload(variant), shape, "cuda")


@ACMT_DYNAMO_WARNING
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
def test_acmt_rows_agree_with_plain(impl):
    """The acmt rows' loss and gradients against the ``torch`` row on a small ACMT
    (:data:`ACMT_SMALL`) at 2×1×16×16×8, then two finite steps; compiled rows with
    ``aot_eager`` as :func:`test_innreg_rows_agree_with_plain`."""
    row = TrainStep(impl, acmt_workload("deep64", **ACMT_SMALL), ACMT_SMALL_SHAPE, "cpu",
                    compile_backend="aot_eager")
    _check_against_plain(row, ACMT_SMALL_SHAPE, "cpu")
    before = float(row.step())
    assert math.isfinite(before) and math.isfinite(float(row.step())), impl


def test_acmt_plain_sobel_is_the_definition():
    """:func:`plain_sobel_l1` equals mrus's float64 definition
    (:func:`mrus_kernels.reference.sobel_l1`) and the shipped ``sobel_l1``; the plain
    row's loss equals the shipped step's on the small ACMT."""
    from mrus_kernels import sobel_l1

    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(2, 3, 7, 6, 5, generator=g, dtype=torch.float64)
    f0 = torch.randn(2, 3, 7, 6, 5, generator=g, dtype=torch.float64)
    want = reference.sobel_l1(f1, f0)
    assert abs(float(plain_sobel_l1(f1, f0) - want)) <= 1e-12 * float(want)
    got = sobel_l1(f1.float(), f0.float(), backend="cpu")
    assert abs(float(got) - float(want)) <= 1e-5 * float(want)
    config, model = _acmt_build("deep64", ACMT_SMALL_SHAPE, **ACMT_SMALL)
    moving, fixed = acmt_prepare(*make_data(ACMT_SMALL_SHAPE, "cpu"), config)
    with torch.no_grad():
        for weights in ({}, {"lam_boundary": 100.0}):
            c = dataclasses.replace(config, **weights)
            want_loss = acmt_mrus_loss(model, moving, fixed, c)
            got_loss = acmt_plain_loss(model, moving, fixed, c)
            assert_close_rel(f"acmt loss {weights}", got_loss, want_loss, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ANATOMY_CPU_SHAPES, ids=shape_id)
def test_train_step_anatomy_aware_cpu(benchmark, shape, impl):
    if benchmark.disabled:
        pytest.skip("a minute of compilation on the CPU; the correctness run checks these "
                    "rows in test_anatomy_aware_rows_agree_with_plain")
    _bench(benchmark, impl, anatomy_workload(), shape, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ANATOMY_GPU_SHAPES, ids=shape_id)
def test_train_step_anatomy_aware_gpu(benchmark, shape, impl):
    _bench(benchmark, impl, anatomy_workload(), shape, "cuda")


@pytest.mark.parametrize("variant", ["svf", "displacement"])
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
def test_anatomy_aware_rows_agree_with_plain(impl, variant):
    """The anatomy_aware rows' loss and gradients against the ``torch`` row on a small
    network (:data:`ANATOMY_SMALL`) at 2×1×16×16×8, then two finite steps; compiled rows
    with ``aot_eager`` as :func:`test_innreg_rows_agree_with_plain`. The plain row's
    smoothness and warp are checked against the shipped module's on the same field."""
    row = TrainStep(impl, anatomy_workload(variant, **ANATOMY_SMALL), ANATOMY_SMALL_SHAPE,
                    "cpu", compile_backend="aot_eager")
    _check_against_plain(row, ANATOMY_SMALL_SHAPE, "cpu")
    before = float(row.step())
    assert math.isfinite(before) and math.isfinite(float(row.step())), impl


def test_anatomy_plain_loss_is_the_shipped_loss():
    """The ``torch`` row's loss equals the shipped step's on a fixed image with an empty
    region (a field of view smaller than the volume, as the simulated ultrasound's fan),
    for both similarity masks and both transforms."""
    for variant in ("svf", "displacement"):
        for mask in ("field_of_view", "none"):
            config, model = _anatomy_build(variant, ANATOMY_SMALL_SHAPE,
                                           similarity_mask=mask, **ANATOMY_SMALL)
            moving, fixed = make_data(ANATOMY_SMALL_SHAPE, "cpu")
            fixed = fixed.clone()
            fixed[:, :, :5] = 0.0
            with torch.no_grad():
                want = anatomy_mrus_loss(model, moving, fixed, config)
                got = anatomy_plain_loss(model, moving, fixed, config)
            assert_close_rel(f"anatomy_aware loss {variant} {mask}", got, want, 1e-5)


def _fits(impl: str, similarity: str, shape: tuple[int, ...]) -> bool:
    """Whether one step of ``impl`` at ``shape`` runs within :data:`GPU_MEMORY_CAP`."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        row = TrainStep(impl, voxelmorph_workload(similarity), shape, "cuda")
        row.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() <= GPU_MEMORY_CAP
    except torch.OutOfMemoryError:
        return False
    finally:
        row = None  # noqa: F841 - release the step's tensors before the next try
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_train_step_largest_batch(benchmark, similarity, impl):
    """The largest batch of 1×160×192×224 volumes one step trains in (doubling, then a
    bisection), recorded as ``extra_info["largest_batch"]``, and that batch's step time."""
    spatial = GPU_SHAPES[0][2:]
    lo, hi = 0, 1
    while _fits(impl, similarity, (hi, 1, *spatial)):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(impl, similarity, (mid, 1, *spatial)) else (lo, mid)
    assert lo >= 1, f"{impl}: not even one 160x192x224 volume fits"
    row = TrainStep(impl, voxelmorph_workload(similarity), (lo, 1, *spatial), "cuda")
    benchmark.group = f"train_step-largest-batch-{similarity}"
    run_benchmark(benchmark, row.step, rounds=3, warmup_rounds=1, device="cuda",
                  baseline=impl == "torch", second_baseline=impl == "compiled",
                  extra_info={"op": "train_step", "impl": impl, "model": "voxelmorph",
                              "similarity": similarity, "largest_batch": lo,
                              "size": shape_id((lo, 1, *spatial))})


def test_plain_rows_match_the_definitions():
    """The plain-PyTorch pieces of the ``torch`` rows equal mrus's float64 definitions (so
    the rows compute the same loss, not merely similar ones)."""
    g = torch.Generator().manual_seed(1)
    fixed = torch.rand(2, 1, 11, 12, 13, generator=g, dtype=torch.float64)
    moving = torch.rand(2, 1, 11, 12, 13, generator=g, dtype=torch.float64)
    v = (torch.rand(2, 3, 11, 12, 13, generator=g, dtype=torch.float64) - 0.5) * 4
    want = reference.lncc(fixed, moving, window=5)
    assert (plain_lncc(fixed, moving, 5) - want).abs().max() <= 1e-12
    u = plain_integrate(v)
    assert (u - reference.integrate_velocity(v)).abs().max() <= 1e-10
    # The barrier, both forms, against NMILoss's CPU kernels (b above the paper form's d).
    related = fixed.sin() + 0.1 * moving
    for form, b in (("released", 5.0), ("paper", 50.0)):
        loss = NMILoss(barrier=b, form=form, bins=19, value_range=(0.0, 1.0), backend="cpu")
        want = loss(fixed, related)
        got = plain_barrier(fixed, related, b, form, 19, 0.5, (0.0, 1.0))
        assert abs(float(got - want)) <= 1e-9 * max(1.0, abs(float(want))), (form, got, want)
