"""``sobel`` and ``sobel_l1``: Sobel edge maps of feature maps and the fused ACMT boundary loss.

``sobel(x)`` is the separable 3^ndim Sobel of every (batch, channel) volume: component i is
the derivative [-1, 0, 1] along spatial axis i times the smoothing [1, 2, 1] along every
other axis, unnormalised, exactly ``scipy.ndimage.sobel(x[b, c], axis=i)`` (mode "nearest"
for ``padding="replicate"``, "constant" for ``"zeros"``). ``sobel_l1(f1, f0)`` is
``mean |sobel(f1) - sobel(f0)|`` of the magnitudes, computed without materialising either
magnitude map: one pass forward; backward, the adjoint Sobel of sign(m1 - m0) g_i / m (on
the GPU backends, those values go to a float32 scratch in a first pass, then one gather
applies the adjoint filter). The per-voxel math is in
csrc/include/sobel.h (shared by the cpu and cuda kernels); mrus_kernels/triton/sobel.py
reproduces it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _double, _ext, reference
from ._ext import DTYPE_CODES, Padding, cuda_stream, fake_grads, grads_or_empty, ptr
from ._validation import check_choice, check_float, check_same, check_spatial, check_tensor
from .backends import resolve

OUTPUTS = ("magnitude", "components")
PADDINGS = ("replicate", "zeros")
REDUCTIONS = ("mean", "sum", "none")
_HALF = (torch.float16, torch.bfloat16)

# Modes and reductions of csrc/include/sobel.h (sobel::Mode, sobel::Reduction).
COMPONENTS, MAGNITUDE, L1 = 0, 1, 2
_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
_PADDING_CODES = {"replicate": int(Padding.BORDER), "zeros": int(Padding.ZEROS)}
_PADDING_NAMES = {code: name for name, code in _PADDING_CODES.items()}
_REDUCTION_NAMES = {code: name for name, code in _REDUCTION_CODES.items()}


# ---------------------------------------------------------------------------- validation


# Accepted eps: normal float32 numbers, as the GPU backends and half inputs compute in
# float32; a smaller eps is 0 there (1e-300: the magnitude's gradient NaN where every
# component vanishes), a larger one swamps any edge (1e300: an infinite magnitude).
EPS_MIN, EPS_MAX = 1e-30, 1e30


def _check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    # Comparisons only (NaN fails both): under torch.compile eps may be symbolic.
    if not EPS_MIN <= value <= EPS_MAX:
        raise ValueError(
            f"{op}: eps must be positive and finite (in [{EPS_MIN:g}, {EPS_MAX:g}]: it keeps "
            f"the magnitude's gradient finite where all components vanish), got {eps!r}"
        )
    return value


def _validate_sobel(x: object, output: object, padding: object, eps: object) -> float:
    op = "sobel"
    check_tensor(op, "x", x)
    assert isinstance(x, torch.Tensor)
    check_float(op, "x", x)
    check_spatial(op, "x", x)
    check_choice(op, "output", output, OUTPUTS)
    check_choice(op, "padding", padding, PADDINGS)
    return _check_eps(op, eps)


def _validate_l1(f1: object, f0: object, padding: object, eps: object, reduction: object) -> float:
    op = "sobel_l1"
    check_tensor(op, "f1", f1)
    check_tensor(op, "f0", f0)
    assert isinstance(f1, torch.Tensor) and isinstance(f0, torch.Tensor)
    check_float(op, "f1", f1)
    check_float(op, "f0", f0)
    check_spatial(op, "f1", f1)
    if f0.shape != f1.shape:
        raise ValueError(
            f"sobel_l1: f1 and f0 must have the same shape, got {tuple(f1.shape)} and "
            f"{tuple(f0.shape)}"
        )
    check_same(op, ("f1", "f0"), (f1, f0))
    check_choice(op, "padding", padding, PADDINGS)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    return _check_eps(op, eps)


# ---------------------------------------------------------------------------- launchers


def _args(shape: tuple[int, ...], dtype: torch.dtype, padding: int, eps: float, mode: int,
          reduction: int) -> tuple:
    """Kernel arguments for inputs of `shape` [B, C, *S] and `dtype`."""
    return (
        DTYPE_CODES[dtype], len(shape) - 2, shape[0], shape[1], list(shape[2:]), padding, eps,
        mode, reduction,
    )


def _input_shape(grad_out: torch.Tensor, x: torch.Tensor, mode: int) -> tuple[int, ...]:
    """[B, C, *S] of the forward input. The components backward gets an empty placeholder
    for x (its values do not enter the gradient) and takes the shape from grad_out."""
    if mode == COMPONENTS:
        return (grad_out.shape[0], grad_out.shape[1], *grad_out.shape[3:])
    return tuple(x.shape)


def _out_shape(x: torch.Tensor, mode: int, reduction: int) -> tuple[int, ...]:
    if mode == COMPONENTS:
        return (x.shape[0], x.shape[1], x.dim() - 2, *x.shape[2:])
    if mode == L1 and reduction != _REDUCTION_CODES["none"]:
        return ()
    return tuple(x.shape)


@_ext.on_tensor_device
def launch_forward(
    x: torch.Tensor, x0: torch.Tensor | None, mode: int, padding: int, eps: float,
    reduction: int, backend: str,
) -> torch.Tensor:
    """Runs the forward kernel of `backend` (not "torch") on validated inputs.

    mode COMPONENTS / MAGNITUDE: sobel(x); L1: |sobel(x) - sobel(x0)| reduced.
    """
    x = x.contiguous()
    x0 = x0.contiguous() if x0 is not None else None
    dtype = x.dtype
    shape = _out_shape(x, mode, reduction)
    if backend == "cpu":
        work = torch.float32 if dtype in _HALF else dtype
        xw = x.to(work)
        x0w = x0.to(work) if x0 is not None else None
        out = torch.empty(shape, dtype=work, device=x.device)
        _ext.C.sobel_forward_cpu(
            *_args(xw.shape, work, padding, eps, mode, reduction), torch.get_num_threads(), ptr(xw),
            ptr(x0w), out.data_ptr(),
        )
        return out.to(dtype)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    if backend == "cuda":
        partials = None
        if mode == L1 and reduction != _REDUCTION_CODES["none"]:
            n = _ext.C.sobel_partials_cuda(x.dim() - 2, x.shape[0], x.shape[1], list(x.shape[2:]))
            partials = torch.empty(n, dtype=torch.float32, device=x.device)
        _ext.C.sobel_forward_cuda(
            *_args(x.shape, dtype, padding, eps, mode, reduction), ptr(x), ptr(x0), out.data_ptr(),
            ptr(partials), cuda_stream(x),
        )
    elif backend == "triton":
        from .triton import sobel as triton_sobel

        triton_sobel.sobel_forward(x, x0, out, mode=mode, padding=padding, eps=eps,
                                   reduction=reduction)
    else:  # pragma: no cover - dispatch never sends other names here
        raise ValueError(f"sobel: no kernel for backend {backend!r}")
    return out


@_ext.on_tensor_device
def launch_backward(
    grad_out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor | None, mode: int, padding: int,
    eps: float, reduction: int, backend: str, need_x: bool, need_x0: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Runs the backward kernel of `backend`: (grad_x, grad_x0), None where not needed."""
    grad_out, x = grad_out.contiguous(), x.contiguous()
    x0 = x0.contiguous() if x0 is not None else None
    dtype = grad_out.dtype
    shape = _input_shape(grad_out, x, mode)
    if backend == "cpu":
        work = torch.float32 if dtype in _HALF else dtype
        g, xw = grad_out.to(work), x.to(work)
        x0w = x0.to(work) if x0 is not None else None
    else:
        work, g, xw, x0w = dtype, grad_out, x, x0
    gx = torch.empty(shape, dtype=work, device=grad_out.device) if need_x else None
    gx0 = torch.empty(shape, dtype=work, device=grad_out.device) if need_x0 else None
    if backend == "cpu":
        _ext.C.sobel_backward_cpu(
            *_args(shape, work, padding, eps, mode, reduction),
            torch.get_num_threads(),
            g.data_ptr(),
            ptr(xw), ptr(x0w), ptr(gx), ptr(gx0),
        )
    elif backend == "cuda":
        # The two-pass backward's gradient inputs r * g_i, float32, one block per gradient.
        scratch = None
        if mode != COMPONENTS:
            scratch = torch.empty((int(need_x) + int(need_x0), shape[0], shape[1],
                                   len(shape) - 2, *shape[2:]), dtype=torch.float32,
                                  device=grad_out.device)
        _ext.C.sobel_backward_cuda(
            *_args(shape, dtype, padding, eps, mode, reduction), g.data_ptr(), ptr(x), ptr(x0),
            ptr(gx), ptr(gx0), ptr(scratch), cuda_stream(x),
        )
    elif backend == "triton":
        from .triton import sobel as triton_sobel

        triton_sobel.sobel_backward(g, x, x0, gx, gx0, mode=mode, padding=padding, eps=eps,
                                    reduction=reduction)
    else:  # pragma: no cover
        raise ValueError(f"sobel: no kernel for backend {backend!r}")
    return (
        gx.to(dtype) if gx is not None else None,
        gx0.to(dtype) if gx0 is not None else None,
    )


