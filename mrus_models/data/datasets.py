"""Training datasets with a known answer, built from the MNI152 template (no download).

:class:`SlicePairs` gives 2D slice pairs (INNReg's 192 × 192, Plasticine's 256 × 256, or any
size) and :class:`Crops3D` 3D crops (ACMT's 128 × 128 × 64 by default). Both follow one
recipe, the one of :func:`mrus_models.data.default_pair`:

1. the template's T1 and tissue maps (1 mm, cropped to the brain) are sampled on the item's
   grid: this is the **fixed** frame;
2. a random smooth warp ``b`` is drawn on the item's grid, a cubic B-spline free-form
   deformation or a stationary velocity field, and the same maps are sampled at
   ``x + b(x)``: the anatomy as the **moving** acquisition sees it;
3. the moving modality (``t2_like`` or ``pseudo_ultrasound``) is simulated on those moving
   tissue maps, item by item, so that its bias field, fan, shadows and speckle belong to the
   moving acquisition (the physics of :mod:`mrus_models.data.modalities`; it costs about
   7 ms per 192² slice and 0.45 s per 128 × 128 × 64 crop on one core, so no whole-volume
   simulation is cached);
4. the true displacement ``ddf`` is the inverse of ``b``, so that
   ``mrus_kernels.warp(moving, ddf) ≈ fixed`` anatomy: ``moving(x + ddf(x)) ≈ fixed(x)``;
5. optionally (the train split by default) the item is flipped and slightly rotated, every
   tensor the same way (:func:`augment`).

Labels (0 background, 1 CSF-like rest of the brain, 2 grey matter, 3 white matter) are made
by the template's own rule (most probable tissue inside ``T1 > 0.2``) from the maps sampled
in each frame, so fixed and moving labels agree wherever the displacement is right.

Every random draw of item ``i`` comes from ``numpy.random.SeedSequence((seed, split, i))``:
an item is a pure function of (dataset arguments, seed, split, index), the same in any
DataLoader worker, process or order; nothing reads the global RNGs, so worker seeding does
not matter. The template is loaded once per process (:func:`template_volume`, cached).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mrus_kernels import integrate_velocity, warp

from .._smooth import coarse_size, gaussian_blur, resize_ddf
from .modalities import pseudo_ultrasound, t2_like
from .templates import MASK_THRESHOLD, mni152
from .warps import _rotation, random_velocity

MODALITIES = ("t2", "us")
PLANES = ("axial", "coronal", "sagittal")
SPLITS = ("train", "val", "test")
WARPS = ("bspline", "svf")

#: Normal axis (of the template's x, y, z: left-right, posterior-anterior, inferior-superior)
#: of each slicing plane; the slice keeps the two other axes in increasing order.
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}

#: 2D splits: along each plane's normal, the slice positions that hold at least this
#: fraction of the plane's largest brain area are cut into blocks, repeating
#: train 16, gap 2, val 4, gap 2, test 4, gap 2 (template slices, 1 mm): slices of two
#: different splits are at least 3 mm apart and the held-out blocks, one every 30 mm,
#: sample the whole brain.
MIN_BRAIN_FRACTION = 0.25
SPLIT_CYCLE = (("train", 16), (None, 2), ("val", 4), (None, 2), ("test", 4), (None, 2))

#: Cubic B-spline warp: control points every ``BSPLINE_CONTROL_SPACING`` mm, displacements
#: uniform in [-1, 1] per component, the dense field scaled so that its largest displacement
#: is ``max_displacement`` mm. INNReg (§4.1) makes its unaligned T1/T2 pairs "with the
#: B-spline transformation method used in [8, 21]" and resizes them to 192 × 192, without
#: stating the control grid or the amplitude: these values are ours. The field's largest
#: gradient grows with the amplitude (0.31 at 6 mm, the worst of 40 draws), so the
#: amplitude is capped at ``BSPLINE_MAX_DISPLACEMENT`` mm (about 0.8) to keep the warp
#: invertible and its inverse's fixed-point iteration contracting.
BSPLINE_CONTROL_SPACING = 40.0
BSPLINE_MAX_DISPLACEMENT = 15.0
#: SVF warp: control points per axis of :func:`mrus_models.data.random_velocity`; the
#: velocity is integrated with 7 scaling-and-squaring steps both ways.
SVF_CONTROL = 5
SVF_STEPS = 7
#: Default largest displacement of the random warp, mm (as :func:`default_pair`).
MAX_DISPLACEMENT = 6.0

#: Augmentation: each spatial axis flipped with probability 1/2, then a rotation about the
#: item's centre by angles uniform in ±``AUGMENT_ROTATION`` degrees (one angle in 2D, one
#: per axis plane in 3D). ACMT augments "flipping and rotation" (§III, Dataset) without ranges.
FLIP_PROBABILITY = 0.5
AUGMENT_ROTATION = 10.0

#: Crops3D items per split when ``length`` is not given.
CROPS_PER_SPLIT = {"train": 1024, "val": 16, "test": 16}


# --------------------------------------------------------------------------- template


@functools.lru_cache(maxsize=1)
def template_volume() -> torch.Tensor:
    """The 1 mm MNI152 template cropped to the brain, channels T1, CSF, GM, WM.

    Loaded once per process (about 1 s); DataLoader workers started by fork inherit it.

    Returns:
        Tensor [1, 4, X, Y, Z] float32 (197 × 233 × 189 before cropping, 153 × 189 × 159
        after), 1 mm isotropic voxels.
    """
    tpl = mni152(1)
    return torch.cat([tpl.t1, tpl.csf, tpl.gm, tpl.wm], 1).contiguous()


def _labels(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels int64, brain mask bool), each [1, 1, *S], from sampled [1, 4, *S] maps by the
    template's rule: the most probable tissue inside ``T1 > MASK_THRESHOLD``."""
    mask = channels[:, :1] > MASK_THRESHOLD
    labels = _most_probable(channels[0, 1:])[None] + 1  # first maximum wins, as Template's
    return torch.where(mask, labels, 0), mask


