"""Second modalities simulated from tissue maps: a T2-like MR and a pseudo-ultrasound.

Both take the tissue probabilities as channels, Tensor [1, 3, *S] (CSF-like, grey matter,
white matter; zero outside the brain), so that a moving image can be simulated from tissue
maps already warped into the moving frame: the speckle, the fan and the shadows then belong
to the moving acquisition, as they do in a real scan. Every random draw comes from a
``torch.Generator`` seeded by ``seed``: the same seed gives the same image.
"""

from __future__ import annotations

import math

import torch

from mrus_kernels import warp

from .._smooth import gaussian_blur, resize

#: T2-like intensity per tissue (CSF bright, white matter dark: T1's contrast inverted).
T2_INTENSITY = {"csf": 1.0, "gm": 0.55, "wm": 0.3}
#: Pseudo-ultrasound echogenicity per tissue (fluid anechoic, white matter brightest) and of
#: the non-brain background inside the fan.
US_ECHOGENICITY = {"background": 0.12, "csf": 0.04, "gm": 0.35, "wm": 0.6}
#: Relative acoustic impedance per tissue; boundaries reflect where it changes.
US_IMPEDANCE = {"background": 0.2, "csf": 0.0, "gm": 0.6, "wm": 1.0}

RAYLEIGH_SCALE = math.sqrt(2.0 / math.pi)  # σ of a unit-mean Rayleigh variable


def _check_tissues(tissues: object) -> torch.Tensor:
    if not isinstance(tissues, torch.Tensor):
        raise TypeError(f"tissues must be a torch.Tensor, got {type(tissues).__name__}")
    if tissues.dim() not in (4, 5) or tissues.shape[:2] != (1, 3):
        raise ValueError(
            "tissues must be [1, 3, *S] (CSF, GM, WM probabilities, S 2D or 3D), got shape "
            f"{tuple(tissues.shape)}"
        )
    if not tissues.is_floating_point():
        raise TypeError(f"tissues must be floating, got {tissues.dtype}")
    return tissues


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def smooth_random_field(size: tuple[int, ...], *, control: int = 4, seed: int = 0) -> torch.Tensor:
    """A smooth random field [1, 1, *size] in [-1, 1]: Gaussian noise on a ``control``-point
    grid per axis, linearly upsampled and smoothed (a bias field, a velocity component)."""
    g = _generator(seed)
    coarse = torch.randn(1, 1, *([control] * len(size)), generator=g)
    field = resize(coarse, size)
    field = gaussian_blur(field, [n / (2.0 * control) for n in size])
    return field / field.abs().amax().clamp_min(1e-12)


def t2_like(tissues: torch.Tensor, *, bias: float = 0.2, noise: float = 0.01,
            seed: int = 0) -> torch.Tensor:
    """T2-like MR image: tissue contrast inverted from T1, smooth bias field, light noise.

    ``I = exp(bias · b(x)) · Σ_t c_t p_t(x) + noise · n(x)``, inside the brain, with
    ``c = {CSF 1.0, GM 0.55, WM 0.3}`` (:data:`T2_INTENSITY`), ``b`` a smooth random field
    in [-1, 1] (:func:`smooth_random_field`) and ``n`` standard normal. Background is 0.

    Args:
        tissues: Tensor [1, 3, *S], CSF/GM/WM probabilities.
        bias: amplitude of the log bias field (0.2: up to ±22 % intensity).
        noise: standard deviation of the additive Gaussian noise inside the brain.
        seed: seed of the bias field and the noise.

    Returns:
        Tensor [1, 1, *S] float32, on the device of ``tissues``.
    """
    tissues = _check_tissues(tissues)
    size = tuple(tissues.shape[2:])
    c = torch.tensor([T2_INTENSITY[k] for k in ("csf", "gm", "wm")], dtype=tissues.dtype,
                     device=tissues.device)
    clean = (tissues * c.view(1, 3, *([1] * len(size)))).sum(1, keepdim=True)
    inside = (tissues.sum(1, keepdim=True) > 0).to(tissues.dtype)
    field = smooth_random_field(size, seed=seed).to(tissues.device, tissues.dtype)
    n = torch.randn(1, 1, *size, generator=_generator(seed + 1)).to(tissues.device, tissues.dtype)
    return torch.exp(bias * field) * clean + noise * n * inside


