"""The report's R-GAP figures (Jeon et al. 2021, App. C), from the metrics column
`layer_errors` (the relative error ‖x̂_i − x_i‖ / ‖x_i‖ of each victim layer's recovered input,
layer 0 = the victim's input; tasks.work.inversion):

- Figure A1, error per layer: the mean error at every layer, one line per method (R-GAP,
  R-GAP+G) and defense, one panel per victim; the layers R-GAP+G leaves to its prior are
  where the two differ.
- Figure A2, error accumulation with depth: R-GAP's error against the number of layers the
  recursion has inverted from the top (1 = the last layer's input), one line per defense level
  and victim: how an error made high up grows on the way down.

Both are None for a run without `layer_errors` (no R-GAP cell).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import aggregate as ag
from pipelines.report_figures import _figure, _save

FLOOR = 1e-12  # an exact recovery plotted on a log axis


def layer_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell's configuration, victim, defense, layer): mean, min, max error and
    the number of images, over the committed ok rows that carry `layer_errors`."""
    if "layer_errors" not in df.columns:
        return pd.DataFrame()
    rows = df[df["layer_errors"].notna() & (df["status"] == "ok")]
    if rows.empty:
        return pd.DataFrame()
    config = ag.config_columns(df)
    long = [
        {
            "method": r["method"],
            "label": ag.label_of({k: r[k] for k in config}),
            "victim": _victim(r),
            "defense": _defense(r),
            "layer": i,
            "error": e,
        }
        for r in rows.to_dict("records")
        for i, e in enumerate(json.loads(r["layer_errors"]))
    ]
    table = pd.DataFrame(long).groupby(["method", "label", "victim", "defense", "layer"])
    return table["error"].agg(["mean", "min", "max", "count"]).reset_index()


def _victim(row: dict[str, object]) -> str:
    width = row.get("victim_width")
    return f"{row['victim']} w={int(width)}" if pd.notna(width) else str(row["victim"])  # type: ignore[call-overload]


def _defense(row: dict[str, object]) -> str:
    if row["defense"] == "none":
        return "none"
    return f"{row['defense']} {row['defense_level']:g}"


_STYLES = {"none": "-", 0: "--", 1: ":", 2: "-."}  # defense level -> line style


def fig_a1(df: pd.DataFrame, path: Path) -> Path | None:
    """Figure A1: mean error of each layer's recovered input, R-GAP vs R-GAP+G: colour by
    method, line style by defense."""
    table = layer_table(df)
    if table.empty:
        return None
    victims = sorted(table["victim"].unique())
    methods = sorted(table["label"].unique())
    defenses = sorted(table["defense"].unique(), key=lambda d: (d != "none", d))
    fig = _figure(4.0 * len(victims) + 0.4, 4.4)
    axes = fig.subplots(1, len(victims), squeeze=False)[0]
    for ax, victim in zip(axes, victims, strict=True):
        part = table[table["victim"] == victim]
        for (label, defense), line in part.groupby(["label", "defense"]):
            m, d = methods.index(label), defenses.index(defense)
            ax.plot(
                line["layer"],
                line["mean"].clip(lower=FLOOR),
                _STYLES.get(defense if defense == "none" else d % 3, "-"),
                color=f"C{m}",
                marker="os^D"[m % 4],
                markersize=7 - 2 * m,
                label=f"{line['method'].iloc[0]}, {defense}",
            )
        _axes(ax, victim, "layer (0 = the victim's input)")
        ax.set_xticks(sorted(part["layer"].unique()))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7)
    return _save(fig, path)


def fig_a2(df: pd.DataFrame, path: Path) -> Path | None:
    """Figure A2: R-GAP's error against the number of layers inverted from the top."""
    table = layer_table(df)
    table = table[table["method"] == "rgap"] if not table.empty else table
    if table.empty:
        return None
    fig = _figure(5.0, 3.8)
    ax = fig.subplots()
    for (victim, defense), line in table.groupby(["victim", "defense"]):
        depth = int(line["layer"].max()) + 1 - line["layer"]  # 1 = the top layer's input
        order = np.argsort(depth.to_numpy())
        ax.plot(
            depth.to_numpy()[order],
            line["mean"].clip(lower=FLOOR).to_numpy()[order],
            marker="o",
            label=f"{victim}, {defense}",
        )
        ax.set_xticks(sorted(depth.unique()))
    _axes(ax, "R-GAP: error accumulation", "layers inverted from the top (last = the input)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _axes(ax: object, title: str, xlabel: str) -> None:
    ax.set_yscale("log")  # type: ignore[attr-defined]
    ax.set_xlabel(xlabel)  # type: ignore[attr-defined]
    ax.set_ylabel("relative error ‖x̂ − x‖ / ‖x‖")  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]
    ax.grid(alpha=0.3, which="both")  # type: ignore[attr-defined]


def figures(df: pd.DataFrame) -> list[tuple[str, str, str, Callable[[Path], Path | None]]]:
    """(title, file, caption, draw) of the R-GAP figures, as pipelines.report lists them."""
    return [
        (
            "Figure A1 (App. C): R-GAP error per layer",
            "rgap_a1.png",
            "mean relative error of each victim layer's recovered input, over the gradients",
            functools.partial(fig_a1, df),
        ),
        (
            "Figure A2 (App. C): R-GAP error accumulation with depth",
            "rgap_a2.png",
            "R-GAP's mean error against the layers its recursion has inverted from the top",
            functools.partial(fig_a2, df),
        ),
    ]
