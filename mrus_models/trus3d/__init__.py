"""Probe-free TRUS 3D reconstruction from bi-plane sweeps (MR2US-Pro §II-A, Fig. 2-3).

A bi-plane probe records, at each time point, a rectangular sagittal frame along its long
axis and a fan-shaped transverse frame from its tip. Holding the probe's orientation and
moving it along the sweep, the sagittal frames are patches of one plane: they are stitched
one by one onto the growing composite (SIFT or ORB matches, DBSCAN on the displacement
vectors, the largest cluster as inliers), each frame's position is the mean inlier
displacement, the positions pass to the transverse frames (orthogonal views of the same
time point), which fill a sparse volume, and the gaps are inpainted by a Deep Image Prior
or interpolated.

- :mod:`.phantom`: a seeded prostate-like phantom and the MNI152 tissue maps.
- :mod:`.simulate`: a seeded bi-plane sweep of either, with the true positions.
- :mod:`.stitching`: stitching (and the frame-to-frame baseline).
- :mod:`.reconstruct`, :mod:`.inpaint`: sparse volume, interpolation and DIP fills.
- :mod:`.metrics`: position errors, PSNR / SSIM against the truth.
- :mod:`.io`: sweeps on disk (PNG / NPY frames + ``sweep.json``).

OpenCV (headless) is needed for the matching only: ``pip install "mrus[trus3d]"``.
"""

from .io import SweepFormatError, read_sweep, write_sweep
from .metrics import position_errors, psnr, sweep_metrics, volume_metrics
from .phantom import TissueVolume, mni_volume, prostate_phantom, tissue_volume
from .reconstruct import (
    Reconstruction,
    SparseVolume,
    fill,
    interpolate_fill,
    reconstruct_sweep,
    sparse_volume,
)
from .simulate import Sweep, fan_mask, simulate_sweep, simulated_sweep, us_volume
from .stitching import StitchConfig, StitchResult, best_stitch, match_points, robust_offset, stitch

__all__ = [
    "Reconstruction",
    "SparseVolume",
    "StitchConfig",
    "StitchResult",
    "Sweep",
    "SweepFormatError",
    "TissueVolume",
    "best_stitch",
    "fan_mask",
    "fill",
    "interpolate_fill",
    "match_points",
    "mni_volume",
    "position_errors",
    "prostate_phantom",
    "psnr",
    "read_sweep",
    "reconstruct_sweep",
    "robust_offset",
    "simulate_sweep",
    "simulated_sweep",
    "sparse_volume",
    "stitch",
    "sweep_metrics",
    "tissue_volume",
    "us_volume",
    "volume_metrics",
    "write_sweep",
]