def rayleigh_speckle(
    size: tuple[int, ...], *, correlation: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """Unit-mean Rayleigh speckle [1, 1, *size]: the amplitude of a circular complex Gaussian.

    With ``correlation > 0`` (voxels) both quadratures are Gaussian-smoothed and rescaled to
    unit variance first, which keeps each voxel Rayleigh but gives the speckle a grain.
    """
    g = _generator(seed)
    re_im = torch.randn(1, 2, *size, generator=g)
    if correlation > 0:
        re_im = gaussian_blur(re_im, correlation)
        re_im = re_im / re_im.std(dim=tuple(range(2, re_im.dim())), keepdim=True)
    # |z| of z ~ CN(0, 2σ²) is Rayleigh(σ); σ = sqrt(2/π) makes its mean 1.
    return RAYLEIGH_SCALE * re_im.square().sum(1, keepdim=True).sqrt()


def _fan_geometry(size, axis, half_angle, apex_offset, device):
    """Apex, per-voxel depth-normalised lateral tangents and ray length for a fan whose beam
    runs along ``axis`` from the high-index face towards index 0."""
    ndim = len(size)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=device) for n in size],
                           indexing="ij")
    apex = [(n - 1) / 2.0 for n in size]
    apex[axis] = size[axis] - 1 + apex_offset
    depth = apex[axis] - grids[axis]  # > 0 everywhere in the volume
    lateral = [a for a in range(ndim) if a != axis]
    tans = [(grids[a] - apex[a]) / depth for a in lateral]
    r = depth * torch.sqrt(1 + sum(t * t for t in tans))
    limit = math.tan(math.radians(half_angle))
    fov = torch.ones_like(depth, dtype=torch.bool)
    for t in tans:
        fov &= t.abs() <= limit
    return apex, lateral, tans, r, limit, fov


def _cumulate_along_rays(source: torch.Tensor, axis: int, apex, lateral, tans, r, limit,
                         r_min: float) -> torch.Tensor:
    """∫_{r_min}^{r(x)} source ds along the ray from the apex through each voxel (voxels).

    The source is resampled onto a polar grid (lateral tangents × radius, 1-voxel radial
    step) with :func:`mrus_kernels.warp`, summed along the radius, and sampled back at each
    voxel's (tangent, radius): two warps and a cumsum.
    """
    size = tuple(source.shape[2:])
    ndim = len(size)
    dev, dt = source.device, source.dtype
    n_theta = [size[a] for a in lateral]
    n_r = int(math.ceil(float(r.max()) - r_min)) + 2
    polar = torch.meshgrid(
        *[torch.linspace(-limit, limit, n, device=dev, dtype=dt) for n in n_theta],
        r_min + torch.arange(n_r, device=dev, dtype=dt), indexing="ij",
    )
    *t_polar, radius = polar
    norm = torch.sqrt(1 + sum(t * t for t in t_polar))
    coords = [None] * ndim
    for a, t in zip(lateral, t_polar, strict=True):
        coords[a] = apex[a] + radius * t / norm
    coords[axis] = apex[axis] - radius / norm
    index = torch.meshgrid(*[torch.arange(n, device=dev, dtype=dt) for n in polar[0].shape],
                           indexing="ij")
    to_polar = torch.stack([c - i for c, i in zip(coords, index, strict=True)])[None]
    on_rays = warp(source, to_polar, padding="zeros")
    # Exclusive sum: a reflector shadows what lies behind it, not itself.
    cum = torch.cumsum(on_rays, dim=-1) - on_rays
    cart = torch.meshgrid(*[torch.arange(n, device=dev, dtype=dt) for n in size], indexing="ij")
    back = [(t / limit + 1) * (n - 1) / 2 for t, n in zip(tans, n_theta, strict=True)] + [r - r_min]
    to_cart = torch.stack([b - cart[a] for a, b in enumerate(back)])[None]
    return warp(cum, to_cart, padding="border")


