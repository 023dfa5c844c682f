"""How good a sweep's reconstruction is, against a simulated sweep's truth.

- Frame-position error: the estimated sagittal positions against the true ones, both taken
  relative to frame 0 (a sweep without a tracker fixes positions only up to one global
  translation), Euclidean over (along-sweep, depth), mm.
- PSNR and SSIM of the reconstructed volume against the true ultrasound volume inside the
  swept region, the truth resampled onto the reconstruction grid by aligning frame 0. PSNR
  uses every voxel of the region (peak = the truth's range there); SSIM
  (:func:`mrus_models.metrics.ssim`, Gaussian window 11, σ 1.5) needs a box, so it is taken
  on the largest box that lies inside the region.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .reconstruct import Reconstruction


def position_errors(estimated, truth, spacing: float) -> np.ndarray:
    """Per-frame position error, mm: numpy [T] (frame 0: 0).

    Args:
        estimated: numpy [T, 2], (column, row) of each sagittal frame, pixels.
        truth: numpy [T, 2], the true (S, depth) positions, pixels.
        spacing: pixel size, mm.
    """
    e = np.asarray(estimated, np.float64)
    t = np.asarray(truth, np.float64)
    if e.shape != t.shape or e.ndim != 2 or e.shape[1] != 2:
        raise ValueError(f"estimated and truth must both be [T, 2], got {e.shape} and {t.shape}")
    return np.hypot(*((e - e[0]) - (t - t[0])).T) * spacing


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of ``a`` against the reference ``b`` over ``mask``; the peak is ``b``'s
    range inside the mask."""
    x, y = np.asarray(a, np.float64)[mask], np.asarray(b, np.float64)[mask]
    if x.size == 0:
        raise ValueError("psnr: the mask is empty")
    mse = float(np.mean((x - y) ** 2))
    peak = float(y.max() - y.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def largest_box(mask2d: np.ndarray) -> tuple[slice, slice]:
    """The largest-area axis-aligned rectangle of True pixels in a 2D mask (the classic
    histogram-stack scan, O(rows · cols))."""
    m = np.asarray(mask2d, bool)
    rows, cols = m.shape
    heights = np.zeros(cols, int)
    best = (0, slice(0, 0), slice(0, 0))
    for r in range(rows):
        heights = np.where(m[r], heights + 1, 0)
        stack: list[int] = []
        for c in range(cols + 1):
            h = heights[c] if c < cols else 0
            while stack and heights[stack[-1]] >= h:
                top = stack.pop()
                left = stack[-1] + 1 if stack else 0
                area = heights[top] * (c - left)
                if area > best[0]:
                    best = (area, slice(r - heights[top] + 1, r + 1), slice(left, c))
            stack.append(c)
    return best[1], best[2]


def truth_on_grid(rec: Reconstruction, volume: np.ndarray, truth_positions) -> np.ndarray:
    """The true volume [S, D, L] resampled onto the reconstruction grid (linear), frame 0
    aligned; NaN outside the true volume."""
    from scipy.ndimage import map_coordinates

    t0 = np.asarray(truth_positions, np.float64)[0]
    shift = t0 - np.asarray(rec.positions, np.float64)[0] + rec.sparse.origin
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in rec.volume.shape],
                       indexing="ij")
    coords = [grid[0] + shift[0], grid[1] + shift[1], grid[2]]
    return map_coordinates(np.asarray(volume, np.float64), coords, order=1, mode="constant",
                           cval=np.nan)


def volume_metrics(rec: Reconstruction, volume: np.ndarray, truth_positions) -> dict:
    """PSNR over the swept region and SSIM on the largest box inside it.

    Returns:
        dict with ``psnr`` (dB), ``ssim``, ``region_voxels``, ``ssim_box`` (its shape).
    """
    from ..metrics import ssim

    truth = truth_on_grid(rec, volume, truth_positions)
    region = rec.sparse.region & np.isfinite(truth)
    out = {"psnr": psnr(rec.volume, truth, region), "region_voxels": int(region.sum())}
    along = np.flatnonzero(region.any((1, 2)))
    inside = region[along].all(0)
    rs, cs = largest_box(inside)
    box = (slice(int(along.min()), int(along.max()) + 1), rs, cs)
    a = torch.from_numpy(np.ascontiguousarray(rec.volume[box], np.float64))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(truth[box], np.float64))[None, None]
    side = min(a.shape[2:])
    window = min(11, side if side % 2 else side - 1)
    out["ssim"] = float(ssim(a, b, window=window, sigma=1.5 * window / 11)[0]) \
        if window >= 3 else float("nan")
    out["ssim_box"] = list(a.shape[2:])
    return out


def sweep_metrics(sweep, *, method: str = "sift", fill_method: str = "interp",
                  dip_options=None, progress: bool = False) -> tuple[Reconstruction, dict]:
    """Reconstructs a simulated sweep and measures it.

    Position errors (mean and max, mm) for: stitching with DBSCAN (the reconstruction's
    positions), stitching without DBSCAN, and frame-to-frame matching with DBSCAN; PSNR and
    SSIM of the reconstruction, and of the same fill of the same frames from the true
    positions (what the fill alone allows).

    Returns:
        (the reconstruction from stitching with DBSCAN, the metrics dict).
    """
    from .reconstruct import reconstruct_sweep
    from .stitching import StitchConfig, stitch

    if sweep.positions is None or sweep.volume is None:
        raise ValueError("sweep_metrics needs a simulated sweep (true positions and volume)")
    rec = reconstruct_sweep(sweep, method=method, fill_method=fill_method,
                            dip_options=dip_options, progress=progress)
    used = rec.method
    truth = sweep.positions
    out: dict = {"method": used, "frames": sweep.frames, "spacing_mm": sweep.spacing,
                 "unmatched_frames": [int(i) for i in np.flatnonzero(~rec.stitched.matched)]}

    def errors(tag, positions):
        e = position_errors(positions, truth, sweep.spacing)
        out[f"position_error_mean_mm{tag}"] = float(e.mean())
        out[f"position_error_max_mm{tag}"] = float(e.max())

    errors("", rec.positions)
    errors("_no_dbscan", stitch(sweep.sagittal, StitchConfig(method=used, dbscan=False)).positions)
    errors("_frame_to_frame",
           stitch(sweep.sagittal, StitchConfig(method=used, mode="pairwise")).positions)
    out.update(volume_metrics(rec, sweep.volume, truth))
    # Relative to frame 0, as the estimate: the same grid phase (a fractional shift of the
    # grid would smooth the truth by interpolation and change the comparison).
    ref = reconstruct_sweep(sweep, positions=truth - truth[0], use=rec.used,
                            fill_method=fill_method,
                            dip_options=dip_options, progress=progress)
    m = volume_metrics(ref, sweep.volume, truth)
    out["psnr_true_positions"], out["ssim_true_positions"] = m["psnr"], m["ssim"]
    return rec, out
