"""The paper's figures from a run directory (matplotlib, Agg backend, PNG).

    fig3_curves.png   cost vs iteration of every method on one gradient (Figure 3, left)
    fig3_strip.png    ground truth and each method's images at the snapshot iterations
    fig4a.png         batch-average vs best-in-batch PSNR per configuration (Figure 4a)
    fig5_<axis>.png   PSNR vs batch size / sparsity p / noise σ with 95 % CI bands (Figure 5)
    grid_best.png, grid_worst.png   ground truth vs every configuration on the batch that was
                      reconstructed best / worst (mean PSNR over configurations)

Each function returns the path it wrote, or None when the run has nothing to show for it
(e.g. no sparsity axis, no snapshots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipelines import aggregate as ag  # noqa: E402
from storage.run import RunDir  # noqa: E402
from storage.zarr_store import read_gradient, read_reconstruction  # noqa: E402

FIG3_METHODS = ("gi-x", "gi-z", "gi-z/x", "gi-z/w")
DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _configs(df: pd.DataFrame) -> list[dict[str, Any]]:
    cols = ag.config_columns(df)
    return df[cols].drop_duplicates().sort_values(cols).to_dict("records")


def _label(df: pd.DataFrame, row: dict[str, Any]) -> str:
    """The configuration label of a full metrics row (only its configuration columns count:
    e.g. the prior's checkpoint hash only where it tells configurations apart)."""
    return ag.label_of({k: row[k] for k in ag.config_columns(df)})


def fig3_gradient(df: pd.DataFrame) -> str | None:
    """The gradient attacked by most configurations (ties: no defense, smallest B, first)."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    per = ok.groupby("gradient_id").agg(
        configs=("cell_id", "nunique"),
        undefended=("defense", lambda s: bool((s == "none").all())),
        batch=("batch_size", "min"),
        index=("batch_index", "min"),
    )
    per = per.sort_values(
        ["configs", "undefended", "batch", "index"], ascending=[False, False, True, True]
    )
    return str(per.index[0])


def fig3_cells(df: pd.DataFrame, gradient_id: str) -> pd.DataFrame:
    """One cell per configuration on `gradient_id` (first seed), Figure 3's methods first."""
    cells = df[(df["gradient_id"] == gradient_id) & (df["status"] == "ok")]
    cells = cells.sort_values("seed").drop_duplicates(ag.config_columns(df))
    order = {m: i for i, m in enumerate(FIG3_METHODS)}
    cells = cells.assign(_o=cells["method"].map(order).fillna(len(order)))
    return cells.sort_values(["_o", *ag.config_columns(df)]).drop_duplicates("cell_id")


def fig3_curves(run: RunDir, df: pd.DataFrame, path: Path) -> Path | None:
    """Cost of the chosen restart vs global iteration, one line per configuration."""
    gradient_id = fig3_gradient(df)
    if gradient_id is None:
        return None
    cells = fig3_cells(df, gradient_id)
    curves = run.curves(cells["cell_id"])
    if curves.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for c in cells.to_dict("records"):
        curve = _chosen_restart(curves[curves["cell_id"] == c["cell_id"]])
        if curve.empty:
            continue
        (line,) = ax.plot(curve["iteration"], curve["cost"], label=_label(df, c), lw=1.4)
        # dotted line where a later stage starts (e.g. GI-z/w switching from z to w)
        starts = curve.groupby("stage", sort=False)["iteration"].min().sort_values()
        for it in starts.iloc[1:]:
            ax.axvline(it, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cost c(x) (gradient distance + priors)")
    if (curves["cost"].dropna() > 0).all():
        ax.set_yscale("log")
    first = cells.iloc[0]
    ax.set_title(
        f"Figure 3: one gradient ({first['defense']}, B={first['batch_size']})", fontsize=9
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _chosen_restart(curve: pd.DataFrame) -> pd.DataFrame:
    """The restart with the lowest finite cost at the last point (the attack's choice)."""
    if curve.empty:
        return curve
    last = curve[curve["iteration"] == curve["iteration"].max()]
    last = last[np.isfinite(last["cost"])]
    restart = int(last.sort_values("cost")["restart"].iloc[0]) if not last.empty else 0
    return curve[curve["restart"] == restart].sort_values("iteration")


def fig3_strip(run: RunDir, df: pd.DataFrame, path: Path) -> Path | None:
    """Image evolution of the first image of the Figure 3 gradient: a row per configuration,
    a column per snapshot iteration, then the final image; the ground truth on the right."""
    gradient_id = fig3_gradient(df)
    if gradient_id is None:
        return None
    truth = read_gradient(run.gradient_path(gradient_id)).images[0]
    rows = []
    for c in fig3_cells(df, gradient_id).to_dict("records"):
        rec = read_reconstruction(run.reconstruction_path(c["cell_id"]))
        if rec.snapshots is None or rec.snapshot_iterations is None:
            continue
        restart = max(rec.best_restart, 0)
        frames = [
            (f"it {int(i)}", rec.snapshots[k, restart, 0])
            for k, i in enumerate(rec.snapshot_iterations)
            if int(i) < rec.iterations
        ]
        frames.append((f"final ({rec.iterations})", rec.images[0]))
        rows.append((_label(df, c).replace(" [", "\n["), frames))
    if not rows:
        return None
    width = max(len(f) for _, f in rows) + 1
    fig, axes = plt.subplots(
        len(rows), width, figsize=(1.2 * width + 0.8, 1.3 * len(rows)), squeeze=False
    )
    for r, (label, frames) in enumerate(rows):
        for k in range(width):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(frames):
                _show(ax, frames[k][1], frames[k][0] if r == 0 or k == len(frames) - 1 else "")
            elif k == width - 1:
                _show(ax, truth, "ground truth" if r == 0 else "")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, fontsize=7)
    return _save(fig, path)


def _show(ax: Any, image: np.ndarray, title: str) -> None:
    """image: (C, H, W) in [0, 1]; grey images have C = 1."""
    img = np.clip(np.asarray(image).transpose(1, 2, 0), 0, 1)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    if title:
        ax.set_title(title, fontsize=6)


def fig4a(df: pd.DataFrame, path: Path) -> Path | None:
    """Batch-average vs best-in-batch PSNR (95 % CI bars), one panel per batch size, on the
    undefended gradients (all gradients when there are none)."""
    part = df[df["defense"] == "none"] if (df["defense"] == "none").any() else df
    by = [*ag.config_columns(df), "batch_size"]
    avg = ag.summary(part, by, ["psnr"])
    best = ag.summary(part, by, ["psnr"], best_in_batch=True)
    # B = 1: the batch's best image is its only image, nothing to compare
    sizes = sorted(b for b in avg["batch_size"].unique() if b > 1)
    if avg.empty or not sizes:
        return None
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes) + 1, 3.4), squeeze=False)
    for ax, b in zip(axes[0], sizes, strict=True):
        a, s = avg[avg["batch_size"] == b], best[best["batch_size"] == b]
        labels = [_label(df, r) for r in a.to_dict("records")]
        x = np.arange(len(labels))
        for offset, rows, name in ((-0.2, a, "average"), (0.2, s, "best in batch")):
            ax.bar(
                x + offset, rows["mean"], width=0.4, label=name, yerr=_error_bars(rows), capsize=3
            )
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"B = {b}", fontsize=9)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Figure 4a: average vs best-in-batch PSNR", fontsize=9)
    return _save(fig, path)


