"""Structure maps: the "basic content shapes" x_s, y_s that condition Plasticine's diffusion.

Plasticine (Zhang et al., ../shared/papers/plasticine.txt, §III and Appendix "Contour
samples", Fig. 14) obtains the structure maps of the source and target images "by an
unsupervised pixel clustering method [46]": the pixels are clustered on their intensities
and every pixel is replaced by its cluster. The appendix uses two clusters (foreground /
background); on our T1 slices four clusters separate background, CSF, grey and white matter
(the model's configuration chooses).

Here the clustering is k-means on the pixel intensities of each image (scikit-learn's
``KMeans``, a fixed number of restarts, seeded), the clusters are ordered by their mean
intensity so that a map means the same on every image (cluster 0 is the darkest), and the
map is scaled to [-1, 1] like the images the diffusion sees. It runs on the CPU in NumPy, as
data preparation: no gradient flows through it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

#: k-means restarts (scikit-learn's ``n_init``); the best of them by inertia is kept. The
#: problem is 1-D, so a few restarts from k-means++ seeds reach the same optimum.
N_INIT = 4
#: Pixels the clusters are fitted on: k-means runs on a seeded random subset of at most this
#: many pixels, then every pixel goes to its nearest centre (the subsampled fit of
#: scikit-learn's colour-quantisation example). 1-D centres from 16 384 samples move by a
#: fraction of a percent of the intensity range; the fit then costs a quarter of a
#: 256 × 256 image's, which keeps the maps cheap as per-item data preparation. Images of up
#: to this many pixels (a 128 × 128 slice) are fitted on every pixel.
MAX_SAMPLES = 16384


def _check_clusters(owner: str, clusters) -> int:
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 2:
        raise ValueError(f"{owner}: clusters must be an int >= 2, got {clusters!r}")
    return clusters


def kmeans_labels(values: np.ndarray, clusters: int = 2, *, seed: int = 0,
                  n_init: int = N_INIT, max_samples: int | None = MAX_SAMPLES) -> np.ndarray:
    """Clusters 1-D intensities with k-means and numbers the clusters by mean intensity.

    Args:
        values: array [N] of finite intensities (any real dtype).
        clusters: k, the number of clusters (>= 2).
        seed: seeds the k-means++ initialisations (scikit-learn's ``random_state``) and
            the subsample.
        n_init: number of k-means runs; the one with the lowest inertia is kept.
        max_samples: fit the centres on a seeded random subset of this many values when
            there are more (:data:`MAX_SAMPLES`), then label every value by its nearest
            centre; None fits on all values.

    Returns:
        int64 array [N] of labels in 0 … k-1, label 0 the cluster of lowest mean
        intensity, k-1 the highest. With fewer than k distinct values, each distinct value
        is its own cluster (labels 0 … distinct-1, by value): k-means has nothing to split.

    Raises:
        ValueError: ``values`` not 1-D, empty or not finite; ``clusters`` < 2;
            ``max_samples`` < ``clusters``.
        ImportError: scikit-learn is not installed.

    Example:
        >>> kmeans_labels(np.array([0.1, 5.0, 0.2, 4.9, 9.8]), 3).tolist()
        [0, 1, 0, 1, 2]
    """
    clusters = _check_clusters("kmeans_labels", clusters)
    if max_samples is not None and (isinstance(max_samples, bool)
                                    or not isinstance(max_samples, int)
                                    or max_samples < clusters):
        raise ValueError(f"kmeans_labels: max_samples must be None or an int >= clusters "
                         f"({clusters}), got {max_samples!r}")
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"kmeans_labels: values must be a non-empty 1-D array, got shape "
                         f"{values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("kmeans_labels: values must be finite (found NaN or inf)")
    values = values.astype(np.float64)
    distinct, inverse = np.unique(values, return_inverse=True)
    if distinct.size <= clusters:
        # Each value is its own cluster; scikit-learn would warn that it found fewer
        # distinct clusters than asked for.
        return inverse.reshape(-1).astype(np.int64)
    try:
        from sklearn.cluster import KMeans
    except ImportError as err:  # pragma: no cover - scikit-learn is in the test extra
        raise ImportError("structure maps need scikit-learn: pip install scikit-learn") from err
    km = KMeans(n_clusters=clusters, n_init=n_init, random_state=seed)
    fit = values
    if max_samples is not None and values.size > max_samples:
        fit = values[np.random.default_rng(seed).choice(values.size, max_samples, replace=False)]
    with warnings.catch_warnings():
        # Near-duplicate values (or a subsample with fewer than k distinct ones) can leave a
        # cluster empty; the best restart by inertia is kept regardless, and an empty
        # cluster only leaves its label unused.
        warnings.simplefilter("ignore", category=UserWarning)
        km.fit(fit[:, None])
    labels = km.predict(values[:, None])
    # Cluster means from the labels (not km.cluster_centers_, which is the last Lloyd
    # iterate's centre and need not match the final assignment exactly).
    means = np.array([values[labels == c].mean() if (labels == c).any() else np.inf
                      for c in range(clusters)])
    rank = np.empty(clusters, dtype=np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(clusters)
    return rank[labels]


def structure_map(image: torch.Tensor, clusters: int = 2, *, seed: int = 0,
                  n_init: int = N_INIT, max_samples: int | None = MAX_SAMPLES) -> torch.Tensor:
    """The structure map of each image: its k-means intensity clusters, scaled to [-1, 1].

    Plasticine §III: the "basic content shapes" x_s, y_s of the source and target images,
    by unsupervised pixel clustering ([46]); the Appendix ("Contour samples", Fig. 14) uses
    two clusters, foreground and background.

    Args:
        image: Tensor [B, 1, *S] (2D or 3D, any float dtype and device) of raw or scaled
            intensities; each item is clustered on its own.
        clusters: k (2: foreground / background as the paper's appendix; 4 separates
            background / CSF / GM / WM on T1 slices).
        seed: seeds the k-means initialisations and the pixel subsample, so the map is
            reproducible.
        n_init: k-means restarts per image.
        max_samples: pixels the centres are fitted on (:data:`MAX_SAMPLES`; None: all).

    Returns:
        Tensor [B, 1, *S] in the dtype and on the device of ``image``: the cluster label l
        of each pixel (0 the darkest cluster) mapped to ``-1 + 2 l / (k - 1)``.

    Raises:
        TypeError: ``image`` is not a floating-point tensor.
        ValueError: ``image`` not [B, 1, *S] with 2 or 3 spatial dimensions, not finite,
            ``clusters`` < 2 or ``max_samples`` < ``clusters``.

    Example:
        >>> img = torch.tensor([[[[0.0, 0.1], [0.9, 1.0]]]])
        >>> structure_map(img, 2).tolist()
        [[[[-1.0, -1.0], [1.0, 1.0]]]]
    """
    clusters = _check_clusters("structure_map", clusters)
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        got = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"structure_map: image must be a floating-point torch.Tensor, got {got}")
    if image.dim() not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"structure_map: image must be [B, 1, H, W] or [B, 1, D, H, W], got "
                         f"{tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"structure_map: image must not be empty, got {tuple(image.shape)}")
    flat = image.detach().to("cpu", torch.float64).reshape(image.shape[0], -1).numpy()
    out = np.empty_like(flat)
    for b, values in enumerate(flat):
        if not np.isfinite(values).all():
            raise ValueError(f"structure_map: image must be finite; item {b} has NaN or inf")
        labels = kmeans_labels(values, clusters, seed=seed, n_init=n_init,
                               max_samples=max_samples)
        out[b] = -1.0 + 2.0 * labels / (clusters - 1)
    return torch.from_numpy(out).reshape(image.shape).to(image.device, image.dtype)