def pseudo_ultrasound(
    tissues: torch.Tensor,
    *,
    spacing: float = 1.0,
    axis: int = -1,
    half_angle: float = 50.0,
    apex_offset: float = 8.0,
    boundary_gain: float = 0.2,
    attenuation: float = 0.3,
    shadow: float = 0.05,
    shadow_threshold: float = 0.6,
    speckle_correlation: float = 0.0,
    seed: int = 0,
    return_parts: bool = False,
):
    """Pseudo-ultrasound image of the tissue maps, as a probe on the volume's surface sees it.

    Model (every step a documented, seeded, simple stand-in for the physics):

    1. **Echogenicity**: ``e = Σ_t ε_t p_t`` with ε = {background 0.12, CSF 0.04, GM 0.35,
       WM 0.6} (:data:`US_ECHOGENICITY`).
    2. **Specular boundaries**: reflectivity ``R = min(1, |∇ z| / q99)`` with ``z`` the
       impedance map (:data:`US_IMPEDANCE`, smoothed with σ = 0.7 voxel) and ``q99`` its
       99th percentile inside the brain; the image gets ``+ boundary_gain · R``.
    3. **Depth attenuation**: ``× exp(-attenuation · r / r_max)`` along the ray length ``r``
       from the apex.
    4. **Acoustic shadows**: ``× exp(-shadow · ∫ relu(R - τ) / (1 - τ) ds)``, the integral
       (in voxels) along the ray from the apex up to the voxel (τ = ``shadow_threshold``):
       strong reflectors darken what lies behind them.
    5. **Speckle**: ``× s``, with ``s`` unit-mean Rayleigh (:func:`rayleigh_speckle`),
       independent per voxel unless ``speckle_correlation > 0``.
    6. **Fan**: zero outside a pyramid (a sector in 2D) with apex ``apex_offset`` voxels
       beyond the high-index face of ``axis``, half-angle ``half_angle`` degrees per
       lateral axis. The image is scaled so that the 99.5th percentile of the clean image
       inside the fan is 1. Voxels are assumed isotropic for the geometry.

    Args:
        tissues: Tensor [1, 3, *S], CSF/GM/WM probabilities (zero outside the brain).
        spacing: voxel size, mm (only reported in the parts; the model works in voxels).
        axis: spatial axis of the beam (default: the last, MNI's inferior–superior, so the
            probe sits on top of the head).
        half_angle: fan half-angle, degrees.
        apex_offset: distance of the apex beyond the volume's face, voxels.
        boundary_gain, attenuation, shadow, shadow_threshold: see the model above.
        speckle_correlation: speckle grain, voxels (0: independent voxels).
        seed: seed of the speckle.
        return_parts: also return the model's intermediate maps.

    Returns:
        Tensor [1, 1, *S] float32; with ``return_parts`` a dict with ``image``, ``clean``
        (everything but the speckle, same scale: ``image = clean · speckle``), ``speckle``,
        ``fov`` (bool), ``reflectivity``, ``transmission``, ``attenuation``, ``depth``
        (ray length, voxels) and ``spacing``.
    """
    tissues = _check_tissues(tissues)
    size = tuple(tissues.shape[2:])
    ndim = len(size)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [-{ndim}, {ndim - 1}] for a {ndim}D image, got {axis}")
    axis %= ndim
    if not 0 < half_angle < 90:
        raise ValueError(f"half_angle must be in (0, 90) degrees, got {half_angle}")
    dev, dt = tissues.device, tissues.dtype
    shape = (1, 4, *([1] * ndim))
    background = (1 - tissues.sum(1, keepdim=True)).clamp(0, 1)
    full = torch.cat([background, tissues], 1)
    keys = ("background", "csf", "gm", "wm")
    echo_w = torch.tensor([US_ECHOGENICITY[k] for k in keys], device=dev, dtype=dt).view(shape)
    imped_w = torch.tensor([US_IMPEDANCE[k] for k in keys], device=dev, dtype=dt).view(shape)
    echo = (full * echo_w).sum(1, keepdim=True)
    z = (full * imped_w).sum(1, keepdim=True)
    z = gaussian_blur(z, 0.7)
    grads = torch.gradient(z[0, 0])
    gmag = torch.sqrt(sum(g * g for g in grads))[None, None]
    brain = tissues.sum(1, keepdim=True) > 0.5
    inside = gmag[brain] if bool(brain.any()) else gmag.flatten()
    q99 = torch.quantile(inside.float().cpu(), 0.99).to(dev, dt).clamp_min(1e-6)
    refl = (gmag / q99).clamp(max=1.0)

    apex, lateral, tans, r, limit, fov = _fan_geometry(size, axis, half_angle, apex_offset, dev)
    r = r.to(dt)[None, None]
    fov = fov[None, None]
    r_min = float(apex_offset)
    atten = torch.exp(-attenuation * (r - r_min) / (r.max() - r_min))
    source = ((refl - shadow_threshold) / (1 - shadow_threshold)).clamp_min(0)
    path = _cumulate_along_rays(source, axis, apex, lateral, [t.to(dt) for t in tans], r[0, 0],
                                limit, r_min)
    trans = torch.exp(-shadow * path)
    clean = (echo + boundary_gain * refl) * atten * trans * fov
    scale = torch.quantile(clean[fov].float().cpu(), 0.995).to(dev, dt).clamp_min(1e-6)
    clean = clean / scale
    speckle = rayleigh_speckle(size, correlation=speckle_correlation, seed=seed).to(dev, dt)
    image = clean * speckle
    if not return_parts:
        return image
    return {
        "image": image, "clean": clean, "speckle": speckle, "fov": fov, "reflectivity": refl,
        "transmission": trans, "attenuation": atten, "depth": r, "spacing": spacing,
    }
