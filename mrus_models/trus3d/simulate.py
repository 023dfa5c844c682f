"""A seeded bi-plane TRUS sweep of a 3D volume (MR2US-Pro §II-A, Fig. 2).

The probe, held at a fixed orientation, moves along its long axis (axis S of the sweep
layout, :mod:`.phantom`) at uneven, unknown steps with small jitter along S and in depth.
At each time point it records two frames:

- a rectangular **sagittal** frame: the plane through the probe's long axis (rows = depth,
  columns = along S), ``frame_width`` columns from the probe's current position;
- a fan-shaped **transverse** frame: the plane across the long axis at the probe's tip
  (rows = depth, columns = lateral), zero outside a sector whose apex sits just behind the
  probe face.

Ultrasound model: the pseudo-ultrasound volume is simulated once
(:func:`mrus_models.data.pseudo_ultrasound`, beams along the depth axis from the probe face,
near-parallel as a linear array's: apex 1000 voxels away) and the frames are cut from it,
so that the speckle belongs to the tissue, as real speckle belongs to its scatterers and is
what overlapping frames share. Each frame then gets its own decorrelation (a fraction of its
speckle redrawn) and gain (as time-gain and contact changes do), so no two frames are equal.
Shadows and attenuation follow the depth axis and do not move with the depth jitter (the
jitter is small). Frames are sampled with linear interpolation at the true, fractional
positions, which are kept for evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .phantom import TissueVolume

#: Distance of the volume simulation's apex from the probe face, voxels: far enough for the
#: beams to be near-parallel (a linear array).
_LINEAR_APEX = 1000.0


@dataclass
class Sweep:
    """A recorded (or simulated) bi-plane sweep.

    Attributes:
        sagittal: numpy [T, H, W] float32, the sagittal frames in time order (rows depth,
            columns along the sweep).
        transverse: numpy [T, H, L] float32, the transverse frames (rows depth, columns
            lateral), zero outside the fan.
        fan: numpy [H, L] bool, the transverse frames' field of view.
        spacing: pixel size of both views, mm (isotropic).
        tip_column: column of the sagittal frame (fractional allowed) where the transverse
            plane crosses it: the transverse frame of time t lies at S = position_t +
            tip_column.
        positions: numpy [T, 2] float64 or None, the true (S, D) voxel position of each
            sagittal frame's pixel (0, 0) in the volume (simulated sweeps only).
        volume: numpy [S, D, L] float32 or None, the true ultrasound volume (simulated only).
        bad_frames: indices of frames replaced by a lost-contact frame (simulated only).
    """

    sagittal: np.ndarray
    transverse: np.ndarray
    fan: np.ndarray
    spacing: float
    tip_column: float
    positions: np.ndarray | None = None
    volume: np.ndarray | None = None
    bad_frames: list[int] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return int(self.sagittal.shape[0])


def us_volume(vol: TissueVolume, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The pseudo-ultrasound of ``vol`` with beams along depth from the probe face (D = 0).

    Returns:
        dict with ``image`` (speckled), ``clean`` and ``speckle``: numpy [S, D, L] float32.
    """
    from ..data import pseudo_ultrasound

    tissues = vol.tissues
    # pseudo_ultrasound's probe sits beyond the high-index face of its axis: flip depth.
    half = math.degrees(math.atan((max(tissues.shape[2], tissues.shape[4]) / 2 + 2)
                                  / _LINEAR_APEX)) + 0.5
    parts = pseudo_ultrasound(tissues.flip(3), spacing=vol.spacing, axis=1, half_angle=half,
                              apex_offset=_LINEAR_APEX, seed=seed, return_parts=True)
    return {k: parts[k].flip(3)[0, 0].numpy().astype(np.float32)
            for k in ("image", "clean", "speckle")}


def fan_mask(rows: int, cols: int, *, half_angle: float = 60.0,
             apex_fraction: float = 0.15) -> np.ndarray:
    """Field of view of a transverse frame: numpy [rows, cols] bool.

    The apex lies ``apex_fraction · rows`` rows above the frame (behind the probe face) on
    the middle column; a pixel is inside when its ray's angle from the depth axis is at most
    ``half_angle`` degrees and its distance from the apex at most that of the last row.
    """
    if not 0 < half_angle < 90:
        raise ValueError(f"half_angle must be in (0, 90) degrees, got {half_angle}")
    a = apex_fraction * rows
    r = np.arange(rows, dtype=np.float64)[:, None] + a
    c = np.arange(cols, dtype=np.float64)[None, :] - (cols - 1) / 2
    return (np.abs(c) <= r * math.tan(math.radians(half_angle))) & \
        (np.hypot(r, c) <= rows - 1 + a)


def _sample(image: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    return map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)


