"""Synthetic registration batches shared by the model tests (voxelmorph, innreg).

Importable as ``_registration_batch`` with tests/models on ``sys.path`` (pytest puts it
there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mrus_kernels


def smooth_field(gen: torch.Generator, b: int, c: int, size, scale: float) -> torch.Tensor:
    """Random smooth field [b, c, *size]: coarse noise, upsampled (bi/trilinear)."""
    coarse = torch.randn(b, c, *(max(s // 8, 2) for s in size), generator=gen)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return scale * F.interpolate(coarse, size=size, mode=mode, align_corners=True)


def synthetic_batch(gen: torch.Generator, b: int, size, margin: int,
                    ddf_scale: float) -> dict[str, torch.Tensor]:
    """A batch in the datasets' item format: smooth 'anatomy' in [0, 1] inside a mask
    ``margin`` voxels from the border, three tissues by intensity, a T2-like inverted moving
    image warped by a known smooth displacement of scale ``ddf_scale``."""
    ndim = len(size)
    fixed = torch.sigmoid(smooth_field(gen, b, 1, size, 3.0))
    inner = [slice(None), slice(None)] + [slice(margin, s - margin) for s in size]
    mask = torch.zeros(b, 1, *size, dtype=torch.bool)
    mask[tuple(inner)] = True
    fixed = fixed * mask
    labels = torch.bucketize(fixed, torch.tensor([0.05, 0.35, 0.6])) * mask
    ddf = smooth_field(gen, b, ndim, size, ddf_scale)
    inverse = -ddf  # close enough for a smooth, small field: only the images need be related
    moving = mrus_kernels.warp((1.0 - fixed) * mask, inverse)
    moving_labels = mrus_kernels.warp(labels.float(), inverse, mode="nearest").long()
    return {"fixed": fixed, "moving": moving, "fixed_labels": labels,
            "moving_labels": moving_labels, "mask": mask, "ddf": ddf,
            "spacing": torch.tensor([[1.0, 2.0, 1.5][:ndim]] * b), "index": torch.arange(b)}


def translation_batch() -> dict[str, torch.Tensor]:
    """A 32 x 48 batch of one item whose moving image is the fixed one shifted by 3 pixels
    along axis 1 (spacing 1 x 2 mm): the truth (``"ddf"``) is a constant displacement of 3
    pixels = 6 mm, and warping by it restores the fixed labels exactly. Labels: WM (3) in
    [8:24, 10:20], GM (2) in [10:20, 20:32], CSF (1) in [12:16, 32:36]."""
    size = (32, 48)
    labels = torch.zeros(1, 1, *size, dtype=torch.long)
    labels[..., 8:24, 10:20] = 3
    labels[..., 10:20, 20:32] = 2
    labels[..., 12:16, 32:36] = 1
    fixed = labels.float() / 3
    moving, moving_labels = torch.roll(fixed, 3, dims=3), torch.roll(labels, 3, dims=3)
    truth = torch.zeros(1, 2, *size)
    truth[:, 1] = 3.0
    return {"fixed": fixed, "moving": moving, "fixed_labels": labels,
            "moving_labels": moving_labels, "mask": labels > 0, "ddf": truth,
            "spacing": torch.tensor([[1.0, 2.0]]), "index": torch.tensor([0])}


def check_one_step(task, net: torch.nn.Module, batch: dict[str, torch.Tensor], config,
                   logs: set[str]) -> None:
    """One Adam step (``config.lr``, ``config.betas``) of ``task.training_step`` on
    ``batch``: the step logs exactly ``logs``, every parameter gets a finite, nonzero
    gradient, and the loss on the same batch falls."""
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=config.betas)
    loss, got = task.training_step(net, batch, config)
    assert set(got) == logs
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"{name}: non-finite gradient"
        assert p.grad.abs().max().item() > 0, f"{name}: zero gradient"
    opt.step()
    with torch.no_grad():
        after, _ = task.training_step(net, batch, config)
    assert after.item() < loss.item() - 1e-6, (loss.item(), after.item())
