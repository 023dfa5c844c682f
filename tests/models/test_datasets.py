"""mrus_models.data.datasets: 2D slice pairs and 3D crops of the MNI152 template pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import interpolate, ndimage

from mrus_kernels import warp
from mrus_models.data import Crops3D, SlicePairs
from mrus_models.data import datasets as D
from mrus_models.data.modalities import T2_INTENSITY

KEYS = {"fixed", "moving", "fixed_labels", "moving_labels", "mask", "ddf", "spacing", "index",
        "position"}


def _dice(a: torch.Tensor, b: torch.Tensor, label: int) -> float:
    a, b = a == label, b == label
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1))


def _warped_labels(item: dict, ddf: torch.Tensor | None = None) -> torch.Tensor:
    ddf = item["ddf"] if ddf is None else ddf
    return warp(item["moving_labels"][None].float(), ddf[None], mode="nearest")[0].long()


def _mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return (_dice(a, b, 2) + _dice(a, b, 3)) / 2  # grey and white matter


def _equal_items(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


# --------------------------------------------------------------------------- items


@pytest.mark.parametrize("modality", ["t2", "us"])
@pytest.mark.parametrize("kind", ["bspline", "svf"])
def test_slice_item_shapes_dtypes_and_values(modality, kind):
    ds = SlicePairs(modality, size=(40, 48), warp=kind, split="val")
    item = ds[3]
    assert set(item) == KEYS
    s = (40, 48)
    for k, dtype in [("fixed", torch.float32), ("moving", torch.float32),
                     ("fixed_labels", torch.int64), ("moving_labels", torch.int64),
                     ("mask", torch.bool)]:
        assert item[k].shape == (1, *s) and item[k].dtype == dtype, k
    assert item["ddf"].shape == (2, *s) and item["ddf"].dtype == torch.float32
    assert item["spacing"].dtype == torch.float32
    step = (max(D.template_volume().shape[2:]) - 1) / (48 - 1)
    assert item["spacing"].tolist() == pytest.approx([step, step])
    assert item["index"] == 3 and item["position"].dtype == torch.int64
    assert bool(torch.isfinite(item["moving"]).all()) and bool(torch.isfinite(item["ddf"]).all())
    assert 0 <= float(item["fixed"].min()) and float(item["fixed"].max()) <= 1
    assert float(item["moving"].std()) > 0.05
    assert set(item["fixed_labels"].unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(item["mask"], item["fixed_labels"] > 0)
    assert torch.equal(item["mask"], item["fixed"] > D.MASK_THRESHOLD)
    # The warp reaches its stated size (mm) but not much more (the inverse of a field whose
    # largest displacement is 6 mm is about as large).
    largest = float((item["ddf"] * item["spacing"].view(2, 1, 1)).square().sum(0).sqrt().max())
    assert 0.7 * D.MAX_DISPLACEMENT <= largest <= 1.3 * D.MAX_DISPLACEMENT


@pytest.mark.parametrize("modality", ["t2", "us"])
def test_crop_item_shapes_dtypes_and_values(modality):
    ds = Crops3D(modality, size=(24, 20, 16), split="test", length=4)
    assert len(ds) == 4
    item = ds[1]
    assert set(item) == KEYS
    assert item["fixed"].shape == (1, 24, 20, 16) and item["moving"].dtype == torch.float32
    assert item["ddf"].shape == (3, 24, 20, 16) and item["mask"].dtype == torch.bool
    assert item["spacing"].tolist() == [1.0, 1.0, 1.0]
    origin = item["position"].tolist()
    vol = D.template_volume()
    expect = vol[0, 0, origin[0]:origin[0] + 24, origin[1]:origin[1] + 20,
                 origin[2]:origin[2] + 16]
    assert torch.equal(item["fixed"][0], expect)  # an exact crop (no augmentation in test)
    item["fixed"].zero_()  # a copy: the cached template is untouched
    assert torch.equal(ds[1]["fixed"][0], expect)
    assert bool(torch.isfinite(item["moving"]).all())


def test_label_rule_is_the_templates():
    labels, mask = D._labels(D.template_volume())
    tpl = D.mni152(1)
    assert torch.equal(labels, tpl.labels) and torch.equal(mask, tpl.mask)


def test_an_in_bounds_crop_is_a_copy():
    channels = torch.rand(1, 4, 6, 5, 4)
    keep = channels.clone()
    out = D._sample(channels, torch.zeros(1, 3, 6, 5, 4))  # the whole volume: a view before
    assert torch.equal(out, keep)
    out.zero_()
    assert torch.equal(channels, keep)


def test_crop_larger_than_the_template_is_centred_and_zero_padded():
    depth = D.template_volume().shape[-1]
    ds = Crops3D(size=(8, 8, depth + 12), split="val", length=1)
    item = ds[0]
    assert item["position"].tolist()[2] == -6
    assert float(item["fixed"][..., :6].abs().max()) == 0
    assert float(item["fixed"][..., -6:].abs().max()) == 0
    assert not bool(item["mask"][..., :6].any())


def test_default_sizes_are_the_papers():
    assert SlicePairs().size == (192, 192)  # INNReg §4.1
    assert SlicePairs(size=256).size == (256, 256)  # Plasticine §III-C
    assert Crops3D().size == (128, 128, 64)  # ACMT §III (Dataset)


# --------------------------------------------------------------------------- determinism


def test_item_is_a_function_of_seed_split_index_only():
    a = SlicePairs("us", size=40, split="train")
    b = SlicePairs("us", size=40, split="train")
    order = [5, 0, 17, 3]
    first = {i: a[i] for i in order}
    # Other indices read in between, reverse order, a fresh dataset: the same items.
    _ = a[9]
    for i in reversed(order):
        assert _equal_items(a[i], first[i])
        assert _equal_items(b[i], first[i])
    # Other seeds, or the same index in another split, differ.
    assert not torch.equal(SlicePairs("us", size=40, seed=1)[5]["ddf"], first[5]["ddf"])
    # The global RNGs play no part.
    torch.manual_seed(123)
    np.random.seed(123)
    assert _equal_items(a[5], first[5])


def _forget_caches(worker_id: int) -> None:
    # Each worker loads the template and rebuilds the slice tables itself, as a fresh
    # process would (spawn costs many seconds of imports on 2 cores; fork + this does not).
    for cached in (D.template_volume, D.slice_positions, D._slice_offset):
        cached.cache_clear()


@pytest.mark.parametrize("dataset", [
    lambda: Crops3D("us", size=(16, 16, 12), split="train", length=6),
    lambda: SlicePairs("t2", size=32, split="train", length=6),
], ids=["crops", "slices"])
def test_items_are_the_same_in_dataloader_workers(dataset):
    ds = dataset()
    direct = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                         worker_init_fn=_forget_caches)
    seen = list(loader)
    assert len(seen) == len(direct)
    for got, want in zip(seen, direct, strict=True):
        assert _equal_items(got, want)


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("plane", D.PLANES)
def test_slice_splits_are_disjoint_blocks_with_gaps(plane):
    pos = D.slice_positions(plane)
    sets = {k: set(v) for k, v in pos.items()}
    for k in D.SPLITS:
        assert len(sets[k]) >= 8, (plane, k)
    gap = min(v for name, v in D.SPLIT_CYCLE if name is None)
    for a in D.SPLITS:
        for b in D.SPLITS:
            if a < b:
                assert not sets[a] & sets[b]
                closest = min(abs(x - y) for x in sets[a] for y in sets[b])
                assert closest > gap, (plane, a, b, closest)
    # The held-out blocks are spread over the brain, not bunched at one end.
    everything = sorted(sets["train"] | sets["val"] | sets["test"])
    span = everything[-1] - everything[0]
    for k in ("val", "test"):
        assert max(sets[k]) - min(sets[k]) >= span / 2, (plane, k)


def test_slice_datasets_of_different_splits_share_no_slice():
    seen = {}
    for split in D.SPLITS:
        ds = SlicePairs(size=32, split=split)
        assert len(ds) == len(ds.positions)
        seen[split] = {tuple(p) for p in ds.positions}
        assert {tuple(ds[i]["position"].tolist()) for i in (0, len(ds) - 1)} <= seen[split]
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_crop_splits_draw_from_disjoint_seeds():
    items = {s: Crops3D(size=(12, 12, 8), split=s, length=3) for s in D.SPLITS}
    seeds = {s: {tuple(ds._seeds(i)) for i in range(3)} for s, ds in items.items()}
    assert not seeds["train"] & seeds["val"] and not seeds["val"] & seeds["test"]
    for i in range(3):
        a, b = items["train"][i], items["val"][i]
        assert not torch.equal(a["ddf"], b["ddf"])


def test_length_spreads_or_cycles_over_the_positions():
    full = SlicePairs(size=32, planes=("coronal",), split="val")
    n = len(full)
    short = SlicePairs(size=32, planes=("coronal",), split="val", length=3)
    picked = [short.positions[i * n // 3] for i in range(3)]
    assert [tuple(short[i]["position"].tolist()) for i in range(3)] == picked
    long = SlicePairs(size=32, planes=("coronal",), split="val", length=2 * n)
    a, b = long[1], long[n + 1]
    assert torch.equal(a["position"], b["position"]) and torch.equal(a["fixed"], b["fixed"])
    assert not torch.equal(a["ddf"], b["ddf"])  # same slice, another warp


# --------------------------------------------------------------------------- the answer


@pytest.mark.parametrize("kind", ["bspline", "svf"])
def test_slice_ddf_brings_the_moving_anatomy_onto_the_fixed(kind):
    ds = SlicePairs("t2", size=64, warp=kind, split="test", max_displacement=9.0)
    for i in (0, 7, 20):
        item = ds[i]
        before = _mean_dice(item["moving_labels"], item["fixed_labels"])
        after = _mean_dice(_warped_labels(item), item["fixed_labels"])
        assert after >= 0.85 and after >= before + 0.1, (i, before, after)
        # The T2 contrast of the fixed anatomy, from the fixed labels: the warped T2 image
        # matches it better than the unwarped one.
        c = torch.tensor([0.0] + [T2_INTENSITY[k] for k in ("csf", "gm", "wm")])
        target = c[item["fixed_labels"]]
        warped = warp(item["moving"][None], item["ddf"][None])[0]
        assert _ncc(warped, target) >= _ncc(item["moving"], target) + 0.05


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("kind", ["svf", "bspline"])
def test_crop_ddf_brings_the_moving_anatomy_onto_the_fixed(kind):
    ds = Crops3D("us", size=(40, 40, 32), warp=kind, split="val", max_displacement=8.0,
                 length=2)
    for i in range(2):
        item = ds[i]
        before = _mean_dice(item["moving_labels"], item["fixed_labels"])
        after = _mean_dice(_warped_labels(item), item["fixed_labels"])
        assert after >= 0.8 and after >= before + 0.1, (i, before, after)


def test_bspline_smoothness_does_not_depend_on_the_grid_size():
    # Control points every 40 mm whatever the extent: a small grid is not folded.
    for size in [(8, 8, 8), (12, 40), (192, 192)]:
        b = D.bspline_displacement(size, max_displacement=D.BSPLINE_MAX_DISPLACEMENT,
                                   spacing=(1.0,) * len(size), seed=1)[0].double()
        grads = torch.stack([torch.stack(torch.gradient(c)) for c in b])
        worst = torch.linalg.matrix_norm(grads.movedim((0, 1), (-2, -1)), ord=2).max()
        assert float(worst) <= 0.9, (size, float(worst))
        D.invert_displacement(b[None].float())  # converges


def test_bspline_field_matches_scipy_basis():
    size, spacing = (33, 50), (2.0, 1.0)
    b = D.bspline_displacement(size, max_displacement=5.0, spacing=spacing,
                               control_spacing=20.0, seed=4)
    # The same field from SciPy's cubic B-spline basis elements and the same draws.
    k = [math.ceil((n - 1) * h / 20.0) for n, h in zip(size, spacing, strict=True)]
    assert k == [4, 3]
    g = torch.Generator().manual_seed(4)
    coeff = (torch.rand(2, k[0] + 3, k[1] + 3, generator=g, dtype=torch.float64) * 2 - 1).numpy()
    basis = []
    for n, kk, h in zip(size, k, spacing, strict=True):
        t = np.arange(n) * h / 20.0  # control points every 20 mm from the first voxel
        cols = [interpolate.BSpline.basis_element(np.arange(j - 1, j + 4) - 2.0,
                                                  extrapolate=False)(t) for j in range(kk + 3)]
        basis.append(np.nan_to_num(np.stack(cols, 1)))
    dense = np.einsum("cij,xi,yj->cxy", coeff, basis[0], basis[1])
    mm = dense * 5.0 / np.sqrt((dense ** 2).sum(0)).max()
    expect = mm / np.asarray(spacing)[:, None, None]
    assert np.abs(b[0].double().numpy() - expect).max() <= 1e-5
    largest = float((b[0] * torch.tensor(spacing).view(2, 1, 1)).square().sum(0).sqrt().max())
    assert largest == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize("size", [(96, 80), (40, 36, 32)])
def test_inverse_displacement_against_scipy(size):
    ndim = len(size)
    b = D.bspline_displacement(size, max_displacement=6.0, spacing=(1.0,) * ndim, seed=2)
    u = D.invert_displacement(b)
    # x + u(x) + b(x + u(x)) = x, b sampled by SciPy in float64 (linear).
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij")).astype(np.float64)
    where = grid + u[0].double().numpy()
    b_at = np.stack([ndimage.map_coordinates(b[0, c].double().numpy(), where, order=1,
                                             mode="nearest") for c in range(ndim)])
    residual = np.abs(u[0].double().numpy() + b_at)
    inner = residual[(slice(None),) + (slice(8, -8),) * ndim]
    assert inner.max() <= 2e-3
    assert float(u.abs().max()) >= 3.0  # not a trivially small field


# --------------------------------------------------------------------------- augmentation


def test_augmented_items_keep_the_answer():
    plain = SlicePairs("t2", size=64, split="train", augment=False, max_displacement=9.0)
    aug = SlicePairs("t2", size=64, split="train", max_displacement=9.0)
    assert aug.augment and not plain.augment
    changed = 0
    for i in (1, 4, 9, 30):
        p, a = plain[i], aug[i]
        changed += not torch.equal(p["fixed"], a["fixed"])
        dice_p = _mean_dice(_warped_labels(p), p["fixed_labels"])
        dice_a = _mean_dice(_warped_labels(a), a["fixed_labels"])
        before = _mean_dice(a["moving_labels"], a["fixed_labels"])
        # Rotations resample the labels once more (nearest): a little Dice is lost on
        # 3 mm pixels, the answer is kept.
        assert dice_a >= dice_p - 0.04 and dice_a >= before + 0.03, (i, dice_p, dice_a, before)
        agree = (a["mask"] == (a["fixed_labels"] > 0)).float().mean()
        assert float(agree) >= 0.99
    assert changed == 4


def test_crop_augmentation_keeps_the_answer():
    plain = Crops3D("t2", size=(32, 32, 24), augment=False, length=2, max_displacement=8.0)
    aug = Crops3D("t2", size=(32, 32, 24), augment=True, length=2, max_displacement=8.0)
    for i in range(2):
        a = aug[i]
        dice_a = _mean_dice(_warped_labels(a), a["fixed_labels"])
        dice_p = _mean_dice(_warped_labels(plain[i]), plain[i]["fixed_labels"])
        assert dice_a >= dice_p - 0.05, (i, dice_p, dice_a)


@pytest.mark.parametrize("flips, angles", [((True, False), (0.0,)), ((False, True), (0.0,)),
                                           ((False, False), (90.0,)),
                                           ((True, True), (-35.0,))])
def test_augment_turns_the_displacement_vectors(flips, angles):
    item = SlicePairs("t2", size=64, split="val", max_displacement=10.0, warp="svf")[5]
    out = D.augment(item, flips=flips, angles=angles)
    good = _mean_dice(_warped_labels(out), out["fixed_labels"])
    # The same resampling of the field without turning its vectors breaks the answer.
    lin = _linear_part(flips, angles, item["spacing"])
    unturned = torch.einsum("ij,j...->i...", torch.linalg.inv(lin).float(), out["ddf"])
    bad = _mean_dice(_warped_labels(out, unturned), out["fixed_labels"])
    assert good >= 0.85 and good >= bad + 0.08, (good, bad)


def _linear_part(flips, angles, spacing):
    h = np.asarray(spacing.tolist())
    f = np.diag([-1.0 if x else 1.0 for x in flips])
    r = D._rotation([math.radians(a) for a in angles])
    return torch.from_numpy(np.diag(1 / h) @ r @ np.diag(h) @ f)


def test_augment_is_consistent_on_an_anisotropic_grid():
    # A synthetic item whose answer is exact: fixed = warp(moving, ddf) on a 1 × 2 mm grid.
    size = (64, 40)
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size],
                                   indexing="ij"))
    moving = (torch.sin(x[0] / 5) * torch.cos(x[1] / 3) + 1)[None]
    ddf = torch.stack([2 * torch.sin(x[1] / 9), 1.5 * torch.cos(x[0] / 11)])
    fixed = warp(moving[None], ddf[None])[0]
    lab = torch.zeros(1, *size, dtype=torch.int64)
    item = {"fixed": fixed, "moving": moving, "fixed_labels": lab, "moving_labels": lab,
            "mask": lab > 0, "ddf": ddf, "spacing": torch.tensor([1.0, 2.0]), "index": 0,
            "position": torch.zeros(2, dtype=torch.int64)}
    out = D.augment(item, flips=(True, False), angles=(25.0,))
    inner = (slice(None), slice(16, -16), slice(10, -10))
    err = (warp(out["moving"][None], out["ddf"][None])[0] - out["fixed"])[inner].abs().max()
    assert float(err) <= 0.05
    # Turning the vectors as in voxel space (ignoring the spacing) is measurably wrong.
    lin_mm = _linear_part((True, False), (25.0,), torch.tensor([1.0, 1.0]))
    lin_vox = _linear_part((True, False), (25.0,), item["spacing"])
    wrong = torch.einsum("ij,j...->i...", (lin_mm @ torch.linalg.inv(lin_vox)).float(),
                         out["ddf"])
    err_wrong = (warp(out["moving"][None], wrong[None])[0] - out["fixed"])[inner].abs().max()
    assert float(err_wrong) >= 4 * float(err)


def test_flipping_twice_gives_the_item_back():
    item = Crops3D(size=(12, 10, 8), split="val", length=1)[0]
    once = D.augment(item, flips=(True, False, True), angles=(0.0, 0.0, 0.0))
    assert torch.equal(once["ddf"][0], -item["ddf"][0].flip(0, 2))
    assert torch.equal(once["ddf"][1], item["ddf"][1].flip(0, 2))
    twice = D.augment(once, flips=(True, False, True), angles=(0.0, 0.0, 0.0))
    assert _equal_items(twice, item)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"modality": "ct"}, ValueError, "modality"),
    ({"split": "training"}, ValueError, "split"),
    ({"warp": "affine"}, ValueError, "warp"),
    ({"size": 4}, ValueError, "size"),
    ({"size": (32,)}, ValueError, "size"),
    ({"size": (32, 32, 32)}, ValueError, "size"),
    ({"size": 32.5}, ValueError, "size"),
    ({"size": (32, "a")}, TypeError, "size"),
    ({"planes": ()}, ValueError, "planes"),
    ({"planes": "axial"}, ValueError, "planes"),
    ({"planes": ("axial", "top")}, ValueError, "planes"),
    ({"planes": ("axial", "axial")}, ValueError, "planes"),
    ({"max_displacement": -1.0}, ValueError, "max_displacement"),
    ({"max_displacement": float("nan")}, ValueError, "max_displacement"),
    ({"max_displacement": 16.0}, ValueError, "max_displacement must be <= 15"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"augment": "yes"}, TypeError, "augment"),
    ({"length": 0}, ValueError, "length"),
])
def test_slice_pairs_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        SlicePairs(**kwargs)


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"modality": "US"}, ValueError, "modality"),
    ({"size": (32, 32)}, ValueError, "size"),
    ({"size": 32}, ValueError, "size"),
    ({"size": (32, 32, 4)}, ValueError, "size"),
    ({"warp": None}, ValueError, "warp"),
    ({"split": "all"}, ValueError, "split"),
    ({"length": -3}, ValueError, "length"),
])
def test_crops_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        Crops3D(**kwargs)


def test_inverting_a_folding_field_fails_loudly():
    b = D.bspline_displacement((32, 32), max_displacement=40.0, spacing=(1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match="could not be inverted"):
        D.invert_displacement(b)


def test_bad_index_and_augment_arguments():
    ds = Crops3D(size=(8, 8, 8), split="val", length=2)
    with pytest.raises(IndexError, match="index 2"):
        ds[2]
    with pytest.raises(IndexError, match="index -1"):
        ds[-1]
    with pytest.raises(TypeError, match="index"):
        ds[1.0]
    item = ds[0]
    with pytest.raises(ValueError, match="flips"):
        D.augment(item, flips=(True,), angles=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="angles"):
        D.augment(item, flips=(True, True, True), angles=(0.0,))
