"""Table 1 and the paired comparisons as pandas Stylers -> markdown, CSV, LaTeX and HTML.

Table 1 (the paper's layout): one column per configuration (method [variant]); rows PSNR ↑,
SSIM ↑, LPIPS ↓, each as the batch average and the best image in the batch, "mean [CI]" with the
95 % bootstrap CI over batches x seeds; the best configuration of each row in bold. Below them,
per configuration: batches x seeds used (n), diverged cells and failed cells — counted apart,
never averaged. A run with several settings (defense, level, batch size) gets one block each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.io.formats.style import Styler

from pipelines import aggregate as ag
from storage.layout import RunLayout

METRIC_LABELS = {
    "psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "label_accuracy": "label accuracy ↑",
}  # fmt: skip
DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3, "label_accuracy": 2}
PER_BATCH = frozenset({"label_accuracy"})  # one value per batch: no "best image" row
BOLD_CSS = "font-weight: bold"


@dataclass(frozen=True)
class Table:
    """Display strings, which of them are bold, and the numbers behind them (for CSV)."""

    text: pd.DataFrame  # index: (setting, row); columns: configuration labels
    bold: pd.DataFrame  # same shape, bool
    numbers: pd.DataFrame  # long form: the aggregate.summary rows


def setting_label(row: pd.Series | dict, setting: Sequence[str]) -> str:
    """'none, B=4' / 'sparsity 0.9, B=1'."""
    parts = []
    if "defense" in setting:
        level = row.get("defense_level")
        defense = str(row["defense"])
        parts.append(defense if defense == "none" else f"{defense} {level:g}")
    if "batch_size" in setting:
        parts.append(f"B={int(row['batch_size'])}")
    parts += [f"{a}={row[a]}" for a in setting if a in ag.EXTRA_SETTING_AXES]
    return ", ".join(parts) or "all"


def table1(df: pd.DataFrame, cells: pd.DataFrame | None = None, *, seed: int = 0) -> Table:
    """Table 1 of the committed metrics `df`; `cells` (run.cells()) adds the failed counts."""
    if df.empty:
        return Table(pd.DataFrame(), pd.DataFrame(), pd.DataFrame())
    df = ag.identify(df)
    by = ag.default_by(df)
    setting = [c for c in by if c not in ag.config_columns(df)]
    metrics = table_metrics(df)
    avg = ag.summary(df, by, metrics, seed=seed).assign(kind="avg")
    best = ag.summary(df, by, ag.METRICS, best_in_batch=True, seed=seed).assign(kind="best")
    numbers = pd.concat([avg, best], ignore_index=True)
    numbers["config"] = [ag.label_of(r) for r in numbers.to_dict("records")]
    numbers["setting"] = [setting_label(r, setting) for r in numbers.to_dict("records")]
    configs = list(dict.fromkeys(numbers.sort_values(ag.config_columns(df))["config"]))
    settings = list(dict.fromkeys(numbers.sort_values(setting)["setting"])) if setting else ["all"]
    text, bold = _blocks(numbers, configs, settings, _failed_counts(cells), metrics)
    return Table(text, bold, numbers)


def table_metrics(df: pd.DataFrame) -> tuple[str, ...]:
    """PSNR, SSIM and LPIPS; and label accuracy where some attack recovered its labels (issue
    19: under label disguise the attacker's labels are wrong, and the table must show it)."""
    recovered = "tm_labels" in df.columns and bool(
        df["tm_labels"].astype(str).str.startswith("recovered").any()
    )
    return (*ag.METRICS, "label_accuracy") if recovered else ag.METRICS


def _blocks(
    numbers: pd.DataFrame,
    configs: list[str],
    settings: list[str],
    failed: dict[str, int],
    metrics: Sequence[str] = ag.METRICS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    index, text_rows, bold_rows = [], [], []
    for s in settings:
        part = numbers[numbers["setting"] == s]
        # with one image per batch the best image is the batch: no separate "best" rows
        single = "batch_size" in part.columns and bool((part["batch_size"] == 1).all())
        for metric in metrics:
            for kind in ("avg",) if single or metric in PER_BATCH else ("avg", "best"):
                rows = part[(part["metric"] == metric) & (part["kind"] == kind)]
                by_config = rows.set_index("config")
                index.append((s, f"{METRIC_LABELS[metric]} {kind}"))
                text_rows.append([_cell(by_config, c, metric) for c in configs])
                bold_rows.append([bool(by_config["best"].get(c, False)) for c in configs])
        units = part[(part["metric"] == "psnr") & (part["kind"] == "avg")].set_index("config")
        for label, column in (("n (batches × seeds)", "n"), ("diverged cells", "diverged")):
            index.append((s, label))
            text_rows.append([_count(units, c, column) for c in configs])
            bold_rows.append([False] * len(configs))
    if failed:
        index.append(("all", "failed cells"))
        text_rows.append([str(failed.get(c.split(" [")[0], 0)) for c in configs])
        bold_rows.append([False] * len(configs))
    mi = pd.MultiIndex.from_tuples(index, names=["setting", ""])
    return (
        pd.DataFrame(text_rows, index=mi, columns=configs),
        pd.DataFrame(bold_rows, index=mi, columns=configs),
    )


def _cell(rows: pd.DataFrame, config: str, metric: str) -> str:
    if config not in rows.index or not np.isfinite(rows.at[config, "mean"]):
        return "–"
    d = DIGITS.get(metric, 3)
    r = rows.loc[config]
    if int(r["n"]) < ag.MIN_N:
        return f"{r['mean']:.{d}f} (no CI: n < {ag.MIN_N})"
    if not np.isfinite(r["ci_low"]):
        return f"{r['mean']:.{d}f}"
    return f"{r['mean']:.{d}f} [{r['ci_low']:.{d}f}, {r['ci_high']:.{d}f}]"


def _count(rows: pd.DataFrame, config: str, column: str) -> str:
    return str(int(rows.at[config, column])) if config in rows.index else "0"


def _failed_counts(cells: pd.DataFrame | None) -> dict[str, int]:
    if cells is None or cells.empty or "status" not in cells.columns:
        return {}
    failed = cells[cells["status"] == "failed"]
    return {str(k): int(v) for k, v in failed.groupby("method").size().items()}


def styler(table: Table) -> Styler:
    """The Styler every format is rendered from: best cells bold (CSS, converted for LaTeX)."""
    css = np.where(table.bold.to_numpy(), BOLD_CSS, "")
    return table.text.style.apply(lambda _: css, axis=None)


def to_markdown(text: pd.DataFrame, bold: pd.DataFrame | None = None, caption: str = "") -> str:
    """A GitHub pipe table of display strings; bold cells get **…**."""
    index_names = [n or "" for n in text.index.names]
    head = [*index_names, *map(str, text.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (key, row) in enumerate(text.iterrows()):
        keys = key if isinstance(key, tuple) else (key,)
        values = [
            f"**{v}**" if bold is not None and bool(bold.iloc[i, j]) else str(v)
            for j, v in enumerate(row)
        ]
        lines.append("| " + " | ".join([*map(str, keys), *values]) + " |")
    return (f"{caption}\n\n" if caption else "") + "\n".join(lines) + "\n"


def write_table1(
    table: Table, run: RunLayout, *, caption: str, note: str = ""
) -> dict[str, Path]:
    """table.md (+ `note` below it), table.tex (Styler LaTeX, booktabs rules, bold via
    \\bfseries), table.csv (the numbers in long form, CI bounds as columns)."""
    paths = {k: run.report_file(f"table.{k}") for k in ("md", "tex", "csv")}
    md = to_markdown(table.text, table.bold, caption)
    paths["md"].write_text(md + (f"\n{note}" if note else ""))
    paths["tex"].write_text(
        styler(table).to_latex(
            convert_css=True,
            hrules=True,
            caption=caption,
            multirow_align="t",
            column_format="ll" + "r" * table.text.shape[1],
        )
    )
    table.numbers.to_csv(paths["csv"], index=False)
    return paths


def paired_text(pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Display strings of aggregate.comparisons (or paired_table) rows; bold where the
    Holm-adjusted p (the raw p where there is none) is below 0.05. Rows below MIN_N units say
    so instead of a CI and a p."""
    if pairs.empty:
        return pd.DataFrame(), pd.DataFrame()
    setting = [c for c in pairs.columns if c in ag.SETTING_AXES or c in ag.EXTRA_SETTING_AXES]
    p_column = "p_holm" if "p_holm" in pairs.columns else "p_wilcoxon"
    rows = []
    for r in pairs.to_dict("records"):
        d = DIGITS.get(r["metric"], 3)
        rows.append(
            {
                "setting": setting_label(r, setting),
                "a − b": f"{r['a']} − {r['b']}",
                "metric": METRIC_LABELS.get(r["metric"], r["metric"]),
                "mean diff [95 % CI]": (
                    f"{r['mean_diff']:+.{d}f} [{r['ci_low']:+.{d}f}, {r['ci_high']:+.{d}f}]"
                    if np.isfinite(r["ci_low"])
                    else f"{r['mean_diff']:+.{d}f}" + (f" ({r['note']})" if r.get("note") else "")
                ),
                "Wilcoxon p": _p(r["p_wilcoxon"]),
                **({"Holm p": _p(r["p_holm"])} if "p_holm" in r else {}),
                "effect (rank-biserial)": _p(r.get("effect_size", float("nan")), "+.2f"),
                "n": str(r["n"]),
                "dropped": str(r["dropped"]),
            }
        )
    text = pd.DataFrame(rows)
    bold = pd.DataFrame(False, index=text.index, columns=text.columns)
    bold["Holm p" if p_column == "p_holm" else "Wilcoxon p"] = pairs[p_column].lt(0.05).to_numpy()
    return text, bold


def _p(value: float, spec: str = ".3g") -> str:
    return "–" if not np.isfinite(value) else format(value, spec)


def write_paired(
    pairs: pd.DataFrame, run: RunLayout, *, caption: str, tested: pd.DataFrame | None = None
) -> dict[str, Path]:
    """paired.csv: every pair (uncorrected; for exploration only). paired.md/.tex: the spec's
    comparisons of interest (`tested`, aggregate.comparisons), or a note that there are none."""
    paths = {k: run.report_file(f"paired.{k}") for k in ("md", "tex", "csv")}
    pairs.to_csv(paths["csv"], index=False)
    if tested is None:
        paths["md"].write_text(
            f"{caption}\n\nNo `baseline:` in the spec, so no comparison is tested. Every "
            "pair's paired difference is in paired.csv (uncorrected for multiplicity: "
            "exploration only).\n"
        )
        paths["tex"].write_text("")
        return paths
    tested.to_csv(run.report_file("comparisons.csv"), index=False)
    text, bold = paired_text(tested)
    if text.empty:
        paths["md"].write_text(
            f"{caption}\n\n(the baseline attacked no gradient another configuration did)\n"
        )
        paths["tex"].write_text("")
        return paths
    paths["md"].write_text(
        to_markdown(text.set_index("setting"), bold.drop(columns="setting"), caption)
    )
    css = np.where(bold.to_numpy(), BOLD_CSS, "")
    paths["tex"].write_text(
        text.style.apply(lambda _: css, axis=None)
        .hide(axis="index")
        .to_latex(convert_css=True, hrules=True, caption=caption)
    )
    return paths
