"""Issue 20: the bit-for-bit comparison behind `gi-eval verify --recompute`, the choice of cells,
and the report's schedule sentence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gi_core.errors import ConfigError
from pipelines.recompute import choose_cells
from pipelines.report import schedule_sentence
from storage.verify import array_difference, row_differences


def test_arrays_compare_bit_for_bit() -> None:
    a = np.array([0.5, np.nan, 1.0], dtype=np.float32)
    assert array_difference("images", a, a.copy()) is None  # NaN equals the same NaN
    assert array_difference("images", a, np.array([0.5, np.nan, 1.0 + 1e-7], np.float32)) == (
        "images: 1 value(s) differ (max |delta| 1.19e-07)"
    )
    assert array_difference("x", np.array([0.0]), np.array([-0.0])) is not None  # sign bit
    assert "shape/dtype" in str(array_difference("x", a, a.astype(np.float64)))


def test_rows_compare_every_metric_in_image_order() -> None:
    rows = pd.DataFrame({
        "image_index": [0, 1], "sample_index": [4, 9], "label": [1, 2], "label_accuracy": 1.0,
        "psnr": [12.5, 13.0], "ssim": 0.3, "lpips": 0.4, "best_psnr_in_batch": [False, True],
        "best_ssim_in_batch": True, "best_lpips_in_batch": True, "final_cost": 0.1,
        "status": "ok", "iterations": 6, "wall_seconds": [1.0, 2.0],
    })  # fmt: skip
    shuffled = rows.iloc[::-1].assign(wall_seconds=9.0)  # order and wall time do not matter
    assert row_differences(rows, shuffled) == []
    changed = rows.assign(psnr=[12.5, 13.5], status=["ok", "diverged"])
    assert row_differences(rows, changed) == [
        "psnr: 1 value(s) differ (max |delta| 0.5)", "status: 1 value(s) differ"
    ]
    assert row_differences(rows, rows.iloc[:1]) == ["rows: 2 stored, 1 recomputed"]


def test_cells_are_drawn_reproducibly_or_named() -> None:
    committed = [f"c{i}" for i in range(10)]
    drawn = choose_cells(committed, 3, [], seed=0)
    assert len(set(drawn)) == 3 and drawn == choose_cells(committed, 3, [], seed=0)
    assert choose_cells(committed, 0, ["c2", "c2", "c1"], seed=0) == ["c2", "c1"]
    with pytest.raises(ConfigError, match="--cells: nope is not a committed cell"):
        choose_cells(committed, 0, ["nope"], seed=0)
    with pytest.raises(ConfigError, match=r"--recompute: asks for 11 cells.*give 1\.\.10"):
        choose_cells(committed, 11, [], seed=0)


def test_the_report_says_how_many_cells_were_resumed_or_regrouped() -> None:
    df = pd.DataFrame({
        "cell_id": ["a", "a", "b", "c"], "attempts": [1, 1, 2, 3],
        "resumed_from_iteration": [None, None, 40, None], "threads": [1, 1, 1, 2],
    })  # fmt: skip
    assert schedule_sentence(df) == (
        "1 of 3 cells resumed from a checkpoint and 2 ran in a later attempt, i.e. regrouped "
        "into a new job (neither changes a result: docs/decisions/101); torch threads 1, 2"
    )
    assert schedule_sentence(df.drop(columns="attempts")) is None  # a run from before #20
