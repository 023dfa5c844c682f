"""mrus_models.anatomy_aware.table2 at a tiny size: its rows and columns, the same items for
every row, and the identity row against the metrics of a zero displacement computed here
independently (NumPy: overlaps, brute-force surface distances, endpoint error)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mrus_models.anatomy_aware.table2 import (
    COLUMNS,
    ROWS,
    held_out_items,
    main,
    pair_scores,
    run_table,
)

SIZE = (16, 16, 8)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the image counts)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded.copy()
    for axis in range(mask.ndim):
        for shift in (1, -1):
            inner &= np.roll(padded, shift, axis=axis)
    return mask & ~inner[1:-1, 1:-1, 1:-1]


def _asd(a: np.ndarray, r: np.ndarray, spacing: np.ndarray) -> float:
    """Symmetric average surface distance by brute force over all surface-voxel pairs."""
    if not a.any() or not r.any():
        return math.nan
    pa = np.argwhere(_surface(a)) * spacing
    pr = np.argwhere(_surface(r)) * spacing
    d = np.sqrt(((pa[:, None, :] - pr[None, :, :]) ** 2).sum(-1))
    return float((d.min(1).sum() + d.min(0).sum()) / (len(pa) + len(pr)))


def _identity_scores(item) -> dict[str, float]:
    moving = item["moving_labels"][0, 0].numpy()
    fixed = item["fixed_labels"][0, 0].numpy()
    spacing = item["spacing"][0].double().numpy()
    dices, ious, asds = [], [], []
    for value in (1, 2, 3):
        a, r = moving == value, fixed == value
        if r.any():
            dices.append(2.0 * (a & r).sum() / (a.sum() + r.sum()))
            ious.append((a & r).sum() / (a | r).sum())
        v = _asd(a, r, spacing)
        if not math.isnan(v):
            asds.append(v)
    truth = item["ddf"][0].double().numpy() * spacing[:, None, None, None]
    mask = item["mask"][0, 0].numpy().astype(bool)
    epe = float(np.sqrt((truth ** 2).sum(0))[mask].mean())
    return {"dice": float(np.mean(dices)), "iou": float(np.mean(ious)),
            "asd_mm": float(np.mean(asds)), "harmonic_energy": 0.0, "folding_fraction": 0.0,
            "epe_mm": epe}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("table2")
    result = run_table(out, size=SIZE, steps=2, test_n=2, train_items=2, acmt_steps=1,
                       register_iterations=(3, 2), tiny=True, progress=False,
                       log=lambda _: None)
    return out, result


def test_rows_and_columns(table):
    out, result = table
    assert list(result["rows"]) == list(ROWS)
    for name, row in result["rows"].items():
        assert list(row) == list(COLUMNS), name
        assert all(math.isfinite(v) for v in row.values()), (name, row)
        assert len(result["per_item"][name]) == 2
        assert 0 <= row["dice"] <= 1 and 0 <= row["iou"] <= row["dice"] + 1e-12
        assert 0 <= row["folding_fraction"] <= 1 and row["harmonic_energy"] >= 0
    # The learned rows moved something: their fields are not zero.
    for name in ROWS[1:]:
        assert result["rows"][name]["harmonic_energy"] > 0, name
    saved = json.loads((out / "table2.json").read_text())
    assert saved["rows"] == result["rows"]
    md = (out / "table2.md").read_text().splitlines()
    assert len(md) == 2 + len(ROWS) and "DSC" in md[0] and "EPE (mm)" in md[0]
    assert {"acmt", "voxelmorph", "anatomy_aware", "acmt_anatomy_aware"} <= {
        p.name for p in out.iterdir()}


def test_identity_row_is_a_zero_displacement_scored_independently(table):
    _, result = table
    items = held_out_items(SIZE, 2)
    want = [_identity_scores(it) for it in items]
    for got, exp in zip(result["per_item"]["identity"], want, strict=True):
        for c in COLUMNS:
            err = abs(got[c] - exp[c])
            assert err <= 1e-6 * max(1.0, abs(exp[c])), (c, got[c], exp[c])
    # The known warp scores an endpoint error of 0 and moves labels onto the fixed ones.
    item = items[0]
    truth = pair_scores(item["ddf"], item)
    assert truth["epe_mm"] <= 1e-6
    assert truth["dice"] > result["per_item"]["identity"][0]["dice"]


def test_checkpoints_are_reused_and_bad_arguments_refused(table, tmp_path, capsys):
    out, result = table
    again = run_table(out, size=SIZE, steps=2, test_n=2, train_items=2, acmt_steps=1,
                      register_iterations=(3, 2), tiny=True, progress=False,
                      rows=("voxelmorph", "anatomy_aware"), log=lambda _: None)
    for name in ("voxelmorph", "anatomy_aware"):
        assert again["rows"][name] == result["rows"][name]
    with pytest.raises(ValueError, match="holds a run at step 2, not 3"):
        run_table(out, size=SIZE, steps=3, test_n=1, tiny=True, progress=False,
                  rows=("voxelmorph",), log=lambda _: None)
    with pytest.raises(ValueError, match=r"size: expected three multiples of 4"):
        run_table(tmp_path, size=(16, 16, 6), rows=("identity",), log=lambda _: None)
    assert main(["--out", str(tmp_path / "t"), "--size", "16", "16", "8", "--test-items",
                 "40", "--rows", "identity"]) == 2
    assert "held_out_items: n (--test-items): expected 1..16, got 40" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "t"), "--size", "16", "16", "8", "--test-items", "1",
                 "--rows", "identity", "--quiet"]) == 0
    assert "| identity |" in capsys.readouterr().out
    assert torch.is_tensor(held_out_items(SIZE, 1)[0]["fixed"])