# ---------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mrus::sobel", mutates_args=())
def _sobel_op(x: torch.Tensor, mode: int, padding: int, eps: float, backend: str) -> torch.Tensor:
    return launch_forward(x, None, mode, padding, eps, 0, backend)


@_sobel_op.register_fake
def _(x, mode, padding, eps, backend):
    return x.new_empty(_out_shape(x, mode, 0))


@torch.library.custom_op("mrus::sobel_backward", mutates_args=())
def _sobel_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, mode: int, padding: int, eps: float, backend: str
) -> torch.Tensor:
    gx, _ = launch_backward(grad_out, x, None, mode, padding, eps, 0, backend, True, False)
    assert gx is not None
    return gx


@_sobel_backward_op.register_fake
def _(grad_out, x, mode, padding, eps, backend):
    return grad_out.new_empty(_input_shape(grad_out, x, mode))


def _sobel_setup_context(ctx, inputs, output):
    x, mode, padding, eps, backend = inputs
    # The components backward is the adjoint filter of grad_out alone: x is not saved.
    ctx.save_for_backward(x if mode == MAGNITUDE else None)
    ctx.args = (mode, padding, eps, backend)


def _sobel_backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    (x,) = ctx.saved_tensors
    if x is None:
        x = grad_out.new_empty(0)
    return _sobel_backward_op(grad_out, x, *ctx.args), None, None, None, None