def _error_bars(rows: pd.DataFrame) -> np.ndarray:
    low = (rows["mean"] - rows["ci_low"]).fillna(0).clip(lower=0)
    high = (rows["ci_high"] - rows["mean"]).fillna(0).clip(lower=0)
    return np.vstack([low.to_numpy(), high.to_numpy()])


FIG5_AXES = {
    "batch_size": ("batch size B", None),
    "sparsity": ("gradient sparsity p", "sparsity"),
    "noise": ("Gaussian noise σ", "noise"),
}


def fig5(df: pd.DataFrame, axis: str, path: Path) -> Path | None:
    """PSNR vs one defense axis, a line per configuration with its 95 % CI band. Undefended
    gradients count as p = 0 / σ = 0; batch size uses the undefended gradients only. None
    when the run has fewer than two values on the axis."""
    xlabel, defense = FIG5_AXES[axis]
    if defense is None:
        part, x = df[df["defense"] == "none"], "batch_size"
    else:
        part, x = df[df["defense"].isin(["none", defense])], "defense_level"
    if part[x].nunique() < 2 or (defense is not None and not (part["defense"] == defense).any()):
        return None
    by = [*ag.config_columns(df), x] + (["batch_size"] if x != "batch_size" else [])
    table = ag.summary(part, by, ["psnr"])
    panels = sorted(table["batch_size"].unique()) if x != "batch_size" else [None]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels) + 1, 3.4), squeeze=False, sharey=True
    )
    styles = _line_styles(table, ag.config_columns(df))
    for ax, b in zip(axes[0], panels, strict=True):
        rows = table if b is None else table[table["batch_size"] == b]
        for config, line in rows.groupby(ag.config_columns(df), sort=True, dropna=False):
            line = line.sort_values(x)
            label = ag.label_of(dict(zip(ag.config_columns(df), _tuple(config), strict=True)))
            color, dash = styles[_tuple(config)]
            ax.plot(line[x], line["mean"], marker="o", ms=3, label=label, color=color, ls=dash)
            ax.fill_between(line[x], line["ci_low"], line["ci_high"], alpha=0.15, color=color)
        if x == "batch_size":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        if b is not None:
            ax.set_title(f"B = {b}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Figure 5: PSNR vs {xlabel} (95 % CI bands)", fontsize=9)
    return _save(fig, path)