def _most_probable(maps: torch.Tensor) -> torch.Tensor:
    """Index of the largest of C maps [C, *S] (the first on ties), as [1, *S] int64;
    written out because torch's argmax across a leading dimension is ten times slower."""
    best, index = maps[0], torch.zeros_like(maps[0], dtype=torch.int64)
    for c in range(1, maps.shape[0]):
        index = torch.where(maps[c] > best, c, index)
        best = torch.maximum(best, maps[c])
    return index[None]


# --------------------------------------------------------------------------- warps


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    a = t.abs()
    inner = 2.0 / 3.0 - a * a + 0.5 * a ** 3
    outer = (2.0 - a).clamp_min(0) ** 3 / 6.0
    return torch.where(a < 1, inner, outer)


def bspline_displacement(size: Sequence[int], *, max_displacement: float,
                         spacing: Sequence[float], control_spacing: float =
                         BSPLINE_CONTROL_SPACING, seed: int = 0) -> torch.Tensor:
    """A random cubic B-spline free-form deformation on a grid, voxel units.

    Control points sit every ``δ = control_spacing`` mm along each axis, from ``-δ`` to
    ``(k + 1) δ`` with ``k = ceil((n - 1) · spacing / δ)`` (k + 3 points: every voxel has
    its 4 × 4 (× 4) supporting points; the grid's first point is the first voxel, so the
    field's smoothness is the same whatever the grid's size). Their displacements are
    uniform in [-1, 1] per component, in mm; the dense field ``Σ_k β³(x/δ + 1 - k) c_k``
    is evaluated as one matrix product per axis and scaled so that its largest
    displacement is ``max_displacement`` mm.

    Args:
        size: spatial size S (2D or 3D).
        max_displacement: largest displacement, mm.
        spacing: voxel size per axis, mm.
        control_spacing: approximate distance between control points, mm.
        seed: seed of the control-point displacements.

    Returns:
        Tensor [1, ndim, *S] float32, voxel units, component i along spatial axis i.

    Example:
        >>> b = bspline_displacement((192, 192), max_displacement=6.0, spacing=(1.0, 1.0))
    """
    ndim = len(size)
    h = torch.tensor([float(s) for s in spacing], dtype=torch.float64)
    # The float32 rounding of a spacing must not add a control interval.
    intervals = [max(1, math.ceil((n - 1) * float(s) / control_spacing - 1e-6))
                 for n, s in zip(size, spacing, strict=True)]
    g = torch.Generator().manual_seed(int(seed))
    coeff = torch.rand(ndim, *[k + 3 for k in intervals], generator=g, dtype=torch.float64)
    # Drawn in mm, so that the warp is isotropic on anisotropic grids.
    mm = coeff * 2 - 1
    for axis, (n, k) in enumerate(zip(size, intervals, strict=True)):
        t = torch.arange(n, dtype=torch.float64)[:, None] * (float(spacing[axis]) /
                                                             control_spacing)
        basis = _cubic_bspline(t - (torch.arange(k + 3, dtype=torch.float64)[None, :] - 1))
        mm = torch.tensordot(mm, basis, dims=([1 + axis], [1])).movedim(-1, 1 + axis)
    if max_displacement == 0:
        return torch.zeros(1, ndim, *size)
    largest = float(mm.square().sum(0).sqrt().max())
    mm = mm * (max_displacement / max(largest, 1e-12))
    return (mm / h.view(ndim, *([1] * ndim)))[None].float().contiguous()


