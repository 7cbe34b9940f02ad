"""Table 1 shows label accuracy where an attack recovered its labels (issue 19, App. F): under
label disguise the recovered labels are wrong, and the table must say how often."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipelines import report_tables as tables
from tasks.cells import expand
from tasks.spec import parse_spec

SPEC: dict[str, Any] = {
    "name": "disguise",
    "data": {"dataset": "synthetic", "num_batches": 2},
    "victim": {"arch": "lenet"},
    "methods": [{"name": "gi-x", "params": {"labels": "yin"}}],
    "defenses": [{"kind": "none"}, {"kind": "disguise", "k": [1]}],
    "batch_sizes": [2],
}


def _rows(recovered: bool) -> pd.DataFrame:
    rows = []
    for cell in expand(parse_spec(SPEC)).inversion_cells:
        k = cell.gradient.defense.level
        accuracy = 1.0 if k == 0 else k / 2  # the batch's labels the attack had right
        for image in range(2):
            rows.append({
                **cell.metric_axes(), "gradient_id": cell.gradient.id, "seed": cell.seed,
                "image_index": image, "psnr": 10.0 + image, "ssim": 0.1, "lpips": 0.4,
                "label_accuracy": accuracy, "status": "ok",
                **{f"best_{m}_in_batch": image == 1 for m in ("psnr", "ssim", "lpips")},
                "tm_labels": "recovered:yin" if recovered else "given",
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_recovered_labels_add_one_label_accuracy_row_per_setting() -> None:
    text = tables.table1(_rows(recovered=True)).text
    rows = text.xs("label accuracy ↑ avg", level=1)
    assert list(rows.index) == ["disguise 1, B=2", "none, B=2"]
    assert [v.split()[0] for v in rows.iloc[:, 0]] == ["0.50", "1.00"]
    assert not any("label accuracy ↑ best" in r for r in text.index.get_level_values(1))
    # one configuration, one column: the disguise level is a setting, not part of the label
    assert list(text.columns) == ["gi-x [paper labels=yin]"]


def test_given_labels_show_no_label_accuracy_row() -> None:
    text = tables.table1(_rows(recovered=False)).text
    assert not any("label accuracy" in r for r in text.index.get_level_values(1))
