"""Budgets in the report (issue 16): what each configuration spent, and quality versus budget.

    budget_table(df)              one row per configuration and setting: stage iterations,
                                  restarts, victim gradient evaluations, matched-budget request
                                  and its priced seconds, measured attack seconds
    budget_points(run, df)        PSNR of every committed cell at each stored snapshot
                                  (storage.snapshots) and at its end, against the gradient
                                  evaluations and the seconds spent up to there
    quality_vs_budget(run, df, p) the curves of every configuration from that one run

The curves evaluate the stored snapshots, so they come from one run at no extra attack cost.
At a snapshot the restart an attacker would keep is the one with the lowest cost at the
nearest loss-curve point at or before it (the final choice uses the final cost the same way).
Gradient evaluations at global iteration i = i x restarts (tasks.cells.budget_columns); seconds
at i = i x the cell's measured seconds per iteration. A run without snapshots has only loss
curves: its figure shows the cost against gradient evaluations and PSNR at the budgets run,
and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from gi_core.metrics import psnr  # noqa: E402
from pipelines import aggregate as ag  # noqa: E402
from storage.run import RunDir  # noqa: E402
from storage.zarr_store import read_gradient, read_reconstruction  # noqa: E402

BUDGET_COLUMNS = {
    "budget_stage_iterations": "iterations per stage",
    "budget_restarts": "restarts",
    "budget_grad_evals": "victim gradient evaluations",
    "budget_match": "matched by",
    "budget_match_value": "matched value",
    "budget_priced_seconds": "priced s (cost table)",
    "wall_seconds": "measured attack s (mean)",
}


def budget_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (and setting block where there are several)."""
    df = ag.identify(df)
    if df.empty or "budget_grad_evals" not in df.columns:
        return pd.DataFrame()
    cells = df.drop_duplicates("cell_id")
    setting = ag.setting_columns(df)
    keys = [*setting, ag.COLUMN]
    present = [c for c in BUDGET_COLUMNS if c in cells.columns]
    first = cells.groupby(keys, dropna=False, sort=True)[present].first()
    if "wall_seconds" in present:
        first["wall_seconds"] = cells.groupby(keys, dropna=False, sort=True)["wall_seconds"].mean()
    out = first.reset_index().rename(columns={ag.COLUMN: "configuration", **BUDGET_COLUMNS})
    return out.drop(columns=[c for c in setting if out[c].nunique(dropna=False) <= 1])


def budget_markdown(df: pd.DataFrame) -> str:
    table = budget_table(df)
    if table.empty:
        return ""
    shown = table.map(_text)
    head = "| " + " | ".join(map(str, shown.columns)) + " |"
    lines = [head, "|" + "---|" * shown.shape[1]]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(["Budgets (one iteration = one victim gradient per restart):", "", *lines, ""])


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str) and value.startswith("{"):
        return ", ".join(f"{k} {v}" for k, v in json.loads(value).items())
    return str(value)


def budget_points(run: RunDir, df: pd.DataFrame) -> pd.DataFrame:
    """Columns: configuration, cell_id, gradient_id, seed, iteration, grad_evals, seconds, psnr,
    snapshot (False for the end point)."""
    df = ag.identify(df)
    cells = df[df["status"].eq("ok")].drop_duplicates("cell_id")
    curves = run.curves(set(cells["cell_id"]))
    rows = []
    for c in cells.to_dict("records"):
        rec = read_reconstruction(run.reconstruction_path(c["cell_id"]))
        restarts = int(rec.restart_costs.shape[0])
        per_it = float(c["wall_seconds"]) / max(1, int(c["iterations"]))
        base = {k: c[k] for k in (ag.COLUMN, "cell_id", "gradient_id", "seed")}
        if rec.snapshots is not None and rec.snapshot_iterations is not None:
            truth = torch.from_numpy(read_gradient(run.gradient_path(c["gradient_id"])).images)
            curve = curves[curves["cell_id"] == c["cell_id"]]
            for k, it in enumerate(rec.snapshot_iterations.tolist()):
                if it >= rec.iterations:
                    continue
                images = rec.snapshots[k, _kept_restart(curve, it)]
                rows.append({**base, "iteration": it, "grad_evals": it * restarts,
                             "seconds": it * per_it, "snapshot": True,
                             "psnr": float(psnr(torch.from_numpy(images), truth).mean())})
        rows.append({**base, "iteration": rec.iterations, "grad_evals": rec.iterations * restarts,
                     "seconds": float(c["wall_seconds"]), "snapshot": False,
                     "psnr": float(df.loc[df["cell_id"] == c["cell_id"], "psnr"].mean())})
    return pd.DataFrame(rows)


def _kept_restart(curve: pd.DataFrame, iteration: int) -> int:
    """The restart with the lowest cost at the last loss-curve point at or before `iteration`."""
    before = curve[(curve["iteration"] <= iteration) & np.isfinite(curve["cost"])]
    if before.empty:
        return 0
    last = before[before["iteration"] == before["iteration"].max()]
    return int(last.sort_values("cost")["restart"].iloc[0])


def quality_vs_budget(run: RunDir, df: pd.DataFrame, path: Path) -> Path | None:
    """Mean PSNR over batches x seeds against gradient evaluations and seconds, one line per
    configuration; without snapshots, the loss curves against gradient evaluations instead."""
    points = budget_points(run, df)
    if points.empty:
        return None
    has_snapshots = bool(points["snapshot"].any())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in points.groupby(ag.COLUMN, sort=True):
        mean = rows.groupby("iteration")[["grad_evals", "seconds", "psnr"]].mean()
        if has_snapshots:
            left.plot(mean["grad_evals"], mean["psnr"], marker="o", label=_wrap(str(label)))
        else:
            _cost_curve(run, df, str(label), left)
        right.plot(mean["seconds"], mean["psnr"], marker="o", label=_wrap(str(label)))
    left.set_xlabel("victim gradient evaluations (iterations × restarts)")
    left.set_ylabel("PSNR (dB)" if has_snapshots else "gradient-matching cost (chosen restart)")
    left.set_title("quality vs gradient evaluations" if has_snapshots
                   else "no snapshots stored: cost vs gradient evaluations")
    right.set_xlabel("attack seconds (measured)")
    right.set_ylabel("PSNR (dB)")
    right.set_title("quality vs seconds" + ("" if has_snapshots else " (end points only)"))
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels overlap
        ax.grid(alpha=0.3)
    right.legend(fontsize=6, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cost_curve(run: RunDir, df: pd.DataFrame, label: str, ax: plt.Axes) -> None:
    cells = ag.identify(df)
    ids = set(cells.loc[cells[ag.COLUMN] == label, "cell_id"])
    curves = run.curves(ids)
    restarts = curves.groupby("cell_id")["restart"].nunique()
    best = curves.groupby(["cell_id", "iteration"])["cost"].min().reset_index()
    best["grad_evals"] = best["iteration"] * best["cell_id"].map(restarts)
    mean = best.groupby("grad_evals")["cost"].mean()
    ax.plot(mean.index, mean.to_numpy(), label=_wrap(label))


def _wrap(label: str) -> str:
    return label.replace(" · ", "\n")
