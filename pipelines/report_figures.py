"""The paper's figures from a run directory (matplotlib, Agg backend, PNG).

    fig3_curves.png   cost vs iteration of every method on one gradient (Figure 3, left)
    fig3_strip.png    ground truth and each method's images at the snapshot iterations
    fig4a.png         batch-average vs best-in-batch PSNR per configuration (Figure 4a)
    fig5_<axis>.png   PSNR vs batch size / sparsity p / noise σ with 95 % CI bands (Figure 5)
    grid_best.png, grid_worst.png   ground truth vs every configuration on the batch that was
                      reconstructed best / worst (mean PSNR over configurations)

Each function returns the path it wrote, or None when the run has nothing to show for it
(e.g. no sparsity axis, no snapshots).

Readability at any number of configurations (decision 152): a configuration label longer than
ALIAS_MAX characters is shown as a short alias (`gi-x #1`) and spelled out in a legend under the
figure; row labels are horizontal, image grids put the ground truth next to every method and
wrap into blocks of at most GRID_COLUMNS configurations, and every figure uses matplotlib's
constrained layout, which makes room for titles, labels and legends instead of squeezing them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
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
ALIAS_MAX = 16  # longer configuration labels get an alias (fits a 1.15-inch column at 7 pt)
GRID_COLUMNS = 6  # configurations per block of an image grid (each block repeats the truth)
LEGEND_PT = 6.5  # legend font size; monospace glyphs are 0.6 em wide


def _save(fig: Figure, path: Path) -> Path:
    # constrained layout (set at creation) has placed every label; "tight" keeps the legend
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path


def _figure(width: float, height: float) -> Figure:
    return plt.figure(figsize=(width, height), layout="constrained")


def aliases(labels: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Display alias of each distinct label (the label itself when it is short) and the legend
    lines that spell out the aliased ones, e.g. 'gi-x #1 = gi-x [tuned 2x iterations]'."""
    out: dict[str, str] = {}
    legend: list[str] = []
    counts: dict[str, int] = {}
    for label in dict.fromkeys(labels):
        if len(label) <= ALIAS_MAX:
            out[label] = label
            continue
        method = label.split(" ")[0][: ALIAS_MAX - 4]
        counts[method] = counts.get(method, 0) + 1
        out[label] = f"{method} #{counts[method]}"
        legend.append(f"{out[label]} = {label}")
    return out, legend


def _add_legend(fig: Figure, lines: Sequence[str]) -> None:
    """The alias legend under the figure, wrapped to the figure's width (constrained layout
    reserves its height: it is the figure's supxlabel)."""
    if not lines:
        return
    chars = max(30, int(fig.get_figwidth() * 72 / (0.6 * LEGEND_PT)) - 4)
    wrapped = [textwrap.fill(line, chars, subsequent_indent="    ") for line in lines]
    fig.supxlabel("\n".join(wrapped), x=0.0, ha="left", fontsize=LEGEND_PT, family="monospace")


def _configs(df: pd.DataFrame) -> list[dict[str, Any]]:
    cols = ag.config_columns(df)
    return df[cols].drop_duplicates().sort_values(cols).to_dict("records")


def _label(df: pd.DataFrame, row: dict[str, Any]) -> str:
    """The configuration label of a full metrics row (only its configuration columns count:
    e.g. the prior's checkpoint hash only where it tells configurations apart)."""
    return ag.label_of({k: row[k] for k in ag.config_columns(df)})


