"""The ``mrus`` command: ``info``, ``demo``, ``register``, ``train``, ``evaluate``,
``predict``, ``translate``, ``mr2us``, ``trus3d`` and ``bench``.

Bad input (a missing file, a 4D image, images of different dimension, an unknown option
value, an unknown model, a bad ``--set``, a checkpoint of another model or architecture, an
``--out`` holding another run) ends with one ``mrus: error: ...`` line on stderr and exit
status 2, never a traceback; nothing is written before the input has passed its checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2

#: Registration settings of the demo per resolution (mm): 8, 4 and 2 mm grids, the velocity
#: on the 8 mm grid's spacing, so that 2 mm runs in well under a minute on two CPU cores
#: (the short 2 mm level takes the endpoint error from about 1 mm to 0.5 mm for T2).
DEMO_SETTINGS = {
    2: dict(levels=(4, 2, 1), iterations=(100, 40, 20), velocity_factor=4),
    1: dict(levels=(8, 4, 2), iterations=(100, 40, 20), velocity_factor=8),
}
DEMO_COMMON = dict(similarity="mi", transform="affine+svf", smoothness=50.0,
                   velocity_sigma=1.5)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _fail(message: str) -> int:
    print(f"mrus: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --------------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from mrus_kernels.info import info_lines

    from . import __version__

    print("\n".join([f"mrus_models  {__version__}"] + info_lines()))
    return 0


# --------------------------------------------------------------------------- helpers


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def _dice(a, b, label: int) -> float:
    x, y = a == label, b == label
    denom = int(x.sum()) + int(y.sum())
    return 2.0 * int((x & y).sum()) / denom if denom else float("nan")


def _endpoint_errors(ddf, truth, affine, region):
    """(mean, 95th percentile) of |ddf - truth| in mm over ``region`` [1, 1, *S] bool."""
    import torch

    from mrus_kernels import ddf_to_mm

    err = ddf_to_mm((ddf - truth).double(), torch.from_numpy(affine).to(ddf.device))
    err = err.square().sum(1).sqrt()[region[:, 0]].float().cpu()
    return float(err.mean()), float(torch.quantile(err, 0.95))


def _timed_reference(pair_fixed, pair_moving, settings, result, device, moving_mask,
                     fixed_mask, iterations: int, progress: bool):
    """Seconds per iteration of each stage of ``result`` on the plain-PyTorch ``torch``
    backend, from ``iterations`` iterations per stage (a full reference run would take
    minutes): the estimated reference wall time of the same run."""
    from .register import register

    short = dict(settings)
    short["iterations"] = tuple(iterations for _ in settings["levels"])
    ref = register(pair_fixed, pair_moving, device=device, backend="torch", progress=progress,
                   moving_mask=moving_mask, fixed_mask=fixed_mask, **short)
    per_it = {(s["stage"], s["factor"]): s["seconds"] / max(1, s["iterations"])
              for s in ref.stages}
    return sum(per_it[(s["stage"], s["factor"])] * s["iterations"] for s in result.stages)


def _save_png(path, pair, warped, ddf, spacing) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from mrus_kernels import ddf_to_mm

    affine = torch.from_numpy(pair.affine)
    truth_mm = ddf_to_mm(pair.truth.ddf.double(), affine).square().sum(1).sqrt()[0]
    found_mm = ddf_to_mm(ddf.detach().cpu().double(), affine).square().sum(1).sqrt()[0]
    fixed, moving, warped_ = (t[0, 0].detach().cpu().float() for t in
                              (pair.fixed, pair.moving, warped))

    def norm(x):
        hi = float(torch.quantile(x.flatten()[:: max(1, x.numel() // 500_000)], 0.995))
        return (x / max(hi, 1e-6)).clamp(0, 1)

    fixed, moving, warped_ = norm(fixed), norm(moving), norm(warped_)
    size = fixed.shape
    tiles = torch.stack(torch.meshgrid(*[torch.arange(n) // 8 for n in size], indexing="ij"))
    checker = torch.where(tiles.sum(0) % 2 == 0, fixed, warped_)
    vmax = float(max(truth_mm.max(), found_mm.max()))
    columns = [("fixed (T1)", fixed, "gray", 1), (f"moving ({pair.modality})", moving, "gray", 1),
               ("warped moving", warped_, "gray", 1), ("checkerboard", checker, "gray", 1),
               ("|true ddf| mm", truth_mm, "magma", vmax),
               ("|recovered ddf| mm", found_mm, "magma", vmax)]
    centre = [n // 2 for n in size]
    views = [("sagittal", 0), ("coronal", 1), ("axial", 2)]
    fig, axes = plt.subplots(3, len(columns), figsize=(3 * len(columns), 9))
    for r, (view, axis) in enumerate(views):
        for c, (title, vol, cmap, vm) in enumerate(columns):
            sl = vol.select(axis, centre[axis]).T.numpy()
            ax = axes[r, c]
            im = ax.imshow(sl, origin="lower", cmap=cmap, vmin=0, vmax=vm)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(view)
            if c == len(columns) - 1 and r == 0:
                fig.colorbar(im, ax=axes[:, -2:].ravel().tolist(), shrink=0.6, label="mm")
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    import torch

    from mrus_kernels import folding_fraction, warp

    from .data import LABELS, default_pair, write_displacement, write_nifti
    from .register import register

    device = _device(args.device)
    progress = not args.quiet
    t_start = time.perf_counter()
    pair = default_pair(args.modality, resolution=args.resolution, seed=args.seed,
                        max_displacement=args.max_displacement)
    t_data = time.perf_counter() - t_start
    settings = dict(DEMO_COMMON, **DEMO_SETTINGS[args.resolution])
    if args.iterations is not None:
        settings["iterations"] = tuple(args.iterations)
    fixed, moving = pair.fixed.to(device), pair.moving.to(device)
    moving_mask = pair.moving_fov.to(device) if args.modality == "us" else None
    # Warm-up on a tiny pair: the first call of each op pays one-off set-up costs
    # (library loading, dispatch caches) that are no part of the registration's speed.
    tiny = torch.rand(1, 1, 8, 8, 8, device=device)
    register(tiny, tiny, levels=(1,), iterations=1, progress=False)
    result = register(fixed, moving, device=device, progress=progress, moving_mask=moving_mask,
                      **settings)
    n_it = result.iterations

    ref_seconds = None
    if not args.no_compare:
        ref_seconds = _timed_reference(fixed, moving, settings, result, device, moving_mask,
                                       None, args.compare_iterations, progress)

    ddf = result.ddf
    truth = pair.truth.ddf.to(device)
    labels_after = warp(pair.moving_labels.to(device).float(), ddf, mode="nearest").long()
    fixed_labels = pair.fixed_labels.to(device)
    moving_labels = pair.moving_labels.to(device)
    brain = pair.fixed_mask.to(device)
    before = _endpoint_errors(torch.zeros_like(truth), truth, pair.affine, brain)
    after = _endpoint_errors(ddf, truth, pair.affine, brain)
    folding = float(folding_fraction(ddf)[0])

    print(f"mrus demo: MNI152 T1 (fixed) vs simulated {args.modality.upper()} under a known "
          f"warp (moving), {args.resolution} mm, grid {tuple(pair.fixed.shape[2:])}, "
          f"device {device}, {torch.get_num_threads()} CPU threads")
    print(f"  transform {settings['transform']}, similarity MI, levels {settings['levels']}, "
          f"iterations {settings['iterations']}")
    print(f"  {'':22}{'before':>10}{'after':>10}")
    for k in (1, 2, 3):
        print(f"  Dice {LABELS[k]:<17}{_dice(moving_labels, fixed_labels, k):10.3f}"
              f"{_dice(labels_after, fixed_labels, k):10.3f}")
    print(f"  {'EPE mean (mm, brain)':<22}{before[0]:10.2f}{after[0]:10.2f}"
          f"   ({100 * (1 - after[0] / before[0]):.0f} % lower)")
    print(f"  {'EPE p95 (mm, brain)':<22}{before[1]:10.2f}{after[1]:10.2f}")
    if args.modality == "us":
        seen = (warp(pair.moving_fov.to(device).float(), truth) > 0.5) & brain
        b_fov = _endpoint_errors(torch.zeros_like(truth), truth, pair.affine, seen)
        a_fov = _endpoint_errors(ddf, truth, pair.affine, seen)
        print(f"  {'EPE mean (mm, fan)':<22}{b_fov[0]:10.2f}{a_fov[0]:10.2f}")
    print(f"  folding fraction (det J <= 0): {folding:.2e}")
    print(f"  registration {result.seconds:.2f} s, {n_it} iterations, "
          f"{1e3 * result.seconds / max(1, n_it):.1f} ms/iteration; data {t_data:.2f} s")
    if ref_seconds is not None:
        print(f"  plain-PyTorch reference backend: {ref_seconds:.1f} s estimated for the same "
              f"run ({args.compare_iterations} timed iterations per stage): mrus is "
              f"{ref_seconds / result.seconds:.1f}x faster")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(out / "fixed.nii.gz", pair.fixed, pair.affine)
    write_nifti(out / "moving.nii.gz", pair.moving, pair.affine)
    write_nifti(out / "warped.nii.gz", result.warped.cpu(), pair.affine)
    write_displacement(out / "ddf.nii.gz", ddf.cpu(), pair.affine)
    write_displacement(out / "ddf_truth.nii.gz", pair.truth.ddf, pair.affine)
    wrote = ["fixed.nii.gz", "moving.nii.gz", "warped.nii.gz", "ddf.nii.gz", "ddf_truth.nii.gz"]
    if not args.no_png:
        _save_png(out / "demo.png", pair, result.warped, ddf, pair.spacing)
        wrote.append("demo.png")
    print(f"  wrote {', '.join(wrote)} to {out}/ (total {time.perf_counter() - t_start:.1f} s)")
    return 0


# --------------------------------------------------------------------------- register


def _grids_equal(a, b) -> bool:
    import numpy as np

    return tuple(a.data.shape[2:]) == tuple(b.data.shape[2:]) and \
        np.allclose(a.affine_nd, b.affine_nd, atol=1e-4)


def _fixed_to_moving(fixed, moving, device):
    """Displacement [1, ndim, *S_fixed] in moving voxel units that takes each fixed voxel to
    the same world point in the moving image: ``A_m⁻¹ A_f x - x``."""
    import numpy as np
    import torch

    from .data import affine_ddf

    m = np.linalg.inv(moving.affine_nd) @ fixed.affine_nd
    return affine_ddf(torch.from_numpy(m), tuple(fixed.data.shape[2:]), device=device)


def _read_pair(fixed_path, moving_path):
    """The fixed and moving NIfTI images, checked: same dimension, at least 4 voxels a side."""
    from .data import read_nifti

    fixed = read_nifti(fixed_path)
    moving = read_nifti(moving_path)
    if fixed.ndim != moving.ndim:
        raise CLIError(
            f"fixed and moving must have the same dimension, got a {fixed.ndim}D fixed image "
            f"{tuple(fixed.data.shape[2:])} and a {moving.ndim}D moving image "
            f"{tuple(moving.data.shape[2:])}"
        )
    for name, img in (("fixed", fixed), ("moving", moving)):
        if min(img.data.shape[2:]) < 4:
            raise CLIError(f"{name} image is too small to register: {tuple(img.data.shape[2:])}")
    return fixed, moving


def _moving_on_fixed_grid(fixed, moving, device, quiet: bool):
    """(moving image resampled into the fixed grid, the fixed-to-moving voxel displacement or
    None when both share one grid)."""
    from mrus_kernels import warp

    if _grids_equal(fixed, moving):
        return moving.data.to(device), None
    # One resampling into the fixed grid through the two affines; the final warped image
    # is resampled once more from the original moving image, not from this copy.
    to_moving = _fixed_to_moving(fixed, moving, device)
    moving_on_fixed = warp(moving.data.to(device), to_moving)
    if not quiet:
        print(f"moving resampled from {tuple(moving.data.shape[2:])} into the fixed grid "
              f"{tuple(fixed.data.shape[2:])} through the two affines")
    return moving_on_fixed, to_moving


def _warp_original(fixed, moving, to_moving, ddf, device):
    """The original moving image warped by ``ddf`` (fixed voxel units, on the fixed grid)."""
    import numpy as np
    import torch

    from mrus_kernels import warp

    if to_moving is None:
        return warp(moving.data.to(device), ddf)
    # Moving voxel of fixed voxel x: M (x + u(x)) with M = A_m⁻¹ A_f.
    m = torch.from_numpy(np.linalg.inv(moving.affine_nd) @ fixed.affine_nd).to(
        device=device, dtype=torch.float32)
    n = ddf.shape[1]
    total = to_moving + torch.einsum("ij,bj...->bi...", m[:n, :n], ddf)
    return warp(moving.data.to(device), total)


def cmd_register(args) -> int:
    from .data import write_displacement, write_nifti
    from .register import register

    device = _device(args.device)
    fixed, moving = _read_pair(args.fixed, args.moving)
    moving_on_fixed, to_moving = _moving_on_fixed_grid(fixed, moving, device, args.quiet)
    kw = {}
    if args.levels is not None:
        kw["levels"] = tuple(args.levels)
    if args.iterations is not None:
        kw["iterations"] = tuple(args.iterations) if len(args.iterations) > 1 else \
            args.iterations[0]
    result = register(fixed.data.to(device), moving_on_fixed, similarity=args.similarity,
                      transform=args.transform, device=device, progress=not args.quiet,
                      smoothness=args.smoothness, **kw)
    ddf = result.ddf
    warped = result.warped if to_moving is None else \
        _warp_original(fixed, moving, to_moving, ddf, device)
    write_nifti(args.output, warped.cpu(), fixed.affine)
    if args.ddf:
        write_displacement(args.ddf, ddf.cpu(), fixed.affine)
    if not args.quiet:
        print(f"registered in {result.seconds:.2f} s ({result.iterations} iterations), final "
              f"loss {result.loss_history[-1]:.4f}; wrote {args.output}"
              + (f" and {args.ddf}" if args.ddf else ""))
    return 0


# --------------------------------------------------------------------------- models


def _auto_device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return _device(name)


def cmd_train(args) -> int:
    from .train import Trainer, apply_overrides, get_task
    from .train.trainer import saved_config

    task = get_task(args.model)
    # A resumed run starts from its own configuration: only what is given here changes.
    config = saved_config(task, args.out) if args.resume else task.default_config()
    config = apply_overrides(config, args.set)
    flags = [f"steps={args.steps}"] if args.steps is not None else []
    flags += [f"batch_size={args.batch_size}"] if args.batch_size is not None else []
    config = apply_overrides(config, flags)
    trainer = Trainer(task, config, args.out, _auto_device(args.device), resume=args.resume,
                      progress=False if args.quiet else None)
    try:
        start = trainer.step
        metrics = trainer.fit()
    finally:
        trainer.close()
    if trainer.step == start and trainer.rank == 0:
        print(f"{args.model}: the run in {args.out} is at step {start} of {config.steps}; "
              "nothing to train (give a larger --steps to continue it)")
    elif not args.quiet and trainer.rank == 0:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{args.model}: trained steps {start + 1}-{trainer.step} on {trainer.device}"
              + (f" x {trainer.world} processes" if trainer.world > 1 else "")
              + (f"; validation: {shown}" if shown else "") + f"; wrote {args.out}/")
    return 0


def cmd_evaluate(args) -> int:
    import json

    import torch
    from torch.utils.data import DataLoader

    from .train import get_task
    from .train.trainer import load_checkpoint

    task = get_task(args.model)
    device = _auto_device(args.device)
    overrides = args.set + ([f"batch_size={args.batch_size}"] if args.batch_size else [])
    model, config, ckpt = load_checkpoint(task, args.checkpoint, device, overrides)
    loader = DataLoader(task.dataset(config, args.split), batch_size=config.batch_size,
                        shuffle=False, num_workers=config.num_workers)
    with torch.no_grad():
        metrics = {k: float(v) for k, v in task.evaluate(model, loader, config, device).items()}
    if args.json:
        print(json.dumps({"model": args.model, "split": args.split, "step": ckpt.get("step"),
                          **metrics}))
    else:
        print(f"{args.model} at step {ckpt.get('step')}, {args.split} split "
              f"({len(loader.dataset)} items):")
        for k, v in metrics.items():
            print(f"  {k:<24}{v:.6g}")
    return 0


def cmd_predict(args) -> int:
    import torch

    from .data import write_displacement, write_nifti
    from .train import get_task
    from .train.trainer import load_checkpoint

    task = get_task(args.model)
    device = _auto_device(args.device)
    model, config, _ = load_checkpoint(task, args.checkpoint, device)
    fixed, moving = _read_pair(args.fixed, args.moving)
    ndim = getattr(config, "ndim", fixed.ndim)
    if ndim != fixed.ndim:
        raise CLIError(f"{args.model} in {args.checkpoint} registers {ndim}D images, got "
                       f"{fixed.ndim}D images {tuple(fixed.data.shape[2:])}")
    moving_on_fixed, to_moving = _moving_on_fixed_grid(fixed, moving, device, args.quiet)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = task.predict(model, fixed.data.to(device), moving_on_fixed, config)
    ddf = out["ddf"].float()
    warped = out["warped"] if to_moving is None else \
        _warp_original(fixed, moving, to_moving, ddf, device)
    write_nifti(args.output, warped.float().cpu(), fixed.affine)
    if args.ddf:
        write_displacement(args.ddf, ddf.cpu(), fixed.affine)
    if not args.quiet:
        print(f"{args.model}: predicted in {time.perf_counter() - t0:.2f} s; wrote "
              f"{args.output}" + (f" and {args.ddf}" if args.ddf else ""))
    return 0


def _nifti_path(path: str, what: str) -> str:
    """``path`` if it names a .nii / .nii.gz file; CLIError otherwise."""
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        raise CLIError(f"{what} {path}: expected a .nii or .nii.gz file")
    return path


def cmd_mr2us(args) -> int:
    import torch

    from .anatomy_aware.pipeline import load_pipeline, mr2us
    from .data import read_nifti, write_displacement, write_nifti

    output = _nifti_path(args.output, "-o/--output")
    ddf_path = _nifti_path(args.ddf, "--ddf") if args.ddf else \
        _beside(output, "ddf")
    images = {}
    for what, path in (("FIXED_US", args.fixed), ("MOVING_MR", args.moving)):
        _nifti_path(path, what)
        if not Path(path).is_file():
            raise CLIError(f"{what} {path}: no such file")
        try:
            images[what] = read_nifti(path)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"{what} {path}: {exc}") from None
        img = images[what]
        if img.ndim != 3:
            raise CLIError(f"{what} {path}: expected a 3D volume, got a {img.ndim}D image "
                           f"{tuple(img.data.shape[2:])}")
        if min(img.data.shape[2:]) < 4:
            raise CLIError(f"{what} {path}: too small to register: "
                           f"{tuple(img.data.shape[2:])}")
    fixed, moving = images["FIXED_US"], images["MOVING_MR"]
    device = _auto_device(args.device)
    pipeline = load_pipeline(args.acmt, args.registration, device)
    moving_on_fixed, to_moving = _moving_on_fixed_grid(fixed, moving, device, args.quiet)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = mr2us(pipeline, fixed.data.to(device), moving_on_fixed, progress=not args.quiet)
        ddf = out["ddf"].float()
        # Φ warps the original MR: from its own grid when it came on another one.
        warped = out["warped"] if to_moving is None else \
            _warp_original(fixed, moving, to_moving, ddf, device)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(ddf_path).parent.mkdir(parents=True, exist_ok=True)
    write_nifti(output, warped.float().cpu(), fixed.affine)
    write_displacement(ddf_path, ddf.cpu(), fixed.affine)
    if not args.quiet:
        print(f"mr2us: ACMT translation and anatomy-aware registration in "
              f"{time.perf_counter() - t0:.2f} s; wrote {output} and {ddf_path} (mm)")
    return 0


#: Image formats of ``mrus translate`` by suffix: NIfTI (the affine is kept), PNG, NumPy.
TRANSLATE_FORMATS = (".nii.gz", ".nii", ".png", ".npy")


def _image_format(path: str, what: str) -> str:
    """The suffix of ``path`` among :data:`TRANSLATE_FORMATS`; CLIError otherwise."""
    name = str(path).lower()
    for suffix in TRANSLATE_FORMATS:
        if name.endswith(suffix):
            return suffix
    raise CLIError(f"{what} {path}: expected a .nii, .nii.gz, .png or .npy file")


def _read_image(path: str):
    """(image Tensor [1, 1, *S] float32, affine or None) of a NIfTI, PNG or NPY file."""
    import numpy as np
    import torch

    fmt = _image_format(path, "IMAGE")
    if not Path(path).is_file():
        raise CLIError(f"IMAGE {path}: no such file")
    if fmt in (".nii", ".nii.gz"):
        from .data import read_nifti

        img = read_nifti(path)
        return img.data.float(), img.affine
    if fmt == ".png":
        from PIL import Image

        with Image.open(path) as im:
            # Colour images are read as luminance: the models translate one channel.
            arr = np.asarray(im if im.mode in ("L", "I", "I;16", "F") else im.convert("L"))
    else:
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise CLIError(f"IMAGE {path}: not a NumPy array file ({exc})") from None
        while arr.ndim > 2 and arr.shape[0] == 1:  # [1, 1, *S] or [1, *S] as written
            arr = arr[0]
    if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.number) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise CLIError(f"IMAGE {path}: expected a real 2D or 3D image, got an array of shape "
                       f"{arr.shape} and dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None], None


def _write_image(path: str, image, affine) -> None:
    """Writes [1, 1, *S] to ``path`` in its suffix's format (PNG: 8-bit grey, [0, 1] ->
    0-255 after clipping; NPY: float32 [*S]; NIfTI: float32 with ``affine``)."""
    import numpy as np

    fmt = _image_format(path, "output")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    arr = image[0, 0].detach().float().cpu().numpy()
    if fmt in (".nii", ".nii.gz"):
        from .data import write_nifti

        write_nifti(path, image.detach().float().cpu(), affine)
    elif fmt == ".png":
        from PIL import Image

        Image.fromarray(np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)).save(path)
    else:
        np.save(path, arr.astype(np.float32))


def _write_ddf(path: str, ddf, affine) -> None:
    """Writes a displacement [1, ndim, *S]: NIfTI in mm (``write_displacement``), NPY in
    voxel units [ndim, *S]."""
    import numpy as np

    fmt = _image_format(path, "displacement")
    if fmt == ".png":
        raise CLIError(f"displacement {path}: a PNG cannot hold a displacement field; give "
                       ".npy (voxel units) or .nii/.nii.gz (mm)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if fmt == ".npy":
        np.save(path, ddf[0].detach().float().cpu().numpy())
    else:
        from .data import write_displacement

        write_displacement(path, ddf.detach().float().cpu(), affine)


def _beside(output: str, tag: str) -> str:
    """``<stem>_<tag><ext>`` next to ``output``; a PNG output gets ``.npy`` fields."""
    fmt = _image_format(output, "output")
    ext = ".npy" if fmt == ".png" else fmt
    return str(output)[: len(str(output)) - len(fmt)] + f"_{tag}{ext}"


def cmd_translate(args) -> int:
    import numpy as np
    import torch

    from .train import get_task
    from .train.trainer import load_checkpoint

    task = get_task(args.model)
    out_fmt = _image_format(args.output, "-o/--output")
    in_fmt = _image_format(args.image, "IMAGE")
    if (out_fmt in (".nii", ".nii.gz")) != (in_fmt in (".nii", ".nii.gz")):
        raise CLIError(f"-o/--output {args.output}: write the input's format ({in_fmt} in: "
                       "a NIfTI image goes out as NIfTI, PNG / NPY as PNG or NPY)")
    for flag, path in (("--ddf", args.ddf), ("--ddf-inverse", args.ddf_inverse)):
        if path is not None and _image_format(path, flag) == ".png":
            raise CLIError(f"{flag} {path}: a PNG cannot hold a displacement field; give "
                           ".npy (voxel units) or .nii/.nii.gz (mm)")
        if path is not None and _image_format(path, flag) != ".npy" and \
                in_fmt in (".png", ".npy"):
            raise CLIError(f"{flag} {path}: a {in_fmt} input has no affine for a NIfTI field "
                           "in mm; give .npy (voxel units)")
    image, affine = _read_image(args.image)
    if affine is None:
        affine = np.eye(4)
    device = _auto_device(args.device)
    model, config, _ = load_checkpoint(task, args.checkpoint, device, args.set)
    ndim = getattr(config, "ndim", image.dim() - 2)
    if ndim != image.dim() - 2:
        raise CLIError(f"{args.model} in {args.checkpoint} translates {ndim}D images, got a "
                       f"{image.dim() - 2}D image {tuple(image.shape[2:])}")
    t0 = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad():
            out = task.translate(model, image.to(device), config)
    except NotImplementedError as exc:
        raise CLIError(str(exc)) from None
    _write_image(args.output, out["translated"], affine)
    written = [args.output]
    for key, flag, tag in (("ddf", args.ddf, "phi"), ("ddf_inverse", args.ddf_inverse,
                                                      "phi_inv")):
        if key in out:
            path = flag or _beside(args.output, tag)
            _write_ddf(path, out[key], affine)
            written.append(path)
    if not args.quiet:
        print(f"{args.model}: translated in {time.perf_counter() - t0:.2f} s; wrote "
              f"{', '.join(written)}")
    return 0


# --------------------------------------------------------------------------- trus3d

#: Metric rows printed by ``mrus trus3d --simulate`` (key, label, format).
TRUS3D_ROWS = (
    ("position_error_mean_mm", "position error, stitching + DBSCAN, mean (mm)", "{:.3f}"),
    ("position_error_max_mm", "position error, stitching + DBSCAN, max (mm)", "{:.3f}"),
    ("position_error_mean_mm_no_dbscan", "position error, no DBSCAN, mean (mm)", "{:.3f}"),
    ("position_error_max_mm_no_dbscan", "position error, no DBSCAN, max (mm)", "{:.3f}"),
    ("position_error_mean_mm_frame_to_frame", "position error, frame to frame, mean (mm)",
     "{:.3f}"),
    ("position_error_max_mm_frame_to_frame", "position error, frame to frame, max (mm)",
     "{:.3f}"),
    ("psnr", "PSNR in the swept region (dB)", "{:.2f}"),
    ("ssim", "SSIM (largest box in the swept region)", "{:.3f}"),
    ("psnr_true_positions", "PSNR, same fill from the true positions (dB)", "{:.2f}"),
    ("ssim_true_positions", "SSIM, same fill from the true positions", "{:.3f}"),
)


def _save_gray_png(path: Path, image) -> None:
    import numpy as np
    from PIL import Image

    scale = float(np.percentile(image[image > 0], 99.5)) if (image > 0).any() else 1.0
    data = np.round(np.clip(image / max(scale, 1e-12), 0, 1) * 255).astype(np.uint8)
    Image.fromarray(data).save(path)


def cmd_trus3d(args) -> int:
    import json

    import numpy as np

    from .trus3d import StitchConfig, reconstruct_sweep
    from .trus3d.stitching import require_opencv

    if args.simulate == (args.sweep_dir is not None):
        raise CLIError("give either SWEEP_DIR (a recorded sweep) or --simulate")
    dip = {"iterations": args.dip_iterations, "width": args.dip_width, "device": args.device,
           "progress": not args.quiet} if args.fill == "dip" else None
    if args.device == "cuda":
        _device("cuda")
    require_opencv()  # before anything is written
    t0 = time.perf_counter()
    if args.simulate:
        if args.output is not None:
            raise CLIError("-o/--output is for a recorded sweep; --simulate writes into --out")
        if args.no_dbscan or args.frame_to_frame:
            raise CLIError("--no-dbscan / --frame-to-frame: --simulate reports every variant")
        from .data import write_nifti
        from .trus3d import simulated_sweep, sweep_metrics, write_sweep

        out = Path(args.out or "mrus-trus3d")
        if out.exists() and any(out.iterdir()) and not (out / "sweep" / "sweep.json").is_file():
            raise CLIError(f"--out {out}: the folder holds something else; give an empty or "
                           "new folder (or one of an earlier `mrus trus3d --simulate`)")
        kwargs = {"frames": args.frames, "bad_frames": args.bad_frame}
        sweep = simulated_sweep(args.phantom, seed=args.seed, **kwargs)
        write_sweep(sweep, out / "sweep", fmt=args.format)
        rec, metrics = sweep_metrics(sweep, method=args.method, fill_method=args.fill,
                                     dip_options=dip, progress=not args.quiet)
        import torch

        write_nifti(out / "reconstruction.nii.gz", torch.from_numpy(rec.volume)[None, None],
                    rec.affine)
        truth = np.diag([sweep.spacing] * 3 + [1.0])
        # The true volume in the same frame: frame 0 of the sweep at the origin.
        truth[:2, 3] = -np.asarray(sweep.positions[0]) * sweep.spacing
        write_nifti(out / "true_volume.nii.gz", torch.from_numpy(sweep.volume)[None, None],
                    truth)
        _save_gray_png(out / "stitched.png", rec.stitched.composite)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["phantom"], metrics["fill"], metrics["seed"] = args.phantom, args.fill, args.seed
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if args.json:
            print(json.dumps(metrics))
        else:
            print(f"trus3d: {args.phantom} phantom, {sweep.frames} frames, "
                  f"{sweep.spacing:g} mm pixels, {metrics['method'].upper()} matching, "
                  f"{args.fill} fill, {metrics['seconds']:.1f} s")
            for key, label, fmt in TRUS3D_ROWS:
                print(f"  {label:<52} {fmt.format(metrics[key])}")
            if metrics["unmatched_frames"]:
                print(f"  unmatched frames (placed by the last step): "
                      f"{metrics['unmatched_frames']}")
            print(f"wrote {out}/sweep/, reconstruction.nii.gz, true_volume.nii.gz, "
                  "stitched.png, metrics.json")
        return 0
    if args.output is None:
        raise CLIError("a recorded sweep needs -o/--output VOLUME.nii.gz")
    if not str(args.output).lower().endswith((".nii", ".nii.gz")):
        raise CLIError(f"-o/--output {args.output}: expected a .nii or .nii.gz file")
    for flag, given in (("--phantom", args.phantom != "prostate"), ("--out", args.out),
                        ("--bad-frame", args.bad_frame), ("--frames", args.frames != 40)):
        if given:
            raise CLIError(f"{flag} is for --simulate")
    from .data import write_nifti
    from .trus3d import read_sweep

    sweep = read_sweep(args.sweep_dir)
    cfg = StitchConfig(dbscan=not args.no_dbscan,
                       mode="pairwise" if args.frame_to_frame else "composite")
    rec = reconstruct_sweep(sweep, stitch_config=cfg, method=args.method,
                            fill_method=args.fill, dip_options=dip, progress=not args.quiet)
    import torch

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_nifti(args.output, torch.from_numpy(rec.volume)[None, None], rec.affine)
    st = rec.stitched
    unmatched = [int(i) for i in np.flatnonzero(~st.matched)]
    summary = {"frames": sweep.frames, "method": rec.method, "fill": args.fill,
               "unmatched_frames": unmatched, "mean_inliers": float(st.inliers[1:].mean()),
               "volume_shape": list(rec.volume.shape), "spacing_mm": sweep.spacing,
               "sweep_length_mm": float(np.ptp(rec.positions[:, 0]) * sweep.spacing),
               "seconds": time.perf_counter() - t0}
    if args.stitched:
        _save_gray_png(Path(args.stitched), st.composite)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trus3d: {sweep.frames} frames, {rec.method.upper()} matching, "
              f"{summary['mean_inliers']:.0f} inliers per frame, unmatched {unmatched or 'none'}, "
              f"sweep {summary['sweep_length_mm']:.1f} mm; wrote {args.output} "
              f"{tuple(rec.volume.shape)} ({args.fill} fill, {summary['seconds']:.1f} s)")
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    if args.quick and args.train:
        raise CLIError("--quick and --train are alternatives: pick one")
    if args.quick:
        from mrus_kernels import quickbench

        quickbench.main([])
        return 0
    import importlib.util

    if importlib.util.find_spec("pytest") is None or \
            importlib.util.find_spec("pytest_benchmark") is None:
        raise CLIError('mrus bench needs pytest and pytest-benchmark: pip install "mrus[test]"')
    import mrus_kernels

    root = Path(mrus_kernels.__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        raise CLIError(f"the benchmark suite is not next to this install (looked in {root}); "
                       "run it from a source checkout, or use `mrus bench --quick`")
    import pytest

    extra = ["-q", "-p", "no:cacheprovider", "--benchmark-columns=min,median,max,rounds"]
    if args.train:
        # The end-to-end training step only: mrus ops vs plain PyTorch vs torch.compile.
        root = root / "bench_train_step.py"
    if args.quiet:
        extra.append("--benchmark-disable")
    return int(pytest.main([str(root), *extra, *args.pytest_args]))


# --------------------------------------------------------------------------- parser


def _positive_ints(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrus", description="Fast deformable multi-modal (MR/ultrasound) registration.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def quiet(p):
        p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars")
        p.add_argument("--threads", type=_positive_ints, default=None,
                       help="CPU threads for torch (default: torch's choice); 1 is faster "
                            "on a machine whose cores are busy with other work")

    p = sub.add_parser("info", help="versions, backends and build flags")
    quiet(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="register the default pair (MNI152 T1 vs simulated "
                                    "modality under a known warp) and report accuracy")
    quiet(p)
    p.add_argument("--modality", choices=("t2", "us"), default="t2",
                   help="simulated moving modality: T2-like MR or pseudo-ultrasound")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resolution", type=int, choices=(2, 1), default=2, help="mm")
    p.add_argument("--out", default="mrus-demo", help="output folder (default ./mrus-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-displacement", type=float, default=6.0,
                   help="largest displacement of the known SVF, mm (an affine comes on top)")
    p.add_argument("--iterations", type=_positive_ints, nargs="+", default=None,
                   help="iterations per level (default: tuned per resolution)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip timing the plain-PyTorch reference backend")
    p.add_argument("--compare-iterations", type=_positive_ints, default=3,
                   help="reference iterations timed per stage (default 3)")
    p.add_argument("--no-png", action="store_true", help="do not draw the PNG")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("register", help="register two NIfTI images")
    quiet(p)
    p.add_argument("fixed", help="fixed image (.nii/.nii.gz)")
    p.add_argument("moving", help="moving image; another grid is resampled through the affines")
    p.add_argument("-o", "--output", required=True, help="warped moving image to write")
    p.add_argument("--ddf", help="also write the displacement (mm, NIfTI vector image)")
    p.add_argument("--similarity", choices=("mi", "nmi", "lncc"), default="mi")
    p.add_argument("--transform", choices=("affine", "svf", "affine+svf"), default="affine+svf")
    p.add_argument("--levels", type=_positive_ints, nargs="+", default=None,
                   help="pyramid factors, coarse to fine (default 4 2 1)")
    p.add_argument("--iterations", type=_positive_ints, nargs="+", default=None,
                   help="iterations, one number or one per level")
    p.add_argument("--smoothness", type=float, default=50.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.set_defaults(func=cmd_register)

    def model_args(p):
        p.add_argument("model", help="model name (e.g. voxelmorph)")
        p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda when available")

    def overrides(p, what):
        p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help=f"{what}: one or more key=value (keys: the model's "
                            "configuration fields)")

    p = sub.add_parser("train", help="train a model (torchrun --nproc_per_node N -m "
                                     "mrus_models.train MODEL ... for N processes)")
    quiet(p)
    model_args(p)
    p.add_argument("--out", required=True,
                   help="run directory: checkpoint.pt, config.json, log.jsonl")
    p.add_argument("--steps", type=_positive_ints, default=None,
                   help="optimiser steps (default: the model's)")
    p.add_argument("--batch-size", type=_positive_ints, default=None,
                   help="items per step and process (default: the model's)")
    overrides(p, "change a configuration field")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="a trained model's metrics on a held-out split")
    quiet(p)
    model_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of `mrus train`")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=_positive_ints, default=None)
    overrides(p, "change a field that is not the architecture's (e.g. the data)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="register two NIfTI images with a trained model")
    quiet(p)
    model_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of `mrus train`")
    p.add_argument("fixed", help="fixed image (.nii/.nii.gz)")
    p.add_argument("moving", help="moving image; another grid is resampled through the affines")
    p.add_argument("-o", "--output", required=True, help="warped moving image to write")
    p.add_argument("--ddf", help="also write the displacement (mm, NIfTI vector image)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("mr2us", help="MR2US-Pro: ACMT translation of both volumes, "
                                     "anatomy-aware registration, the original MR warped")
    quiet(p)
    p.add_argument("--acmt", required=True, help="checkpoint.pt of `mrus train acmt`")
    p.add_argument("--registration", required=True,
                   help="checkpoint.pt of `mrus train anatomy_aware`")
    p.add_argument("fixed", metavar="FIXED_US", help="fixed ultrasound volume (.nii/.nii.gz)")
    p.add_argument("moving", metavar="MOVING_MR",
                   help="moving MR volume; another grid is resampled through the affines")
    p.add_argument("-o", "--output", required=True,
                   help="the original MR warped onto the US grid (.nii/.nii.gz)")
    p.add_argument("--ddf", help="where to write the displacement (mm, NIfTI vector image; "
                                 "default: <stem>_ddf<ext> beside the output)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")
    p.set_defaults(func=cmd_mr2us)

    p = sub.add_parser("translate", help="translate an image into a model's target domain "
                                         "(and write its deformations, if the model has them)")
    quiet(p)
    model_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of `mrus train`")
    p.add_argument("image", help="image to translate (.nii/.nii.gz, .png or .npy)")
    p.add_argument("-o", "--output", required=True,
                   help="translated image, same kind as the input (NIfTI keeps the affine)")
    p.add_argument("--ddf", help="where to write φ (default: <stem>_phi<ext> beside the "
                                 "output; NIfTI in mm, .npy in voxel units [ndim, *S])")
    p.add_argument("--ddf-inverse", help="where to write φ⁻¹ (default: <stem>_phi_inv<ext>)")
    overrides(p, "change a field that is not the architecture's (e.g. sample_steps)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("trus3d", help="TRUS 3D reconstruction from a bi-plane sweep "
                                      "(recorded, or --simulate one and measure it)")
    quiet(p)
    p.add_argument("sweep_dir", nargs="?", default=None,
                   help="recorded sweep: PNG/NPY frames and sweep.json (frame order, pixel "
                        "spacing)")
    p.add_argument("-o", "--output", help="reconstructed volume (.nii/.nii.gz) of SWEEP_DIR")
    p.add_argument("--simulate", action="store_true",
                   help="simulate a sweep, reconstruct it and print the metrics")
    p.add_argument("--phantom", choices=("prostate", "mni"), default="prostate",
                   help="volume swept by --simulate")
    p.add_argument("--out", help="--simulate output folder (default ./mrus-trus3d)")
    p.add_argument("--frames", type=_positive_ints, default=40, help="--simulate time points")
    p.add_argument("--bad-frame", type=int, action="append", default=[],
                   help="--simulate: replace this frame by a lost-contact frame (repeatable)")
    p.add_argument("--format", choices=("npy", "png"), default="npy",
                   help="--simulate frame files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=("sift", "orb", "best"), default="sift",
                   help="key points; best: both, keep the one with more inlier support")
    p.add_argument("--fill", choices=("interp", "dip"), default="interp",
                   help="fill of the sparse volume: interpolation along the sweep (fast) or "
                        "Deep Image Prior")
    p.add_argument("--dip-iterations", type=_positive_ints, default=300)
    p.add_argument("--dip-width", type=_positive_ints, default=16,
                   help="DIP network channels at full resolution")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where DIP runs (default: cuda when available)")
    p.add_argument("--no-dbscan", action="store_true",
                   help="recorded sweep: mean of every match (no DBSCAN filter)")
    p.add_argument("--frame-to-frame", action="store_true",
                   help="recorded sweep: match each frame with the previous one instead of "
                        "the composite")
    p.add_argument("--stitched", help="recorded sweep: also write the stitched sagittal PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_trus3d)

    p = sub.add_parser("bench", help="run the benchmark suite (pytest benchmarks) and print "
                                     "its table")
    quiet(p)
    p.add_argument("--quick", action="store_true",
                   help="a one-minute warp benchmark instead (python -m mrus_kernels.quickbench)")
    p.add_argument("--train", action="store_true",
                   help="only the training-step benchmark (benchmarks/bench_train_step.py): "
                        "one VoxelMorph step with mrus ops, plain PyTorch and torch.compile")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="more pytest arguments, e.g. -k warp")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mrus`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Only `mrus bench` passes arguments through (to pytest: `-k warp`, `-x`, ...);
        # argparse's REMAINDER does not take them when the first one is an option.
        if getattr(args, "func", None) is not cmd_bench:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pytest_args = [*unknown, *args.pytest_args]
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from mrus_kernels import BackendUnavailableError

    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError, TypeError, ModuleNotFoundError,
            BackendUnavailableError) as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
