"""Sagittal frame positions by stitching onto the growing composite (MR2US-Pro §II-A, Fig. 3).

Each new sagittal frame is matched against the composite stitched so far (not against the
previous frame): SIFT or ORB key points (OpenCV), brute-force mutual nearest-neighbour
matching, and the displacement vector of every match (composite position − frame
position). The probe keeps its orientation during the sweep, so between a frame and the
composite the transform is a translation and correct matches share one displacement:
DBSCAN (scikit-learn) clusters the displacement vectors and the largest cluster is kept as
the inliers; the frame's position is their mean displacement. The frame is then averaged
into the composite at that (sub-pixel) position.

A frame whose inliers are fewer than ``min_inliers`` (probe lost contact, a frame of pure
noise) is not pasted; its position is extrapolated from the last step and it is flagged
unmatched. ``mode="pairwise"`` matches each frame with the previous frame instead and adds
up the steps: the frame-to-frame baseline whose errors accumulate (the paper's argument for
stitching).

OpenCV is imported lazily (``pip install "mrus[trus3d]"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("sift", "orb")
MODES = ("composite", "pairwise")


def require_opencv():
    """The ``cv2`` module; ModuleNotFoundError naming the extra when OpenCV is missing."""
    return _cv2()


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ModuleNotFoundError(
            'TRUS 3D reconstruction needs OpenCV (headless): pip install "mrus[trus3d]"'
        ) from None
    return cv2


@dataclass
class StitchConfig:
    """Stitching settings.

    Attributes:
        method: ``"sift"`` or ``"orb"`` (the paper evaluates both with clustering and keeps
            the better per patient).
        dbscan: filter the matches with DBSCAN (False: the mean over every match).
        eps: DBSCAN neighbourhood radius on the displacement vectors, pixels.
        min_samples: DBSCAN core-point neighbours (the point itself included).
        min_inliers: fewest inliers that place a frame; fewer: unmatched.
        upsample: frames (and the composite) are enlarged this many times before key
            point detection (speckle-sized frames have few key points at native size).
        search: the composite is cropped to ``search`` frame widths on each side of the
            previous frame's position before matching (speed; the crop is composite).
        mode: ``"composite"`` (stitching) or ``"pairwise"`` (frame to frame).
        intensity_scale: pixel value shown as white in the 8-bit images the detectors see
            (None: the 99.5th percentile of all the frames).
    """

    method: str = "sift"
    dbscan: bool = True
    eps: float = 1.0
    min_samples: int = 4
    min_inliers: int = 4
    upsample: int = 2
    search: float = 1.5
    mode: str = "composite"
    intensity_scale: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive (pixels), got {self.eps!r}")
        for name in ("min_samples", "min_inliers", "upsample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass
class StitchResult:
    """Positions of the sagittal frames and the stitched sagittal image.

    Attributes:
        positions: numpy [T, 2] float64, (along-sweep column, depth row) of each frame's
            pixel (0, 0) relative to frame 0, pixels.
        inliers: numpy [T] int, inlier matches per frame (frame 0: 0).
        matches: numpy [T] int, matches before filtering.
        matched: numpy [T] bool, whether the frame was placed by matching (frame 0: True).
        composite: numpy [H', W'] float32, the stitched sagittal image (0 where no frame).
        origin: (row, col) of frame 0's pixel (0, 0) in ``composite``.
    """

    positions: np.ndarray
    inliers: np.ndarray
    matches: np.ndarray
    matched: np.ndarray
    composite: np.ndarray
    origin: tuple[int, int]


def to_uint8(image: np.ndarray, scale: float) -> np.ndarray:
    """[0, scale] -> 0..255, clipped."""
    return np.clip(image * (255.0 / scale), 0, 255).astype(np.uint8)


def _detector(cv2, method: str):
    if method == "sift":
        return cv2.SIFT_create(contrastThreshold=0.01), cv2.NORM_L2
    # ORB's default 31-pixel border and patch find nothing in frames this small.
    return cv2.ORB_create(nfeatures=3000, edgeThreshold=8, patchSize=15,
                          fastThreshold=5), cv2.NORM_HAMMING


def match_points(frame: np.ndarray, reference: np.ndarray, *, method: str = "sift",
                 scale: float = 1.0, upsample: int = 2,
                 reference_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Key point matches between a frame and a reference image (mutual nearest neighbours).

    Args:
        frame: numpy [h, w] float, the new frame.
        reference: numpy [H, W] float, the composite (or the previous frame).
        method: ``"sift"`` or ``"orb"``.
        scale: intensity shown as white in the 8-bit images given to OpenCV.
        upsample: enlargement before detection; the points are returned at native scale.
        reference_mask: numpy [H, W] bool, where the reference has data (None: everywhere).

    Returns:
        (points in the frame, points in the reference): numpy [M, 2] float64 each, (x, y)
        = (column, row) pixels; M = 0 when nothing matched.
    """
    cv2 = _cv2()
    det, norm = _detector(cv2, method)

    def features(img, mask):
        img8 = to_uint8(img, scale)
        if upsample > 1:
            img8 = cv2.resize(img8, None, fx=upsample, fy=upsample,
                              interpolation=cv2.INTER_LINEAR)
            if mask is not None:
                mask = np.kron(mask, np.ones((upsample, upsample), bool))
        m8 = None if mask is None else mask.astype(np.uint8) * 255
        kp, desc = det.detectAndCompute(img8, m8)
        return kp, desc

    kf, df = features(frame, None)
    kr, dr = features(reference, reference_mask)
    empty = np.zeros((0, 2))
    if df is None or dr is None or len(kf) == 0 or len(kr) == 0:
        return empty, empty.copy()
    matches = cv2.BFMatcher(norm, crossCheck=True).match(df, dr)
    if not matches:
        return empty, empty.copy()
    # Key point (x, y) on the enlarged image -> native pixels (centres preserved).
    f = np.array([kf[m.queryIdx].pt for m in matches], np.float64)
    r = np.array([kr[m.trainIdx].pt for m in matches], np.float64)
    return (f + 0.5) / upsample - 0.5, (r + 0.5) / upsample - 0.5


