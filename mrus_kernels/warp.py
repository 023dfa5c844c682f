"""``warp``: resample an image through a dense displacement field, out(x) = I(x + u(x))."""

from __future__ import annotations

import torch
from torch import nn

from . import _double, _ext, reference
from ._ext import DTYPE_CODES, Interp, Padding, WarpFlags, cuda_stream, fake_grads, grads_or_empty
from ._validation import (
    check_batch,
    check_choice,
    check_float,
    check_optional_bool,
    check_same,
    check_spatial,
    check_tensor,
)
from .backends import resolve

MODES = ("linear", "nearest")
PADDINGS = ("zeros", "border")
_HALF = (torch.float16, torch.bfloat16)
# GPU backward with a broadcast displacement (batch 1, image batch B > 1) whose gradient is
# needed: below this many output voxels the displacement is expanded to B items, so that
# the batch goes on a grid axis (the kernels then write one gradient per item, summed
# here); above it the grid is full anyway and one program walks the batch.
_SPLIT_BATCH_BELOW_VOXELS = 1 << 17


def _validate(
    image: object, ddf: object, mode: object, padding: object, deterministic: object
) -> None:
    op = "warp"
    check_tensor(op, "image", image)
    check_tensor(op, "ddf", ddf)
    assert isinstance(image, torch.Tensor) and isinstance(ddf, torch.Tensor)
    check_float(op, "image", image)
    check_float(op, "ddf", ddf)
    ndim = check_spatial(op, "image", image)
    if ddf.dim() != image.dim():
        raise ValueError(
            f"warp: ddf must have the same rank as image ([B, {ndim}, *S_out] for a {ndim}D "
            f"image of shape {tuple(image.shape)}), got shape {tuple(ddf.shape)}"
        )
    check_spatial(op, "ddf", ddf, layout="ndim")
    if ddf.shape[1] != ndim:
        raise ValueError(
            f"warp: ddf must have {ndim} channels (one per spatial axis) for a {ndim}D image, "
            f"got {ddf.shape[1]} (shape {tuple(ddf.shape)})"
        )
    check_batch(op, "image", image, "ddf", ddf)
    check_same(op, ("image", "ddf"), (image, ddf))
    check_choice(op, "mode", mode, MODES)
    check_choice(op, "padding", padding, PADDINGS)
    check_optional_bool(op, "deterministic", deterministic)


def _kernel_args(image: torch.Tensor, ddf: torch.Tensor, mode: int, padding: int, flags: int):
    return (
        DTYPE_CODES[image.dtype], ddf.shape[1], max(image.shape[0], ddf.shape[0]), image.shape[0],
        ddf.shape[0], image.shape[1], list(image.shape[2:]), list(ddf.shape[2:]), mode, padding,
        flags,
    )


def _out_shape(image: torch.Tensor, ddf: torch.Tensor) -> tuple[int, ...]:
    return (max(image.shape[0], ddf.shape[0]), image.shape[1], *ddf.shape[2:])


