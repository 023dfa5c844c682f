"""Plain-PyTorch oracles of every operator: written for clarity, float64 capable,
differentiable by autograd. Tests compare every backend against these; the ``torch``
backend runs them."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .convert import ddf_to_grid

_HALF = (torch.float16, torch.bfloat16)


def _sample_points(ddf: torch.Tensor) -> list[torch.Tensor]:
    """x + u(x) per spatial axis, each [B, *S]."""
    axes = [torch.arange(n, device=ddf.device, dtype=ddf.dtype) for n in ddf.shape[2:]]
    grid = torch.meshgrid(*axes, indexing="ij")
    return [grid[i] + ddf[:, i] for i in range(ddf.shape[1])]


def warp(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear", padding: str = "zeros"
) -> torch.Tensor:
    """out(x) = image(x + ddf(x)) by explicit corner gathers (the oracle for `warp`).

    Args:
        image: Tensor [B, C, *S_in].
        ddf: Tensor [B, ndim, *S_out], voxel units, component i along spatial axis i.
        mode: "linear" or "nearest" (round half to even).
        padding: "zeros" (interpolate against zero voxels outside) or "border" (clamp the
            coordinate into [0, n - 1]).

    Returns:
        Tensor [B, C, *S_out]; NaN in every channel where the displacement is NaN.
    """
    if image.dtype in _HALF:
        return warp(image.float(), ddf.float(), mode, padding).to(image.dtype)
    ndim = ddf.dim() - 2  # the rank, static under torch.compile(dynamic=True); not a SymInt
    batch = max(image.shape[0], ddf.shape[0])
    channels = image.shape[1]
    size_in = image.shape[2:]
    image = image.expand(batch, *image.shape[1:])
    ddf = ddf.expand(batch, *ddf.shape[1:])
    points = _sample_points(ddf)
    nan = torch.stack(points).isnan().any(0)
    flat = image.reshape(batch, channels, -1)

    def gather(idx: list[torch.Tensor]) -> torch.Tensor:
        valid = torch.ones_like(nan)
        off = torch.zeros_like(idx[0])
        for i, n in enumerate(size_in):
            valid = valid & (idx[i] >= 0) & (idx[i] < n)
            off = off * n + idx[i].clamp(0, n - 1)
        values = torch.gather(flat, 2, off.reshape(batch, 1, -1).expand(-1, channels, -1))
        values = values.reshape(batch, channels, *off.shape[1:])
        return torch.where(valid[:, None], values, torch.zeros_like(values))

    clamped = []
    for i, n in enumerate(size_in):
        p = torch.where(nan, torch.zeros_like(points[i]), points[i])
        lo, hi = (0, n - 1) if padding == "border" else (-2, n + 1)
        # Two one-sided clamps: the same values and gradient as p.clamp(lo, hi), which
        # inductor (torch 2.13, dynamic shapes) miscompiled in the backward of chained
        # compose steps (integrate_velocity's gradient off by O(1)).
        clamped.append(p.clamp(min=lo).clamp(max=hi))
    if mode == "nearest":
        # Rounding has a zero derivative: keep the ddf in the graph with an exact zero gradient
        # (clamped points are finite, so 0 * p cannot make a NaN).
        zero = sum(p for p in clamped) * 0
        out = gather([torch.round(p).long() for p in clamped]) + zero[:, None]
    else:
        lower = [torch.floor(p) for p in clamped]
        frac = [p - f for p, f in zip(clamped, lower, strict=True)]
        out = torch.zeros(batch, channels, *ddf.shape[2:], dtype=image.dtype, device=image.device)
        for bits in itertools.product((0, 1), repeat=ndim):
            weight = torch.ones_like(frac[0])
            for t, bit in zip(frac, bits, strict=True):
                weight = weight * (t if bit else 1 - t)
            idx = [f.long() + bit for f, bit in zip(lower, bits, strict=True)]
            out = out + gather(idx) * weight[:, None]
    return torch.where(nan[:, None], torch.full_like(out, float("nan")), out)


def warp_grid_sample(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear", padding: str = "zeros"
) -> torch.Tensor:
    """The VoxelMorph-style spatial transformer: ddf to a normalised grid, then grid_sample.

    What users write today; the baseline of the benchmarks. Needs every spatial size >= 2.
    """
    batch = max(image.shape[0], ddf.shape[0])
    grid = ddf_to_grid(
        ddf.expand(batch, *ddf.shape[1:]), align_corners=True, size=tuple(image.shape[2:])
    )
    gs_mode = "bilinear" if mode == "linear" else "nearest"
    return F.grid_sample(
        image.expand(batch, *image.shape[1:]), grid, mode=gs_mode, padding_mode=padding,
        align_corners=True,
    )


def compose(u: torch.Tensor, v: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Displacement of φ_u ∘ φ_v: v(x) + u(x + v(x)). u, v: [B, ndim, *S], voxel units."""
    return v + warp(u, v, "linear", padding)


