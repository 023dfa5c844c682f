"""A sweep on disk: frames as PNG or NPY files and one ``sweep.json``.

``sweep.json``::

    {
      "pixel_spacing_mm": 0.75,          # both views, isotropic pixels (required)
      "frames": [                         # time order (required, at least 2)
        {"sagittal": "sagittal/0000.png", "transverse": "transverse/0000.png"},
        ...
      ],
      "tip_column": 17.5,                 # sagittal column of the transverse plane
                                          # (optional; default: the middle column)
      "fan": "fan.npy"                    # transverse field of view, non-zero inside
                                          # (optional; default: pixels non-zero in a frame)
    }

Paths are relative to the folder. PNG frames are 8- or 16-bit grey (colour is read as
luminance), scaled to [0, 1]; NPY frames are 2D real arrays read as they are. A simulated
sweep also carries ``"truth"``: the true positions ((S, depth) pixels per frame) and the
planted bad frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .simulate import Sweep

SWEEP_FILE = "sweep.json"
FORMATS = ("npy", "png")


class SweepFormatError(ValueError):
    """A sweep folder that cannot be read (the message says which file and why)."""


def _read_frame(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise SweepFormatError(f"{what} {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise SweepFormatError(f"{what} {path}: not a NumPy array file ({exc})") from None
    elif suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "I", "I;16"):
                im = im.convert("L")
            arr = np.asarray(im)
        arr = arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    else:
        raise SweepFormatError(f"{what} {path}: expected a .png or .npy frame")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise SweepFormatError(f"{what} {path}: expected a real 2D image, got an array of "
                               f"shape {arr.shape} and dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise SweepFormatError(f"{what} {path}: holds NaN or infinite values")
    return arr.astype(np.float32)


def _stack(frames: list[np.ndarray], paths: list[Path], view: str) -> np.ndarray:
    shape = frames[0].shape
    for f, p in zip(frames, paths, strict=True):
        if f.shape != shape:
            raise SweepFormatError(f"{view} frames differ in size: {paths[0]} is {shape}, "
                                   f"{p} is {f.shape}")
    if min(shape) < 8:
        raise SweepFormatError(f"{view} frames must be at least 8 x 8 pixels, got {shape}")
    return np.stack(frames)


def read_sweep(folder) -> Sweep:
    """Reads a sweep folder (see the module docstring).

    Raises:
        SweepFormatError: (a ValueError) a missing or empty folder, no ``sweep.json`` or
            one without the required keys, missing frame files, frames of different sizes.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SweepFormatError(f"SWEEP_DIR {root}: no such folder")
    if not any(root.iterdir()):
        raise SweepFormatError(f"SWEEP_DIR {root}: the folder is empty (expected frames and "
                               f"{SWEEP_FILE})")
    meta_path = root / SWEEP_FILE
    if not meta_path.is_file():
        raise SweepFormatError(f"SWEEP_DIR {root}: no {SWEEP_FILE} (the frame order and pixel "
                               "spacing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SweepFormatError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise SweepFormatError(f"{meta_path}: expected a JSON object")
    for key in ("pixel_spacing_mm", "frames"):
        if key not in meta:
            raise SweepFormatError(f"{meta_path}: missing {key!r}")
    spacing = meta["pixel_spacing_mm"]
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not spacing > 0:
        raise SweepFormatError(f"{meta_path}: pixel_spacing_mm must be a positive number (mm), "
                               f"got {spacing!r}")
    entries = meta["frames"]
    if not isinstance(entries, list) or len(entries) < 2:
        raise SweepFormatError(f"{meta_path}: frames must list at least 2 time points, got "
                               f"{entries if not isinstance(entries, list) else len(entries)}")
    views: dict[str, tuple[list, list]] = {"sagittal": ([], []), "transverse": ([], [])}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not all(isinstance(e.get(v), str) for v in views):
            raise SweepFormatError(f"{meta_path}: frames[{i}] must be an object with "
                                   "'sagittal' and 'transverse' file names")
        for v, (arrs, paths) in views.items():
            p = root / e[v]
            arrs.append(_read_frame(p, f"{v} frame {i}"))
            paths.append(p)
    sag = _stack(*views["sagittal"], "sagittal")
    tra = _stack(*views["transverse"], "transverse")
    tip = meta.get("tip_column", (sag.shape[2] - 1) / 2)
    if isinstance(tip, bool) or not isinstance(tip, (int, float)):
        raise SweepFormatError(f"{meta_path}: tip_column must be a number, got {tip!r}")
    if "fan" in meta:
        fan = _read_frame(root / str(meta["fan"]), "fan") != 0
        if fan.shape != tra.shape[1:]:
            raise SweepFormatError(f"{meta_path}: the fan is {fan.shape}, the transverse "
                                   f"frames {tra.shape[1:]}")
    else:
        fan = (tra != 0).any(0)
    truth = meta.get("truth") or {}
    positions = truth.get("positions")
    return Sweep(sagittal=sag, transverse=tra * fan, fan=fan, spacing=float(spacing),
                 tip_column=float(tip),
                 positions=None if positions is None else np.asarray(positions, np.float64),
                 bad_frames=list(truth.get("bad_frames", [])))


def _write_frame(path: Path, frame: np.ndarray, fmt: str, scale: float) -> None:
    if fmt == "npy":
        np.save(path, frame.astype(np.float32))
    else:
        from PIL import Image

        # 16-bit grey: [0, scale] -> 0..65535 keeps the speckle's dynamic range.
        data = np.round(np.clip(frame / scale, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(data).save(path)


def write_sweep(sweep: Sweep, folder, *, fmt: str = "npy") -> Path:
    """Writes ``sweep`` as frames + ``sweep.json`` (with the truth when it has one).

    PNG frames are 16-bit, scaled by the 99.9th percentile of all frames (clipped above).

    Returns:
        the path of ``sweep.json``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    root = Path(folder)
    for v in ("sagittal", "transverse"):
        (root / v).mkdir(parents=True, exist_ok=True)
    scale = float(np.percentile(np.concatenate([sweep.sagittal.ravel(),
                                                sweep.transverse.ravel()]), 99.9)) or 1.0
    entries = []
    for t in range(sweep.frames):
        e = {}
        for v, arr in (("sagittal", sweep.sagittal), ("transverse", sweep.transverse)):
            name = f"{v}/{t:04d}.{fmt}"
            _write_frame(root / name, arr[t], fmt, scale)
            e[v] = name
        entries.append(e)
    np.save(root / "fan.npy", sweep.fan.astype(np.uint8))
    meta = {"pixel_spacing_mm": sweep.spacing, "tip_column": sweep.tip_column,
            "fan": "fan.npy", "frames": entries}
    if sweep.positions is not None:
        meta["truth"] = {"positions": np.asarray(sweep.positions).tolist(),
                         "bad_frames": list(sweep.bad_frames),
                         "position_axes": ["S (along the sweep)", "depth"]}
    path = root / SWEEP_FILE
    path.write_text(json.dumps(meta, indent=1))
    return path
