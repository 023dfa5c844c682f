"""Volumes to sweep: a seeded prostate-like phantom and the MNI152 tissue maps, both as
tissue channels in the sweep layout ``[1, 3, S, D, L]``.

Sweep layout: axis S runs along the probe's long axis (the direction the probe moves during
the sweep), D is the depth from the probe face (index 0 touches the probe), L is lateral.
The three channels are what :func:`mrus_models.data.pseudo_ultrasound` takes (its CSF, GM
and WM slots): here they stand for anechoic fluid, a mid-grey tissue and a bright tissue,
and the rest (1 − their sum) is the background echogenicity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._smooth import gaussian_blur
from ..data import smooth_random_field

#: Phantom labels (:attr:`TissueVolume.labels`).
PROSTATE_LABELS = {0: "periprostatic", 1: "urethra", 2: "transition zone",
                   3: "peripheral zone", 4: "calcification"}


@dataclass
class TissueVolume:
    """Tissue maps in the sweep layout.

    Attributes:
        tissues: Tensor [1, 3, S, D, L] float32 in [0, 1]: fluid (anechoic), mid-grey and
            bright tissue fractions (``pseudo_ultrasound``'s CSF, GM and WM slots).
        spacing: voxel size, mm (isotropic).
        name: ``"prostate"`` or ``"mni"``.
    """

    tissues: torch.Tensor
    spacing: float
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.tissues.shape[2:])


def _check_size(size) -> tuple[int, int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in size)):
        raise ValueError(f"size must be three ints (S, D, L), got {size!r}")
    if min(size) < 16:
        raise ValueError(f"size must be at least 16 voxels per axis, got {tuple(size)}")
    return tuple(size)


def _ellipsoid(grid, centre, semi) -> torch.Tensor:
    q = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi, strict=True))
    return (q <= 1.0).float()


def prostate_phantom(size=(96, 64, 64), *, spacing: float = 0.75, seed: int = 0) -> TissueVolume:
    """A prostate-like phantom seen from the rectum, seeded.

    An ellipsoid gland (semi-axes 32 %, 30 % and 36 % of the grid along S, D, L) in
    periprostatic tissue, a bright rectal wall along the probe face (depth ≤ 4 % of D);
    inside the gland a mid-grey transition zone (an inner ellipsoid, 60 % of the gland,
    shifted away from the probe) and a bright peripheral zone around it, an anechoic
    urethra-like channel (radius 5 % of the gland's smallest semi-axis + 1 voxel) curving
    through the transition zone along S, three small hypoechoic nodules and two
    calcifications (bright, they cast shadows) at seeded positions; the periprostatic
    tissue carries smooth seeded fat-like lobules (so that frames outside the gland still
    have structure to match). Edges are smoothed with σ = 0.7 voxel.

    Args:
        size: (S, D, L) voxels.
        spacing: voxel size, mm.
        seed: positions of the nodules and calcifications, the lobules' field.

    Returns:
        :class:`TissueVolume` named ``"prostate"``.
    """
    size = _check_size(size)
    if not spacing > 0:
        raise ValueError(f"spacing must be positive (mm), got {spacing!r}")
    g = torch.Generator().manual_seed(int(seed))
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    s_n, d_n, l_n = size
    centre = (0.5 * (s_n - 1), 0.55 * (d_n - 1), 0.5 * (l_n - 1))
    semi = (0.32 * s_n, 0.30 * d_n, 0.36 * l_n)
    gland = _ellipsoid(grid, centre, semi)
    tz_centre = (centre[0], centre[1] + 0.15 * semi[1], centre[2])
    tz = _ellipsoid(grid, tz_centre, [0.6 * a for a in semi]) * gland
    pz = gland - tz
    # The urethra curves towards the probe at both ends of the gland.
    s_rel = (grid[0] - centre[0]) / semi[0]
    u_depth = tz_centre[1] - 0.25 * semi[1] * s_rel ** 2
    u_radius = 0.05 * min(semi) + 1.0
    urethra = (((grid[1] - u_depth) ** 2 + (grid[2] - centre[2]) ** 2 <= u_radius ** 2)
               & (s_rel.abs() <= 1.1)).float()
    fluid = urethra.clone()
    grey = tz * (1 - urethra)
    bright = pz * (1 - urethra)

    def inside_points(n: int, scale: float) -> list[tuple[float, float, float]]:
        pts = []
        while len(pts) < n:
            u = (torch.rand(3, generator=g) * 2 - 1) * scale
            if float((u ** 2).sum()) <= scale ** 2:
                pts.append(tuple(c + float(x) * a for c, x, a in zip(centre, u, semi,
                                                                    strict=True)))
        return pts

    for p in inside_points(3, 0.7):
        nodule = _ellipsoid(grid, p, [0.12 * min(semi)] * 3) * gland * (1 - urethra)
        grey = torch.maximum(grey, nodule)
        bright = bright * (1 - nodule)
    for p in inside_points(2, 0.6):
        calc = _ellipsoid(grid, p, [max(1.0, 0.05 * min(semi))] * 3) * (1 - urethra)
        bright = torch.maximum(bright, calc)
        grey = grey * (1 - calc)
    outside = 1 - torch.clamp(gland + urethra, max=1)
    lobules = smooth_random_field(size, control=6, seed=int(seed) + 1)[0, 0]
    fat = 0.6 * outside * ((lobules - 0.1) / 0.5).clamp(0, 1)
    wall = (grid[1] <= max(1.0, 0.04 * d_n)).float() * outside
    bright = torch.maximum(bright, wall)
    grey = torch.maximum(grey, fat * (1 - wall))
    tissues = torch.stack([fluid, grey, bright])[None]
    tissues = gaussian_blur(tissues, 0.7).clamp(0, 1)
    total = tissues.sum(1, keepdim=True)
    tissues = tissues / total.clamp_min(1.0)
    return TissueVolume(tissues=tissues.contiguous(), spacing=float(spacing), name="prostate")


def mni_volume(resolution: int = 2) -> TissueVolume:
    """The MNI152 CSF / GM / WM maps (:func:`mrus_models.data.mni152`) in the sweep layout.

    The sweep runs anterior → posterior (MNI's y), the probe lies on top of the head
    (depth grows from superior to inferior, MNI's z reversed) and L is MNI's x: S, D, L =
    y, −z, x. At 2 mm that is 98 × 82 × 81 voxels.
    """
    from ..data import mni152

    tpl = mni152(resolution)
    tissues = tpl.tissues().permute(0, 1, 3, 4, 2).flip(3).contiguous()
    return TissueVolume(tissues=tissues, spacing=float(tpl.spacing[0]), name="mni")


def tissue_volume(name: str, *, seed: int = 0, size=None, spacing: float | None = None
                  ) -> TissueVolume:
    """``"prostate"`` (:func:`prostate_phantom`, with ``size`` and ``spacing`` when given)
    or ``"mni"`` (:func:`mni_volume`, 2 mm)."""
    if name == "prostate":
        kwargs = {}
        if size is not None:
            kwargs["size"] = tuple(size)
        if spacing is not None:
            kwargs["spacing"] = spacing
        return prostate_phantom(seed=seed, **kwargs)
    if name == "mni":
        if size is not None or spacing is not None:
            raise ValueError("the mni volume has a fixed size and spacing (2 mm)")
        return mni_volume(2)
    raise ValueError(f"phantom must be 'prostate' or 'mni', got {name!r}")
