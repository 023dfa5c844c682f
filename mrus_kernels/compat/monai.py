"""MONAI 1.6 registration blocks and losses, computed by the fused operators.

Switching is a one-line import change; constructor arguments, defaults, reductions, input
conventions and values are MONAI 1.6.1's::

    # from monai.networks.blocks import DVF2DDF, Warp
    # from monai.losses import (BendingEnergyLoss, DiffusionLoss, GlobalMutualInformationLoss,
    #                           LocalNormalizedCrossCorrelationLoss)
    from mrus_kernels.compat.monai import (BendingEnergyLoss, DiffusionLoss, DVF2DDF,
        GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss, Warp)

Every class also takes a keyword-only ``backend`` ("auto", "torch", "cpu", "triton",
"cuda"; default ``MRUS_BACKEND`` or "auto"), and the layers ``deterministic``.

=======================================  =================================================
MONAI class                              fused operator
=======================================  =================================================
``Warp``                                 :func:`mrus_kernels.warp` (ddf plus MONAI's
                                         seeded jitter when ``jitter=True``)
``DVF2DDF``                              :func:`mrus_kernels.integrate_velocity`
                                         (bilinear); ``num_steps`` fused warps (nearest)
``GlobalMutualInformationLoss``          :func:`mrus_kernels.joint_histogram` (Gaussian
                                         or cubic B-spline window), MONAI's MI formula
                                         on the [B, K, K] histogram
``LocalNormalizedCrossCorrelationLoss``  ``mrus_kernels.lncc.lncc_monai`` on zero-padded
                                         inputs with a mask of the original voxels
``BendingEnergyLoss``                    ``mrus_kernels.regularisers.bending_energy``
``DiffusionLoss``                        ``mrus_kernels.regularisers.diffusion``
=======================================  =================================================

What the fused operators cannot serve raises ``ValueError`` naming the argument and what
to use instead: ``mode="bicubic"`` and ``padding_mode="reflection"`` (Warp, DVF2DDF),
``kernel_type="triangular"`` / ``"gaussian"`` (LNCC), and ``reduction="none"`` of the LNCC,
bending-energy and diffusion losses (MONAI returns a per-voxel map there; the fused
reductions return sums). ``reduction="none"`` of the MI loss is per batch item: served.

Where MONAI's definitions differ from the mrus operators' own conventions, these classes
reproduce MONAI: its LNCC zero-pads the windows at the border (lncc uses in-bounds voxels),
its Gaussian MI places bin centres at ``linspace(0, 1, K)`` after clamping to [0, 1], its
B-spline MI takes the range over the whole batch tensor, and its smoothing constants enter
the MI formula. ``Warp`` reproduces MONAI's PyTorch path (``F.grid_sample`` with
``align_corners=True``: MONAI's default install, without its compiled extension).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.loss import _Loss

from .. import regularisers as _regularisers
from ..compose import MAX_STEPS, integrate_velocity
from ..lncc import lncc_monai
from ..mi import SIGMA_MAX, SIGMA_MIN, joint_histogram
from ..warp import warp

__all__ = [
    "DVF2DDF",
    "BendingEnergyLoss",
    "DiffusionLoss",
    "GlobalMutualInformationLoss",
    "LocalNormalizedCrossCorrelationLoss",
    "SpatialDimsError",
    "Warp",
]

_REDUCTIONS = ("none", "mean", "sum")
# MONAI's string values (its GridSampleMode / GridSamplePadMode enums are str subclasses,
# so their members compare equal to these) -> the fused warp's names. "trilinear" is what
# MONAI's Warp docstring recommends for 3D; its PyTorch path runs it as "bilinear".
_MODES = {"bilinear": "linear", "trilinear": "linear", "nearest": "nearest"}
_PADDINGS = {"zeros": "zeros", "border": "border"}


class SpatialDimsError(ValueError, NotImplementedError):
    """Unsupported number of spatial dimensions. MONAI raises ``NotImplementedError`` there
    and mrus ``ValueError``; this is both, so either ``except`` keeps working."""


def _value(x: object) -> object:
    """A MONAI enum member's value (LossReduction.MEAN -> "mean"); anything else unchanged."""
    return getattr(x, "value", x)


