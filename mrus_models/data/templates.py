"""The MNI152 template shipped inside the nilearn wheel: T1, brain mask, tissue maps, labels.

The files (ICBM 2009a symmetric, 1 mm, 197 × 233 × 189, uint8) sit in nilearn's package
data, so nothing is downloaded: they are found on disk without importing nilearn (whose
import is slow and pulls in pandas and scikit-learn). The 2 mm version averages 2 × 2 × 2
blocks (the anatomy a 2 mm scanner would see), with the affine's origin moved to the block
centres.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Label values of :attr:`Template.labels`.
LABELS = {0: "background", 1: "csf", 2: "gm", 3: "wm"}

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Brain mask threshold on the T1 scaled to [0, 1] (nilearn's ``load_mni152_brain_mask``).
MASK_THRESHOLD = 0.2


@dataclass
class Template:
    """The MNI152 template on one grid.

    Attributes:
        t1: Tensor [1, 1, X, Y, Z] float32, T1 intensity scaled to [0, 1].
        mask: Tensor [1, 1, X, Y, Z] bool, the brain (T1 > 0.2).
        gm, wm, csf: Tensor [1, 1, X, Y, Z] float32 tissue probabilities in [0, 1], zero
            outside the mask; ``csf`` is the rest of the brain, ``1 - gm - wm`` clamped.
        labels: Tensor [1, 1, X, Y, Z] int64, 0 background, 1 CSF-like rest of the brain,
            2 grey matter, 3 white matter (the most probable tissue inside the mask).
        affine: numpy [4, 4] voxel-to-world (MNI mm) affine.
    """

    t1: torch.Tensor
    mask: torch.Tensor
    gm: torch.Tensor
    wm: torch.Tensor
    csf: torch.Tensor
    labels: torch.Tensor
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t1.shape[2:])

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def tissues(self) -> torch.Tensor:
        """Tensor [1, 3, X, Y, Z]: CSF, GM and WM probabilities as channels."""
        return torch.cat([self.csf, self.gm, self.wm], 1)


def nilearn_data_dir() -> str:
    """nilearn's packaged data folder, located without importing nilearn.

    Raises:
        ModuleNotFoundError: nilearn is not installed (``pip install "mrus[data]"``).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MNI152 template needs nilearn (it ships the files): pip install \"mrus[data]\""
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


@functools.lru_cache(maxsize=2)
def _raw() -> tuple[dict[str, np.ndarray], np.ndarray]:
    import nibabel as nib

    folder = nilearn_data_dir()
    arrays, affine = {}, None
    for key, name in _FILES.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the MNI152 {key} file is missing from nilearn's package data: {path!r}"
            )
        img = nib.load(path)
        arrays[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        affine = np.asarray(img.affine, dtype=np.float64)
    return arrays, affine


def _block_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    pad = [p for n in reversed(x.shape[2:]) for p in (0, (-n) % k)]
    # Replicate padding keeps the mean of an edge block what the voxels inside say.
    x = F.pad(x, pad, mode="replicate") if any(pad) else x
    return F.avg_pool3d(x, k)


def mni152(resolution: int = 2, *, crop: bool = True, margin: int = 4) -> Template:
    """Loads the MNI152 template at 1 mm or 2 mm, without network access.

    Args:
        resolution: 2 (default; 99 × 117 × 95 before cropping) or 1 (197 × 233 × 189).
        crop: crop to the brain mask's bounding box plus ``margin`` voxels (the affine is
            shifted so that world positions stay the same).
        margin: voxels kept around the mask when cropping.

    Returns:
        :class:`Template`.

    Example:
        >>> tpl = mni152(2)
        >>> tpl.t1.shape, tpl.spacing
    """
    if resolution not in (1, 2):
        raise ValueError(f"resolution must be 1 or 2 (mm), got {resolution!r}")
    arrays, affine = _raw()
    maps = {k: torch.from_numpy(v)[None, None] for k, v in arrays.items()}
    affine = affine.copy()
    if resolution == 2:
        maps = {k: _block_mean(v, 2) for k, v in maps.items()}
        # The centre of block n is the 1 mm voxel 2n + 0.5.
        affine[:3, 3] = affine[:3, :3] @ np.full(3, 0.5) + affine[:3, 3]
        affine[:3, :3] = affine[:3, :3] * 2
    t1 = maps["t1"] / maps["t1"].max()
    mask = t1 > MASK_THRESHOLD
    if crop:
        idx = mask[0, 0].nonzero()
        lo = (idx.min(0).values - margin).clamp_min(0)
        hi = torch.minimum(idx.max(0).values + margin + 1, torch.tensor(mask.shape[2:]))
        sl = (slice(None), slice(None)) + tuple(
            slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)
        )
        t1, mask = t1[sl].contiguous(), mask[sl].contiguous()
        maps = {k: v[sl].contiguous() for k, v in maps.items()}
        affine[:3, 3] = affine[:3, :3] @ lo.double().numpy() + affine[:3, 3]
    m = mask.float()
    gm = maps["gm"].clamp(0, 1) * m
    wm = maps["wm"].clamp(0, 1) * m
    csf = (1 - gm - wm).clamp_min(0) * m
    labels = torch.where(mask, torch.cat([csf, gm, wm], 1).argmax(1, keepdim=True) + 1, 0)
    return Template(t1.contiguous(), mask, gm, wm, csf, labels.long(), affine)
