"""Double (and higher) backward of the kernel operators, through the reference.

Each operator's first-order gradient is a custom op of its own, ``mrus::<op>_backward``,
that runs a fused kernel. Differentiating that gradient again (a gradient penalty, a
Hessian-vector product, a second-order optimiser needing d/d ddf of a warp's gradient)
goes through the autograd formula :func:`register` gives each such op: it recomputes the
first-order gradient with the plain-PyTorch reference (:mod:`mrus_kernels.reference`), as
a function of the backward op's inputs, and lets autograd differentiate it.

Costs: the second derivative costs what ``backend="torch"`` costs for the same call (time
and memory: the reference's graph of the forward and first backward is built once per
second backward). The first backward is untouched: it runs with grad mode off unless
``create_graph=True``, so autograd records nothing for the backward op, the formula's
setup saves nothing and the kernels run exactly as before. With ``create_graph=True`` at
the second backward too, the second derivatives are themselves built from differentiable
reference ops, so third and higher derivatives work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._ext import Interp, Padding

_HALF = (torch.float16, torch.bfloat16)

MODE_NAMES = {int(Interp.LINEAR): "linear", int(Interp.NEAREST): "nearest"}
PADDING_NAMES = {int(Padding.ZEROS): "zeros", int(Padding.BORDER): "border"}

# One primal of a backward op: (tensor, position of that tensor among the backward op's
# arguments or None when it is not one of them (no gradient returned for it), whether the
# backward op's matching output holds its gradient (False: an empty placeholder)).
Primal = tuple[torch.Tensor, "int | None", bool]
# spec(*backward_op_args) -> (reference forward of the primals, the primals in the order of
# the backward op's outputs).
Spec = Callable[..., tuple[Callable[..., torch.Tensor], Sequence[Primal]]]


def _work(t: torch.Tensor) -> torch.Tensor:
    """Half types computed in float32, as every backend does."""
    return t.float() if t.dtype in _HALF else t


def vjp_of_vjp(
    fn: Callable[..., torch.Tensor],
    grad_out: torch.Tensor,
    primals: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor | None],
    need_grad_out: bool,
    need_primals: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of Σ_k <c_k, v_k> where v_k = (∂fn/∂x_k)ᵀ grad_out (the first-order
    gradients a backward op returned) and c_k its cotangent (None: v_k not computed or not
    used).

    Args:
        fn: differentiable reference forward, fn(*primals) -> Tensor of grad_out's shape.
        grad_out: the upstream gradient the backward op was called with.
        primals: the forward inputs x_k.
        cotangents: c_k per primal, shaped like it, or None.
        need_grad_out, need_primals: which gradients to return (None for the others).

    Returns:
        (d / d grad_out, [d / d x_k]), each of its input's dtype or None (zero). Built with
        create_graph when grad mode is on (the caller's create_graph), so that they can be
        differentiated again.
    """
    n = len(primals)
    active = [k for k in range(n) if cotangents[k] is not None]
    need_primals = [bool(need) for need in need_primals]
    if not active or not (need_grad_out or any(need_primals)):
        return None, [None] * n
    create = torch.is_grad_enabled()

    def leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
        w = _work(t)
        if create and t.requires_grad:
            # A node of its own in the caller's graph: the derivatives stay differentiable
            # (higher orders), and a tensor passed as two primals (compose(u, u)) gets its
            # two partial derivatives, not their sum for each.
            return w.view_as(w)
        return w.detach().requires_grad_(grad)

    with torch.enable_grad():
        xs = [leaf(t, k in active or need_primals[k]) for k, t in enumerate(primals)]
        go = leaf(grad_out, need_grad_out)
        y = fn(*xs)
        first = torch.autograd.grad(
            y, [xs[k] for k in active], go.to(y.dtype), create_graph=True, allow_unused=True
        )
        # A first-order gradient that is a constant (no path to grad_out or any primal) has
        # no second derivative.
        pairs = [
            (v, _work(cotangents[k]).to(v.dtype))  # type: ignore[union-attr]
            for v, k in zip(first, active, strict=True)
            if v is not None and v.requires_grad
        ]
        targets = ([go] if need_grad_out else []) + [xs[k] for k in range(n) if need_primals[k]]
        if not pairs:
            return None, [None] * n
        second = list(torch.autograd.grad(
            [v for v, _ in pairs], targets, [c for _, c in pairs], create_graph=create,
            allow_unused=True,
        ))
    d_go = None
    if need_grad_out:
        g = second.pop(0)
        d_go = g.to(grad_out.dtype) if g is not None else None
    d_x: list[torch.Tensor | None] = [None] * n
    for k in range(n):
        if need_primals[k]:
            g = second.pop(0)
            d_x[k] = g.to(primals[k].dtype) if g is not None else None
    return d_go, d_x


def register(backward_op, spec: Spec, *, unsaved: Sequence[int] = ()) -> None:
    """Gives ``backward_op`` (a ``mrus::<op>_backward`` custom op whose first argument is
    the upstream gradient and whose outputs are the gradients of its primals, in order) an
    autograd formula through the reference.

    Args:
        backward_op: the custom op.
        spec: spec(*args) with the backward op's arguments -> (fn, primals): fn the
            reference forward, differentiable, of the primals; primals a sequence of
            (tensor, argument position or None, output computed) in the order of the
            backward op's outputs.
        unsaved: positions of tensor arguments that spec does not read (not saved: they
            stay as None).
    """

    def setup_context(ctx, inputs, output):
        # Runs only when autograd records the backward op (a backward with
        # create_graph=True): a first backward saves nothing here.
        pos = [
            i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and i not in unsaved
        ]
        ctx.save_for_backward(*[inputs[i] for i in pos])
        ctx.mrus_tensor_pos = pos
        ctx.mrus_args = tuple(None if isinstance(a, torch.Tensor) else a for a in inputs)

    def backward(ctx, *cotangents):
        args = list(ctx.mrus_args)
        for i, t in zip(ctx.mrus_tensor_pos, ctx.saved_tensors, strict=True):
            args[i] = t
        fn, primals = spec(*args)
        needs = ctx.needs_input_grad
        cots = [
            c if computed and c is not None and c.numel() == x.numel() else None
            for c, (x, _, computed) in zip(cotangents, primals, strict=True)
        ]
        d_go, d_x = vjp_of_vjp(
            fn, args[0], [x for x, _, _ in primals], cots, needs[0],
            [pos is not None and needs[pos] for _, pos, _ in primals],
        )
        grads: list[torch.Tensor | None] = [None] * len(args)
        grads[0] = d_go
        for (_, pos, _), d in zip(primals, d_x, strict=True):
            if pos is not None:
                grads[pos] = d
        return tuple(grads)

    backward_op.register_autograd(backward, setup_context=setup_context)
