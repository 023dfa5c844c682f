"""``compose`` and ``integrate_velocity`` (scaling and squaring) of displacement fields."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _double, reference
from ._ext import Interp, Padding, WarpFlags
from ._validation import check_batch, check_choice, check_field, check_optional_bool, check_same
from .backends import resolve
from .warp import _warp_op, launch_backward, launch_forward

PADDINGS = ("border", "zeros")
MEMORY_MODES = ("store", "recompute")
# Most squaring steps: the scale 2**steps is a Python int that torch converts to int64, so
# 2**62 is the largest it takes. Far more than any use needs: after about 30 steps v / 2**steps
# is below float32 resolution at any voxel coordinate, and each step is one kernel.
MAX_STEPS = 62
_LINEAR = int(Interp.LINEAR)
_STEP = int(WarpFlags.ADD_DDF)
_STEP_BACKWARD = int(WarpFlags.ADD_DDF | WarpFlags.DDF_GRAD_SCATTER)


def _padding_code(padding: str) -> int:
    return int(Padding.BORDER if padding == "border" else Padding.ZEROS)


def _check_steps(op: str, steps: object) -> int:
    """`steps` is an int (Python or NumPy, not bool) in [0, MAX_STEPS]; returns it as int."""
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{op}: steps must be an int, got {type(steps).__name__}")
    if not 0 <= steps <= MAX_STEPS:
        raise ValueError(
            f"{op}: steps must be in [0, {MAX_STEPS}] (the scale 2**steps must fit in int64), "
            f"got {steps}"
        )
    return int(steps)


# ---------------------------------------------------------------------------- compose


def compose(
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    padding: str = "border",
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Displacement of φ_u ∘ φ_v: ``v(x) + u(x + v(x))``, in one fused pass.

    Args:
        u: Tensor [B, ndim, *S], voxel units, component i along spatial axis i (applied last).
        v: Tensor [B, ndim, *S], voxel units (applied first). Either batch may be 1.
        padding: "border" (default for displacement fields) or "zeros".
        backend: "auto", "torch", "cpu", "triton" or "cuda" (default ``MRUS_BACKEND``/auto).
        deterministic: bitwise reproducible gradient of ``u`` (default: torch's setting).

    Returns:
        Tensor [max(B_u, B_v), ndim, *S], voxel units.

    Example:
        >>> w = compose(u, v)  # warp(warp(I, u), v) ≈ warp(I, w)
    """
    op = "compose"
    check_field(op, "u", u)
    check_field(op, "v", v)
    if u.shape[1:] != v.shape[1:]:
        raise ValueError(
            f"compose: u and v must have the same shape [*, ndim, *S], got {tuple(u.shape)} "
            f"and {tuple(v.shape)}"
        )
    check_batch(op, "u", u, "v", v)
    check_same(op, ("u", "v"), (u, v))
    check_choice(op, "padding", padding, PADDINGS)
    check_optional_bool(op, "deterministic", deterministic)
    name = resolve(op, backend, u.device, u.dtype)
    if name == "torch":
        return reference.compose(u, v, padding)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _warp_op(u, v, _LINEAR, _padding_code(padding), _STEP, name, deterministic)


# ---------------------------------------------------------------------------- integrate


def _square(u: torch.Tensor, padding: int, backend: str) -> torch.Tensor:
    """One scaling-and-squaring step u ∘ u = u + u(x + u(x)), in one kernel."""
    return launch_forward(u, u, _LINEAR, padding, _STEP, backend)


def _step_input(v: torch.Tensor, k: int, steps: int, padding: int, backend: str, trace=None):
    """Input of squaring step k: v / 2**steps squared k times (each kept in trace[j] when
    given, j < k)."""
    u = v / 2**steps
    for j in range(k):
        if trace is not None:
            trace[j].copy_(u)
        u = _square(u, padding, backend)
    return u


@torch.library.custom_op("mrus::integrate_velocity", mutates_args=())
def _integrate_op(
    v: torch.Tensor, steps: int, padding: int, backend: str, store: bool, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, trace): trace[k] is the input of squaring step k when `store`, else empty."""
    v = v.contiguous()
    trace = v.new_empty((steps, *v.shape)) if store else v.new_empty(0)
    u = _step_input(v, steps, steps, padding, backend, trace if store else None)
    return (u.clone() if steps == 0 else u), trace


@_integrate_op.register_fake
def _(v, steps, padding, backend, store, deterministic):
    return v.new_empty(v.shape), v.new_empty((steps, *v.shape) if store else (0,))


@torch.library.custom_op("mrus::integrate_velocity_backward", mutates_args=())
def _integrate_backward_op(
    grad: torch.Tensor, v: torch.Tensor, trace: torch.Tensor, steps: int, padding: int,
    backend: str, store: bool, deterministic: bool,
) -> torch.Tensor:
    """d loss / d v: the fused backward of each squaring step, last step first. Without a
    stored trace each step's input is recomputed from v (time for memory)."""
    v = v.contiguous()
    g = grad.contiguous()
    for k in reversed(range(steps)):
        u_k = trace[k] if store else _step_input(v, k, steps, padding, backend)
        g, _ = launch_backward(
            g, u_k, u_k, _LINEAR, padding, _STEP_BACKWARD, backend, deterministic, True, False
        )
    return g / 2**steps