_sobel_op.register_autograd(_sobel_backward, setup_context=_sobel_setup_context)


def _sobel_double_spec(grad_out, x, mode, padding, eps, backend):
    """Double backward of mrus::sobel_backward (mrus_kernels/_double.py): the reference
    Sobel. The components' backward is linear and gets an empty placeholder for x: its
    primal is any input of the right shape (zeros), with no gradient returned."""
    pad = _PADDING_NAMES[padding]
    if mode == COMPONENTS:
        zeros = grad_out.new_zeros(_input_shape(grad_out, x, mode))
        return (lambda x: reference.sobel(x, "components", pad, eps)), ((zeros, None, True),)
    return (lambda x: reference.sobel(x, "magnitude", pad, eps)), ((x, 1, True),)


_double.register(_sobel_backward_op, _sobel_double_spec)


@torch.library.custom_op("mrus::sobel_l1", mutates_args=())
def _sobel_l1_op(
    f1: torch.Tensor, f0: torch.Tensor, padding: int, eps: float, reduction: int, backend: str
) -> torch.Tensor:
    return launch_forward(f1, f0, L1, padding, eps, reduction, backend)


@_sobel_l1_op.register_fake
def _(f1, f0, padding, eps, reduction, backend):
    return f1.new_empty(_out_shape(f1, L1, reduction))