def _df_aliases(df: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """Aliases of every configuration in the run, so that all figures use the same ones."""
    return aliases(sorted(_label(df, r) for r in _configs(df)))


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
    short, legend = _df_aliases(df)
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    for c in cells.to_dict("records"):
        curve = _chosen_restart(curves[curves["cell_id"] == c["cell_id"]])
        if curve.empty:
            continue
        label = short[_label(df, c)]
        (line,) = ax.plot(curve["iteration"], curve["cost"], label=label, lw=1.4)
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
    # beside the axes, never over the curves, however many configurations there are
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    _add_legend(fig, legend)
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
    short, legend = _df_aliases(df)
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
        rows.append((short[_label(df, c)], frames))
    if not rows:
        return None
    return _save(strip_figure(rows, truth, legend), path)


Frames = list[tuple[str, np.ndarray]]


def strip_figure(
    rows: Sequence[tuple[str, Frames]], truth: np.ndarray, legend: Sequence[str]
) -> Figure:
    """rows: (row label, [(frame title, image (C, H, W))]); the truth ends every row. Row
    labels are horizontal (rotated ones overlapped each other at 10 configurations)."""
    width = max(len(f) for _, f in rows) + 1
    fig = _figure(1.15 * width + 1.4, 1.15 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), width, squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for k in range(width):
            ax = axes[r][k]
            if k < len(frames):
                _show(ax, frames[k][1], frames[k][0] if r == 0 or k == len(frames) - 1 else "")
            elif k == width - 1:
                _show(ax, truth, "ground truth" if r == 0 else "")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    _add_legend(fig, legend)
    return fig


def _show(ax: Any, image: np.ndarray, title: str) -> None:
    """image: (C, H, W) in [0, 1]; grey images have C = 1."""
    img = np.clip(np.asarray(image).transpose(1, 2, 0), 0, 1)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
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
    short, legend = _df_aliases(df)
    panels = [(b, avg[avg["batch_size"] == b], best[best["batch_size"] == b]) for b in sizes]
    bars = [([short[_label(df, r)] for r in a.to_dict("records")], a, s) for _, a, s in panels]
    fig = bars_figure([f"B = {b}" for b in sizes], bars, legend)
    return _save(fig, path)


Bars = tuple[list[str], pd.DataFrame, pd.DataFrame]


def bars_figure(titles: Sequence[str], panels: Sequence[Bars], legend: Sequence[str]) -> Figure:
    """One panel per title: (labels, average rows, best rows) with mean/ci_low/ci_high. Panels
    widen with the number of bars and labels stand upright, so the axes keep their height."""
    n = max(len(labels) for labels, _, _ in panels)
    chars = max(len(t) for labels, _, _ in panels for t in labels)
    # the height grows by what the upright labels and the legend take, not out of the axes
    fig = _figure((0.32 * n + 1.4) * len(panels) + 0.6, 3.6 + 0.07 * chars + 0.12 * len(legend))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, title, (labels, a, s) in zip(axes[0], titles, panels, strict=True):
        x = np.arange(len(labels))
        for offset, rows, name in ((-0.2, a, "average"), (0.2, s, "best in batch")):
            ax.bar(
                x + offset, rows["mean"], width=0.4, label=name, yerr=_error_bars(rows), capsize=3
            )
        upright = len(labels) > 3 or max(len(t) for t in labels) > 8
        ax.set_xticks(x, labels, rotation=90 if upright else 0, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Figure 4a: average vs best-in-batch PSNR", fontsize=9)
    _add_legend(fig, legend)
    return fig


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
    fig = _figure(3.6 * len(panels) + 2.2, 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    styles = _line_styles(table, ag.config_columns(df))
    short, legend = _df_aliases(df)
    for ax, b in zip(axes[0], panels, strict=True):
        rows = table if b is None else table[table["batch_size"] == b]
        for config, line in rows.groupby(ag.config_columns(df), sort=True, dropna=False):
            line = line.sort_values(x)
            label = short[
                ag.label_of(dict(zip(ag.config_columns(df), _tuple(config), strict=True)))
            ]
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
    # beside the last panel, never over the lines
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(f"Figure 5: PSNR vs {xlabel} (95 % CI bands)", fontsize=9)
    _add_legend(fig, legend)
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


GRID_ROWS = 8  # images shown per configuration


@dataclass(frozen=True)
class Column:
    """One configuration in an image grid: its title and one image (C, H, W) per row (None:
    not committed) with a caption each (the image's PSNR)."""

    title: str
    images: list[np.ndarray | None]
    captions: list[str]


def _column(run: RunDir, ok: pd.DataFrame, cell_id: str, title: str, n: int) -> Column:
    images = read_reconstruction(run.reconstruction_path(cell_id)).images[:n]
    psnr = ok[ok["cell_id"] == cell_id].drop_duplicates("image_index").sort_values("image_index")
    captions = [f"{v:.1f} dB" for v in psnr["psnr"].to_numpy()[:n]]
    return Column(title, list(images), captions + [""] * (len(images) - len(captions)))


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
    truth = read_gradient(run.gradient_path(gradient_id)).images[:GRID_ROWS]
    short, legend = _df_aliases(df)
    columns = [
        _column(run, ok, c["cell_id"], short[_label(df, c)], len(truth))
        for c in cells.to_dict("records")
    ]
    first = cells.iloc[0]
    title = (
        f"{'worst' if worst else 'best'} batch: {first['defense']} "
        f"{first['defense_level']:g}, B={first['batch_size']}, batch {first['batch_index']}"
    )
    return _save(grid_figure(list(truth), columns, title=title, legend=legend), path)


def first_batch_grid(run: RunDir, df: pd.DataFrame, path: Path) -> Path | None:
    """Ground truth next to every configuration x defense level on the grid's first images:
    smallest B, first seed, batches 0, 1, ... up to GRID_ROWS images (so that B = 1 still shows
    several faces). The report's reconstructions.png, the picture `gi-eval demo` points at."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    first = ok[ok["batch_size"] == ok["batch_size"].min()]
    first = first[first["seed"] == first["seed"].min()]
    size = int(first["batch_size"].iloc[0])
    batches = sorted(first["batch_index"].unique())[: max(1, GRID_ROWS // size)]
    first = first[first["batch_index"].isin(batches)].drop_duplicates("cell_id")
    gradients = first.drop_duplicates("batch_index").set_index("batch_index")["gradient_id"]
    truth = [
        image
        for b in batches
        for image in read_gradient(run.gradient_path(gradients[b])).images[:GRID_ROWS]
    ][:GRID_ROWS]
    short, legend = _df_aliases(df)
    keys = [*ag.config_columns(df), "defense", "defense_level"]
    columns = []
    for _, group in first.groupby(keys, sort=True, dropna=False):
        c = group.iloc[0]
        defense = (
            "no defense" if c["defense"] == "none" else f"{c['defense']} {c['defense_level']:g}"
        )
        title = f"{short[_label(df, c.to_dict())]}\n{defense}"
        images: list[np.ndarray | None] = []
        captions: list[str] = []
        for b in batches:
            cell = group[group["batch_index"] == b]
            part = (
                _column(run, ok, cell["cell_id"].iloc[0], title, size)
                if not cell.empty
                else Column(title, [None] * size, [""] * size)
            )
            images += part.images
            captions += part.captions
        columns.append(Column(title, images[: len(truth)], captions[: len(truth)]))
    batch_text = ", ".join(str(b) for b in batches)
    title = f"ground truth vs every method: B = {size}, batch {batch_text}, PSNR under each image"
    return _save(grid_figure(truth, columns, title=title, legend=legend), path)


def grid_figure(
    truth: Sequence[np.ndarray], columns: Sequence[Column], *, title: str, legend: Sequence[str]
) -> Figure:
    """A row per image, the ground truth first and then a column per configuration, wrapped
    into blocks of GRID_COLUMNS configurations (each block repeats the ground truth), so that
    the figure's width, and the room of every column title, is bounded at any count."""
    rows = len(truth)
    per = max(1, min(GRID_COLUMNS, len(columns)))
    blocks = -(-len(columns) // per) or 1
    fig = _figure(1.15 * (per + 1) + 0.3, blocks * (1.2 * rows + 0.6) + 0.5)
    axes = fig.subplots(blocks * rows, per + 1, squeeze=False)
    for blk in range(blocks):
        for r in range(rows):
            line = axes[blk * rows + r]
            _show(line[0], truth[r], "ground truth" if r == 0 else "")
            for k in range(per):
                idx = blk * per + k
                # a column may hold fewer images than the truth (an aggregate's cell stores its
                # clients' images, a FedSGD cell one client's): its cells stay empty there
                has = idx < len(columns) and r < len(columns[idx].images)
                image = columns[idx].images[r] if has else None
                if image is None:
                    line[k + 1].axis("off")
                    continue
                head = "\n".join(
                    textwrap.fill(t, ALIAS_MAX) for t in columns[idx].title.split("\n")
                )
                _show(line[k + 1], image, head if r == 0 else "")
                line[k + 1].set_xlabel(columns[idx].captions[r], fontsize=6, labelpad=1)
    fig.suptitle(title, fontsize=8)
    _add_legend(fig, legend)
    return fig
