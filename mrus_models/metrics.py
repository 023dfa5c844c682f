"""Registration metrics of the models' ``evaluate``: per item, on batched tensors.

- :func:`ssim`: structural similarity (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004)
  with an 11-tap Gaussian window of σ = 1.5, the paper's setting;
- :func:`ncc`: global normalised cross-correlation (Pearson's r over the pixels);
- :func:`dice`: overlap of one label value;
- :func:`hd95`: the 95th-percentile symmetric Hausdorff distance between two label
  surfaces, in mm (SciPy's Euclidean distance transform);
- :func:`endpoint_error_mm`: mean endpoint error against a known displacement, in mm.

Folding is :func:`mrus_kernels.folding_fraction`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["dice", "endpoint_error_mm", "hd95", "ncc", "ssim"]


def _check_pair(op: str, a, b) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.shape != b.shape or a.dim() < 3:
        raise ValueError(f"{op}: a and b must be [B, C, *S] tensors of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def endpoint_error_mm(ddf: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor,
                      spacing: torch.Tensor) -> torch.Tensor:
    """Mean endpoint error inside ``mask`` per item, in millimetres.

    Args:
        ddf: Tensor [B, ndim, *S], voxel units.
        truth: Tensor [B, ndim, *S], voxel units.
        mask: Tensor [B, 1, *S], bool.
        spacing: Tensor [B, ndim], mm per voxel along each axis.

    Returns:
        Tensor [B] (NaN for an item whose mask is empty).
    """
    scale = spacing.to(ddf).reshape(*spacing.shape, *([1] * (ddf.dim() - 2)))
    err = ((ddf - truth.to(ddf)) * scale).square().sum(dim=1, keepdim=True).sqrt()
    m = mask.to(err)
    dims = tuple(range(1, err.dim()))
    return (err * m).sum(dim=dims) / m.sum(dim=dims)


def dice(labels: torch.Tensor, reference: torch.Tensor, value: int) -> torch.Tensor:
    """Dice overlap of label ``value`` per item: Tensor [B], NaN where the reference has no
    voxel of that label (such items do not count, as MONAI's ``ignore_empty``)."""
    a = (labels == value).flatten(1)
    b = (reference == value).flatten(1)
    inter = (a & b).sum(1).double()
    total = a.sum(1).double() + b.sum(1).double()
    out = 2 * inter / total.clamp_min(1)
    return torch.where(b.any(1), out, torch.full_like(out, float("nan")))


def _gaussian_window(sigma: float, size: int, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def _filter_valid(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable filtering of [N, 1, *S] by the 1D window ``w`` along every spatial axis,
    keeping only the positions where the window lies inside (no padding)."""
    ndim = x.dim() - 2
    conv = F.conv2d if ndim == 2 else F.conv3d
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = w.numel()
        x = conv(x, w.reshape(shape))
    return x


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float | None = None,
         window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per item (Wang et al., IEEE TIP 2004).

    Local means, variances and the covariance are Gaussian-weighted (``window`` taps,
    standard deviation ``sigma``, normalised to sum 1; population covariances), and the
    SSIM map is averaged over the positions where the whole window lies inside the image,
    so no padding enters. With the defaults this is scikit-image's
    ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)`` per 2D or 3D item.

    Args:
        a: Tensor [B, 1, *S], 2D or 3D, every size at least ``window``.
        b: Tensor [B, 1, *S], the reference.
        data_range: L in C1 = (k1 L)², C2 = (k2 L)²; None: each item's ``b.max() - b.min()``
            (1 for images normalised to [0, 1]).
        window: odd window side.
        sigma: the window's standard deviation, pixels.
        k1, k2: the stabilising constants' factors.

    Returns:
        Tensor [B], float64.
    """
    _check_pair("ssim", a, b)
    if a.shape[1] != 1 or a.dim() not in (4, 5):
        raise ValueError(f"ssim: expected [B, 1, *S] images, 2D or 3D, got {tuple(a.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"ssim: window must be an odd positive int, got {window!r}")
    if any(s < window for s in a.shape[2:]):
        raise ValueError(f"ssim: every image size must be >= window {window}, got "
                         f"{tuple(a.shape[2:])}")
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"ssim: sigma must be a finite positive number, got {sigma!r}")
    x, y = a.double(), b.double()
    if data_range is None:
        dims = tuple(range(1, y.dim()))
        rng = (y.amax(dim=dims) - y.amin(dim=dims)).reshape(-1, *([1] * (y.dim() - 1)))
    else:
        if not (isinstance(data_range, (int, float)) and data_range > 0
                and math.isfinite(data_range)):
            raise ValueError(f"ssim: data_range must be a finite positive number or None, got "
                             f"{data_range!r}")
        rng = torch.tensor(float(data_range), dtype=torch.float64)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    w = _gaussian_window(float(sigma), window, torch.float64).to(x.device)
    n = x.shape[0]
    stats = _filter_valid(torch.cat([x, y, x * x, y * y, x * y]), w)
    mx, my, xx, yy, xy = stats.split(n)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
        eps: float = 1e-12) -> torch.Tensor:
    """Global normalised cross-correlation per item: Pearson's r of the pixel values.

    Args:
        a, b: Tensor [B, C, *S] of the same shape.
        mask: optional bool Tensor [B or 1, 1 or C, *S]: only those pixels count.
        eps: added to the variance product (a constant image gives 0, not NaN).

    Returns:
        Tensor [B], float64, in [-1, 1].
    """
    _check_pair("ncc", a, b)
    x, y = a.double().flatten(1), b.double().flatten(1)
    if mask is None:
        m = torch.ones_like(x)
    else:
        m = mask.expand_as(a).flatten(1).to(x)
    count = m.sum(1).clamp_min(1)
    mx, my = (x * m).sum(1) / count, (y * m).sum(1) / count
    dx, dy = (x - mx[:, None]) * m, (y - my[:, None]) * m
    return (dx * dy).sum(1) / ((dx * dx).sum(1) * (dy * dy).sum(1) + eps).sqrt()


def _surface(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels with a face neighbour outside it (the image border counts as
    outside)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(
        mask.ndim, 1), border_value=0)
    return mask & ~inner


def hd95(labels: torch.Tensor, reference: torch.Tensor, value: int,
         spacing: torch.Tensor | None = None) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance of label ``value`` per item, in mm.

    The surfaces are each region's voxels with a face neighbour outside it. For every
    surface voxel of one region the distance to the nearest surface voxel of the other is
    read from SciPy's exact Euclidean distance transform (with the voxel spacing); HD95 is
    the larger of the two directed 95th percentiles (NumPy's linear interpolation), the
    definition of MONAI's ``compute_hausdorff_distance(percentile=95)`` (Huttenlocher et
    al., IEEE TPAMI 1993, with the maximum replaced by a percentile).

    Args:
        labels: Tensor [B, 1, *S] of label values (the warped moving labels).
        reference: Tensor [B, 1, *S] (the fixed labels).
        value: the label value.
        spacing: Tensor [B, ndim] of mm per voxel, or None (voxel units).

    Returns:
        Tensor [B], float64; NaN where either image has no voxel of that label.
    """
    from scipy import ndimage

    _check_pair("hd95", labels, reference)
    b, ndim = labels.shape[0], labels.dim() - 2
    if spacing is not None and tuple(spacing.shape) != (b, ndim):
        raise ValueError(f"hd95: spacing must be [B, ndim] = [{b}, {ndim}], got "
                         f"{tuple(spacing.shape)}")
    a_all = (labels == value).cpu().numpy()
    r_all = (reference == value).cpu().numpy()
    out = []
    for i in range(b):
        a, r = a_all[i, 0], r_all[i, 0]
        if not a.any() or not r.any():
            out.append(float("nan"))
            continue
        sampling = None if spacing is None else spacing[i].double().cpu().tolist()
        sa, sr = _surface(a), _surface(r)
        to_r = ndimage.distance_transform_edt(~sr, sampling=sampling)
        to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
        out.append(max(np.percentile(to_r[sa], 95), np.percentile(to_a[sr], 95)))
    return torch.tensor(out, dtype=torch.float64)
