"""What a report's numbers support, and what they do not (issue 16, Deliver 8; the guide's "a
results page states what its numbers support"). Written from the tested comparisons and the
rows themselves, so it is regenerated with the page and cannot drift from the table:

- supported: a comparison of interest whose Holm-adjusted p is below ALPHA, in the direction of
  its mean paired difference;
- not supported either way: tested, Holm p >= ALPHA (no evidence of a difference; not evidence
  of equality);
- not tested: below the minimum n (aggregate.MIN_N);
- outside the numbers: the scope the rows actually span (data, victims, batch sizes, defenses,
  budgets, how values were tuned), so a reader does not generalise past it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pipelines import aggregate as ag
from pipelines.report_tables import DIGITS, METRIC_LABELS, setting_label

ALPHA = 0.05
CLAIM_METRICS: tuple[str, ...] = ("psnr", "lpips")  # SSIM stays in the tables


def claims_markdown(tested: pd.DataFrame | None, df: pd.DataFrame, baseline: str | None) -> str:
    """The '## What these numbers support' section of a report or results page."""
    lines = ["## What these numbers support", ""]
    if tested is None or tested.empty:
        lines.append(
            "No comparison of interest was tested (no `baseline:` in the spec, or the "
            "baseline shared no gradient with another configuration): the tables describe, "
            "they do not compare."
        )
    else:
        lines += _tested_lines(tested, baseline)
    lines += ["", "**Outside what these numbers show:**", ""]
    lines += [f"- {s}" for s in scope_statements(df)]
    return "\n".join(lines) + "\n"


def _tested_lines(tested: pd.DataFrame, baseline: str | None) -> list[str]:
    setting = [c for c in tested.columns if c in ag.SETTING_AXES or c in ag.EXTRA_SETTING_AXES]
    rows = tested[tested["metric"].isin(CLAIM_METRICS)].to_dict("records")
    supported = [r for r in rows if _p(r) < ALPHA]
    open_ = [r for r in rows if _p(r) >= ALPHA]
    untested = [r for r in rows if pd.isna(_p(r))]
    out = [
        f"Against the baseline `{baseline}`, paired on identical gradients and seeds, "
        f"Wilcoxon signed-rank, Holm-adjusted over every tested comparison (α = {ALPHA}); "
        "PSNR and LPIPS (SSIM is in the tables):",
        "",
        f"**Supported** ({len(supported)} of {len(rows)}):",
        "",
        *(_claim(r, setting) for r in supported),
        *(["- none"] if not supported else []),
        "",
        f"**Not supported either way** (Holm p ≥ {ALPHA}; no evidence of a difference, "
        f"which is not evidence of equality; {len(open_)}):",
        "",
        *(_claim(r, setting) for r in open_),
        *(["- none"] if not open_ else []),
    ]
    if untested:
        out += ["", f"**Not tested** (n < {ag.MIN_N}; {len(untested)}):", ""]
        out += [_claim(r, setting) for r in untested]
    return out


def _p(r: dict) -> float:
    return float(r.get("p_holm", r["p_wilcoxon"]))


def _claim(r: dict, setting: Sequence[str]) -> str:
    metric, diff = r["metric"], float(r["mean_diff"])
    d = DIGITS.get(metric, 3)
    better = diff > 0 if ag.higher_is_better(metric) else diff < 0
    where = setting_label(r, setting) if setting else "all cells"
    ci = f" [{r['ci_low']:+.{d}f}, {r['ci_high']:+.{d}f}]" if pd.notna(r.get("ci_low")) else ""
    p = f", Holm p = {_p(r):.3g}" if pd.notna(_p(r)) else ""
    verb = "better than" if better else "worse than"
    if pd.isna(_p(r)) or _p(r) >= ALPHA:
        verb = "vs"
    return (
        f"- {where}: `{r['a']}` {verb} `{r['b']}`: {METRIC_LABELS.get(metric, metric)} "
        f"{diff:+.{d}f}{ci}{p}, n = {r['n']}"
    )


def scope_statements(df: pd.DataFrame) -> list[str]:
    """What the rows span; every conclusion above is conditional on it."""
    out = [
        f"Data: {_values(df, 'dataset')} at {_values(df, 'image_size')} px; batch sizes "
        f"{_values(df, 'batch_size')}; defenses {_defenses(df)}; "
        f"{df['gradient_id'].nunique() if 'gradient_id' in df else '?'} gradients, seeds "
        f"{_values(df, 'seed')}. Other data, image sizes, batch sizes or defenses are not "
        "covered.",
        f"Victims: {_victims(df)}. One victim initialisation is one draw: variation across "
        "victims (and across training) is not sampled, so the tests generalise over batches, "
        "not over victims.",
        _budget_statement(df),
    ]
    # paper presets carry an empty `tuned_on`: only a non-empty mark says values were tuned
    if "param_tuned_on" in df and df["param_tuned_on"].fillna("").astype(str).ne("").any():
        out.append(
            "Tuned values were chosen with the ground truth of held-out batches "
            "(evaluator-side tuning, docs/tuning.md): they show how strong a method can be "
            "made, not what an attacker without ground truth would pick."
        )
    out.append(
        "Pairs not involving the baseline are exploratory only (paired.csv: uncorrected for "
        "multiplicity)."
    )
    return out


def _values(df: pd.DataFrame, column: str) -> str:
    if column not in df:
        return "?"
    values = sorted(df[column].dropna().unique().tolist(), key=str)
    return ", ".join(str(v) for v in values) or "?"


def _defenses(df: pd.DataFrame) -> str:
    if "defense" not in df:
        return "?"
    pairs = df[["defense", "defense_level"]].drop_duplicates().itertuples(index=False)
    return ", ".join(d if d == "none" else f"{d} {lvl:g}" for d, lvl in sorted(pairs))


def _victims(df: pd.DataFrame) -> str:
    cols = [c for c in ("victim", "victim_width", "victim_seed") if c in df]
    if not cols:
        return "?"
    rows = df[cols].drop_duplicates().to_dict("records")
    checkpoints = [c for c in df.columns if c.endswith("victim.checkpoint")]
    trained = any(df[c].notna().any() for c in checkpoints)
    state = "some trained" if trained else "untrained (random initialisation)"
    return (
        "; ".join(
            f"{r['victim']} width {r.get('victim_width')} seed {r.get('victim_seed')}" for r in rows
        )
        + f", {state}"
    )


def _budget_statement(df: pd.DataFrame) -> str:
    if "budget_match" in df and df["budget_match"].notna().any():
        matched = df[["budget_match", "budget_match_value"]].dropna().drop_duplicates()
        text = "; ".join(f"{m} = {v:g}" for m, v in matched.itertuples(index=False))
        return (
            f"Budget: matched per cell ({text}). A method that converges later could rank "
            "differently at a larger budget: the quality-versus-budget figure shows how far "
            "each curve was from flat."
        )
    if "budget_grad_evals" in df:
        spread = df.groupby("method")["budget_grad_evals"].agg(["min", "max"])
        text = "; ".join(f"{m} {lo}-{hi}" for m, (lo, hi) in spread.iterrows())
        return (
            f"Budget: NOT matched; victim gradient evaluations per cell by method: {text}. "
            "Differences between methods may be differences of budget."
        )
    return "Budget: not recorded in these rows."