def integrate_velocity(v: torch.Tensor, steps: int = 7, padding: str = "border") -> torch.Tensor:
    """Scaling and squaring: u = v / 2**steps, then `steps` times u = compose(u, u)."""
    u = v / 2**steps
    for _ in range(steps):
        u = compose(u, u, padding)
    return u


def _derivative(x: torch.Tensor, dim: int, h: float) -> torch.Tensor:
    """d/dx along `dim`: central differences inside, one-sided at the borders, 0 for size 1."""
    n = x.shape[dim]
    if n == 1:
        # 0 (even where x is NaN), still a function of x: a field whose every axis has size 1
        # gets a zero gradient, not a det cut off from the graph.
        return torch.where(torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x), x)
    fwd = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)  # x[k + 1] - x[k]
    inner = (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2  # (x[k + 1] - x[k - 1]) / 2
    return torch.cat([fwd.narrow(dim, 0, 1), inner, fwd.narrow(dim, n - 2, 1)], dim) / h


def jacobian_det(u: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """det(I + ∇u) of the map x + u(x), per voxel: [B, ndim, *S] -> [B, *S].

    d u_i / d x_j: central differences inside, one-sided at the borders, 0 along an axis of
    size 1. Half types are computed in float32 and rounded once.

    spacing: voxel size per axis; u is then in the same units (e.g. mm). None: voxel units.
    """
    if u.dtype in _HALF:
        return jacobian_det(u.float(), spacing).to(u.dtype)
    ndim = u.shape[1]
    h = spacing if spacing is not None else (1.0,) * ndim
    jac = [
        [_derivative(u[:, i], j + 1, h[j]) + (1.0 if i == j else 0.0) for j in range(ndim)]
        for i in range(ndim)
    ]
    if ndim == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        det = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )
    return det


def folding_fraction(u: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """Fraction of voxels with det(I + ∇u) <= 0, per batch item: [B], float32 (float64 for
    float64 input)."""
    det = jacobian_det(u, spacing)
    return (det <= 0).flatten(1).to(torch.promote_types(u.dtype, torch.float32)).mean(1)


# --- Parzen-window mutual information ------------------------------------------------------


def _item_range(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item min and max over the voxels with mask > 0, [B, 1] each, no host sync."""
    flat = x.flatten(1)
    if mask is None:
        return flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    inside = mask.flatten(1) > 0
    lo = torch.where(inside, flat, torch.full_like(flat, float("inf"))).amin(1, keepdim=True)
    hi = torch.where(inside, flat, torch.full_like(flat, float("-inf"))).amax(1, keepdim=True)
    return lo, hi


def _mask_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask weights [B, N] as `dtype`, a floating mask scaled per item by a power of two
    that brings its largest weight into [1, 2): P does not depend on the scale, and the
    weights and their sums then neither overflow (1e38 in float32) nor flush to 0 (1e-300
    in float64 cast to float32). A bool or integer mask is cast as it is; an item whose
    largest weight is 0, NaN or infinite keeps its weights (P = 0 or NaN, as the
    definition gives). Scaling by a power of two is exact, so 0/1 masks are unchanged."""
    if not mask.is_floating_point():
        return mask.to(dtype)
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    top = m.amax(1, keepdim=True)
    limit = 1000 if m.dtype == torch.float64 else 120  # 2**+-limit: normal in m's dtype
    exponent = torch.floor(torch.log2(top)).clamp(-limit, limit)
    usable = (top > 0) & (top < float("inf"))
    scale = torch.where(usable, torch.exp2(-exponent), torch.ones_like(top))
    return (m * scale).to(dtype)


def _bspline3(t: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline on [-2, 2]."""
    a = t.abs()
    near = (4 - 6 * a**2 + 3 * a**3) / 6
    far = (2 - a).clamp_min(0) ** 3 / 6
    return torch.where(a < 1, near, far)


def parzen_weights(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bins: int,
    kernel: str = "gaussian",
    sigma: float = 0.5,
) -> torch.Tensor:
    """Per-voxel Parzen weights W_k(x), normalised to sum 1 over k: [B, N] -> [B, N, K].

    Bin width w = (hi - lo) / K, centres c_k = lo + (k + 1/2) w, values clamped to [lo, hi].
    The Gaussian window is normalised in max-subtracted (softmax) form so that a tiny sigma
    tends to hard binning instead of 0/0.
    """
    width = ((hi - lo) / bins).clamp_min(1e-12)  # [B, 1]; a constant image keeps a finite width
    centres = lo + (torch.arange(bins, device=x.device, dtype=x.dtype) + 0.5) * width  # [B, K]
    # torch.clamp's derivative is 1 on the closed interval [lo, hi] (minimum / maximum
    # would halve it at the per-item extremes, where x equals the bound exactly).
    xc = torch.clamp(x, lo, hi)
    t = (xc[..., None] - centres[:, None, :]) / width[..., None]  # [B, N, K]
    if kernel == "gaussian":
        return torch.softmax(-(t**2) / (2 * sigma**2), dim=-1)
    phi = _bspline3(t)
    return phi / phi.sum(-1, keepdim=True)


def joint_histogram(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bins: int = 32,
    kernel: str = "gaussian",
    sigma: float = 0.5,
    value_range: tuple | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Joint Parzen histogram P[a, b] = Σ m W_a(f) W_b(g) / Σ m: [B, 1, *S] x2 -> [B, K, K].

    value_range: None (each item's own min and max over the mask, per image), (lo, hi) for
    both images, or ((lo_f, hi_f), (lo_g, hi_g)). The range is a constant for gradients.
    """
    b = max(fixed.shape[0], moving.shape[0])
    f = fixed.expand(b, *fixed.shape[1:]).flatten(1)
    g = moving.expand(b, *moving.shape[1:]).flatten(1)
    m = None if mask is None else _mask_weights(mask.flatten(1), f.dtype).expand(b, -1)
    ranges = []
    for x, i in ((f, 0), (g, 1)):
        if value_range is None:
            lo, hi = _item_range(x.detach(), m)
        else:
            r = value_range[i] if isinstance(value_range[0], (tuple, list)) else value_range
            lo = torch.full((b, 1), float(r[0]), dtype=x.dtype, device=x.device)
            hi = torch.full((b, 1), float(r[1]), dtype=x.dtype, device=x.device)
        ranges.append((lo, hi))
    if m is not None:
        # Voxels with mask 0 do not count, whatever their values (NaN included).
        inside = m > 0
        f = torch.where(inside, f, ranges[0][0])
        g = torch.where(inside, g, ranges[1][0])
    wf = parzen_weights(f, *ranges[0], bins, kernel, sigma)
    wg = parzen_weights(g, *ranges[1], bins, kernel, sigma)
    if m is None:
        return torch.einsum("bna,bnc->bac", wf, wg) / f.shape[1]
    return torch.einsum("bna,bnc->bac", wf * m[..., None], wg) / m.sum(1)[:, None, None]


def _entropies(p_joint: torch.Tensor, eps: float):
    pc = p_joint.clamp_min(eps)
    pa = p_joint.sum(2).clamp_min(eps)  # [B, K], fixed
    pb = p_joint.sum(1).clamp_min(eps)  # [B, K], moving
    h_f = -(pa * pa.log()).sum(1)
    h_g = -(pb * pb.log()).sum(1)
    h_fg = -(pc * pc.log()).sum((1, 2))
    mi = (pc * (pc.log() - pa.log()[:, :, None] - pb.log()[:, None, :])).sum((1, 2))
    return mi, h_f, h_g, h_fg


def mutual_information(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bins: int = 32,
    kernel: str = "gaussian",
    sigma: float = 0.5,
    value_range: tuple | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """MI = Σ P log(P / (p_a p_b)), P and p clamped at eps: [B]."""
    p = joint_histogram(fixed, moving, bins, kernel, sigma, value_range, mask)
    return _entropies(p, eps)[0]


def nmi(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bins: int = 32,
    kernel: str = "gaussian",
    sigma: float = 0.5,
    value_range: tuple | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """NMI = (H_f + H_g) / H_fg, entropies H = -Σ p log p of the clamped histograms: [B]."""
    p = joint_histogram(fixed, moving, bins, kernel, sigma, value_range, mask)
    _, h_f, h_g, h_fg = _entropies(p, eps)
    return (h_f + h_g) / h_fg


# --- Sobel ---------------------------------------------------------------------------------


def _shift(x: torch.Tensor, dim: int, k: int, padding: str) -> torch.Tensor:
    """y[i] = x[i + k] along `dim` (|k| <= 1), outside values replicated or zero."""
    n = x.shape[dim]
    if k == 0:
        return x
    if k > 0:
        body = x.narrow(dim, k, n - k)
        edge = x.narrow(dim, n - 1, 1) if padding == "replicate" else torch.zeros_like(
            x.narrow(dim, n - 1, 1)
        )
        return torch.cat([body, edge.expand_as(x.narrow(dim, 0, k))], dim)
    body = x.narrow(dim, 0, n + k)
    edge = x.narrow(dim, 0, 1) if padding == "replicate" else torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([edge.expand_as(x.narrow(dim, 0, -k)), body], dim)


def sobel(
    x: torch.Tensor, output: str = "magnitude", padding: str = "replicate", eps: float = 1e-6
) -> torch.Tensor:
    """Separable Sobel of every (batch, channel) volume.

    Component i = [-1, 0, 1] along spatial axis i and [1, 2, 1] along every other spatial axis
    (unnormalised, as scipy.ndimage.sobel with mode "nearest" for "replicate", "constant"
    for "zeros"). x: [B, C, *S]. output "components": [B, C, ndim, *S]; "magnitude":
    sqrt(Σ_i g_i² + eps), [B, C, *S].
    """
    ndim = x.dim() - 2
    comps = []
    for i in range(ndim):
        g = _shift(x, 2 + i, 1, padding) - _shift(x, 2 + i, -1, padding)
        for j in range(ndim):
            if j != i:
                g = _shift(g, 2 + j, -1, padding) + 2 * g + _shift(g, 2 + j, 1, padding)
        comps.append(g)
    if output == "components":
        return torch.stack(comps, 2)
    return torch.sqrt(sum(g * g for g in comps) + eps)


def sobel_l1(
    f1: torch.Tensor,
    f0: torch.Tensor,
    padding: str = "replicate",
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """|sobel(f1) - sobel(f0)| of the magnitudes, reduced by "mean", "sum" or "none"."""
    d = (sobel(f1, "magnitude", padding, eps) - sobel(f0, "magnitude", padding, eps)).abs()
    if reduction == "none":
        return d
    return d.sum() if reduction == "sum" else d.mean()


# --- Local normalised cross-correlation and regularisers ------------------------------------


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over the in-bounds voxels of a cubic (square in 2D) window centred on each voxel,
    one axis at a time (zero padding): each output adds only its window's values.

    Eager: a convolution with a line of ones per axis (the fastest). Under torch.compile: the
    sum of each `window`-long run of an unfold view, because inductor specialises the sizes
    of a convolution's backward, which recompiled torch.compile(dynamic=True) for every new
    image size."""
    ndim = x.dim() - 2
    r = window // 2
    if torch.compiler.is_compiling():
        for axis in range(2, x.dim()):
            pad = [0, 0] * ndim  # F.pad lists the last axis first
            pad[2 * (x.dim() - 1 - axis)] = pad[2 * (x.dim() - 1 - axis) + 1] = r
            x = F.pad(x, pad).unfold(axis, window, 1).sum(-1)
        return x
    conv = F.conv3d if ndim == 3 else F.conv2d
    c = x.shape[1]
    for axis in range(ndim):
        size, padding = [1] * ndim, [0] * ndim
        size[axis], padding[axis] = window, r
        weight = torch.ones((c, 1, *size), dtype=x.dtype, device=x.device)
        x = conv(x, weight, padding=tuple(padding), groups=c)
    return x


def _centre(x: torch.Tensor) -> torch.Tensor:
    """x minus the mean of each item (a detached constant: lncc and its gradients do not
    change when a constant is added to an image)."""
    return x - x.detach().mean(dim=tuple(range(1, x.dim())), keepdim=True)


def _lncc_stats(
    fixed: torch.Tensor, moving: torch.Tensor, window: int, sum_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross, raw var_I, raw var_J) of every window, [B, C, *S] in `sum_dtype`, from the
    in-bounds box sums of the items centred on their own means (see :func:`lncc`)."""
    if sum_dtype is not None:
        fixed, moving = fixed.to(sum_dtype), moving.to(sum_dtype)
    fixed, moving = _centre(fixed), _centre(moving)
    b = max(fixed.shape[0], moving.shape[0])
    i = fixed.expand(b, *fixed.shape[1:])
    j = moving.expand(b, *moving.shape[1:])
    n = _box_sum(torch.ones_like(i[:1]), window)
    si, sj = _box_sum(i, window), _box_sum(j, window)
    sii, sjj, sij = _box_sum(i * i, window), _box_sum(j * j, window), _box_sum(i * j, window)
    return sij - si * sj / n, sii - si * si / n, sjj - sj * sj / n


def _lncc_mean(cc: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per item Σ m cc / Σ m (the mean without a mask; 0 for an all-zero mask), as `dtype`."""
    cc = cc.flatten(1)
    if mask is None:
        return cc.mean(1).to(dtype)
    b = cc.shape[0]
    m = mask.expand(b, *mask.shape[1:]).flatten(1).to(cc.dtype)
    msum = m.sum(1)
    # An empty mask gives 0 (no voxel to score), not 0/0.
    out = torch.where(msum > 0, (cc * m).sum(1) / torch.where(msum > 0, msum, 1), 0)
    return out.to(dtype)


def lncc(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    window: int = 9,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
    *,
    sum_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Local NCC in squared-correlation form, averaged over the voxels (or the mask): [B].

    Per voxel, with window sums over in-bounds voxels only (n of them):
    cross = Σ IJ - Σ I Σ J / n, var_I = Σ I² - (Σ I)² / n, cc = cross² / (var_I var_J + eps),
    variances clamped at 0 so that constant patches give cc = 0, never NaN, and cross² clamped
    to var_I var_J so that cc stays in [0, 1] under rounding. fixed, moving: [B or 1, C, *S];
    mask: [B or 1, 1, *S] weights (an all-zero mask gives 0).

    Each item of `fixed` and `moving` is cast to `sum_dtype` (None: kept in its dtype) and
    centred on its own mean before the sums, and the result is cast back to the inputs'
    dtype. Raw intensities (MR tissue at ~1e3, CT at -1024) would otherwise cancel in
    Σ I² - (Σ I)² / n: float32 box sums of uncentred images at a mean of 1e4 are ~3e-3 off,
    and flat windows on a non-zero background get cc of 0.01-1 in float32, centred or not.
    With float64 sums, float32 inputs at any offset give the float64 value up to the
    rounding of the output (measured 1e-8 at offsets up to 1e4). An item holding NaN or Inf
    has a non-finite mean: its value (and gradients) are NaN.
    """
    cross, var_i, var_j = _lncc_stats(fixed, moving, window, sum_dtype)
    vv = var_i.clamp_min(0) * var_j.clamp_min(0)
    c2 = cross * cross
    # cross² <= var_I var_J holds exactly (Cauchy-Schwarz); rounding in the sums can break it
    # where the variances cancel (near-constant patches of large intensities), which would
    # give cc >> 1. Clamping keeps cc in [0, 1]; where it binds the exact value is ~1 anyway.
    # `where` (not `minimum`) so that a tie (I = J) takes the gradient of cross².
    c2 = torch.where(c2 > vv, vv, c2)
    return _lncc_mean(c2 / (vv + eps), mask, fixed.dtype)


def lncc_monai(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    window: int = 9,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-5,
    mask: torch.Tensor | None = None,
    *,
    sum_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """LNCC in MONAI's per-window form (LocalNormalizedCrossCorrelationLoss, rectangular
    kernel), averaged over the voxels (or the mask): [B].

    Per voxel, with the in-bounds window sums of :func:`lncc` (no zero padding):
    cc = (cross² + smooth_nr) / (max(var_I, smooth_dr) max(var_J, smooth_dr)), raw variances
    (no clamp at 0, no bound on cc). Gradients are torch.maximum's (1/2 on a tie with the
    floor). Centring, `sum_dtype` and mask as :func:`lncc`.
    """
    cross, var_i, var_j = _lncc_stats(fixed, moving, window, sum_dtype)
    dr = torch.as_tensor(smooth_dr, dtype=var_i.dtype, device=var_i.device)
    cc = (cross * cross + smooth_nr) / (torch.maximum(var_i, dr) * torch.maximum(var_j, dr))
    return _lncc_mean(cc, mask, fixed.dtype)


def grad_l2(u: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """Mean squared forward difference, averaged over the axes: (1/ndim) Σ_i mean((Δ_i u / h_i)²).

    u: [B, C, *S] (a displacement has C = ndim). Returns a scalar.
    """
    ndim = u.dim() - 2
    h = spacing if spacing is not None else (1.0,) * ndim
    total = u.new_zeros(())
    for i in range(ndim):
        n = u.shape[2 + i]
        d = (u.narrow(2 + i, 1, n - 1) - u.narrow(2 + i, 0, n - 1)) / h[i]
        total = total + (d * d).mean()
    return total / ndim


def harmonic_energy(u: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Σ_c ‖∇² u_c‖² with the 5-point (2D) / 7-point (3D) Laplacian on interior voxels.

    reduction: "sum" (scalar over batch, components and interior voxels: the paper's metric
    for B = 1), "mean" (the same terms averaged), "none" ([B] per-item sums).
    """
    ndim = u.dim() - 2
    inner = [slice(None), slice(None)] + [slice(1, n - 1) for n in u.shape[2:]]
    lap = -2 * ndim * u[tuple(inner)]
    for i in range(ndim):
        for k in (0, 2):
            idx = list(inner)
            n = u.shape[2 + i]
            idx[2 + i] = slice(k, n - 2 + k)
            lap = lap + u[tuple(idx)]
    sq = lap * lap
    if reduction == "none":
        return sq.flatten(1).sum(1)
    return sq.sum() if reduction == "sum" else sq.mean()


def _interior_shift(u: torch.Tensor, offsets: dict[int, int]) -> torch.Tensor:
    """u(x + o) over the voxels x interior in every spatial axis (o_i in {-1, 0, 1})."""
    idx = [slice(None), slice(None)]
    for i, n in enumerate(u.shape[2:]):
        o = offsets.get(i, 0)
        idx.append(slice(1 + o, n - 1 + o))
    return u[tuple(idx)]


def _reduce_map(m: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return m.flatten(1).sum(1)
    return m.sum() if reduction == "sum" else m.mean()


def bending_energy(
    u: torch.Tensor, spacing: tuple[float, ...] | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Σ_i (∂²_ii u)² + 2 Σ_{i<j} (∂²_ij u)² on interior voxels, per component: ∂²_ii the
    [1, -2, 1] / h_i² stencil, ∂²_ij the 4-point (u(+,+) - u(+,-) - u(-,+) + u(-,-)) /
    (4 h_i h_j). reduction: "mean" (over B·C·Π(S_i - 2)), "sum", "none" ([B] sums)."""
    ndim = u.dim() - 2
    h = spacing if spacing is not None else (1.0,) * ndim
    centre = _interior_shift(u, {})
    energy = torch.zeros_like(centre)
    for i in range(ndim):
        d2 = (_interior_shift(u, {i: 1}) - 2 * centre + _interior_shift(u, {i: -1})) / h[i] ** 2
        energy = energy + d2 * d2
        for j in range(i + 1, ndim):
            dij = (
                _interior_shift(u, {i: 1, j: 1}) - _interior_shift(u, {i: 1, j: -1})
                - _interior_shift(u, {i: -1, j: 1}) + _interior_shift(u, {i: -1, j: -1})
            ) / (4 * h[i] * h[j])
            energy = energy + 2 * dij * dij
    return _reduce_map(energy, reduction)


def diffusion(
    u: torch.Tensor, spacing: tuple[float, ...] | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Σ_i ((u(x + e_i) - u(x - e_i)) / (2 h_i))² on interior voxels, per component;
    reductions as bending_energy."""
    ndim = u.dim() - 2
    h = spacing if spacing is not None else (1.0,) * ndim
    energy = torch.zeros_like(_interior_shift(u, {}))
    for i in range(ndim):
        d = (_interior_shift(u, {i: 1}) - _interior_shift(u, {i: -1})) / (2 * h[i])
        energy = energy + d * d
    return _reduce_map(energy, reduction)
