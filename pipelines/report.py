"""Tables from a run's committed metrics (a Table-1-style pivot; figures come later)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from storage.run import RunDir

AXES = ["method", "defense", "defense_level", "batch_size"]
METRICS = ["psnr", "ssim", "lpips"]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over images, and best-in-batch means, per (method, defense, level, B)."""
    if df.empty:
        return pd.DataFrame()
    grouped = df.groupby(AXES, dropna=False)
    table = grouped[METRICS].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    best = df[df["best_psnr_in_batch"]].groupby(AXES, dropna=False)["psnr"].mean()
    table["psnr_best_in_batch"] = best
    table["images"] = grouped.size()
    table["diverged_cells"] = df[df["status"] == "diverged"].groupby(AXES)["cell_id"].nunique()
    return table.fillna({"diverged_cells": 0}).reset_index()


def markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no committed cells yet)\n"
    rows = [
        "| method | defense | level | B | PSNR | SSIM | LPIPS | best PSNR | images |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples(index=False):
        rows.append(
            f"| {r.method} | {r.defense} | {r.defense_level:g} | {r.batch_size} "
            f"| {r.psnr_mean:.2f} ± {_std(r.psnr_std, 2)} "
            f"| {r.ssim_mean:.3f} ± {_std(r.ssim_std, 3)} "
            f"| {r.lpips_mean:.3f} ± {_std(r.lpips_std, 3)} "
            f"| {r.psnr_best_in_batch:.2f} | {r.images} |"
        )
    return "\n".join(rows) + "\n"


def _std(value: float, digits: int) -> str:
    return "–" if pd.isna(value) else f"{value:.{digits}f}"


def write_tables(run: RunDir) -> Path:
    """reports/table.md and table.csv; returns the markdown path."""
    table = summary(run.metrics())
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(run.reports_dir / "table.csv", index=False)
    path = run.reports_dir / "table.md"
    path.write_text(markdown(table))
    return path
