"""GIML report: Figure 6b (PSNR vs meta step next to the baselines), paired differences at the
last step, Appendix G loss curves, and the snapshots' sample grids (Figure 6a, first row).

Reads only committed cells of the evaluation grids (one run directory per generator label);
statistics come from pipelines.aggregate (unit = one batch attack, bootstrap CIs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.aggregate import paired, summary
from storage.atomic import publishing, write_bytes_atomic
from storage.generator_snapshots import grid_image_path, snapshot_steps
from storage.run import RunDir, open_run

WRONG, UNTRAINED = "wrong-prior", "untrained"


def step_of(label: str) -> int | None:
    """'giml-00040' -> 40; None for the baselines."""
    return int(label.split("-")[1]) if label.startswith("giml-") else None


def collect(labels: dict[str, str]) -> pd.DataFrame:
    """Every committed metrics row of every evaluation grid, with a `prior` column."""
    frames = []
    for label, path in labels.items():
        df = open_run(path).metrics()
        frames.append(df.assign(prior=label))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def psnr_table(df: pd.DataFrame) -> pd.DataFrame:
    table = summary(df, by=["prior", "method"], metrics=("psnr",))
    table["step"] = table["prior"].map(step_of)
    return table.sort_values(["method", "step", "prior"], na_position="last")


def paired_rows(df: pd.DataFrame) -> list[tuple[str, object]]:
    """GIML at its last evaluated step against the baselines and against its own step 0."""
    steps = sorted(s for s in map(step_of, df["prior"].unique()) if s is not None)
    if not steps:
        return []
    last, first = f"giml-{steps[-1]:05d}", f"giml-{steps[0]:05d}"
    pairs = [
        (f"GIML GI-z/w ({last}) − wrong-prior GI-z/w", (last, "gi-z/w"), (WRONG, "gi-z/w")),
        (f"GIML GI-z/w ({last}) − untrained GI-w", (last, "gi-z/w"), (UNTRAINED, "gi-w")),
        (f"GIML GI-z ({last}) − wrong-prior GI-z", (last, "gi-z"), (WRONG, "gi-z")),
        (f"GIML GI-z/w ({last}) − GIML GI-z/w ({first})", (last, "gi-z/w"), (first, "gi-z/w")),
        (f"GIML GI-z ({last}) − GIML GI-z ({first})", (last, "gi-z"), (first, "gi-z")),
    ]
    present = set(zip(df["prior"], df["method"], strict=True))
    return [
        (name, paired(df, {"prior": a[0], "method": a[1]}, {"prior": b[0], "method": b[1]}))
        for name, a, b in pairs
        if a in present and b in present and a != b
    ]


def write_giml_report(run: RunDir, labels: dict[str, str]) -> Path:
    """reports/giml.md + giml_psnr.png + appendix_g_curves.png; returns the markdown path."""
    df = collect(labels)
    table = psnr_table(df)
    lines = [
        "# GIML evaluation (Figure 6b)",
        "",
        f"Run: `{run.root}`",
        "",
        "| generator | method | PSNR mean | 95 % CI | batches | images |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['prior']} | {r['method']} | {r['mean']:.2f} | "
            f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['n']} | {r['images']} |"
        )
    lines += [
        "",
        "## Paired differences (same gradients and seeds; unit = batch)",
        "",
        "| comparison | mean ΔPSNR | 95 % CI | Wilcoxon p | batches |",
        "|---|---|---|---|---|",
    ]
    for name, res in paired_rows(df):
        d = res.as_dict()  # type: ignore[attr-defined]
        lines.append(
            f"| {name} | {d['mean_diff']:+.2f} | [{d['ci_low']:+.2f}, "
            f"{d['ci_high']:+.2f}] | {d['p_wilcoxon']:.3f} | {d['n']} |"
        )
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    plot_psnr(table, run.report_file("giml_psnr.png"))
    plot_curves(labels, run.report_file("appendix_g_curves.png"))
    lines += [
        "",
        "![PSNR vs meta step](giml_psnr.png)",
        "",
        "![Appendix G loss curves](appendix_g_curves.png)",
        "",
        "## Sample grids",
        "",
    ]
    for step in snapshot_steps(run.root):
        rel = Path("..") / grid_image_path(run.root, step).relative_to(run.root)
        lines.append(f"- step {step}: ![step {step}]({rel})")
    path = run.report_file("giml.md")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_psnr(table: pd.DataFrame, path: Path) -> None:
    """PSNR (95 % CI) of GIML's GI-z and GI-z/w against meta step; baselines as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"gi-z": "tab:blue", "gi-z/w": "tab:red", "gi-w": "tab:gray"}
    giml = table[table["step"].notna()].sort_values("step")
    for method, rows in giml.groupby("method"):
        c = colors.get(str(method), "k")
        ax.plot(rows["step"], rows["mean"], "o-", color=c, label=f"GIML {method}")
        ax.fill_between(rows["step"], rows["ci_low"], rows["ci_high"], color=c, alpha=0.15)
    for (prior, method), style in (
        ((WRONG, "gi-z"), "--"),
        ((WRONG, "gi-z/w"), "--"),
        ((UNTRAINED, "gi-w"), ":"),
    ):
        row = table[(table["prior"] == prior) & (table["method"] == method)]
        if len(row):
            ax.axhline(
                float(row["mean"].iloc[0]),
                ls=style,
                color=colors.get(method, "k"),
                label=f"{prior} {method}",
            )
    ax.set_xlabel("meta step")
    ax.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with publishing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def curve_means(run_dir: str, method: str) -> pd.DataFrame:
    """Mean over cells of the best restart's cost at each iteration of `method`."""
    curves = open_run(run_dir).curves()
    curves = curves[curves["method"] == method]
    if curves.empty:
        return curves
    best = curves.groupby(["cell_id", "iteration"])["cost"].min().reset_index()
    return best.groupby("iteration")["cost"].mean().reset_index()


def plot_curves(labels: dict[str, str], path: Path) -> None:
    """Appendix G (Figure A4): GIAS loss from the GIML generator (last step), from the wrong
    prior, and GI-w from an untrained generator."""
    plt = _pyplot()
    steps = sorted(s for s in map(step_of, labels) if s is not None)
    wanted = [(f"giml-{steps[-1]:05d}", "gi-z/w")] if steps else []
    wanted += [(WRONG, "gi-z/w"), (UNTRAINED, "gi-w")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, method in wanted:
        if label not in labels:
            continue
        mean = curve_means(labels[label], method)
        if len(mean):
            ax.plot(mean["iteration"], np.maximum(mean["cost"], 1e-6), label=f"{label} {method}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient-matching cost (best restart, mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with publishing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