def _check_reduction(cls: str, reduction: object, per_voxel: bool) -> str:
    """MONAI's reduction check; ``per_voxel``: its "none" is a per-voxel map, not served."""
    value = _value(reduction)
    if not isinstance(value, str) or value not in _REDUCTIONS:
        raise ValueError(
            f"{cls}: reduction must be 'none', 'mean' or 'sum' (MONAI's LossReduction), got "
            f"{reduction!r}"
        )
    if per_voxel and value == "none":
        raise ValueError(
            f"{cls}: reduction='none' (MONAI's per-voxel map) is not served: the fused "
            "operator reduces inside its kernel. Use reduction='mean' or 'sum', or MONAI's "
            "own class for the map"
        )
    return value


def _warp_option(cls: str, name: str, given: object, table: dict[str, str], unserved: str,
                 choices: str) -> str:
    """MONAI's mode / padding_mode value -> the fused warp's name; ``unserved`` (a value
    MONAI has and the fused warp has not) and anything unknown raise ValueError."""
    value = _value(given)
    if value == unserved:
        raise ValueError(
            f"{cls}: {name}={unserved!r} is not served by the fused warp; use {name}="
            f"{choices}, or MONAI's own class"
        )
    if not isinstance(value, str) or value not in table:
        raise ValueError(
            f"{cls}: {name} must be {choices}, got {given!r}"
            + (" (MONAI's integer codes mean different things with and without its "
               "compiled extension; pass the name)" if isinstance(value, int) else "")
        )
    return table[value]


def _warp_mode(cls: str, mode: object) -> str:
    return _warp_option(cls, "mode", mode, _MODES, "bicubic",
                        "'bilinear' (or 'trilinear') or 'nearest'")


def _warp_padding(cls: str, padding_mode: object) -> str:
    return _warp_option(cls, "padding_mode", padding_mode, _PADDINGS, "reflection",
                        "'zeros' or 'border'")


def _check_warp_inputs(image: torch.Tensor, ddf: torch.Tensor) -> int:
    """MONAI Warp's checks, with its messages; returns the number of spatial dimensions."""
    spatial_dims = image.dim() - 2
    if spatial_dims not in (2, 3):
        raise SpatialDimsError(
            f"got unsupported spatial_dims={spatial_dims}, currently support 2 or 3."
        )
    ddf_shape = (image.shape[0], spatial_dims) + tuple(image.shape[2:])
    if tuple(ddf.shape) != ddf_shape:
        raise ValueError(
            f"Given input {spatial_dims}-d image shape {image.shape}, the input DDF shape must "
            f"be {ddf_shape}, Got {ddf.shape} instead."
        )
    return spatial_dims


def _pin_singleton_axes(ddf: torch.Tensor) -> torch.Tensor:
    """Zeroes the displacement along size-1 axes, as MONAI's sampling does: grid_sample
    with align_corners=True maps every coordinate on a size-1 axis to its one voxel."""
    sizes = ddf.shape[2:]
    if all(n > 1 for n in sizes):
        return ddf
    # Slices and zeros, not a multiplication by a mask tensor: no host-to-device copy.
    parts = [ddf[:, i:i + 1] if n > 1 else torch.zeros_like(ddf[:, i:i + 1])
             for i, n in enumerate(sizes)]
    return torch.cat(parts, 1)


# ---------------------------------------------------------------------------- layers