def _finite_abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements (0 if none), a float32 device scalar."""
    return x.abs().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).amax().float()


def _fixed_bound(grad_out: torch.Tensor, image: torch.Tensor, flags: int) -> torch.Tensor:
    """vmax of the deterministic image gradient (mrus_kernels/triton/warp.py docstring): a
    float32 device scalar >= every finite contribution, computed without a host sync.

    Image-gradient contributions are w * g with 0 <= w <= 1: at most max |g|. With
    DDF_GRAD_SCATTER (image is the field being squared) the displacement gradient adds
    sum_c g_c * (differences of the field at the corners) * weights + g_i, at most
    gmax * (2 * C * umax + 1); the factor 1 + 2**-16 covers its float32 rounding. Every
    finite float32 value is <= FLT_MAX, so the bound is clamped there.
    """
    gmax = _finite_abs_max(grad_out)
    if not flags & WarpFlags.DDF_GRAD_SCATTER:
        return gmax
    umax = _finite_abs_max(image).double()
    bound = gmax.double() * (2 * image.shape[1] * umax + 1) * (1 + 2**-16)
    return bound.clamp(max=torch.finfo(torch.float32).max).float()


@_ext.on_tensor_device
def launch_forward(
    image: torch.Tensor, ddf: torch.Tensor, mode: int, padding: int, flags: int, backend: str
) -> torch.Tensor:
    """Runs the forward warp kernel of `backend` (not "torch") on validated inputs.

    flags: WarpFlags of csrc/include/warp.h (WarpFlags.ADD_DDF for compose).
    """
    image, ddf = image.contiguous(), ddf.contiguous()
    dtype = image.dtype
    if backend == "cpu":
        work = torch.float32 if dtype in _HALF else dtype
        img, d = image.to(work), ddf.to(work)
        out = torch.empty(_out_shape(image, ddf), dtype=work, device=image.device)
        _ext.C.warp_forward_cpu(
            *_kernel_args(img, d, mode, padding, flags), torch.get_num_threads(),
            img.data_ptr(), d.data_ptr(), out.data_ptr(),
        )
        return out.to(dtype)
    out = torch.empty(_out_shape(image, ddf), dtype=dtype, device=image.device)
    if backend == "cuda":
        _ext.C.warp_forward_cuda(
            *_kernel_args(image, ddf, mode, padding, flags), image.data_ptr(), ddf.data_ptr(),
            out.data_ptr(), cuda_stream(image),
        )
    elif backend == "triton":
        from .triton import warp as triton_warp

        triton_warp.warp_forward(image, ddf, out, mode=mode, padding=padding, flags=flags)
    else:  # pragma: no cover - dispatch never sends other names here
        raise ValueError(f"warp: no kernel for backend {backend!r}")
    return out


@_ext.on_tensor_device
def launch_backward(
    grad_out: torch.Tensor, image: torch.Tensor, ddf: torch.Tensor, mode: int, padding: int,
    flags: int, backend: str, deterministic: bool, need_image: bool, need_ddf: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Runs the backward warp kernel of `backend`: (grad_image, grad_ddf), None where not
    needed. With WarpFlags.DDF_GRAD_SCATTER (image is ddf) both land in grad_image."""
    grad_out, image, ddf = grad_out.contiguous(), image.contiguous(), ddf.contiguous()
    dtype = image.dtype
    if backend == "cpu":
        work = torch.float32 if dtype in _HALF else dtype
        g, img, d = grad_out.to(work), image.to(work), ddf.to(work)
        gi = torch.zeros(img.shape, dtype=work) if need_image else None
        gd = torch.empty(d.shape, dtype=work) if need_ddf else None
        _ext.C.warp_backward_cpu(
            *_kernel_args(img, d, mode, padding, flags), torch.get_num_threads(),
            g.data_ptr(), img.data_ptr(), d.data_ptr(),
            gi.data_ptr() if gi is not None else 0, gd.data_ptr() if gd is not None else 0,
        )
    else:
        gi = (
            torch.zeros(image.shape, dtype=torch.float32, device=image.device)
            if need_image
            else None
        )
        batch = max(image.shape[0], ddf.shape[0])
        expand = (need_ddf and ddf.shape[0] == 1 and batch > 1
                  and ddf[0, 0].numel() < _SPLIT_BATCH_BELOW_VOXELS)
        run_ddf = ddf.expand(batch, *ddf.shape[1:]).contiguous() if expand else ddf
        gd = torch.empty(run_ddf.shape, dtype=dtype, device=ddf.device) if need_ddf else None
        bound = None
        if deterministic and need_image:
            bound = _fixed_bound(grad_out, image, flags)
        if backend == "cuda":
            scratch = None
            if bound is not None:
                # int64 fixed-point sums, then the int32 non-finite flags (csrc/cuda/warp.cu).
                n = image.numel()
                scratch = torch.zeros(n + (n + 1) // 2, dtype=torch.int64, device=image.device)
            _ext.C.warp_backward_cuda(
                *_kernel_args(image, run_ddf, mode, padding, flags), grad_out.data_ptr(),
                image.data_ptr(), run_ddf.data_ptr(), gi.data_ptr() if gi is not None else 0,
                gd.data_ptr() if gd is not None else 0, deterministic,
                scratch.data_ptr() if scratch is not None else 0,
                bound.data_ptr() if bound is not None else 0, cuda_stream(image),
            )
        elif backend == "triton":
            from .triton import warp as triton_warp

            triton_warp.warp_backward(
                grad_out, image, run_ddf, gi, gd, mode=mode, padding=padding,
                deterministic=deterministic, flags=flags, fixed_bound=bound,
            )
        else:  # pragma: no cover
            raise ValueError(f"warp: no kernel for backend {backend!r}")
        if expand and gd is not None:
            gd = gd.sum(0, keepdim=True, dtype=torch.float32).to(dtype)
    return (
        gi.to(dtype) if gi is not None else None,
        gd.to(dtype) if gd is not None else None,
    )


# ---------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mrus::warp", mutates_args=())
def _warp_op(
    image: torch.Tensor, ddf: torch.Tensor, mode: int, padding: int, flags: int, backend: str,
    deterministic: bool,
) -> torch.Tensor:
    return launch_forward(image, ddf, mode, padding, flags, backend)


@_warp_op.register_fake
def _(image, ddf, mode, padding, flags, backend, deterministic):
    return image.new_empty(_out_shape(image, ddf))


@torch.library.custom_op("mrus::warp_backward", mutates_args=())
def _warp_backward_op(
    grad_out: torch.Tensor, image: torch.Tensor, ddf: torch.Tensor, mode: int, padding: int,
    flags: int, backend: str, deterministic: bool, need_image: bool, need_ddf: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (image, ddf); an empty tensor stands for one not asked for."""
    gi, gd = launch_backward(
        grad_out, image, ddf, mode, padding, flags, backend, deterministic, need_image, need_ddf
    )
    return grads_or_empty((gi, image), (gd, ddf))


@_warp_backward_op.register_fake
def _(grad_out, image, ddf, mode, padding, flags, backend, deterministic, need_image, need_ddf):
    return fake_grads((image, need_image), (ddf, need_ddf))


def _setup_context(ctx, inputs, output):
    image, ddf, mode, padding, flags, backend, deterministic = inputs
    ctx.save_for_backward(image, ddf)
    ctx.args = (mode, padding, flags, backend, deterministic)


def _backward(ctx, grad_out):
    image, ddf = ctx.saved_tensors
    need_image, need_ddf = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_image or need_ddf):
        return None, None, None, None, None, None, None
    gi, gd = _warp_backward_op(grad_out, image, ddf, *ctx.args, need_image, need_ddf)
    return (gi if need_image else None), (gd if need_ddf else None), None, None, None, None, None


_warp_op.register_autograd(_backward, setup_context=_setup_context)


def _double_spec(grad_out, image, ddf, mode, padding, flags, backend, deterministic, need_image,
                 need_ddf):
    """Double backward of mrus::warp_backward (mrus_kernels/_double.py): the reference
    warp (plus the ddf for compose's ADD_DDF) of the primals (image, ddf)."""

    def forward(image, ddf):
        out = reference.warp(image, ddf, _double.MODE_NAMES[mode], _double.PADDING_NAMES[padding])
        return out + ddf if flags & WarpFlags.ADD_DDF else out

    return forward, ((image, 1, need_image), (ddf, 2, need_ddf))


_double.register(_warp_backward_op, _double_spec)


# ---------------------------------------------------------------------------- public API


def warp(
    image: torch.Tensor,
    ddf: torch.Tensor,
    *,
    mode: str = "linear",
    padding: str = "zeros",
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Resamples ``image`` at ``x + ddf(x)``: out(x) = image(x + ddf(x)).

    Coordinates and interpolation weights are computed once per output voxel and every
    channel is gathered in the same pass. Differentiable in ``image`` and ``ddf``.

    Args:
        image: Tensor [B, C, *S_in] (2D: S = (H, W); 3D: S = (D, H, W)), any C.
        ddf: Tensor [B, ndim, *S_out], voxel units, component i along spatial axis i. The
            output has the ddf's spatial size. Either batch size may be 1 (broadcast).
        mode: "linear" (bi/trilinear) or "nearest" (label maps; round half to even).
        padding: "zeros" (interpolate against zero-valued voxels outside, as grid_sample)
            or "border" (clamp the coordinate into the image).
        backend: "auto", "torch", "cpu", "triton" or "cuda"; default ``MRUS_BACKEND`` or
            "auto".
        deterministic: bitwise reproducible image gradient (no float atomics); default
            ``torch.are_deterministic_algorithms_enabled()``. On the GPU backends it sums in
            64-bit fixed point: each element within m·q/2 of the exact sum of its m
            contributions (q <= max|grad_out|·max(M, 2**11)·2**-60, M the most contributions
            one element can receive; mrus_kernels/triton/warp.py), NaN/inf only where they
            reach.

    Returns:
        Tensor [max(B_image, B_ddf), C, *S_out] of image's dtype. NaN in every channel where
        the displacement is NaN.

    Example:
        >>> image = torch.rand(1, 1, 32, 32, 32)
        >>> ddf = torch.zeros(1, 3, 32, 32, 32)
        >>> torch.equal(warp(image, ddf), image)
        True
    """
    _validate(image, ddf, mode, padding, deterministic)
    name = resolve("warp", backend, image.device, image.dtype)
    if name == "torch":
        return reference.warp(image, ddf, mode, padding)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    interp = Interp.LINEAR if mode == "linear" else Interp.NEAREST
    pad = Padding.ZEROS if padding == "zeros" else Padding.BORDER
    return _warp_op(image, ddf, int(interp), int(pad), int(WarpFlags.NONE), name, deterministic)


class Warp(nn.Module):
    """``nn.Module`` form of :func:`warp` (a spatial transformer layer).

    Example:
        >>> layer = Warp(mode="linear", padding="border")
        >>> moved = layer(moving, ddf)
    """

    def __init__(
        self, mode: str = "linear", padding: str = "zeros", backend: str | None = None,
        deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        check_choice("Warp", "mode", mode, MODES)
        check_choice("Warp", "padding", padding, PADDINGS)
        self.mode, self.padding = mode, padding
        self.backend, self.deterministic = backend, deterministic

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        return warp(
            image, ddf, mode=self.mode, padding=self.padding, backend=self.backend,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding={self.padding!r}, backend={self.backend!r}"