def invert_displacement(b: torch.Tensor, *, iterations: int = 50,
                        tol: float = 1e-4) -> torch.Tensor:
    """The inverse of a small smooth displacement by fixed-point iteration.

    ``u`` with ``x + u(x) + b(x + u(x)) = x`` is the fixed point of ``u ← -b(x + u)``
    (``mrus_kernels.warp``, border padding); it converges geometrically when the largest
    gradient of ``b`` is below 1, which the warps here satisfy by a wide margin.

    Args:
        b: Tensor [B, ndim, *S], voxel units.
        iterations: most iterations.
        tol: stop when no component changes by more than this, voxels.

    Returns:
        Tensor [B, ndim, *S]: ``warp(image, b)`` warped by ``u`` gives ``image`` back.

    Raises:
        ValueError: the iteration did not settle (``b`` folds or is too large).
    """
    u = -b
    for _ in range(iterations):
        nxt = -warp(b, u, padding="border")
        delta = float((nxt - u).abs().max())
        u = nxt
        if delta <= tol:
            return u.contiguous()
    raise ValueError(f"b could not be inverted: the fixed-point iteration still moved by "
                     f"{delta:.3g} voxels after {iterations} iterations (b folds or is too "
                     "large for its smoothness)")


def _random_warp(kind: str, size: tuple[int, ...], spacing: tuple[float, ...],
                 max_displacement: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, ddf), each [1, ndim, *size], voxel units: b makes the moving frame (moving
    anatomy at y = fixed anatomy at y + b(y)), ddf = b⁻¹ is the answer.

    The SVF integration and the B-spline inversion run on a grid coarsened by 2 (when every
    axis has at least 32 voxels) and are resampled back: both fields are smooth on the scale
    of their control points (tens of voxels), so this moves the answer by hundredths of a
    voxel and takes 8 times fewer warps in 3D.
    """
    small = coarse_size(size, 2) if min(size) >= 32 else size
    h_small = tuple(h * (n - 1) / (m - 1) for h, n, m in zip(spacing, size, small, strict=True))

    def full(u: torch.Tensor) -> torch.Tensor:
        return resize_ddf(u, size).contiguous() if small != size else u

    if kind == "bspline":
        b = bspline_displacement(size, max_displacement=max_displacement, spacing=spacing,
                                 seed=seed)
        b_small = resize_ddf(b, small) if small != size else b
        return b, full(invert_displacement(b_small))
    v = random_velocity(small, max_displacement=max_displacement, spacing=h_small,
                        control=SVF_CONTROL, seed=seed)
    return full(integrate_velocity(-v, SVF_STEPS)), full(integrate_velocity(v, SVF_STEPS))


# --------------------------------------------------------------------------- augmentation


def _identity_grid(size: Sequence[int]) -> torch.Tensor:
    return torch.stack(torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij"))


def augment(item: dict, *, flips: Sequence[bool], angles: Sequence[float]) -> dict:
    """Flips then rotates every spatial tensor of an item the same way.

    With ``T(x) = c + L (x - c)`` the combined map in voxel coordinates (``L = H⁻¹ R F H``,
    F the flips, R the rotation, H the voxel sizes, c the grid's centre), each image
    becomes ``I'(x') = I(T⁻¹ x')`` (linear for ``fixed``/``moving``; labels and mask as
    linearly resampled indicator maps, then the most probable label and ``>= 0.5``; zero
    outside) and the displacement ``ddf'(x') = L ddf(T⁻¹ x')``: its
    vectors turn with the images, so ``warp(moving', ddf') ≈ fixed'`` still holds. Flips
    alone are exact (no resampling).

    Args:
        item: dict with "fixed", "moving", "fixed_labels", "moving_labels", "mask"
            ([1, *S]), "ddf" ([ndim, *S], voxel units) and "spacing" ([ndim], mm); other
            keys are copied.
        flips: one bool per spatial axis.
        angles: rotation angles, degrees: one in 2D (from axis 0 towards axis 1), three in
            3D (about axes 0, 1, 2 in turn).

    Returns:
        A new dict.
    """
    out = dict(item)
    ddf = item["ddf"]
    ndim = ddf.shape[0]
    if len(flips) != ndim:
        raise ValueError(f"flips must have {ndim} entries (one per axis), got {len(flips)}")
    if len(angles) != (1 if ndim == 2 else 3):
        raise ValueError(f"angles must have {1 if ndim == 2 else 3} entries for a {ndim}D "
                         f"item, got {len(angles)}")
    dims = [1 + a for a in range(ndim) if flips[a]]
    if dims:
        sign = torch.tensor([-1.0 if f else 1.0 for f in flips], dtype=ddf.dtype)
        for k in ("fixed", "moving", "fixed_labels", "moving_labels", "mask"):
            out[k] = item[k].flip(dims)
        out["ddf"] = ddf.flip(dims) * sign.view(ndim, *([1] * ndim))
    if not any(a != 0 for a in angles):
        return out
    size = tuple(ddf.shape[1:])
    h = np.asarray(item["spacing"].tolist(), dtype=np.float64)
    rot = np.diag(1 / h) @ _rotation([math.radians(a) for a in angles]) @ np.diag(h)
    lin = torch.from_numpy(rot)
    centre = torch.tensor([(n - 1) / 2 for n in size], dtype=torch.float64)
    x = _identity_grid(size)
    shape = (ndim,) + (1,) * ndim
    # T⁻¹ x' = c + L⁻¹ (x' - c); the pull displacement T⁻¹ x' - x'.
    src = torch.einsum("ij,j...->i...", torch.linalg.inv(lin), x - centre.view(shape))
    pull = (src + centre.view(shape) - x).float()[None]
    # One warp for the images and the labels' indicator maps (coordinates and weights are
    # computed once for all channels). Labels turn as indicator maps, linearly, then the
    # most probable label wins: nearest-neighbour rounding here and again in the later warp
    # by ddf' would move boundaries independently in the two frames (about 0.04 of GM/WM
    # Dice lost on 1 mm crops). The background's map is 1 - the others' sum.
    keys = ("fixed_labels", "moving_labels")
    n = max(int(out[k].max()) for k in keys) + 1
    dt = out["fixed"].dtype
    maps = [out["fixed"], out["moving"].to(dt), out["mask"].to(dt)]
    maps += [(out[k] == c).to(dt) for k in keys for c in range(1, n)]
    res = warp(torch.cat(maps)[None], pull)[0]
    out["fixed"], out["moving"] = res[:1].contiguous(), res[1:2].contiguous()
    out["mask"] = res[2:3] >= 0.5
    for j, k in enumerate(keys):
        fg = res[3 + j * (n - 1):3 + (j + 1) * (n - 1)]
        soft = torch.cat([1 - fg.sum(0, keepdim=True), fg])
        out[k] = _most_probable(soft).to(item[k].dtype)
    turned = warp(out["ddf"][None], pull, padding="border")[0]
    out["ddf"] = torch.einsum("ij,j...->i...", lin.float(), turned).contiguous()
    return out


# --------------------------------------------------------------------------- datasets


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_size(value: object, ndim: int) -> tuple[int, ...]:
    items = (value,) * ndim if isinstance(value, (int, np.integer)) and ndim == 2 else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or \
            len(items) != ndim:
        what = "an int or a pair of ints" if ndim == 2 else "a triple of ints"
        raise ValueError(f"size must be {what}, got {value!r}")
    return tuple(_check_int("size", n, minimum=8) for n in items)


def _check_common(modality, split, warp_kind, max_displacement, seed, augment_flag, length):
    _check_choice("modality", modality, MODALITIES)
    _check_choice("split", split, SPLITS)
    _check_choice("warp", warp_kind, WARPS)
    if isinstance(max_displacement, bool) or not isinstance(max_displacement, (int, float)) \
            or not math.isfinite(max_displacement) or max_displacement < 0:
        raise ValueError(f"max_displacement must be a finite number >= 0 (mm), got "
                         f"{max_displacement!r}")
    if warp_kind == "bspline" and max_displacement > BSPLINE_MAX_DISPLACEMENT:
        raise ValueError(f"max_displacement must be <= {BSPLINE_MAX_DISPLACEMENT} mm with "
                         f"warp='bspline' (an invertible B-spline warp), got "
                         f"{max_displacement!r}; warp='svf' has no such limit")
    _check_int("seed", seed, minimum=0)
    if augment_flag is not None and not isinstance(augment_flag, bool):
        raise TypeError(f"augment must be None or a bool, got {augment_flag!r}")
    if length is not None:
        _check_int("length", length, minimum=1)


def _sample(channels: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``warp(channels, offset)``; a plain slice when the offset is an integer translation
    that stays inside (3D crops: exact, and no interpolation to pay for)."""
    ndim = offset.shape[1]
    first = offset.reshape(ndim, -1)[:, 0]
    size = offset.shape[2:]
    if bool((offset == first.view(1, ndim, *([1] * ndim))).all()) and \
            bool((first == first.round()).all()):
        lo = [int(o) for o in first]
        if all(0 <= a and a + n <= d for a, n, d in zip(lo, size, channels.shape[2:],
                                                           strict=True)):
            sl = tuple(slice(a, a + n) for a, n in zip(lo, size, strict=True))
            # A copy, never a view: an item changed in place must not change the template.
            return channels[(slice(None), slice(None)) + sl].clone(
                memory_format=torch.contiguous_format)
    return warp(channels, offset)


class _PairDataset(Dataset):
    """What both datasets share: seeding, the moving simulation, labels and augmentation."""

    ndim: int

    def __init__(self, modality, split, warp_kind, max_displacement, seed, augment_flag):
        self.modality = modality
        self.split = split
        self.warp = warp_kind
        self.max_displacement = float(max_displacement)
        self.seed = int(seed)
        self.augment = (split == "train") if augment_flag is None else augment_flag

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return int(index)

    def _seeds(self, index: int) -> list[int]:
        """Four independent seeds (warp, simulation, augmentation, position) of an item."""
        seq = np.random.SeedSequence((self.seed, SPLITS.index(self.split), index))
        return [int(s) for s in seq.generate_state(4, dtype=np.uint32)]

    def _make(self, channels: torch.Tensor, offset: torch.Tensor, scale: float,
              size: tuple[int, ...], spacing: tuple[float, ...], seeds: list[int],
              index: int, position: list[int]) -> dict:
        """Builds an item from maps ``channels`` [1, 4, *S_in] sampled on the item grid by
        the pull displacement ``offset`` [1, ndim, *size] (scale: source voxels per item
        voxel)."""
        b, ddf = _random_warp(self.warp, size, spacing, self.max_displacement, seeds[0])
        fixed_ch = _sample(channels, offset)
        moving_ch = warp(channels, offset + scale * b)
        fixed_labels, mask = _labels(fixed_ch)
        moving_labels, _ = _labels(moving_ch)
        tissues = moving_ch[:, 1:].contiguous()
        if self.modality == "t2":
            moving = t2_like(tissues, seed=seeds[1])
        else:
            moving = pseudo_ultrasound(tissues, spacing=spacing[-1], seed=seeds[1])
        item = {
            "fixed": fixed_ch[0, :1].contiguous(),
            "moving": moving[0].float().contiguous(),
            "fixed_labels": fixed_labels[0],
            "moving_labels": moving_labels[0],
            "mask": mask[0],
            "ddf": ddf[0].float().contiguous(),
            "spacing": torch.tensor(spacing, dtype=torch.float32),
            "index": index,
            "position": torch.tensor(position, dtype=torch.int64),
        }
        if self.augment:
            rng = np.random.default_rng(seeds[2])
            flips = [bool(f) for f in rng.random(self.ndim) < FLIP_PROBABILITY]
            angles = rng.uniform(-AUGMENT_ROTATION, AUGMENT_ROTATION,
                                 1 if self.ndim == 2 else 3).tolist()
            item = augment(item, flips=flips, angles=angles)
        return item


class SlicePairs(_PairDataset):
    """2D slice pairs of the MNI152 template: T1 (fixed) vs a simulated modality (moving)
    under a random smooth warp, with labels and the true displacement.

    Each slice is a template slice (1 mm, cropped to the brain) at an integer position
    along the plane's normal, centred in a square field of view of 189 template voxels
    (the template's largest extent, the same for every plane) and resampled to ``size``
    (Gaussian anti-aliasing when the pixels are larger than 1 mm): pixel spacing
    ``188 / (max(size) - 1)`` mm, isotropic (0.98 mm at 192², INNReg's size; 0.74 mm at
    256², Plasticine's). Array axes are the template's remaining axes in increasing order:
    axial (x, y), coronal (x, z), sagittal (y, z); the ultrasound probe sits on the
    high-index face of the last one (anterior for axial, superior otherwise).

    Splits, by slice position: per plane, the positions with at least 25 % of the plane's
    largest brain area are cut, from the lowest, into repeating blocks of train 16, gap 2,
    val 4, gap 2, test 4, gap 2 slices (:data:`SPLIT_CYCLE`): no slice is in two splits,
    slices of two splits are at least 3 mm apart, and the val and test blocks span the
    brain. All come from one template, so the planes share one anatomy: what the held-out
    splits test is new slice positions and new warps (item seeds differ too), not new
    subjects.

    Item ``i`` is slice ``positions[i % n]`` (evenly spread positions when ``length`` < n),
    with its own warp, simulation and augmentation drawn from
    ``SeedSequence((seed, split, i))``.

    Args:
        modality: "t2" (:func:`~mrus_models.data.t2_like`) or "us"
            (:func:`~mrus_models.data.pseudo_ultrasound`).
        size: output size, an int (square) or (H, W), each >= 8.
        planes: any of "axial", "coronal", "sagittal", no repeats.
        split: "train", "val" or "test".
        warp: "bspline" (:func:`bspline_displacement`, INNReg's protocol) or "svf"
            (:func:`~mrus_models.data.random_velocity` integrated both ways).
        max_displacement: largest displacement of the random warp, mm.
        seed: dataset seed (>= 0).
        augment: flips and rotations (:func:`augment`); default: on for "train" only.
        length: number of items; default: the split's slice positions over ``planes``.

    Items: dict of CPU tensors, no batch dimension, S = (H, W):
        "fixed" [1, *S] float32 T1 in [0, 1]; "moving" [1, *S] float32 (T2-like about
        [0, 1.3], ultrasound scaled so that the 99.5th percentile of the clean image is 1);
        "fixed_labels", "moving_labels" [1, *S] int64 (0 background, 1 CSF, 2 GM, 3 WM);
        "mask" [1, *S] bool, the brain in the fixed image; "ddf" [2, *S] float32 voxel
        units, ``warp(moving, ddf) ≈ fixed`` anatomy; "spacing" [2] float32 mm;
        "index" int; "position" [2] int64: plane number in :data:`PLANES`, slice index
        along its normal (before augmentation).

    Example:
        >>> ds = SlicePairs("t2", size=192, split="train")
        >>> item = ds[0]; item["fixed"].shape, item["ddf"].shape
        (torch.Size([1, 192, 192]), torch.Size([2, 192, 192]))
    """

    ndim = 2

    def __init__(self, modality: str = "t2", *, size: int | Sequence[int] = 192,
                 planes: Sequence[str] = PLANES, split: str = "train", warp: str = "bspline",
                 max_displacement: float = MAX_DISPLACEMENT, seed: int = 0,
                 augment: bool | None = None, length: int | None = None) -> None:
        _check_common(modality, split, warp, max_displacement, seed, augment, length)
        self.size = _check_size(size, 2)
        if isinstance(planes, str) or not isinstance(planes, Sequence) or not planes:
            raise ValueError(f"planes must be a non-empty sequence of {PLANES}, got {planes!r}")
        for p in planes:
            _check_choice("planes", p, PLANES)
        if len(set(planes)) != len(planes):
            raise ValueError(f"planes must not repeat, got {tuple(planes)}")
        super().__init__(modality, split, warp, max_displacement, seed, augment)
        self.planes = tuple(planes)
        self.positions = [(PLANES.index(p), s) for p in self.planes
                          for s in slice_positions(p)[split]]
        self.length = len(self.positions) if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        n = len(self.positions)
        k = index * n // self.length if self.length <= n else index % n
        plane, pos = self.positions[k]
        vol = template_volume()
        axis = PLANE_AXIS[PLANES[plane]]
        channels = vol.select(2 + axis, pos).contiguous()  # [1, 4, a, b]
        fov = max(vol.shape[2:])
        step = (fov - 1) / (max(self.size) - 1)  # template voxels (mm) per item pixel
        if step > 1:
            channels = gaussian_blur(channels, step / 2)
        offset = _slice_offset(tuple(channels.shape[2:]), self.size, step)
        return self._make(channels, offset, step, self.size, (step, step), self._seeds(index),
                          index, [plane, pos])


class Crops3D(_PairDataset):
    """3D crops of the MNI152 template pair under random warps: T1 (fixed) vs a simulated
    modality (moving), with labels and the true displacement.

    The crop (128 × 128 × 64 by default, ACMT's size, §III, Dataset) is cut from the 1 mm template
    (cropped to the brain: 153 × 189 × 159) at an integer origin drawn uniformly over the
    positions where it fits (centred with zero padding along an axis it exceeds). The
    moving crop samples the whole template at ``origin + y + b(y)``, so anatomy enters it
    from beyond the crop's faces as in a real acquisition. Spacing 1 mm; array axes are
    the template's x, y, z; the ultrasound probe sits on the superior face.

    Splits, by warp seed: every item draws its crop origin, warp, simulation and
    augmentation from ``SeedSequence((seed, split, index))``, so the (origin, warp) pairs
    of different splits come from disjoint seed sets. A crop of 128 × 128 × 64 covers most
    of the one template whatever its origin, so the anatomy is shared by all splits: what
    is held out is the warp and the acquisition's random draws, not the anatomy.

    Args:
        modality: "t2" or "us".
        size: crop size (X, Y, Z), each >= 8.
        split: "train", "val" or "test".
        warp: "svf" (default) or "bspline" (see :class:`SlicePairs`).
        max_displacement: largest displacement of the random warp, mm.
        seed: dataset seed (>= 0).
        augment: flips and rotations (:func:`augment`); default: on for "train" only.
        length: number of items; default :data:`CROPS_PER_SPLIT` (1024 train, 16 val,
            16 test).

    Items: as :class:`SlicePairs` with S = (X, Y, Z), "ddf" [3, *S], "spacing" [3]
    and "position" [3] int64, the crop origin in template voxels (before augmentation).

    Example:
        >>> ds = Crops3D("us", split="val")
        >>> ds[0]["moving"].shape
        torch.Size([1, 128, 128, 64])
    """

    ndim = 3

    def __init__(self, modality: str = "t2", *, size: Sequence[int] = (128, 128, 64),
                 split: str = "train", warp: str = "svf",
                 max_displacement: float = MAX_DISPLACEMENT, seed: int = 0,
                 augment: bool | None = None, length: int | None = None) -> None:
        _check_common(modality, split, warp, max_displacement, seed, augment, length)
        self.size = _check_size(size, 3)
        super().__init__(modality, split, warp, max_displacement, seed, augment)
        self.length = CROPS_PER_SPLIT[split] if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        seeds = self._seeds(index)
        vol = template_volume()
        rng = np.random.default_rng(seeds[3])
        origin = []
        for n, d in zip(self.size, vol.shape[2:], strict=True):
            lo, hi = (0, d - n) if n <= d else ((d - n) // 2, (d - n) // 2)
            origin.append(int(rng.integers(lo, hi + 1)))
        shape = (1, 3) + (1,) * 3
        offset = torch.tensor(origin, dtype=torch.float32).view(shape).expand(
            1, 3, *self.size).contiguous()
        return self._make(vol, offset, 1.0, self.size, (1.0, 1.0, 1.0), seeds, index, origin)


@functools.lru_cache(maxsize=8)
def _slice_offset(source: tuple[int, int], size: tuple[int, ...], step: float) -> torch.Tensor:
    """Pull displacement [1, 2, *size] from item pixels to a slice of ``source`` pixels:
    both centres coincide, ``step`` source pixels per item pixel."""
    x = _identity_grid(size)
    src = torch.stack([(n - 1) / 2 + step * (x[a] - (m - 1) / 2)
                       for a, (n, m) in enumerate(zip(source, size, strict=True))])
    return (src - x).float()[None].contiguous()


@functools.lru_cache(maxsize=4)
def slice_positions(plane: str) -> dict[str, list[int]]:
    """Template slice indices along ``plane``'s normal in each split (see
    :class:`SlicePairs`).

    Returns:
        {"train": [...], "val": [...], "test": [...]}, increasing, disjoint.
    """
    _check_choice("plane", plane, PLANES)
    axis = PLANE_AXIS[plane]
    mask = template_volume()[0, 0] > MASK_THRESHOLD
    area = mask.sum(dim=[a for a in range(3) if a != axis])
    keep = (area >= MIN_BRAIN_FRACTION * area.max()).nonzero().flatten().tolist()
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    pattern = [name for name, count in SPLIT_CYCLE for _ in range(count)]
    for k, pos in enumerate(range(keep[0], keep[-1] + 1)):
        name = pattern[k % len(pattern)]
        if name is not None and area[pos] >= MIN_BRAIN_FRACTION * area.max():
            out[name].append(pos)
    return out