class Warp(nn.Module):
    """``monai.networks.blocks.Warp`` on the fused :func:`mrus_kernels.warp`.

    ``forward(image, ddf)``: image [B, C, *S] (2D or 3D), ddf [B, ndim, *S] in voxel units,
    component i along spatial axis i (MONAI's convention, the same as mrus's); returns
    image(x + ddf(x)) of image's shape. Values and gradients are those of MONAI's PyTorch
    path (``F.grid_sample(..., align_corners=True)``).

    Args:
        mode: "bilinear" (also "trilinear", which MONAI's PyTorch path runs as bilinear) or
            "nearest"; "bicubic" raises ValueError.
        padding_mode: "border" (MONAI's default) or "zeros"; "reflection" raises ValueError.
        jitter: sample at x + r(x) + ddf(x), r the offsets MONAI draws in [0, 1) with seed 0
            (the same values, drawn from a private generator: the global RNG is untouched).
        backend: mrus backend for :func:`mrus_kernels.warp`.
        deterministic: bitwise reproducible image gradient (see :func:`mrus_kernels.warp`).

    Example:
        >>> warp_layer = Warp()  # was: monai.networks.blocks.Warp()
        >>> moved = warp_layer(moving, ddf)
    """

    def __init__(
        self, mode: object = "bilinear", padding_mode: object = "border", jitter: bool = False,
        *, backend: str | None = None, deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        self._mode = _warp_mode("Warp", mode)
        self._padding = _warp_padding("Warp", padding_mode)
        self.mode, self.padding_mode = _value(mode), _value(padding_mode)
        self.jitter = jitter
        self.backend, self.deterministic = backend, deterministic
        self._jitter_cache: tuple[tuple, torch.Tensor] | None = None

    # A generator cannot be created inside a compiled region: under torch.compile this is
    # a graph break (jitter=True only).
    @torch.compiler.disable
    def _jitter_offsets(self, ddf: torch.Tensor) -> torch.Tensor:
        """MONAI's jitter: ``torch.rand_like`` of a [B, ndim, *S] grid of ddf's dtype and
        device right after ``torch.manual_seed(0)``; cached per shape, dtype and device."""
        key = (tuple(ddf.shape), ddf.dtype, ddf.device)
        if self._jitter_cache is None or self._jitter_cache[0] != key:
            gen = torch.Generator(device=ddf.device).manual_seed(0)
            offsets = torch.rand(ddf.shape, generator=gen, dtype=ddf.dtype, device=ddf.device)
            self._jitter_cache = (key, offsets)
        return self._jitter_cache[1]

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        _check_warp_inputs(image, ddf)
        if self.jitter:
            ddf = ddf + self._jitter_offsets(ddf)
        return warp(
            image, _pin_singleton_axes(ddf), mode=self._mode, padding=self._padding,
            backend=self.backend, deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, jitter={self.jitter}, "
                f"backend={self.backend!r}")


class DVF2DDF(nn.Module):
    """``monai.networks.blocks.DVF2DDF`` (scaling and squaring) on the fused kernels.

    ``forward(dvf)``: dvf [B, ndim, *S], voxel units; returns the displacement
    ``ddf = dvf / 2**num_steps`` squared ``num_steps`` times (``ddf + warp(ddf, ddf)``).
    Bilinear: one :func:`mrus_kernels.integrate_velocity` call (each step one fused kernel);
    nearest, a size-1 spatial axis or more than ``MAX_STEPS`` steps: ``num_steps`` fused
    warps.

    Args:
        num_steps: squaring steps, > 0.
        mode: "bilinear" ("trilinear") or "nearest"; "bicubic" raises ValueError.
        padding_mode: "zeros" (MONAI's default here) or "border"; "reflection" raises.
        backend, deterministic: as :class:`Warp`.

    Example:
        >>> ddf = DVF2DDF(num_steps=7)(dvf)  # was: monai.networks.blocks.DVF2DDF(7)(dvf)
    """

    def __init__(
        self, num_steps: int = 7, mode: object = "bilinear", padding_mode: object = "zeros",
        *, backend: str | None = None, deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        if num_steps <= 0:
            raise ValueError(f"expecting positive num_steps, got {num_steps}")
        self.num_steps = num_steps
        self.warp_layer = Warp(mode=mode, padding_mode=padding_mode, backend=backend,
                               deterministic=deterministic)

    def forward(self, dvf: torch.Tensor) -> torch.Tensor:
        layer = self.warp_layer
        _check_warp_inputs(dvf, dvf)
        if (layer._mode == "linear" and not layer.jitter and self.num_steps <= MAX_STEPS
                and all(n > 1 for n in dvf.shape[2:])):
            return integrate_velocity(
                dvf, self.num_steps, padding=layer._padding, backend=layer.backend,
                deterministic=layer.deterministic,
            )
        ddf = dvf / (2**self.num_steps)
        for _ in range(self.num_steps):
            ddf = ddf + layer(ddf, ddf)
        return ddf


# ---------------------------------------------------------------------------- MI


def _bspline_box_inverse(bins: int) -> torch.Tensor:
    """Columns 2..K-3 of the inverse of the K x K tridiagonal matrix [1, 4, 1] / 6, float64.

    The cubic B-spline at an integer position g spreads a unit weight 1/6, 4/6, 1/6 over
    bins g - 1, g, g + 1; the matrix undoes that spread along the target axis. It is
    diagonally dominant (condition number <= 3), so the solve loses nothing.
    """
    m = torch.diag(torch.full((bins,), 4.0, dtype=torch.float64))
    off = torch.ones(bins - 1, dtype=torch.float64)
    m = (m + torch.diag(off, 1) + torch.diag(off, -1)) / 6
    return torch.linalg.inv(m)[:, 2:bins - 2].contiguous()


class GlobalMutualInformationLoss(_Loss):
    """``monai.losses.GlobalMutualInformationLoss`` on the fused joint histogram.

    ``forward(pred, target)``: tensors of one shape [B, ...] (every non-batch element is a
    sample of its item, channels included, as MONAI); returns -MI reduced over the batch,
    MI = Σ P log((P + smooth_nr) / (p_a p_b + smooth_dr) + smooth_dr), a = pred, b = target.

    Routes:

    - ``"gaussian"``: both images clamped to [0, 1]; bin centres at linspace(0, 1, K) are
      the centres of K bins of width w = 1/(K - 1) on [-w/2, 1 + w/2], and MONAI's sigma
      (sigma_ratio · w, computed in float32 as MONAI does) is sigma_ratio bin widths:
      :func:`mrus_kernels.joint_histogram` with that range gives MONAI's P (its weights are
      normalised over the bins per voxel, as MONAI's).
    - ``"b-spline"``: MONAI's bin coordinate t = x / s - (min / s - 2), s = (max - min) /
      (K - 4), min and max over the whole tensor, clamped to [2, K - 3] (computed here in
      torch, so gradients reach min and max as in MONAI). The pred's cubic B-spline window
      is the fused B-spline kernel on bins of width 1 centred at the integers. The target's
      box window (one bin, or half each at an exact .5 tie) has no gradient; the target
      enters at integer positions, where the cubic window is the box spread by [1, 4, 1]/6
      along the target axis, which a tridiagonal solve undoes exactly (condition number
      <= 3). Ties: two batch items in one call, target rounded down and up at .5, averaged
      (elsewhere both equal the box's one bin). Twice the histogram work, no host sync.

    Args:
        kernel_type: "gaussian" or "b-spline".
        num_bins: K; > 0 as MONAI, and >= 2 (gaussian) or >= 5 (b-spline), where MONAI's
            own formulas are defined (ValueError otherwise).
        sigma_ratio: Gaussian width in bin widths, in [1e-6, 1e6].
        reduction: "mean", "sum" or "none" (per item, [B]).
        smooth_nr, smooth_dr: MONAI's smoothing constants.
        backend: mrus backend for :func:`mrus_kernels.joint_histogram`.

    Example:
        >>> loss = GlobalMutualInformationLoss(num_bins=23)(pred, target)
    """

    def __init__(
        self, kernel_type: str = "gaussian", num_bins: int = 23, sigma_ratio: float = 0.5,
        reduction: object = "mean", smooth_nr: float = 1e-7, smooth_dr: float = 1e-7,
        *, backend: str | None = None,
    ) -> None:
        cls = "GlobalMutualInformationLoss"
        super().__init__(reduction=_check_reduction(cls, reduction, per_voxel=False))
        if num_bins <= 0:
            raise ValueError(f"num_bins must > 0, got {num_bins}")
        if kernel_type not in ("gaussian", "b-spline"):
            raise ValueError(
                f"{cls}: kernel_type must be 'gaussian' or 'b-spline', got {kernel_type!r}"
            )
        least = 2 if kernel_type == "gaussian" else 5
        if num_bins < least:
            raise ValueError(
                f"{cls}: num_bins must be >= {least} for kernel_type={kernel_type!r} (below, "
                f"MONAI's own formula gives NaN or an empty bin range), got {num_bins}"
            )
        self.kernel_type = kernel_type
        self.num_bins = int(num_bins)
        self.sigma_ratio = sigma_ratio
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.backend = backend
        if kernel_type == "gaussian":
            # MONAI's sigma, in float32 as MONAI computes it, then in bin widths 1/(K-1).
            centres = torch.linspace(0.0, 1.0, num_bins)
            sigma = float(torch.mean(centres[1:] - centres[:-1]) * sigma_ratio)
            self._sigma_bins = sigma * (num_bins - 1)
            if not SIGMA_MIN <= self._sigma_bins <= SIGMA_MAX:
                raise ValueError(
                    f"{cls}: sigma_ratio must give a width in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] "
                    f"bin widths, got sigma_ratio={sigma_ratio!r}"
                )
        else:
            self.register_buffer("_box_inverse", _bspline_box_inverse(num_bins),
                                 persistent=False)

    def _gaussian(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, k = pred.shape[0], self.num_bins
        w = 1.0 / (k - 1)
        p = pred.clamp(0, 1).reshape(b, 1, 1, -1)
        t = target.clamp(0, 1).reshape(b, 1, 1, -1)
        return joint_histogram(p, t, bins=k, kernel="gaussian", sigma=self._sigma_bins,
                               value_range=(-w / 2, 1 + w / 2), backend=self.backend)

    def _bin_coordinate(self, img: torch.Tensor) -> torch.Tensor:
        # MONAI's expression, term by term, so that its rounding (and its .5 ties) are ours.
        k = self.num_bins
        top, low = torch.max(img), torch.min(img)
        size = (top - low) / (k - 4)
        return torch.clamp(torch.div(img, size) - (torch.div(low, size) - 2), 2, k - 3)

    def _bspline(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, k = pred.shape[0], self.num_bins
        tp = self._bin_coordinate(pred).reshape(b, 1, 1, -1)
        tt = self._bin_coordinate(target.detach()).reshape(b, 1, 1, -1)
        low, high = torch.floor(tt + 0.5), torch.ceil(tt - 0.5)  # equal unless a .5 tie
        hist = joint_histogram(torch.cat([tp, tp]), torch.cat([low, high]), bins=k,
                               kernel="bspline", value_range=(-0.5, k - 0.5),
                               backend=self.backend)
        spread = (hist[:b] + hist[b:]) / 2
        box = spread @ self._box_inverse.to(device=spread.device, dtype=spread.dtype)
        return F.pad(box, (2, 2))  # the box never reaches bins 0, 1, K-2, K-1

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape != pred.shape:
            raise ValueError(
                f"ground truth has differing shape ({target.shape}) from pred ({pred.shape})"
            )
        reduction = _check_reduction("GlobalMutualInformationLoss", self.reduction, False)
        target = target.to(pred.dtype)
        if self.kernel_type == "gaussian":
            p = self._gaussian(pred, target)
        else:
            p = self._bspline(pred, target)
        pa, pb = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
        if self.kernel_type == "b-spline":
            # MONAI's target marginal is the mean of float32 box weights, whatever the input
            # dtype: rounded to float32 here too (a no-op below float64).
            pb = pb.float().to(p.dtype)
        nr, dr = self.smooth_nr, self.smooth_dr
        mi = (p * torch.log((p + nr) / (pa * pb + dr) + dr)).sum((1, 2)).to(pred.dtype)
        if reduction == "sum":
            return mi.sum().neg()
        if reduction == "none":
            return mi.neg()
        return mi.mean().neg()


# ---------------------------------------------------------------------------- LNCC


class LocalNormalizedCrossCorrelationLoss(_Loss):
    """``monai.losses.LocalNormalizedCrossCorrelationLoss`` (rectangular window) on the
    fused ``mrus_kernels.lncc.lncc_monai``.

    ``forward(pred, target)``: [B, C, *S] with ``spatial_dims`` spatial axes; returns -cc
    averaged ("mean") or summed ("sum") over batch, channels and voxels, cc per voxel
    (cross² + smooth_nr) / (max(var_t, smooth_dr) · max(var_p, smooth_dr)) over the
    kernel_size window of the zero-padded images, as MONAI.

    Route: each (item, channel) is one item of ``lncc_monai``; the inputs are zero-padded
    by kernel_size // 2 on every side and the mask selects the original voxels, so every
    window the original voxels see is whole inside the padded image and its in-bounds
    statistics are MONAI's zero-padded sums (lncc_monai is invariant to a constant offset
    per item, so its internal centring keeps this exact). ``spatial_dims=1``: the signal
    becomes a 2D image of kernel_size identical rows, masked to the middle row, whose
    window sums are kernel_size times the 1D sums; smooth_nr and smooth_dr are scaled by
    kernel_size² and kernel_size, which leaves cc exactly MONAI's.

    Args:
        spatial_dims: 1, 2 or 3.
        kernel_size: odd window side.
        kernel_type: "rectangular"; "triangular" and "gaussian" raise ValueError.
        reduction: "mean" or "sum"; "none" (a per-voxel map) raises ValueError.
        smooth_nr, smooth_dr: MONAI's constants.
        backend: mrus backend for ``lncc_monai``.

    Example:
        >>> loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)(p, t)
    """

    def __init__(
        self, spatial_dims: int = 3, kernel_size: int = 3, kernel_type: str = "rectangular",
        reduction: object = "mean", smooth_nr: float = 0.0, smooth_dr: float = 1e-5,
        *, backend: str | None = None,
    ) -> None:
        cls = "LocalNormalizedCrossCorrelationLoss"
        # MONAI's order of checks: reduction, spatial_dims, kernel_size, kernel_type.
        value = _check_reduction(cls, reduction, per_voxel=False)
        super().__init__(reduction=value)
        self.ndim = spatial_dims
        if self.ndim not in {1, 2, 3}:
            raise SpatialDimsError(
                f"Unsupported ndim: {self.ndim}-d, only 1-d, 2-d, and 3-d inputs are supported"
            )
        self.kernel_size = kernel_size
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if kernel_type not in ("rectangular", "triangular", "gaussian"):
            raise ValueError(
                f"{cls}: kernel_type must be 'rectangular', 'triangular' or 'gaussian', got "
                f"{kernel_type!r}"
            )
        if kernel_type != "rectangular":
            raise ValueError(
                f"{cls}: kernel_type={kernel_type!r} is not served by the fused lncc (a box "
                "window); use kernel_type='rectangular', or MONAI's own class"
            )
        _check_reduction(cls, value, per_voxel=True)
        self.kernel_type = kernel_type
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.backend = backend
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None

    def _mask(self, shape: tuple[int, ...], pad: tuple[int, ...], device) -> torch.Tensor:
        """Bool [1, 1, *padded shape], True on the original voxels; cached."""
        key = (shape, pad, device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            inner = torch.ones((1, 1, *shape), dtype=torch.bool, device=device)
            self._mask_cache = (key, F.pad(inner, pad))
        return self._mask_cache[1]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cls = "LocalNormalizedCrossCorrelationLoss"
        if pred.ndim - 2 != self.ndim:
            raise ValueError(
                f"expecting pred with {self.ndim} spatial dimensions, got pred of shape "
                f"{pred.shape}"
            )
        if target.shape != pred.shape:
            raise ValueError(
                f"ground truth has differing shape ({target.shape}) from pred ({pred.shape})"
            )
        reduction = _check_reduction(cls, self.reduction, per_voxel=True)
        k = int(self.kernel_size)
        r = k // 2
        b, c, spatial = pred.shape[0], pred.shape[1], tuple(pred.shape[2:])
        p = pred.reshape(b * c, 1, *spatial)
        t = target.to(pred.dtype).reshape(b * c, 1, *spatial)
        nr, dr = self.smooth_nr, self.smooth_dr
        if self.ndim == 1:
            p = p.unsqueeze(2).expand(-1, -1, k, -1)
            t = t.unsqueeze(2).expand(-1, -1, k, -1)
            pad = (r, r, 0, 0)
            mask = self._mask((1, spatial[0]), (r, r, r, r), pred.device)  # the middle row
            nr, dr = nr * k * k, dr * k
        else:
            pad = (r, r) * self.ndim
            mask = self._mask(spatial, pad, pred.device)
        cc = lncc_monai(
            F.pad(t, pad), F.pad(p, pad), window=k, smooth_nr=nr, smooth_dr=dr, mask=mask,
            backend=self.backend,
        )  # [B*C], the mean over each item's voxels
        count = math.prod(spatial)
        if reduction == "sum":
            return (cc.sum() * count).neg()
        return cc.mean().neg()


# ---------------------------------------------------------------------------- regularisers


def _check_field(pred: torch.Tensor) -> None:
    """MONAI's checks of BendingEnergyLoss / DiffusionLoss, with its messages."""
    if pred.ndim not in [3, 4, 5]:
        raise ValueError(f"Expecting 3-d, 4-d or 5-d pred, instead got pred of shape {pred.shape}")
    for i in range(pred.ndim - 2):
        if pred.shape[-i - 1] <= 2:
            raise ValueError(
                f"All spatial dimensions must be > 2, got spatial dimensions {pred.shape[2:]}"
            )
    if pred.shape[1] != pred.ndim - 2:
        raise ValueError(
            f"Number of vector components, i.e. number of channels of the input DDF, "
            f"{pred.shape[1]}, does not match number of spatial dimensions, {pred.ndim - 2}"
        )


def _regulariser(cls: str, op_name: str, pred: torch.Tensor, normalize: bool,
                 reduction: object, backend: str | None) -> torch.Tensor:
    """MONAI's bending energy or diffusion of ``pred`` through the fused regulariser.

    normalize: MONAI scales component c's derivatives along axes i (and j) by S_i (S_j) /
    S_c: the field divided by S_c per component, with voxel spacing h_i = 1 / S_i.
    A 1D field [B, 1, W] is embedded as the 2D field [B, 2, 3, W] (the signal in three
    identical rows, a zero second component): its derivatives across the rows vanish, so
    its interior terms are the 1D ones, over twice the (item, component) count.
    """
    _check_field(pred)
    reduction = _check_reduction(cls, reduction, per_voxel=True)
    op = getattr(_regularisers, op_name)
    u = pred if pred.is_floating_point() else pred.to(torch.get_default_dtype())
    sizes = tuple(pred.shape[2:])
    spacing = None
    if normalize:
        # Per-channel Python scalars, not a tensor of sizes (MONAI's): no host-to-device copy.
        u = torch.cat([u[:, c:c + 1] / n for c, n in enumerate(sizes)], 1)
        spacing = tuple(1.0 / n for n in sizes)
    if len(sizes) == 1:
        u = torch.cat([u, torch.zeros_like(u)], 1).unsqueeze(2).expand(-1, -1, 3, -1)
        spacing = None if spacing is None else (1.0, spacing[0])
        out = op(u, spacing=spacing, reduction=reduction, backend=backend)
        return out * 2 if reduction == "mean" else out
    return op(u, spacing=spacing, reduction=reduction, backend=backend)


class _FieldLoss(_Loss):
    """MONAI's (normalize, reduction) displacement losses, on the fused regulariser
    ``_op`` of :mod:`mrus_kernels.regularisers`."""

    _op = ""

    def __init__(self, normalize: bool = False, reduction: object = "mean", *,
                 backend: str | None = None) -> None:
        cls = type(self).__name__
        super().__init__(reduction=_check_reduction(cls, reduction, per_voxel=True))
        self.normalize = normalize
        self.backend = backend

    def forward(self, pred: torch.Tensor) -> torch.Tensor:
        return _regulariser(type(self).__name__, self._op, pred, self.normalize,
                            self.reduction, self.backend)


class BendingEnergyLoss(_FieldLoss):
    """``monai.losses.BendingEnergyLoss`` on the fused ``regularisers.bending_energy``.

    ``forward(pred)``: a displacement [B, ndim, *S] (ndim 1, 2 or 3, every S_i > 2);
    returns the mean ("mean": over B · ndim · Π(S_i - 2), MONAI's count) or the sum of
    Σ_i (∂²_ii u)² + 2 Σ_{i<j} (∂²_ij u)² on the interior voxels, compact stencils.

    Args:
        normalize: MONAI's scale-invariant form (derivatives times S_i S_j / S_c).
        reduction: "mean" or "sum"; "none" (a per-voxel map) raises ValueError.
        backend: mrus backend.

    Example:
        >>> loss = BendingEnergyLoss()(ddf)
    """

    _op = "bending_energy"


class DiffusionLoss(_FieldLoss):
    """``monai.losses.DiffusionLoss`` on the fused ``regularisers.diffusion``.

    ``forward(pred)``: a displacement [B, ndim, *S] (ndim 1, 2 or 3, every S_i > 2);
    returns the mean ("mean": over B · ndim · Π(S_i - 2)) or the sum of
    Σ_i ((u(x + e_i) - u(x - e_i)) / 2)² on the interior voxels.

    Args:
        normalize: MONAI's scale-invariant form (derivatives times S_i / S_c).
        reduction: "mean" or "sum"; "none" (a per-voxel map) raises ValueError.
        backend: mrus backend.

    Example:
        >>> loss = DiffusionLoss()(ddf)
    """

    _op = "diffusion"
