"""NIfTI read/write with nibabel, keeping the voxel-to-world affine.

Layout: a NIfTI array indexed (i, j, k) becomes a tensor [1, 1, i, j, k], so spatial axis n
of the tensor is voxel axis n of the affine (what :func:`mrus_kernels.ddf_from_mm` expects).
A single-slice file (X, Y) or (X, Y, 1) is a 2D image [1, 1, X, Y] whose affine keeps its
4 × 4 form; :attr:`NiftiImage.affine_nd` gives the [ndim + 1, ndim + 1] version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

#: NIfTI intent code for a vector per voxel (displacement fields).
INTENT_VECTOR = 1007


@dataclass
class NiftiImage:
    """An image and where it lies in the world.

    Attributes:
        data: Tensor [1, 1, *S] (S = (X, Y, Z) or (X, Y)), float32 for images, int64 for
            label maps.
        affine: numpy [4, 4] float64 voxel-to-world (mm) affine.
    """

    data: torch.Tensor
    affine: np.ndarray

    @property
    def ndim(self) -> int:
        return self.data.dim() - 2

    @property
    def affine_nd(self) -> np.ndarray:
        """The [ndim + 1, ndim + 1] affine of the image's own spatial axes."""
        return affine_nd(self.affine, self.ndim)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along each spatial axis, mm."""
        return voxel_spacing(self.affine, self.ndim)


def affine_nd(affine: np.ndarray, ndim: int) -> np.ndarray:
    """A 4 × 4 NIfTI affine restricted to the first ``ndim`` voxel and world axes."""
    keep = list(range(ndim)) + [3]
    return np.asarray(affine, dtype=np.float64)[np.ix_(keep, keep)]


def voxel_spacing(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Column norms of the linear part: the voxel size along each voxel axis, mm."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :ndim]
    return tuple(float(s) for s in np.linalg.norm(lin, axis=0))


def _load(path: str | os.PathLike):
    import nibabel as nib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path!r}")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read {path!r} as NIfTI: {exc}") from exc


def _spatial_array(img, path: str) -> np.ndarray:
    dtype = img.get_data_dtype()
    if dtype.fields is not None or np.issubdtype(dtype, np.complexfloating):
        raise TypeError(
            f"{path!r}: expected real-valued (integer or float) voxels, got data type {dtype}"
        )
    shape = tuple(img.shape)
    # Trailing singleton axes carry nothing: (X, Y, Z, 1) is 3D and (X, Y, 1) is 2D.
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise ValueError(
            f"{path!r}: expected a 2D or 3D image, got a {len(shape)}D image of shape "
            f"{tuple(img.shape)} (split time series or vector images into single volumes)"
        )
    data = np.asarray(img.dataobj)
    return data.reshape(shape)


def read_nifti(path: str | os.PathLike, *, labels: bool = False) -> NiftiImage:
    """Reads a 2D or 3D NIfTI image.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        labels: read a label map (integer values, returned as int64) instead of an image
            (returned as float32 after the file's scaling).

    Returns:
        :class:`NiftiImage` with data [1, 1, *S] and the file's 4 × 4 affine.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not NIfTI, not 2D or 3D, a label map with non-integer values, or
            non-finite voxels in an image.
        TypeError: complex or RGB voxels.

    Example:
        >>> img = read_nifti("t1.nii.gz")
        >>> img.data.shape, img.spacing
    """
    path = os.fspath(path)
    img = _load(path)
    arr = _spatial_array(img, path)
    scaled = img.dataobj.slope not in (None, 1.0) or img.dataobj.inter not in (None, 0.0)
    if scaled or not np.issubdtype(arr.dtype, np.number):
        arr = np.asarray(img.get_fdata(dtype=np.float64)).reshape(arr.shape)
    if labels:
        if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
            raise ValueError(f"{path!r}: a label map must hold integer values")
        data = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))
    else:
        data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not torch.isfinite(data).all():
            raise ValueError(f"{path!r}: the image has NaN or infinite voxels")
    return NiftiImage(data[None, None], np.asarray(img.affine, dtype=np.float64))


def _affine4(affine, ndim: int) -> np.ndarray:
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine,
                   dtype=np.float64)
    if a.shape == (4, 4):
        return a
    if a.shape == (ndim + 1, ndim + 1) and ndim == 2:
        out = np.eye(4)
        out[np.ix_([0, 1, 3], [0, 1, 3])] = a
        return out
    raise ValueError(f"affine must be 4 x 4 (or 3 x 3 for 2D), got shape {a.shape}")


def _check_tensor(name: str, data: object) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() not in (4, 5) or data.shape[0] != 1:
        raise ValueError(
            f"{name} must be [1, C, *S] with S 2D or 3D, got shape {tuple(data.shape)}"
        )
    return data


def write_nifti(path: str | os.PathLike, data: torch.Tensor, affine, *,
                labels: bool = False) -> None:
    """Writes an image [1, 1, *S] (float32) or a label map (``labels=True``, uint8/int16/int32
    by range) with its affine.

    Args:
        path: output ``.nii`` / ``.nii.gz``; parent folders are created.
        data: Tensor [1, 1, *S]; floating for an image, integer or bool for a label map.
        affine: [4, 4] voxel-to-world affine (a [3, 3] one for a 2D image).
        labels: write a label map.

    Raises:
        TypeError: an integer image without ``labels=True``, or a floating label map.
        ValueError: bad shape or affine.
    """
    import nibabel as nib

    data = _check_tensor("data", data)
    if data.shape[1] != 1:
        raise ValueError(f"data must have one channel, got shape {tuple(data.shape)}")
    if labels:
        if data.is_floating_point() or data.is_complex():
            raise TypeError(f"a label map must be an integer or bool tensor, got {data.dtype}")
        arr = data[0, 0].detach().cpu().numpy().astype(np.int64)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                arr = arr.astype(dt)
                break
    else:
        if not data.is_floating_point():
            raise TypeError(
                f"an image must be a floating tensor, got {data.dtype} (pass labels=True for a "
                "label map)"
            )
        arr = data[0, 0].detach().cpu().float().numpy()
    img = nib.Nifti1Image(arr, _affine4(affine, data.dim() - 2))
    img.header.set_xyzt_units("mm")
    _save(img, path)


def _save(img, path) -> None:
    import nibabel as nib

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    nib.save(img, path)


def write_displacement(path: str | os.PathLike, ddf: torch.Tensor, affine) -> None:
    """Writes a displacement field in millimetres as a NIfTI vector image.

    The file holds (X, Y, Z, 1, ndim) float32 (intent ``vector``), component j the
    displacement along world axis j in mm: the NIfTI convention for displacement fields
    (the moving point is ``world(x) + d(x)``).

    Args:
        path: output file.
        ddf: Tensor [1, ndim, *S], voxel units, component i along spatial axis i.
        affine: [4, 4] voxel-to-world affine of the grid.
    """
    import nibabel as nib

    from mrus_kernels import ddf_to_mm

    ddf = _check_tensor("ddf", ddf)
    ndim = ddf.dim() - 2
    a4 = _affine4(affine, ndim)
    mm = ddf_to_mm(ddf.detach().cpu().double(), affine_nd(a4, ndim))[0]
    size = tuple(mm.shape[1:])
    # NIfTI keeps the vector on the 5th axis, after three spatial axes and time.
    arr = mm.movedim(0, -1).reshape(*size, *([1] * (3 - ndim)), 1, ndim).float().numpy()
    img = nib.Nifti1Image(arr, a4)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    _save(img, path)


def read_displacement(path: str | os.PathLike) -> NiftiImage:
    """Reads a displacement written by :func:`write_displacement`.

    Returns:
        :class:`NiftiImage` whose data is Tensor [1, ndim, *S], voxel units.
    """
    from mrus_kernels import ddf_from_mm

    path = os.fspath(path)
    img = _load(path)
    shape = tuple(img.shape)
    if len(shape) != 5 or shape[3] != 1 or shape[4] not in (2, 3):
        raise ValueError(
            f"{path!r}: expected a displacement of shape (X, Y, Z, 1, 3) or (X, Y, 1, 1, 2), "
            f"got {shape}"
        )
    ndim = shape[4]
    arr = np.asarray(img.get_fdata(dtype=np.float64))[..., 0, :]
    if ndim == 2:
        arr = arr[:, :, 0]
    mm = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))[None]
    vox = ddf_from_mm(mm, affine_nd(img.affine, ndim)).float()
    return NiftiImage(vox, np.asarray(img.affine, dtype=np.float64))