def simulate_sweep(vol: TissueVolume, *, frames: int = 40, frame_width: int | None = None,
                   depth_margin: int = 2, step_spread: float = 0.6, jitter: float = 0.4,
                   decorrelation: float = 0.3, gain_jitter: float = 0.03,
                   fan_half_angle: float = 60.0, bad_frames=(), seed: int = 0) -> Sweep:
    """Simulates a bi-plane sweep of ``vol`` (seeded: the same arguments give the same sweep).

    Positions: the sweep covers S from 0 to ``S − frame_width − 2`` in ``frames − 1`` steps
    whose sizes are drawn uniform in ``[1 − step_spread, 1 + step_spread]`` times the mean
    step; each position then moves by N(0, ``jitter``) along S (clipped to the volume) and
    the depth offset is ``depth_margin`` + N(0, ``jitter``) clipped to [0, 2·depth_margin].

    Args:
        vol: the volume (:func:`.phantom.prostate_phantom`, :func:`.phantom.mni_volume`).
        frames: time points T (≥ 2).
        frame_width: sagittal frame width along S, pixels (default 40 % of S).
        depth_margin: room left for the depth jitter, pixels; frames have
            ``D − 2·depth_margin − 1`` rows.
        step_spread: unevenness of the steps (0: equal steps; < 1).
        jitter: standard deviation of the position jitter, pixels.
        decorrelation: fraction of each frame's speckle redrawn (0: frames share the
            volume's speckle exactly).
        gain_jitter: standard deviation of each frame's log gain.
        fan_half_angle: transverse fan half-angle, degrees.
        bad_frames: indices of frames replaced by lost-contact frames (weak fresh speckle,
            no anatomy) in both views.
        seed: seed of the speckle, the steps, the jitter and the per-frame noise.

    Returns:
        :class:`Sweep` with the true positions and volume.
    """
    if not isinstance(vol, TissueVolume):
        raise TypeError(f"vol must be a TissueVolume, got {type(vol).__name__}")
    s_n, d_n, l_n = vol.shape
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    width = round(0.4 * s_n) if frame_width is None else frame_width
    if isinstance(width, bool) or not isinstance(width, int) or not 8 <= width <= s_n - 4:
        raise ValueError(f"frame_width must be an int in [8, {s_n - 4}] for S = {s_n}, "
                         f"got {frame_width!r}")
    rows = d_n - 2 * depth_margin - 1
    if depth_margin < 0 or rows < 8:
        raise ValueError(f"depth_margin must leave at least 8 rows of D = {d_n}, got "
                         f"{depth_margin!r}")
    if not 0 <= step_spread < 1:
        raise ValueError(f"step_spread must be in [0, 1), got {step_spread!r}")
    if not 0 <= decorrelation <= 1:
        raise ValueError(f"decorrelation must be in [0, 1], got {decorrelation!r}")
    bad = sorted({int(b) for b in bad_frames})
    if any(not 0 <= b < frames for b in bad):
        raise ValueError(f"bad_frames must be frame indices in [0, {frames - 1}], got {bad}")
    us = us_volume(vol, seed=seed)
    rng = np.random.default_rng(seed)
    length = s_n - width - 2.0
    steps = 1 + step_spread * rng.uniform(-1, 1, frames - 1)
    p = np.concatenate([[0.0], np.cumsum(steps / steps.sum() * length)])
    p = np.clip(p + rng.normal(0, jitter, frames), 0, length)
    d = np.clip(depth_margin + rng.normal(0, jitter, frames), 0, 2 * depth_margin)
    positions = np.stack([p, d], 1)
    tip = (width - 1) / 2
    fan = fan_mask(rows, l_n, half_angle=fan_half_angle)
    l_mid = (l_n - 1) // 2
    sag = np.empty((frames, rows, width), np.float32)
    tra = np.empty((frames, rows, l_n), np.float32)
    r_idx = np.arange(rows, dtype=np.float64)
    for t in range(frames):
        rr, cc = np.meshgrid(r_idx, np.arange(width, dtype=np.float64), indexing="ij")
        sag_coords = [p[t] + cc, d[t] + rr, np.full_like(rr, l_mid)]
        rr2, ll = np.meshgrid(r_idx, np.arange(l_n, dtype=np.float64), indexing="ij")
        tra_coords = [np.full_like(rr2, p[t] + tip), d[t] + rr2, ll]
        for out, coords in ((sag, sag_coords), (tra, tra_coords)):
            image = _sample(us["image"], coords)
            clean = _sample(us["clean"], coords)
            fresh = np.sqrt(2 / np.pi) * np.hypot(*rng.normal(size=(2, *image.shape)))
            gain = math.exp(gain_jitter * rng.normal())
            out[t] = gain * ((1 - decorrelation) * image + decorrelation * clean * fresh)
        if t in bad:
            for out in (sag, tra):
                out[t] = 0.1 * np.sqrt(2 / np.pi) * np.hypot(*rng.normal(size=(2,
                                                                               *out[t].shape)))
        tra[t] *= fan
    return Sweep(sagittal=sag, transverse=tra, fan=fan, spacing=vol.spacing, tip_column=tip,
                 positions=positions, volume=us["image"], bad_frames=bad)


def simulated_sweep(phantom: str = "prostate", *, seed: int = 0, size=None,
                    spacing: float | None = None, **kwargs) -> Sweep:
    """:func:`simulate_sweep` of :func:`.phantom.tissue_volume` ``(phantom, seed=seed)``."""
    from .phantom import tissue_volume

    return simulate_sweep(tissue_volume(phantom, seed=seed, size=size, spacing=spacing),
                          seed=seed, **kwargs)


__all__ = ["Sweep", "fan_mask", "simulate_sweep", "simulated_sweep", "us_volume"]
