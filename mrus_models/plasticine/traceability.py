"""Traceability of a translation, measured by segmentation (Plasticine §IV-A, Fig. 6), in
miniature.

The paper trains a U-Net on target-domain images y with their masks m, segments the
translated images ŷ (m̂ = seg(ŷ)), takes m̂ back to the source frame with the inverse
deformation (m̂∘φ⁻¹) and scores it against the source's own masks with Acc, Dice and mIoU:
a translation that keeps every pixel traceable to the source gives masks that land on the
source anatomy. Here:

- :func:`train_segmenter`: a small :class:`~mrus_models.nn.UNet` (2D, VoxelMorph widths)
  with a 1×1 head to the four labels (0 background, 1 CSF, 2 GM, 3 WM), cross-entropy, Adam,
  seeded, trained on target-domain images (the datasets' "moving" T2-like or pseudo-US
  slices and their "moving_labels");
- :func:`traceability`: m̂ = argmax seg(ŷ), m̂∘φ⁻¹ by ``mrus_kernels.warp(..., mode=
  "nearest")`` (labels outside the image read as background), then Dice per tissue, mean
  Dice, mIoU and pixel accuracy against the source labels.

The paper's U-Net "follows the same setting described in the original papers" with no
sizes; the widths, steps and learning rate here are ours, sized for CPU runs (a few hundred
steps at 64×64 in seconds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrus_kernels import warp

from ..metrics import dice, iou
from ..nn import UNet

__all__ = ["CLASSES", "TISSUES", "Segmenter", "traceability", "train_segmenter"]

#: Label values of the tissues scored (the datasets' labels; 0 is background).
TISSUES = {"csf": 1, "gm": 2, "wm": 3}
#: Classes the segmenter predicts: background and the three tissues.
CLASSES = 4
#: The segmenter's U-Net widths (VoxelMorph's encoder; a shorter decoder: one block at full
#: resolution is enough for a 1×1 classification head).
ENCODER = (16, 32, 32, 32)
DECODER = (32, 32, 32, 32, 16)


class Segmenter(nn.Module):
    """A 2D U-Net with a 1×1 convolution to :data:`CLASSES` logits.

    Any input size: the image is padded at the far end of each axis (edge replication) to
    a multiple of the U-Net's stride and the logits are cropped back. With ``size`` set,
    the image is first resized (bilinear) to ``size`` × ``size`` and the logits resized back
    (bilinear), so that a segmenter trained small runs on larger images.

    Args:
        encoder, decoder: the U-Net's widths (:class:`~mrus_models.nn.UNet`).
        size: None (native size) or the side the network works at.
    """

    def __init__(self, encoder: Sequence[int] = ENCODER, decoder: Sequence[int] = DECODER,
                 size: int | None = None) -> None:
        super().__init__()
        self.unet = UNet(2, 1, encoder=encoder, decoder=decoder)
        self.head = nn.Conv2d(self.unet.out_channels, CLASSES, 1)
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [N, CLASSES, H, W] of images [N, 1, H, W]."""
        h, w = image.shape[2:]
        x = image
        if self.size is not None and (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        s = self.unet.stride
        ph, pw = -x.shape[2] % s, -x.shape[3] % s
        logits = self.head(self.unet(F.pad(x, (0, pw, 0, ph), mode="replicate")
                                     if ph or pw else x))
        logits = logits[:, :, :x.shape[2], :x.shape[3]]
        if logits.shape[2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Labels [N, 1, H, W] int64: the most probable class per pixel."""
        return self(image).argmax(1, keepdim=True)


def _check_images(op: str, name: str, x, *, channels: int | None = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels) or x.shape[0] < 1:
        c = "C" if channels is None else str(channels)
        raise ValueError(f"{op}: {name} must be [N, {c}, H, W] with N >= 1, got "
                         f"{tuple(x.shape)}")


def _check_labels(op: str, name: str, labels: torch.Tensor, like: torch.Tensor) -> None:
    _check_images(op, name, labels)
    if labels.shape[0] != like.shape[0] or labels.shape[2:] != like.shape[2:]:
        raise ValueError(f"{op}: {name} must match the images' [N, 1, H, W] = "
                         f"{(like.shape[0], 1, *like.shape[2:])}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= CLASSES:
        raise ValueError(f"{op}: {name} must hold values 0..{CLASSES - 1}, got {lo}..{hi}")


def train_segmenter(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 300,
                    size: int | None = None, seed: int = 0,
                    device: torch.device | str = "cpu", batch: int = 8, lr: float = 1e-3,
                    encoder: Sequence[int] = ENCODER,
                    decoder: Sequence[int] = DECODER) -> Segmenter:
    """Trains a :class:`Segmenter` on target-domain images and their labels.

    Each step draws ``min(batch, N)`` items (with replacement, a seeded generator) and
    takes one Adam step on the pixel-wise cross-entropy. The network's initialisation is
    seeded too, inside a forked RNG state: the caller's global RNG is left as it was, and
    the same arguments give the same network.

    Args:
        images: Tensor [N, 1, H, W] float (the target-domain images, e.g. the datasets'
            "moving" slices in the range the translation produces).
        labels: Tensor [N, 1, H, W] int64 with values 0..3.
        steps: optimisation steps.
        size: None (train at the images' size) or the side to resize images (bilinear) and
            labels (nearest) to; the segmenter then resizes any input to it.
        seed: seeds the initialisation and the batches.
        device: where to train.
        batch: items per step.
        lr: Adam's learning rate.
        encoder, decoder: the U-Net's widths.

    Returns:
        The trained :class:`Segmenter` on ``device``, in evaluation mode.
    """
    op = "train_segmenter"
    _check_images(op, "images", images)
    if not images.is_floating_point():
        raise TypeError(f"{op}: images must be floating point, got {images.dtype}")
    _check_labels(op, "labels", labels, images)
    for name, v, least in (("steps", steps, 1), ("batch", batch, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{op}: {name} must be an int >= {least}, got {v!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ValueError(f"{op}: size must be None or an int >= 8, got {size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"{op}: lr must be a positive number, got {lr!r}")
    dev = torch.device(device)
    x, y = images.detach().float(), labels.detach().long()
    if size is not None and x.shape[2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = F.interpolate(y.float(), size=(size, size), mode="nearest").long()
    x, y = x.to(dev), y[:, 0].to(dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        net = Segmenter(encoder, decoder, size).to(dev)
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    n = x.shape[0]
    net.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=gen).to(dev)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return net.eval()


@torch.no_grad()
def traceability(segmenter: nn.Module, translated: torch.Tensor, ddf_inverse: torch.Tensor,
                 source_labels: torch.Tensor, *, backend: str | None = None
                 ) -> dict[str, float]:
    """Segmentation scores of m̂∘φ⁻¹ against the source labels (Plasticine Fig. 6).

    m̂ is the segmenter's most probable class per pixel of the translated images ŷ;
    ``warp(m̂, ddf_inverse, mode="nearest")`` reads m̂ at ``x + φ⁻¹(x)``, i.e. takes it
    back to the source frame (0, background, outside the image).

    Args:
        segmenter: a module mapping [N, 1, H, W] images to [N, C, H, W] logits (e.g.
            :func:`train_segmenter`'s), on the images' device.
        translated: ŷ, Tensor [N, 1, H, W] in the range the segmenter was trained on.
        ddf_inverse: φ⁻¹, Tensor [N, 2, H, W] in voxel units.
        source_labels: Tensor [N, 1, H, W] int64, the source images' labels (0..3).
        backend: ``warp``'s backend (default: ``MRUS_BACKEND`` or auto).

    Returns:
        dict of floats: ``dice_csf``, ``dice_gm``, ``dice_wm`` (each the mean over the
        items whose source has that tissue), ``dice`` (their mean), ``miou`` (the mean over
        the three tissues of their per-item-mean IoU), ``accuracy`` (the fraction of all
        pixels, background included, whose label is right).
    """
    op = "traceability"
    if not isinstance(segmenter, nn.Module):
        raise TypeError(f"{op}: segmenter must be a torch.nn.Module, got "
                        f"{type(segmenter).__name__}")
    _check_images(op, "translated", translated)
    _check_labels(op, "source_labels", source_labels, translated)
    _check_images(op, "ddf_inverse", ddf_inverse, channels=2)
    if ddf_inverse.shape[0] != translated.shape[0] or \
            ddf_inverse.shape[2:] != translated.shape[2:]:
        raise ValueError(f"{op}: ddf_inverse must be [N, 2, H, W] = "
                         f"{(translated.shape[0], 2, *translated.shape[2:])}, got "
                         f"{tuple(ddf_inverse.shape)}")
    predicted = segmenter(translated).argmax(1, keepdim=True)
    traced = warp(predicted.to(ddf_inverse.dtype), ddf_inverse, mode="nearest",
                  backend=backend).round().long()
    reference = source_labels.to(traced.device)
    out: dict[str, float] = {}
    ious = []
    for name, value in TISSUES.items():
        out[f"dice_{name}"] = float(dice(traced, reference, value).nanmean())
        ious.append(float(iou(traced, reference, value).nanmean()))
    dices = [out[f"dice_{n}"] for n in TISSUES]
    out["dice"] = float(torch.tensor(dices, dtype=torch.float64).nanmean())
    out["miou"] = float(torch.tensor(ious, dtype=torch.float64).nanmean())
    out["accuracy"] = float((traced == reference).double().mean())
    return out
