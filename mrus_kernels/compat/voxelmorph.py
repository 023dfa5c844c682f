"""Drop-in replacements for VoxelMorph 0.3's spatial layers and its classic losses, with
VoxelMorph's signatures and values, computed by the fused operators.

Switching is a change of import::

    # from voxelmorph.nn.modules import (SpatialTransformer, IntegrateVelocityField,
    #                                    ResizeDisplacementField)
    from mrus_kernels.compat.voxelmorph import (SpatialTransformer, IntegrateVelocityField,
                                                ResizeDisplacementField, NCC, Grad)

``NCC(win).loss(y_true, y_pred)`` and ``Grad("l2", loss_mult).loss(y_true, y_pred)`` are the
classic VoxelMorph losses that training scripts call (VoxelMorph 0.3 turned them into stubs
that raise and point to neurite 0.3's ``NCC`` and ``SpatialGradient``); their values are
neurite's (``-NCC(window_size=win)`` and ``SpatialGradient("l2") * loss_mult``). Every class
also takes a keyword-only ``backend`` ("auto", "torch", "cpu", "triton", "cuda").

How each class is served:

- ``SpatialTransformer``: :func:`mrus_kernels.warp` with zeros padding. VoxelMorph
  normalises coordinates by 2/(S-1) and hands ``grid_sample`` its ``align_corners``: with
  True the sample point is x + u(x) (size-1 axes: always 0), with False it is
  (x + u(x))·S/(S-1) − 1/2 (size 1: u − 1/2); both become one voxel displacement.
- ``IntegrateVelocityField``: :func:`mrus_kernels.integrate_velocity` (zeros padding, one
  fused kernel per squaring step) for linear interpolation with ``align_corners=True`` and
  every spatial size >= 2; otherwise VoxelMorph's loop ``u = v / 2**steps``, ``steps`` times
  ``u = u + SpatialTransformer(u, u)``, one fused warp per step.
- ``ResizeDisplacementField``: :func:`mrus_kernels.warp` with border padding on a
  displacement that reproduces ``F.interpolate``'s source coordinates (linear with either
  ``align_corners``; nearest by its float32 floor rule; an axis whose size does not change
  is copied where aten's kernels copy it), times the scale factor. (torch 2.13's CPU
  backward of 3D nearest disagrees with its own forward on such an axis; ours is the
  forward's derivative.)
- ``NCC``: :func:`mrus_kernels.lncc` on both images zero-padded by win // 2 with a mask of
  ones on the original voxels: every window of an original voxel then lies inside the
  padded image, so lncc's in-bounds window sums are neurite's zero-padded box sums, and the
  masked mean is neurite's mean over the voxels. Channels > 1 are scored as separate items,
  as neurite does.
- ``Grad("l2")``: :func:`mrus_kernels.grad_l2` (the same mean of squared forward
  differences averaged over the axes), times ``loss_mult``.

Not served (ValueError naming the argument and what to use instead): ``Grad("l1")`` (no
fused L1 kernel: use ``penalty="l2"`` or neurite's ``SpatialGradient("l1")``), affine
matrices as ``deformation_field`` (VoxelMorph's own ``SpatialTransformer`` rejects them
too), "bicubic" interpolation, ``NCC`` windows of even or unequal sizes (lncc's window is a
centred cube), spatial sizes of 1 in ``Grad`` (grad_l2 needs >= 2; neurite gives NaN).
Differences: a NaN displacement gives NaN in every channel (the warp's rule, where
``grid_sample``'s result depends on mode); NCC computes cc in lncc's clamped form
(min(cross², var_I var_J) / (var_I var_J + eps), equal in exact arithmetic) and returns the
loss where neurite raises on a coefficient outside [0, 1] from rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_float, check_same, check_spatial, check_tensor
from ..compose import integrate_velocity
from ..lncc import lncc
from ..regularisers import grad_l2
from ..warp import warp

__all__ = ["NCC", "Grad", "IntegrateVelocityField", "ResizeDisplacementField",
           "SpatialTransformer"]

_HALF = (torch.float16, torch.bfloat16)
# VoxelMorph passes these to grid_sample / F.interpolate; the fused warp has no kernel.
_NOT_SERVED_MODES = ("bicubic", "area", "nearest-exact")


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


def _check_mode(op: str, mode: object, linear_names: Sequence[str]) -> str:
    """`mode` is "nearest" or a linear name; returns "nearest" or "linear"."""
    if mode == "nearest":
        return "nearest"
    if isinstance(mode, str) and mode in linear_names:
        return "linear"
    if isinstance(mode, str) and mode in _NOT_SERVED_MODES:
        raise ValueError(
            f"{op}: interpolation_mode={mode!r} is not served by the fused warp (linear and "
            f"nearest only); keep VoxelMorph's class for {mode!r}"
        )
    options = " or ".join(repr(m) for m in (*linear_names, "nearest"))
    raise ValueError(f"{op}: interpolation_mode must be {options}, got {mode!r}")


def _check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return bool(value)


def _axis_values(n, ndim: int, axis: int, dtype: torch.dtype, device) -> torch.Tensor:
    """0, 1, ..., n - 1 along spatial `axis`, shaped to broadcast against [B, *S]."""
    view = [1] * (ndim + 1)
    view[axis + 1] = n
    return torch.arange(n, dtype=dtype, device=device).view(view)


# ---------------------------------------------------------------------------- transformer


class SpatialTransformer(nn.Module):
    """VoxelMorph's ``SpatialTransformer``: warps ``moving_image`` by a voxel displacement.

    Args:
        interpolation_mode: "linear" (bi/trilinear; "bilinear" and "trilinear" are taken
            too, as VoxelMorph passes them on) or "nearest".
        align_corners: VoxelMorph's ``align_corners`` (True: the sample point is x + u(x)).
        device: ignored (deprecated in VoxelMorph, kept for its signature).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (keyword only).

    Example:
        >>> st = SpatialTransformer()
        >>> moved = st(torch.rand(1, 1, 32, 32, 32), torch.randn(1, 3, 32, 32, 32))
    """

    def __init__(
        self,
        interpolation_mode: str = "linear",
        align_corners: bool = True,
        device: object = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        op = "SpatialTransformer"
        self._mode = _check_mode(op, interpolation_mode, ("linear", "bilinear", "trilinear"))
        self.interpolation_mode = interpolation_mode
        self.align_corners = _check_bool(op, "align_corners", align_corners)
        self.backend = backend

    def forward(self, moving_image: torch.Tensor, deformation_field: torch.Tensor
                ) -> torch.Tensor:
        """Warps ``moving_image``.

        Args:
            moving_image: Tensor [B, C, *S] (S = (H, W) or (D, H, W)); an integer image is
                sampled as float32 (and, with "nearest", returned in its own dtype).
            deformation_field: Tensor [B, ndim, *S], voxel units, component i along spatial
                axis i, the image's dtype (float32 for an integer image) and device.

        Returns:
            Tensor [B, C, *S]: moving_image(x + deformation_field(x)).
        """
        op = "SpatialTransformer"
        check_tensor(op, "moving_image", moving_image)
        check_tensor(op, "deformation_field", deformation_field)
        field = deformation_field
        if field.dim() in (2, 3):
            raise ValueError(
                f"{op}: deformation_field must be a displacement [B, ndim, *S], got shape "
                f"{tuple(field.shape)}: affine matrices are not served (VoxelMorph's "
                f"SpatialTransformer rejects them too); turn the affine into a displacement "
                f"first"
            )
        int_dtype = None
        image = moving_image
        if not image.is_floating_point():
            if self._mode == "nearest":
                int_dtype = image.dtype
            image = image.float()  # as VoxelMorph: sample integer images as float32
        check_float(op, "moving_image", image)
        check_float(op, "deformation_field", field)
        ndim = check_spatial(op, "moving_image", image)
        if field.dim() != image.dim() or field.shape[1] != ndim or \
                field.shape[2:] != image.shape[2:]:
            sizes = ", ".join(map(str, image.shape[2:]))
            raise ValueError(
                f"{op}: deformation_field must be [B, {ndim}, {sizes}]"
                f" for moving_image of shape {tuple(image.shape)}, got shape {tuple(field.shape)}"
            )
        check_same(op, ("moving_image", "deformation_field"), (image, field))
        out = warp(image, _sampling_ddf(field, self.align_corners), mode=self._mode,
                   padding="zeros", backend=self.backend)
        return out.to(int_dtype) if int_dtype is not None else out

    def extra_repr(self) -> str:
        return (f"interpolation_mode={self.interpolation_mode!r}, "
                f"align_corners={self.align_corners}, backend={self.backend!r}")


def _sampling_ddf(u: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """The displacement whose sample points are those of VoxelMorph's spatial_transform
    (coordinates normalised by 2 / max(S - 1, 1), then grid_sample with align_corners)."""
    ndim = u.shape[1]
    sizes = tuple(u.shape[2:])
    if align_corners:
        if min(sizes) > 1:
            return u  # the sample point is x + u(x) (normalising and back, up to rounding)
        # grid_sample unnormalises a size-1 axis to 0 for any finite coordinate.
        keep = torch.tensor([float(n > 1) for n in sizes], dtype=u.dtype, device=u.device)
        return u * keep.view(1, ndim, *([1] * ndim))
    work = torch.float32 if u.dtype in _HALF else u.dtype
    comps = []
    for i, n in enumerate(sizes):
        x = _axis_values(n, ndim, i, work, u.device)
        # VoxelMorph's normalisation and grid_sample's unnormalisation, in their order.
        g = (x + u[:, i].to(work)) * (2.0 / max(n - 1, 1)) - 1.0
        comps.append(((g + 1) * n - 1) / 2 - x)
    return torch.stack(comps, dim=1).to(u.dtype)


# ---------------------------------------------------------------------------- integration


class IntegrateVelocityField(nn.Module):
    """VoxelMorph's ``IntegrateVelocityField``: scaling and squaring of a velocity field.

    Args:
        shape: ignored (deprecated in VoxelMorph).
        steps: squaring steps, an int >= 0 (VoxelMorph's default 1).
        interpolation_mode: "linear" or "nearest" (of the per-step transformer).
        align_corners: of the per-step transformer (see :class:`SpatialTransformer`).
        device: ignored (deprecated in VoxelMorph).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (keyword only).

    Example:
        >>> integrate = IntegrateVelocityField(steps=7)
        >>> u = integrate(torch.randn(1, 3, 32, 32, 32))
    """

    def __init__(
        self,
        shape: object = None,
        steps: int = 1,
        interpolation_mode: str = "linear",
        align_corners: bool = True,
        device: object = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        op = "IntegrateVelocityField"
        if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"{op}: steps must be an int, got {type(steps).__name__}")
        if steps < 0:
            raise ValueError(f"{op}: steps must be >= 0, got {steps}")
        self.steps = int(steps)
        self.scale = 1.0 / (2**self.steps)
        self.transformer = SpatialTransformer(interpolation_mode, align_corners, backend=backend)
        self.backend = backend

    def forward(self, velocity_field: torch.Tensor) -> torch.Tensor:
        """Integrates ``velocity_field``.

        Args:
            velocity_field: Tensor [B, ndim, *S], voxel units, component i along axis i.

        Returns:
            Tensor [B, ndim, *S]: the displacement of exp(v), voxel units.
        """
        op = "IntegrateVelocityField"
        check_tensor(op, "velocity_field", velocity_field)
        v = velocity_field
        check_float(op, "velocity_field", v)
        ndim = check_spatial(op, "velocity_field", v, layout="ndim")
        if v.shape[1] != ndim:
            raise ValueError(
                f"{op}: velocity_field must have {ndim} channels (one per spatial axis) for a "
                f"{ndim}D field, got {v.shape[1]} (shape {tuple(v.shape)})"
            )
        st = self.transformer
        if st._mode == "linear" and st.align_corners and min(v.shape[2:]) > 1:
            return integrate_velocity(v, self.steps, padding="zeros", backend=self.backend)
        u = v * self.scale
        for _ in range(self.steps):
            u = u + st(u, u)
        return u

    def extra_repr(self) -> str:
        return f"steps={self.steps}, backend={self.backend!r}"


# ---------------------------------------------------------------------------- resizing


class ResizeDisplacementField(nn.Module):
    """VoxelMorph's ``ResizeDisplacementField``: resample a displacement field by
    ``scale_factor`` (as ``F.interpolate``) and scale its magnitude by the same factor.

    Args:
        scale_factor: a positive number (the same for every axis).
        interpolation_mode: "linear" (bi/trilinear by rank; "bilinear" for 2D and
            "trilinear" for 3D fields are taken too) or "nearest".
        align_corners: as ``F.interpolate``: True or False (None: False) for linear; None
            for nearest (``F.interpolate`` raises on any other value there, and so does
            this class, at construction).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (keyword only).

    Example:
        >>> resize = ResizeDisplacementField(scale_factor=2.0)
        >>> u = resize(torch.randn(1, 3, 16, 16, 16))  # [1, 3, 32, 32, 32]
    """

    def __init__(
        self,
        scale_factor: float = 1.0,
        interpolation_mode: str = "linear",
        align_corners: bool | None = True,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        op = "ResizeDisplacementField"
        if not _is_real(scale_factor):
            raise TypeError(
                f"{op}: scale_factor must be a number, got {type(scale_factor).__name__}"
            )
        if not (0 < scale_factor < math.inf):
            raise ValueError(f"{op}: scale_factor must be finite and > 0, got {scale_factor}")
        self._mode = _check_mode(op, interpolation_mode, ("linear", "bilinear", "trilinear"))
        if align_corners is not None:
            align_corners = _check_bool(op, "align_corners", align_corners)
            if self._mode == "nearest":
                raise ValueError(
                    f"{op}: align_corners must be None with interpolation_mode='nearest' "
                    f"(F.interpolate takes it only for linear modes), got {align_corners}"
                )
        self.scale_factor = float(scale_factor)
        self.interpolation_mode = interpolation_mode
        self.align_corners = align_corners
        self.backend = backend

    def forward(self, disp: torch.Tensor) -> torch.Tensor:
        """Resizes ``disp``.

        Args:
            disp: Tensor [B, C, *S] (a displacement has C = ndim; any C is resampled).

        Returns:
            Tensor [B, C, *floor(S · scale_factor)]: the resampled field times scale_factor.
        """
        op = "ResizeDisplacementField"
        check_tensor(op, "disp", disp)
        check_float(op, "disp", disp)
        ndim = check_spatial(op, "disp", disp)
        mode = self.interpolation_mode
        if mode in ("bilinear", "trilinear") and mode != ("bilinear", "trilinear")[ndim - 2]:
            raise ValueError(
                f"{op}: interpolation_mode={mode!r} needs a {4 if mode == 'bilinear' else 5}D "
                f"disp, got shape {tuple(disp.shape)}"
            )
        sf = self.scale_factor
        size_in = tuple(disp.shape[2:])
        size_out = tuple(math.floor(n * sf) for n in size_in)  # F.interpolate's sizes
        if min(size_out) < 1:
            raise ValueError(
                f"{op}: scale_factor {sf} gives an empty output for disp of shape "
                f"{tuple(disp.shape)} (output spatial size {size_out})"
            )
        ddf = self._resampling_ddf(size_in, size_out, disp)
        # Scale whichever of input and output is smaller (the same values: linear).
        if math.prod(size_out) >= math.prod(size_in):
            return warp(disp * sf, ddf, mode=self._mode, padding="border", backend=self.backend)
        return warp(disp, ddf, mode=self._mode, padding="border", backend=self.backend) * sf

    def _resampling_ddf(self, size_in: tuple[int, ...], size_out: tuple[int, ...],
                        disp: torch.Tensor) -> torch.Tensor:
        """[1, ndim, *size_out]: F.interpolate's source coordinate minus the output index."""
        ndim = len(size_in)
        work = torch.float32 if disp.dtype in _HALF else disp.dtype
        device, sf = disp.device, self.scale_factor
        cpu = device.type == "cpu"
        comps = []
        for i, (n_in, n_out) in enumerate(zip(size_in, size_out, strict=True)):
            linear_copy = self._mode == "linear" and (cpu or size_out == size_in)
            if n_out == n_in and (linear_copy or (cpu and ndim == 2)):
                # The CPU kernels copy an axis whose size does not change (linear: the
                # separable kernel skips it; nearest, 4D input only: aten's nearest_idx);
                # aten's CUDA linear kernels copy only when no size changes (that rule is
                # from their source, not run here: no GPU in CI).
                src = dst = torch.arange(n_out, dtype=work, device=device)
            elif self._mode == "nearest":
                # floorf(dst * scale) in float32, scale = float(1 / scale_factor); at
                # n_out = 2 n_in this is the CPU kernel's dst >> 1.
                dst = torch.arange(n_out, dtype=torch.float32, device=device)
                scale = torch.tensor(1.0 / sf, dtype=torch.float32, device=device)
                src = torch.floor(dst * scale).clamp(max=n_in - 1)
                src, dst = src.to(work), dst.to(work)
            else:
                dst = torch.arange(n_out, dtype=work, device=device)
                if self.align_corners:
                    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
                    src = torch.tensor(scale, dtype=work, device=device) * dst
                else:
                    scale = torch.tensor(1.0 / sf, dtype=work, device=device)
                    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
            view = [1] * ndim
            view[i] = n_out
            comps.append((src - dst).view(view).expand(size_out))
        return torch.stack(comps).unsqueeze(0).to(disp.dtype)

    def extra_repr(self) -> str:
        return (f"scale_factor={self.scale_factor}, interpolation_mode="
                f"{self.interpolation_mode!r}, align_corners={self.align_corners}, "
                f"backend={self.backend!r}")


# ---------------------------------------------------------------------------- losses


def _loss_args(op: str, args: tuple) -> torch.Tensor:
    # Classic VoxelMorph calls Grad.loss(y_true, y_pred) (y_true unused); VoxelMorph 0.3's
    # stub takes loss(y_pred): y_pred is the last argument either way.
    if len(args) not in (1, 2):
        raise TypeError(f"{op}.loss takes (y_true, y_pred) or (y_pred), got {len(args)} arguments")
    return args[-1]


class NCC(nn.Module):
    """VoxelMorph's classic local NCC loss: ``loss(y_true, y_pred)`` = −mean cc over the
    voxels, batch items and channels (= −neurite ``NCC(window_size=win)``).

    Args:
        win: window side per axis: None (9), an odd int, or a sequence of equal odd ints
            (VoxelMorph's ``[9] * ndim``).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (keyword only).

    Example:
        >>> loss = NCC(win=[9, 9, 9]).loss(fixed, moved)
    """

    eps = 1e-5  # VoxelMorph's and neurite's

    def __init__(self, win: int | Sequence[int] | None = None, *,
                 backend: str | None = None) -> None:
        super().__init__()
        op = "NCC"
        self._ndim = None  # the rank a list of sizes fixes (None: any)
        if win is None:
            side = 9
        else:
            sides = [win] if _is_real(win) else win
            if not isinstance(sides, (list, tuple)) or not sides or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
                for s in sides
            ):
                raise TypeError(f"{op}: win must be None, an int or a list of ints, got {win!r}")
            side = int(sides[0])
            if any(int(s) != side for s in sides) or side < 1 or side % 2 == 0:
                raise ValueError(
                    f"{op}: win={win!r} is not served: lncc's window is a centred cube (one odd "
                    f"side for every axis); use an odd int or equal odd sizes, or neurite's NCC"
                )
            if isinstance(win, (list, tuple)):
                self._ndim = len(win)
        self.win = win
        self.side = side
        self.backend = backend

    def loss(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        """−mean local squared correlation of ``y_true`` and ``y_pred`` (same shape
        [B, C, *S]); a scalar tensor of their dtype."""
        op = "NCC"
        check_tensor(op, "y_true", y_true)
        check_tensor(op, "y_pred", y_pred)
        check_float(op, "y_true", y_true)
        check_float(op, "y_pred", y_pred)
        ndim = check_spatial(op, "y_true", y_true)
        if y_pred.shape != y_true.shape:
            raise ValueError(
                f"{op}: y_true and y_pred must have the same shape, got {tuple(y_true.shape)} "
                f"and {tuple(y_pred.shape)}"
            )
        check_same(op, ("y_true", "y_pred"), (y_true, y_pred))
        if self._ndim is not None and self._ndim != ndim:
            raise ValueError(
                f"{op}: win has {self._ndim} sizes, the images have {ndim} spatial axes "
                f"(shape {tuple(y_true.shape)})"
            )
        spatial = tuple(y_true.shape[2:])
        r = self.side // 2
        pad = [r] * (2 * ndim)
        fixed = F.pad(y_true.reshape(-1, 1, *spatial), pad)
        moving = F.pad(y_pred.reshape(-1, 1, *spatial), pad)
        # Score only the original voxels; their windows lie inside the padded image.
        mask = torch.zeros((1, 1, *fixed.shape[2:]), dtype=torch.bool, device=y_true.device)
        mask[(..., *[slice(r, r + n) for n in spatial])] = True
        cc = lncc(fixed, moving, window=self.side, eps=self.eps, mask=mask,
                  backend=self.backend)
        return -cc.mean()

    def forward(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        return self.loss(y_true, y_pred)

    def extra_repr(self) -> str:
        return f"win={self.win!r}, backend={self.backend!r}"


class Grad(nn.Module):
    """VoxelMorph's classic gradient loss: ``loss(y_true, y_pred)`` = mean over the axes of
    the mean squared forward difference of ``y_pred`` (penalty "l2"), times ``loss_mult``
    (= neurite ``SpatialGradient("l2")(y_pred) * loss_mult``).

    Args:
        penalty: "l2". VoxelMorph's default "l1" raises ValueError (no fused L1 kernel).
        loss_mult: None or a number multiplying the loss (VoxelMorph scripts pass the
            integration downsampling factor).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (keyword only).

    Example:
        >>> loss = Grad("l2", loss_mult=2).loss(None, ddf)
    """

    def __init__(self, penalty: str = "l1", loss_mult: float | None = None, *,
                 backend: str | None = None) -> None:
        super().__init__()
        op = "Grad"
        if penalty == "l1":
            raise ValueError(
                f"{op}: penalty='l1' is not served by a fused op; use penalty='l2' "
                f"(mrus_kernels.grad_l2) or keep neurite.nn.modules.SpatialGradient('l1')"
            )
        if penalty != "l2":
            raise ValueError(f"{op}: penalty must be 'l2' ('l1' is not served), got {penalty!r}")
        if loss_mult is not None and not _is_real(loss_mult):
            raise TypeError(
                f"{op}: loss_mult must be None or a number, got {type(loss_mult).__name__}"
            )
        self.penalty = penalty
        self.loss_mult = loss_mult
        self.backend = backend

    def loss(self, *args: torch.Tensor | None) -> torch.Tensor:
        """The penalty of y_pred [B, C, *S] (every spatial size >= 2): ``loss(y_true,
        y_pred)`` (y_true unused) or ``loss(y_pred)``; a scalar tensor of its dtype."""
        op = "Grad"
        y_pred = _loss_args(op, args)
        check_tensor(op, "y_pred", y_pred)
        check_float(op, "y_pred", y_pred)
        check_spatial(op, "y_pred", y_pred)
        if min(y_pred.shape[2:]) < 2:
            raise ValueError(
                f"{op}: every spatial size of y_pred must be >= 2 (a forward difference per "
                f"axis), got shape {tuple(y_pred.shape)}"
            )
        out = grad_l2(y_pred, backend=self.backend)
        return out * self.loss_mult if self.loss_mult is not None else out

    def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        return self.loss(*args)

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}, loss_mult={self.loss_mult}, backend={self.backend!r}"
