"""Truths for the warp-family tests that share no code with mrus_kernels: SciPy
``map_coordinates`` for sampling, an explicit NumPy float64 scatter for the image gradient,
and the error bound that the deterministic (fixed-point) image gradient documents.

Conventions (DESIGN.md): ddf [B, ndim, *S] in voxel units, component i along spatial axis
i, out(x) = image(x + u(x)); "zeros" padding is SciPy's "grid-constant", "border" SciPy's
"nearest"; nearest rounds half to even (NumPy's ``np.round``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy import ndimage

SCIPY_MODES = {"zeros": "grid-constant", "border": "nearest"}


def sample_points(ddf: torch.Tensor) -> np.ndarray:
    """Sampling points x + u(x), float64 [B, ndim, *S]. The sum is rounded as the kernels
    round it (float32 for float32 and half types), so that nearest rounding and floor agree
    with them exactly."""
    work = torch.promote_types(ddf.dtype, torch.float32)
    axes = [torch.arange(n, dtype=work) for n in ddf.shape[2:]]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return (grid + ddf.detach().cpu().to(work)).double().numpy()


def scipy_warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear",
               padding: str = "zeros") -> torch.Tensor:
    """warp by SciPy, float64 [max(Bi, Bd), C, *S_out]; either batch may be 1."""
    points = sample_points(ddf)
    img = image.detach().cpu().double().numpy()
    batch = max(img.shape[0], points.shape[0])
    order = 1 if mode == "linear" else 0
    out = [
        [
            ndimage.map_coordinates(img[b % img.shape[0], c], points[b % points.shape[0]],
                                    order=order, mode=SCIPY_MODES[padding], cval=0.0,
                                    prefilter=False)
            for c in range(img.shape[1])
        ]
        for b in range(batch)
    ]
    return torch.from_numpy(np.asarray(out))


def scipy_compose(u: torch.Tensor, v: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """compose(u, v) = v(x) + u(x + v(x)) by SciPy, float64."""
    return v.detach().cpu().double() + scipy_warp(u, v, "linear", padding)


def scipy_integrate(v: torch.Tensor, steps: int, padding: str = "border") -> torch.Tensor:
    """Scaling and squaring by SciPy, float64: u = v / 2**steps, then steps times u ∘ u."""
    u = v.detach().cpu().double() / 2**steps
    for _ in range(steps):
        u = scipy_compose(u, u, padding)
    return u


def scatter_image_grad(image_shape, ddf: torch.Tensor, grad_out: torch.Tensor,
                       mode: str = "linear", padding: str = "zeros"):
    """The image gradient of warp as an explicit float64 scatter: every corner inside the
    image of every non-NaN sample adds w * g (NaN and inf propagate as in a float sum,
    0 * inf = NaN included).

    Returns:
        (grad, count, abs_sum): grad float64 [Bi, C, *S_in]; count [Bi, C, *S_in], the
        number of contributions each element receives; abs_sum, the sum of their |w * g|.
    """
    points = sample_points(ddf)
    bi, channels = image_shape[:2]
    size = tuple(image_shape[2:])
    g = grad_out.detach().cpu().double().numpy()
    batch = g.shape[0]
    n_in = math.prod(size)
    grad = np.zeros((bi, channels, n_in))
    count = np.zeros((bi, channels, n_in))
    abs_sum = np.zeros((bi, channels, n_in))
    with np.errstate(invalid="ignore"):  # 0 * inf is NaN here as in the kernels
        for b in range(batch):
            p = points[b % points.shape[0]]
            live = ~np.isnan(p).any(0)
            q = []
            for i, n in enumerate(size):
                x = np.nan_to_num(p[i])
                q.append(np.clip(x, 0, n - 1) if padding == "border" else np.clip(x, -2, n + 1))
            if mode == "nearest":
                stencil = [([np.round(x) for x in q], np.ones_like(q[0]))]
            else:
                lower = [np.floor(x) for x in q]
                frac = [x - f for x, f in zip(q, lower)]
                stencil = []
                for bits in itertools.product((0, 1), repeat=len(size)):
                    w = np.ones_like(q[0])
                    for t, bit in zip(frac, bits):
                        w = w * (t if bit else 1 - t)
                    stencil.append(([f + bit for f, bit in zip(lower, bits)], w))
            for idx, w in stencil:
                valid = live.copy()
                flat = np.zeros(valid.shape, dtype=np.int64)
                for x, n in zip(idx, size):
                    valid &= (x >= 0) & (x < n)
                    flat = flat * n + np.clip(x, 0, n - 1).astype(np.int64)
                for c in range(channels):
                    v = (w * g[b, c])[valid]
                    np.add.at(grad[b % bi, c], flat[valid], v)
                    np.add.at(count[b % bi, c], flat[valid], 1.0)
                    np.add.at(abs_sum[b % bi, c], flat[valid], np.abs(v))
    shape = (bi, channels, *size)
    return (torch.from_numpy(grad.reshape(shape)), torch.from_numpy(count.reshape(shape)),
            torch.from_numpy(abs_sum.reshape(shape)))


def fixed_point_quantum_bound(vmax: float, terms: int) -> float:
    """The documented bound on the quantum of the fixed-point image gradient:
    q <= max(vmax, 2**-126) * max(M, 2**11) * 2**-60, M the most contributions one element
    can get."""
    return max(vmax, 2.0**-126) * max(terms, 2**11) * 2.0**-60


def assert_fixed_point_close(actual: torch.Tensor, exact: torch.Tensor, count: torch.Tensor,
                             quantum: float, abs_sum: torch.Tensor | None = None,
                             contribution_ulps: float = 0.0, name: str = "") -> None:
    """Checks a deterministic image gradient against the exact float64 sum of its
    contributions with the documented bound |grad - sum| <= m * q / 2 + 2**-24 * |grad|
    (m = count). Non-finite expected elements must match exactly (NaN, +inf, -inf).

    abs_sum and contribution_ulps widen the bound by contribution_ulps * 2**-24 * sum |v_i|
    when the contributions themselves are not exact in float32 (random, non-dyadic input).
    """
    a = actual.detach().cpu().double()
    e = exact.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = fn(a) != fn(e)
        assert not bool(bad.any()), (
            f"{name}: {int(bad.sum())} elements differ in being {what}, first at "
            f"{tuple(bad.nonzero()[0].tolist())}: actual {a[bad][0].item()!r}, "
            f"expected {e[bad][0].item()!r}"
        )
    finite = e.isfinite()
    half_mq = count.double() * quantum / 2
    tol = half_mq * (1 + 2.0**-23) + 2.0**-24 * (1 + 2.0**-20) * (e.abs() + half_mq) + 2.0**-149
    if abs_sum is not None:
        tol = tol + contribution_ulps * 2.0**-24 * abs_sum.double()
    err = (a - e).abs()
    ok = err[finite] <= tol[finite]  # NaN err fails
    if bool(ok.all()):
        return
    excess = (err - tol).masked_fill(~finite, float("-inf")).nan_to_num(float("inf"))
    worst = int(excess.reshape(-1).argmax())
    raise AssertionError(
        f"{name}: {int((~ok).sum())} of {int(finite.sum())} finite elements exceed the "
        f"fixed-point bound (q = {quantum:g}); worst at flat index {worst}: actual "
        f"{a.reshape(-1)[worst].item()!r}, exact {e.reshape(-1)[worst].item()!r}, "
        f"|err| {err.reshape(-1)[worst].item():g} > tol {tol.reshape(-1)[worst].item():g} "
        f"(m = {int(count.reshape(-1)[worst])})"
    )


def dyadic_ddf(gen: torch.Generator, *shape: int, scale: float = 2.0,
               denominator: int = 8) -> torch.Tensor:
    """A displacement whose values are multiples of 1 / denominator: every sampling point,
    fraction and interpolation weight is exact in float32."""
    u = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return (torch.round(u * denominator) / denominator).float()


def dyadic_grad(gen: torch.Generator, *shape: int, bits: int = 12,
                octaves: int = 20) -> torch.Tensor:
    """Upstream gradients with `bits` significant bits and magnitudes spread over
    `octaves` binary orders (|g| in [2**-octaves - 1, 1)): with dyadic weights of at most 9
    bits every contribution w * g is exact in float32, and sums of them are exact in
    float64."""
    mantissa = torch.randint(2 ** (bits - 1), 2**bits, shape, generator=gen, dtype=torch.int64)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
    exponent = torch.randint(0, octaves + 1, shape, generator=gen, dtype=torch.int64)
    return (sign * mantissa).double().mul(torch.pow(2.0, -(exponent + bits).double())).float()
