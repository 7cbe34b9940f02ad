"""Tables from a run's committed metrics (a Table-1-style pivot; figures come later)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from storage.run import RunDir
from storage.zarr_store import read_gradient, read_reconstruction

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


# Part files per method above which the tables step compacts them first: reading 10^4 loose
# parts takes ~8 s, one compact file 0.2 s (docs/results/storage.md). Small runs keep their
# per-cell part files (easiest to inspect; a deleted part is a cell to redo).
COMPACT_FROM_PARTS = 1000


def write_tables(run: RunDir) -> Path:
    """reports/table.md, table.csv and reconstructions.png; returns the markdown path."""
    run.compact(min_parts=COMPACT_FROM_PARTS)
    df = run.metrics()
    table = summary(df)
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(run.reports_dir / "table.csv", index=False)
    path = run.reports_dir / "table.md"
    path.write_text(markdown(table))
    if not df.empty:
        write_figure(run, df, run.reports_dir / "reconstructions.png")
    return path


def write_figure(run: RunDir, df: pd.DataFrame, path: Path) -> None:
    """Ground truth vs every committed reconstruction of the grid's first batch (smallest B,
    batch 0, first seed): one row per method x defense level, one column per image."""
    first = df[
        (df["batch_size"] == df["batch_size"].min())
        & (df["batch_index"] == 0)
        & (df["seed"] == df["seed"].min())
    ]
    cells = first.drop_duplicates("cell_id").sort_values(["method", "defense", "defense_level"])
    truth = read_gradient(run.gradient_path(cells["gradient_id"].iloc[0])).images
    rows = [("ground truth", truth)] + [
        (
            f"{c.method}\n{c.defense} {c.defense_level:g}",
            read_reconstruction(run.reconstruction_path(c.cell_id)).images,
        )
        for c in cells.itertuples()
    ]
    _image_grid(rows, path)


def _image_grid(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = rows[0][1].shape[0]
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.4 * n_cols + 1, 1.4 * len(rows)), squeeze=False
    )
    for r, (label, images) in enumerate(rows):  # images: (B, C, H, W) in [0, 1]
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(np.clip(images[c].transpose(1, 2, 0), 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