def robust_offset(displacements: np.ndarray, *, dbscan: bool = True, eps: float = 1.0,
                  min_samples: int = 4) -> tuple[np.ndarray | None, np.ndarray]:
    """The common displacement of a set of matches.

    With ``dbscan``, DBSCAN clusters the displacement vectors and the largest cluster
    (ties: the first found) gives the inliers; without, every match is an inlier.

    Args:
        displacements: numpy [M, 2], one displacement vector per match, pixels.
        dbscan: filter with DBSCAN.
        eps, min_samples: DBSCAN's parameters.

    Returns:
        (mean displacement of the inliers, numpy [2], or None when there is none; inlier
        mask, numpy [M] bool).
    """
    disp = np.asarray(displacements, np.float64).reshape(-1, 2)
    keep = np.zeros(len(disp), bool)
    if len(disp) == 0:
        return None, keep
    if not dbscan:
        keep[:] = True
        return disp.mean(0), keep
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(disp).labels_
    clusters = labels[labels >= 0]
    if clusters.size == 0:
        return None, keep
    keep = labels == np.bincount(clusters).argmax()
    return disp[keep].mean(0), keep


class _Canvas:
    """Running sums of frame intensities and weights on a canvas that grows as needed."""

    def __init__(self, rows: int, cols: int):
        pad_r, pad_c = rows // 2 + 2, cols + 2
        self.sum = np.zeros((rows + 2 * pad_r, cols + 2 * pad_c), np.float64)
        self.weight = np.zeros_like(self.sum)
        self.origin = np.array([pad_r, pad_c])  # canvas index of position (0, 0)

    def _ensure(self, top: int, left: int, rows: int, cols: int) -> None:
        before = (max(0, -top), max(0, -left))
        after = (max(0, top + rows - self.sum.shape[0]), max(0, left + cols - self.sum.shape[1]))
        if any(before) or any(after):
            grow = ((before[0], after[0]), (before[1], after[1]))
            self.sum = np.pad(self.sum, grow)
            self.weight = np.pad(self.weight, grow)
            self.origin = self.origin + np.array(before)

    def paste(self, frame: np.ndarray, position: np.ndarray) -> None:
        """Adds ``frame`` with its pixel (0, 0) at ``position`` (col, row), sub-pixel by
        bilinear splatting."""
        from scipy.ndimage import shift

        col, row = float(position[0]), float(position[1])
        r0, c0 = int(np.floor(row)), int(np.floor(col))
        h, w = frame.shape
        top, left = self.origin[0] + r0, self.origin[1] + c0
        self._ensure(top, left, h + 1, w + 1)
        top, left = self.origin[0] + r0, self.origin[1] + c0
        padded = np.zeros((h + 1, w + 1))
        padded[:h, :w] = frame
        ones = np.zeros_like(padded)
        ones[:h, :w] = 1
        frac = (row - r0, col - c0)
        self.sum[top:top + h + 1, left:left + w + 1] += shift(padded, frac, order=1)
        self.weight[top:top + h + 1, left:left + w + 1] += shift(ones, frac, order=1)

    def view(self, col_lo: float, col_hi: float) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(image, mask, row of position 0, col of position 0) of the canvas columns
        whose positions are in [col_lo, col_hi)."""
        lo = max(0, int(np.floor(col_lo)) + self.origin[1])
        hi = min(self.sum.shape[1], int(np.ceil(col_hi)) + self.origin[1])
        w = self.weight[:, lo:hi]
        mask = w > 0.5
        image = np.where(mask, self.sum[:, lo:hi] / np.maximum(w, 1e-12), 0.0)
        return image, mask, int(self.origin[0]), int(self.origin[1] - lo)

    def image(self) -> tuple[np.ndarray, tuple[int, int]]:
        """(the composite cropped to the pixels any frame covers, the canvas index of
        position (0, 0) in that crop)."""
        mask = self.weight > 0.5
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        r0, c0 = int(rows.min()), int(cols.min())
        crop = (slice(r0, int(rows.max()) + 1), slice(c0, int(cols.max()) + 1))
        image = np.where(mask, self.sum / np.maximum(self.weight, 1e-12), 0.0)[crop]
        return image.astype(np.float32), (int(self.origin[0]) - r0, int(self.origin[1]) - c0)


def _check_frames(frames) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 3 or arr.shape[0] < 2 or min(arr.shape[1:]) < 8:
        raise ValueError(f"frames must be [T >= 2, H >= 8, W >= 8], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise ValueError("frames must be finite real numbers")
    return arr.astype(np.float64)


def stitch(frames, config: StitchConfig | None = None, *, progress: bool = False
           ) -> StitchResult:
    """Positions of sagittal frames by stitching (or frame-to-frame matching).

    Args:
        frames: numpy [T, H, W], the sagittal frames in time order.
        config: :class:`StitchConfig` (default: SIFT, DBSCAN, composite).
        progress: show a tqdm bar.

    Returns:
        :class:`StitchResult`.

    Example:
        >>> res = stitch(sweep.sagittal, StitchConfig(method="orb"))
        >>> res.positions[-1]  # last frame, (column, row) from frame 0, pixels
    """
    cfg = config or StitchConfig()
    arr = _check_frames(frames)
    t_n, h, w = arr.shape
    # One scale for the whole sweep (a lost-contact first frame must not set it).
    scale = cfg.intensity_scale or float(np.percentile(arr, 99.5)) or 1.0
    canvas = _Canvas(h, w)
    canvas.paste(arr[0], np.zeros(2))
    pos = np.zeros((t_n, 2))
    inl = np.zeros(t_n, int)
    nm = np.zeros(t_n, int)
    ok = np.ones(t_n, bool)
    bar = range(1, t_n)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="stitch", unit="frame", leave=False, dynamic_ncols=True)
    for t in bar:
        prev = pos[t - 1]
        if cfg.mode == "composite":
            ref, mask, r0, c0 = canvas.view(prev[0] - cfg.search * w,
                                            prev[0] + (1 + cfg.search) * w)
            base = np.array([-c0, -r0], np.float64)
        else:
            ref, mask, base = arr[t - 1], None, pos[t - 1]
        pf, pr = match_points(arr[t], ref, method=cfg.method, scale=scale,
                              upsample=cfg.upsample, reference_mask=mask)
        nm[t] = len(pf)
        offset, keep = robust_offset(pr - pf, dbscan=cfg.dbscan, eps=cfg.eps,
                                     min_samples=cfg.min_samples)
        inl[t] = int(keep.sum())
        if offset is None or inl[t] < cfg.min_inliers:
            ok[t] = False
            step = pos[t - 1] - pos[t - 2] if t >= 2 else np.zeros(2)
            pos[t] = prev + step
            continue
        pos[t] = base + offset
        if cfg.mode == "composite":
            canvas.paste(arr[t], pos[t])
    if cfg.mode == "pairwise":
        for t in range(1, t_n):
            if ok[t]:
                canvas.paste(arr[t], pos[t])
    composite, origin = canvas.image()
    return StitchResult(positions=pos, inliers=inl, matches=nm, matched=ok,
                        composite=composite, origin=origin)


def best_stitch(frames, config: StitchConfig | None = None, *, progress: bool = False
                ) -> tuple[str, StitchResult]:
    """Stitches with SIFT and with ORB and keeps the better: fewer unmatched frames, then
    the larger mean fraction of matches kept as inliers (the paper keeps the better method
    per patient by its result; without the truth, the inliers' support is the evidence).

    Returns:
        (the method kept, its :class:`StitchResult`).
    """
    cfg = config or StitchConfig()
    results = {}
    for method in METHODS:
        c = StitchConfig(**{**cfg.__dict__, "method": method})
        results[method] = stitch(frames, c, progress=progress)

    def score(r: StitchResult):
        frac = r.inliers[1:] / np.maximum(r.matches[1:], 1)
        return (-int((~r.matched).sum()), float(frac.mean()))

    method = max(METHODS, key=lambda m: score(results[m]))
    return method, results[method]