def _line_styles(table: pd.DataFrame, configs: list[str]) -> dict[tuple[Any, ...], tuple[str, str]]:
    """A colour per method and a dash per variant of it, so that variants with equal values
    (e.g. two presets that agree) stay visible as overlapping lines."""
    keys = [_tuple(k) for k, _ in table.groupby(configs, sort=True, dropna=False)]
    methods = list(dict.fromkeys(k[0] for k in keys))
    dashes = ("-", "--", ":", "-.")
    out, seen = {}, dict.fromkeys(methods, 0)
    for k in keys:
        out[k] = (f"C{methods.index(k[0]) % 10}", dashes[seen[k[0]] % len(dashes)])
        seen[k[0]] += 1
    return out


def _tuple(key: Any) -> tuple[Any, ...]:
    return key if isinstance(key, tuple) else (key,)


def image_grid(run: RunDir, df: pd.DataFrame, path: Path, *, worst: bool) -> Path | None:
    """Ground truth vs every configuration on the batch (gradient x seed) whose mean PSNR over
    the configurations that attacked it is the highest (or lowest)."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    per = ok.groupby("gradient_id").agg(psnr=("psnr", "mean"), configs=("cell_id", "nunique"))
    per = per[per["configs"] == per["configs"].max()].sort_values("psnr", ascending=worst)
    gradient_id = str(per.index[0])
    cells = ok[ok["gradient_id"] == gradient_id].sort_values("seed")
    cells = cells.drop_duplicates(ag.config_columns(df)).sort_values(ag.config_columns(df))
    truth = read_gradient(run.gradient_path(gradient_id)).images
    rows: list[tuple[str, np.ndarray]] = [("ground truth", truth)]
    for c in cells.to_dict("records"):
        psnr = ok.loc[ok["cell_id"] == c["cell_id"], "psnr"].mean()
        images = read_reconstruction(run.reconstruction_path(c["cell_id"])).images
        rows.append((f"{_label(df, c)}\n{psnr:.1f} dB", images))
    first = cells.iloc[0]
    title = (
        f"{'worst' if worst else 'best'} batch: {first['defense']} "
        f"{first['defense_level']:g}, B={first['batch_size']}, batch {first['batch_index']}"
    )
    return _grid(rows, path, title=title)


def first_batch_grid(run: RunDir, df: pd.DataFrame, path: Path) -> Path | None:
    """Ground truth vs every committed cell of the grid's first batch (smallest B, batch 0,
    first seed): one row per configuration x defense level (the report's reconstructions.png)."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    first = ok[(ok["batch_size"] == ok["batch_size"].min()) & (ok["batch_index"] == 0)]
    first = first[first["seed"] == first["seed"].min()]
    if first.empty:
        return None
    cells = first.drop_duplicates("cell_id").sort_values(
        [*ag.config_columns(df), "defense", "defense_level"]
    )
    truth = read_gradient(run.gradient_path(cells["gradient_id"].iloc[0])).images
    rows: list[tuple[str, np.ndarray]] = [("ground truth", truth)] + [
        (
            f"{_label(df, c)}\n{c['defense']} {c['defense_level']:g}",
            read_reconstruction(run.reconstruction_path(c["cell_id"])).images,
        )
        for c in cells.to_dict("records")
    ]
    return _grid(rows, path, title="first batch")


def _grid(rows: Sequence[tuple[str, np.ndarray]], path: Path, *, title: str) -> Path:
    """rows: (label, images (B, C, H, W) in [0, 1]); at most 8 images per row."""
    n_cols = min(8, rows[0][1].shape[0])
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.3 * n_cols + 1.2, 1.3 * len(rows)), squeeze=False
    )
    for r, (label, images) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            _show(ax, images[c], "")
        axes[r][0].set_ylabel(label, fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)