@torch.library.custom_op("mrus::sobel_l1_backward", mutates_args=())
def _sobel_l1_backward_op(
    grad_out: torch.Tensor, f1: torch.Tensor, f0: torch.Tensor, padding: int, eps: float,
    reduction: int, backend: str, need_f1: bool, need_f0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (f1, f0); an empty tensor stands for one not asked for."""
    g1, g0 = launch_backward(
        grad_out, f1, f0, L1, padding, eps, reduction, backend, need_f1, need_f0
    )
    return grads_or_empty((g1, f1), (g0, f0))


@_sobel_l1_backward_op.register_fake
def _(grad_out, f1, f0, padding, eps, reduction, backend, need_f1, need_f0):
    return fake_grads((f1, need_f1), (f0, need_f0))


def _l1_setup_context(ctx, inputs, output):
    f1, f0, padding, eps, reduction, backend = inputs
    ctx.save_for_backward(f1, f0)
    ctx.args = (padding, eps, reduction, backend)


def _l1_backward(ctx, grad_out):
    f1, f0 = ctx.saved_tensors
    need_f1, need_f0 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_f1 or need_f0):
        return None, None, None, None, None, None
    g1, g0 = _sobel_l1_backward_op(grad_out, f1, f0, *ctx.args, need_f1, need_f0)
    return (g1 if need_f1 else None), (g0 if need_f0 else None), None, None, None, None


_sobel_l1_op.register_autograd(_l1_backward, setup_context=_l1_setup_context)


def _l1_double_spec(grad_out, f1, f0, padding, eps, reduction, backend, need_f1, need_f0):
    """Double backward of mrus::sobel_l1_backward (mrus_kernels/_double.py): the reference
    loss of (f1, f0)."""
    pad, red = _PADDING_NAMES[padding], _REDUCTION_NAMES[reduction]

    def forward(f1, f0):
        return reference.sobel_l1(f1, f0, pad, eps, red)

    return forward, ((f1, 1, need_f1), (f0, 2, need_f0))


_double.register(_sobel_l1_backward_op, _l1_double_spec)


# ---------------------------------------------------------------------------- public API


def sobel(
    x: torch.Tensor,
    *,
    output: str = "magnitude",
    padding: str = "replicate",
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Sobel edge map of every (batch, channel) volume of ``x``.

    Component i is the separable derivative along spatial axis i ([-1, 0, 1] along i,
    [1, 2, 1] along every other axis), unnormalised: exactly
    ``scipy.ndimage.sobel(x[b, c], axis=i, mode=...)``. Differentiable in ``x``.

    Args:
        x: Tensor [B, C, *S] (2D: S = (H, W); 3D: S = (D, H, W)), feature maps or images.
        output: "magnitude" (sqrt(sum_i g_i² + eps)) or "components" (every g_i).
        padding: "replicate" (edge voxels repeated, SciPy mode "nearest") or "zeros"
            (SciPy mode "constant").
        eps: added under the square root of the magnitude, in [1e-30, 1e30] (keeps its
            gradient finite where every component is 0); unused for "components".
        backend: "auto", "torch", "cpu", "triton" or "cuda"; default ``MRUS_BACKEND`` or
            "auto".

    Returns:
        "components": Tensor [B, C, ndim, *S]; "magnitude": Tensor [B, C, *S]; x's dtype
        (float16 / bfloat16 computed in float32), intensity units of x per voxel.

    Example:
        >>> x = torch.rand(1, 8, 32, 32, 32)
        >>> sobel(x).shape, sobel(x, output="components").shape
        (torch.Size([1, 8, 32, 32, 32]), torch.Size([1, 8, 3, 32, 32, 32]))
    """
    eps = _validate_sobel(x, output, padding, eps)
    name = resolve("sobel", backend, x.device, x.dtype)
    if name == "torch":
        return reference.sobel(x, output, padding, eps)
    mode = MAGNITUDE if output == "magnitude" else COMPONENTS
    return _sobel_op(x, mode, _PADDING_CODES[padding], eps, name)


def sobel_l1(
    f1: torch.Tensor,
    f0: torch.Tensor,
    *,
    padding: str = "replicate",
    eps: float = 1e-6,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """The ACMT boundary loss: |sobel(f1) - sobel(f0)| of the Sobel magnitudes, reduced.

    Fused: one pass computes both magnitudes per voxel and the L1 sum (per-slice / per-block
    partial sums added in a fixed order: deterministic, no float atomics), never storing a
    magnitude map. The backward is the adjoint Sobel of sign(m1 - m0) g_i / m per input: on
    the CPU slice by slice; on the GPU backends one pass writes those ndim values per voxel
    to a float32 scratch (ndim x the input's size, per input needing a gradient), then one
    gather applies the adjoint filter. Differentiable in ``f1`` and ``f0``.

    Args:
        f1: Tensor [B, C, *S], e.g. deep features of the translated image.
        f0: Tensor [B, C, *S], same shape, dtype and device, e.g. features of the source.
        padding: "replicate" (default) or "zeros", as in :func:`sobel`.
        eps: added under the square root of each magnitude, in [1e-30, 1e30].
        reduction: "mean" (over all B·C·prod(S) elements), "sum" or "none".
        backend: "auto", "torch", "cpu", "triton" or "cuda"; default ``MRUS_BACKEND`` or
            "auto".

    Returns:
        A scalar tensor ("mean", "sum") or Tensor [B, C, *S] ("none"), f1's dtype.

    Example:
        >>> f1, f0 = torch.rand(2, 32, 16, 16, 16), torch.rand(2, 32, 16, 16, 16)
        >>> sobel_l1(f1, f0).shape
        torch.Size([])
    """
    eps = _validate_l1(f1, f0, padding, eps, reduction)
    name = resolve("sobel_l1", backend, f1.device, f1.dtype)
    if name == "torch":
        return reference.sobel_l1(f1, f0, padding, eps, reduction)
    return _sobel_l1_op(
        f1, f0, _PADDING_CODES[padding], eps, _REDUCTION_CODES[reduction], name
    )


class SobelL1Loss(nn.Module):
    """``nn.Module`` form of :func:`sobel_l1`: the ACMT boundary loss.

    Example:
        >>> loss_fn = SobelL1Loss()
        >>> loss = loss_fn(features_translated, features_source)
    """

    def __init__(
        self, padding: str = "replicate", eps: float = 1e-6, reduction: str = "mean",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("SobelL1Loss", "padding", padding, PADDINGS)
        check_choice("SobelL1Loss", "reduction", reduction, REDUCTIONS)
        self.eps = _check_eps("SobelL1Loss", eps)
        self.padding, self.reduction, self.backend = padding, reduction, backend

    def forward(self, f1: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        return sobel_l1(
            f1, f0, padding=self.padding, eps=self.eps, reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}, eps={self.eps!r}, reduction={self.reduction!r}"