@_integrate_backward_op.register_fake
def _(grad, v, trace, steps, padding, backend, store, deterministic):
    return v.new_empty(v.shape)


def _integrate_setup(ctx, inputs, output):
    v, steps, padding, backend, store, deterministic = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(v, output[1])
    ctx.args = (steps, padding, backend, store, deterministic)


def _integrate_backward(ctx, grad_u, grad_trace):
    v, trace = ctx.saved_tensors
    steps, padding, backend, store, deterministic = ctx.args
    grad_v = _integrate_backward_op(grad_u, v, trace, steps, padding, backend, store, deterministic)
    return grad_v, None, None, None, None, None


_integrate_op.register_autograd(_integrate_backward, setup_context=_integrate_setup)


def _integrate_double_spec(grad, v, trace, steps, padding, backend, store, deterministic):
    """Double backward of mrus::integrate_velocity_backward (mrus_kernels/_double.py): the
    reference scaling and squaring of v (the trace is v's function, not a primal)."""

    def forward(v):
        return reference.integrate_velocity(v, steps, _double.PADDING_NAMES[padding])

    return forward, ((v, 1, True),)


_double.register(_integrate_backward_op, _integrate_double_spec, unsaved=(2,))


def integrate_velocity(
    v: torch.Tensor,
    steps: int = 7,
    *,
    memory: str = "store",
    padding: str = "border",
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Integrates a stationary velocity field by scaling and squaring.

    ``u = v / 2**steps``, then ``steps`` times ``u = compose(u, u)``, each step one fused
    kernel. The inverse map is ``integrate_velocity(-v)``.

    Args:
        v: Tensor [B, ndim, *S], velocity in voxel units, component i along spatial axis i.
        steps: number of squaring steps, 0 to MAX_STEPS (62: the scale 2**steps must fit in
            int64; 7 is the usual choice).
        memory: "store" keeps the ``steps`` intermediate fields for the backward;
            "recompute" keeps only ``v`` and recomputes them in the backward (less memory,
            more time). On the torch backend under torch.compile the compiler's partitioner
            decides what the backward keeps.
        padding: "border" (default) or "zeros", for sampling outside the field.
        backend: "auto", "torch", "cpu", "triton" or "cuda".
        deterministic: bitwise reproducible gradient (default: torch's setting).

    Returns:
        Tensor [B, ndim, *S]: the displacement of exp(v), voxel units.

    Example:
        >>> u = integrate_velocity(v, 7)
        >>> u_inv = integrate_velocity(-v, 7)  # compose(u, u_inv) ≈ 0
    """
    op = "integrate_velocity"
    check_field(op, "v", v)
    steps = _check_steps(op, steps)
    check_choice(op, "memory", memory, MEMORY_MODES)
    check_choice(op, "padding", padding, PADDINGS)
    check_optional_bool(op, "deterministic", deterministic)
    name = resolve(op, backend, v.device, v.dtype)
    if name == "torch":
        # Under torch.compile the graph's own partitioner decides what the backward keeps;
        # inductor (torch 2.13, dynamic shapes) also miscompiled the checkpointed gradient.
        if (memory == "recompute" and torch.is_grad_enabled() and v.requires_grad
                and not torch.compiler.is_compiling()):
            return checkpoint(reference.integrate_velocity, v, steps, padding, use_reentrant=False)
        return reference.integrate_velocity(v, steps, padding)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # Without a backward to serve, storing the intermediates only costs copies and memory.
    store = memory == "store" and torch.is_grad_enabled() and v.requires_grad
    u, _ = _integrate_op(v, steps, _padding_code(padding), name, store, deterministic)
    return u


class Compose(nn.Module):
    """``nn.Module`` form of :func:`compose`: ``forward(u, v)`` = displacement of φ_u ∘ φ_v."""

    def __init__(
        self, padding: str = "border", backend: str | None = None,
        deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        self.padding = check_choice("Compose", "padding", padding, PADDINGS)
        self.backend = backend
        check_optional_bool("Compose", "deterministic", deterministic)
        self.deterministic = deterministic

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compose(u, v, padding=self.padding, backend=self.backend,
                       deterministic=self.deterministic)


class IntegrateVelocity(nn.Module):
    """Scaling-and-squaring layer (VoxelMorph's ``VecInt``) on the fused kernels.

    Example:
        >>> layer = IntegrateVelocity(steps=7, memory="recompute")
        >>> ddf = layer(velocity)
    """

    def __init__(
        self, steps: int = 7, memory: str = "store", padding: str = "border",
        backend: str | None = None, deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        self.steps = _check_steps("IntegrateVelocity", steps)
        self.memory = check_choice("IntegrateVelocity", "memory", memory, MEMORY_MODES)
        self.padding = check_choice("IntegrateVelocity", "padding", padding, PADDINGS)
        self.backend = backend
        check_optional_bool("IntegrateVelocity", "deterministic", deterministic)
        self.deterministic = deterministic

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(
            v, self.steps, memory=self.memory, padding=self.padding, backend=self.backend,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return f"steps={self.steps}, memory={self.memory!r}, padding={self.padding!r}"
