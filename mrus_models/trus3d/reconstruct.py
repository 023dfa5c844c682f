"""From sagittal positions to a 3D volume (MR2US-Pro §II-A, Fig. 3, yellow and purple arrows).

The sagittal and transverse frames of one time point are orthogonal views from the same
probe: the transverse plane crosses the sagittal frame at ``tip_column``, so a sagittal
frame at (column c, row r) puts its transverse frame at S = c + tip_column and shifts it by
r in depth. The transverse frames are splatted (bilinear in S and depth) into a sparse
volume; the missing voxels are then filled by linear interpolation along S (fast) or by
Deep Image Prior (:mod:`.inpaint`).

Reconstruction grid: S from the first to the last transverse plane (index 0 = the smallest
S), depth from the smallest depth shift, lateral = the transverse frame's columns; voxels
are the frames' pixels (isotropic ``spacing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILLS = ("interp", "dip")


@dataclass
class SparseVolume:
    """Transverse frames placed along S.

    Attributes:
        values: numpy [S', D', L] float32, the weighted mean of the frames' pixels per voxel
            (0 where unknown).
        weight: numpy [S', D', L] float32, the splatting weight per voxel.
        known: numpy [S', D', L] bool, ``weight`` above the threshold.
        region: numpy [S', D', L] bool, the swept region: between the first and last
            transverse plane, on the (depth, lateral) lines that hold a known voxel (the
            union of the depth-shifted fans).
        origin: numpy [2] float64, the (S, depth) position, in the sagittal positions'
            frame (frame 0 at 0), of voxel (0, 0, ·).
    """

    values: np.ndarray
    weight: np.ndarray
    known: np.ndarray
    region: np.ndarray
    origin: np.ndarray


def sparse_volume(transverse, positions, *, tip_column: float, fan=None,
                  threshold: float = 0.25) -> SparseVolume:
    """Places the transverse frames at their positions along S (and shifts them in depth).

    Args:
        transverse: numpy [T, H, L], the transverse frames in time order.
        positions: numpy [T, 2], (column, row) of each sagittal frame from
            :func:`.stitching.stitch` (or the truth), pixels.
        tip_column: sagittal column of the transverse plane.
        fan: numpy [H, L] bool, the transverse field of view (None: the pixels that are
            non-zero in at least one frame).
        threshold: a voxel is known where its splatting weight is at least this.

    Returns:
        :class:`SparseVolume`.
    """
    tra = np.asarray(transverse, np.float64)
    pos = np.asarray(positions, np.float64)
    if tra.ndim != 3 or pos.shape != (tra.shape[0], 2):
        raise ValueError(f"transverse must be [T, H, L] and positions [T, 2], got "
                         f"{tra.shape} and {pos.shape}")
    t_n, h, l_n = tra.shape
    fov = (tra != 0).any(0) if fan is None else np.asarray(fan, bool)
    if fov.shape != (h, l_n):
        raise ValueError(f"fan must be [{h}, {l_n}] like the transverse frames, got {fov.shape}")
    s = pos[:, 0] + tip_column
    d = pos[:, 1]
    origin = np.array([np.floor(s.min()), np.floor(d.min())])
    s_rel, d_rel = s - origin[0], d - origin[1]
    shape = (int(np.floor(s_rel.max())) + 2, h + int(np.floor(d_rel.max())) + 2, l_n)
    acc = np.zeros(shape)
    wsum = np.zeros(shape)
    m = fov.astype(np.float64)
    for t in range(t_n):
        s0, d0 = int(np.floor(s_rel[t])), int(np.floor(d_rel[t]))
        fs, fd = s_rel[t] - s0, d_rel[t] - d0
        for a, ws in ((0, 1 - fs), (1, fs)):
            for b, wd in ((0, 1 - fd), (1, fd)):
                wt = ws * wd
                if wt <= 0:
                    continue
                acc[s0 + a, d0 + b:d0 + b + h] += wt * m * tra[t]
                wsum[s0 + a, d0 + b:d0 + b + h] += wt * m
    known = wsum >= threshold
    values = np.where(known, acc / np.maximum(wsum, 1e-12), 0.0)
    # Only lines with a known voxel: every voxel of the region can then be filled.
    footprint = known.any(0)
    along = np.zeros(shape[0], bool)
    along[int(np.ceil(s_rel.min())):int(np.floor(s_rel.max())) + 1] = True
    region = along[:, None, None] & footprint[None]
    return SparseVolume(values=values.astype(np.float32), weight=wsum.astype(np.float32),
                        known=known, region=region, origin=origin)


def interpolate_fill(sparse: SparseVolume) -> np.ndarray:
    """Fills every unknown voxel of the swept region by linear interpolation along S
    between the nearest known voxels on its (depth, lateral) line (the nearest one where
    only one side is known). Known voxels keep their values; outside the region: 0.

    Returns:
        numpy [S', D', L] float32.
    """
    v, known = sparse.values.astype(np.float64), sparse.known
    n = v.shape[0]
    idx = np.arange(n)[:, None, None]
    prev = np.maximum.accumulate(np.where(known, idx, -1), axis=0)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(known, idx, n), 0), axis=0), 0)
    has_p, has_n = prev >= 0, nxt < n
    pc, nc = np.clip(prev, 0, n - 1), np.clip(nxt, 0, n - 1)
    vp = np.take_along_axis(v, pc, 0)
    vn = np.take_along_axis(v, nc, 0)
    span = np.maximum(nc - pc, 1)
    w = np.clip((idx - pc) / span, 0, 1)
    both = has_p & has_n
    out = np.where(both, (1 - w) * vp + w * vn, np.where(has_p, vp, np.where(has_n, vn, 0.0)))
    out = np.where(known, v, out)
    return np.where(sparse.region | known, out, 0.0).astype(np.float32)


def fill(sparse: SparseVolume, method: str = "interp", **dip_options) -> np.ndarray:
    """``"interp"`` (:func:`interpolate_fill`) or ``"dip"`` (:func:`.inpaint.dip_inpaint`,
    keyword options passed on)."""
    if method == "interp":
        if dip_options:
            raise ValueError(f"options {sorted(dip_options)} are for fill='dip' only")
        return interpolate_fill(sparse)
    if method == "dip":
        from .inpaint import dip_inpaint

        return dip_inpaint(sparse, **dip_options)
    raise ValueError(f"fill must be one of {FILLS}, got {method!r}")


@dataclass
class Reconstruction:
    """A reconstructed volume and how it was made.

    Attributes:
        volume: numpy [S', D', L] float32, the filled volume (0 outside the swept region).
        sparse: the :class:`SparseVolume` before filling.
        positions: numpy [T, 2] float64, the sagittal frames' (column, row), pixels.
        used: numpy [T] bool, the time points whose transverse frames were placed.
        method: the feature detector used (``"sift"`` / ``"orb"``) or ``"given"``.
        stitched: the stitching result (None when the positions were given).
        spacing: voxel size, mm.
    """

    volume: np.ndarray
    sparse: SparseVolume
    positions: np.ndarray
    used: np.ndarray
    method: str
    stitched: object
    spacing: float

    @property
    def affine(self) -> np.ndarray:
        """Voxel (i, j, k) -> mm in the sweep's frame (frame 0's sagittal pixel (0, 0) at 0;
        axes S, depth, lateral)."""
        a = np.diag([self.spacing] * 3 + [1.0])
        a[:2, 3] = self.sparse.origin * self.spacing
        return a


def reconstruct_sweep(sweep, *, stitch_config=None, method: str | None = None,
                      fill_method: str = "interp", positions=None, use=None, dip_options=None,
                      progress: bool = False) -> Reconstruction:
    """The whole §II-A pipeline on a :class:`.simulate.Sweep`: stitch the sagittal frames
    (or take ``positions``), place the transverse frames, fill.

    Args:
        sweep: the sweep.
        stitch_config: :class:`.stitching.StitchConfig` (default: SIFT + DBSCAN, composite).
        method: ``"sift"``, ``"orb"`` or ``"best"`` (both, :func:`.stitching.best_stitch`);
            overrides the config's method.
        fill_method: ``"interp"`` or ``"dip"``.
        positions: numpy [T, 2], known sagittal positions (skips stitching).
        use: numpy [T] bool, the time points whose transverse frames enter the volume
            (default: after stitching, the matched frames: an unmatched frame's position
            is only extrapolated, and its content is usually what made it fail, a probe
            off the wall; with given positions, all).
        dip_options: keyword options of :func:`.inpaint.dip_inpaint`.
        progress: tqdm bars.

    Returns:
        :class:`Reconstruction`.
    """
    from .stitching import StitchConfig, best_stitch, stitch

    if fill_method not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill_method!r}")
    stitched = None
    if positions is None:
        cfg = stitch_config or StitchConfig()
        if method == "best":
            method, stitched = best_stitch(sweep.sagittal, cfg, progress=progress)
        else:
            if method is not None:
                cfg = StitchConfig(**{**cfg.__dict__, "method": method})
            method = cfg.method
            stitched = stitch(sweep.sagittal, cfg, progress=progress)
        positions = stitched.positions
    else:
        method = "given"
        positions = np.asarray(positions, np.float64)
    if use is None:
        use = stitched.matched if stitched is not None else np.ones(len(positions), bool)
    use = np.asarray(use, bool)
    if use.shape != (len(positions),) or use.sum() < 1:
        raise ValueError(f"use must be [T = {len(positions)}] bool with a True, got shape "
                         f"{use.shape}")
    sparse = sparse_volume(sweep.transverse[use], positions[use],
                           tip_column=sweep.tip_column, fan=sweep.fan)
    opts = dict(dip_options or {})
    if fill_method == "dip":
        opts.setdefault("progress", progress)
    volume = fill(sparse, fill_method, **opts)
    return Reconstruction(volume=volume, sparse=sparse, positions=positions, used=use,
                          method=method,
                          stitched=stitched, spacing=float(sweep.spacing))
