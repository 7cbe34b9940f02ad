"""Statistics of a run's per-image metrics: the numbers behind every table and figure.

The unit of replication is one *batch attack*: a gradient cell x seed. Its value is the mean of
the metric over the batch's images (or the best-in-batch image's value), and bootstrap
confidence intervals resample these unit values, never single images (images of one batch are
not independent). Only cells with status ``ok`` and a finite metric enter a mean; diverged cells
are counted in their own column (``diverged``), so a failing method cannot hide behind NaN.

    summary(df)                              # mean, 95 % CI, n per method/variant x setting
    paired(df, {"method": "gi-z/w"}, {"method": "gi-x"})   # same gradients: diff, CI, Wilcoxon p

Configurations are grouped by ``method`` + ``variant`` (``method`` alone when the metrics have
no ``variant`` column) plus the setting axes ``defense``, ``defense_level``, ``batch_size``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips")
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "label_accuracy": True,
}
SETTING_AXES: tuple[str, ...] = ("defense", "defense_level", "batch_size")
UNIT: tuple[str, ...] = ("gradient_id", "seed")
CONFIDENCE = 0.95
N_RESAMPLES = 2000  # enough for a 95 % CI (Efron & Tibshirani); a report holds thousands
# Below this many units (batches x seeds) no CI and no test is shown (issue 16): a bootstrap of
# 2-4 values has no coverage to speak of, and a two-sided Wilcoxon test of n <= 5 pairs cannot
# reach p < 0.05 at all (its smallest p is 2 / 2^n = 0.0625 at n = 5).
MIN_N = 5
SUMMARY_COLUMNS = (
    "metric", "mean", "ci_low", "ci_high", "n", "images", "diverged", "best", "note",
)  # fmt: skip

Selector = Mapping[str, Any] | str


# Columns that also tell configurations apart (issue 8: two configurations never share a row).
# Prior columns belong to the method's configuration (a table column); the others are settings
# (a block of the table). Each is used only where it varies within `df`.
PRIOR_AXES: tuple[str, ...] = ("generator", "generator_checkpoint_sha256")
EXTRA_SETTING_AXES: tuple[str, ...] = (
    "defense_p", "defense_sigma", "defense_clip", "defense_bits",
    "dataset", "image_size", "data_seed", "batch_labels",
    "victim", "victim_width", "victim_seed", "victim_checkpoint_sha256",
    "victim_rounds", "victim_training",
)  # fmt: skip


def _varying(df: pd.DataFrame, axes: Sequence[str], *, within: Sequence[str] = ()) -> list[str]:
    """The axes of `axes` present in df that take more than one value (within a group)."""
    present = [a for a in axes if a in df.columns]
    if within:
        counts = df.groupby(list(within), dropna=False)[present].nunique(dropna=False)
        return [a for a in present if bool((counts[a] > 1).any())]
    return [a for a in present if df[a].nunique(dropna=False) > 1]


# --- one identity per configuration (issue 16, Deliver 1) -----------------------------------
CFG = "cfg."  # prefix of the flattened configuration columns
COLUMN = "configuration"  # a table column's label, unique per configuration within a setting
# Configuration keys that the named setting columns already show as table blocks (never in a
# column label): the defense and batch size, and the data set / victim axes that become blocks
# where they vary within a setting (EXTRA_SETTING_AXES).
SETTING_KEYS: dict[str, str] = {
    "cfg.gradient.defense.kind": "defense",
    "cfg.gradient.defense.p": "defense_p",
    "cfg.gradient.defense.sigma": "defense_sigma",
    "cfg.gradient.defense.clip": "defense_clip",
    "cfg.gradient.defense.bits": "defense_bits",
    "cfg.gradient.defense.k": "defense_level",  # disguise: k is its level (gi_core.defenses)
    "cfg.gradient.batch_labels": "batch_labels",  # how batches drew labels (decision 195)
    "cfg.gradient.batch_size": "batch_size",
    "cfg.gradient.dataset": "dataset",
    "cfg.gradient.image_size": "image_size",
    "cfg.gradient.shuffle_seed": "data_seed",
    "cfg.gradient.victim.arch": "victim",
    "cfg.gradient.victim.width": "victim_width",
    "cfg.gradient.victim.seed": "victim_seed",
    # a trained victim's stage (decision 270): its rounds, and its training's hyperparameters
    # (one block per training, so two trainings or two stages never share a table row)
    "cfg.gradient.victim.train.rounds": "victim_rounds",
    **{f"cfg.gradient.victim.train.{k}": "victim_training"
       for k in ("clients", "batch_size", "local_steps", "lr", "seed")},
}
# Row columns that are not configuration: repeats (batch, seed), ids, per-image values,
# measurements and provenance. Rows written before issue 16 have no `config`; their identity is
# every other column (a fallback that still never pools two configurations).
_NOT_IDENTITY = frozenset({
    "cell_id", "gradient_id", "batch_index", "seed", "config_id", "config",
    "image_index", "sample_index", "label", "label_accuracy", "psnr", "ssim", "lpips",
    "best_psnr_in_batch", "best_ssim_in_batch", "best_lpips_in_batch", "final_cost", "status",
    "iterations", "wall_seconds", "device", "slurm_job_id", "slurm_array_index", "host",
    "device_name", "gi_eval_version", "torch_version", "python_version", "git_commit",
    "dp_epsilon", "dp_delta", "budget_priced_seconds", "reason", "images", "victim_sha256",
})  # fmt: skip


def identify(df: pd.DataFrame) -> pd.DataFrame:
    """`df` plus the flattened configuration (cfg.<dotted key> columns, from each row's
    `config` JSON) and COLUMN, the label of its table column. Idempotent.

    COLUMN is unique per configuration less its setting keys within every setting block: two
    cells that differ in anything but their batch and seed never share a table column."""
    if df.empty or COLUMN in df.columns:
        return df
    out = df.reset_index(drop=True)
    texts = pd.Series(_config_texts(out), index=out.index)
    first = ~texts.duplicated()
    flat = pd.json_normalize([json.loads(t) for t in texts[first]], sep=".")
    flat = _with_protocol_text(flat.map(_cell_value).add_prefix(CFG))
    flat.index = texts[first].to_numpy()
    new = [c for c in flat.columns if c not in out.columns]
    per_config = pd.concat(
        [out.loc[first].set_index(texts[first].to_numpy()).drop(columns=new, errors="ignore"),
         flat[new]],
        axis=1,
    )
    labels = pd.Series(_labels(per_config, _label_keys(new)), index=per_config.index)
    out = pd.concat([out, flat[new].reindex(texts.to_numpy()).set_index(out.index)], axis=1)
    out[COLUMN] = labels.reindex(texts.to_numpy()).to_numpy()
    return out


def _label_keys(columns: list[str]) -> list[str]:
    """Configuration keys a column label may show: not the setting keys (blocks show them),
    nor the legacy fallback's method/variant/whole-config columns, nor the protocol's nested
    keys (PROTOCOL_COLUMN says it in one phrase)."""
    blocks = {CFG + a for a in (*SETTING_AXES, *EXTRA_SETTING_AXES, *PRIOR_AXES)}
    legacy = {f"{CFG}method", f"{CFG}variant", f"{CFG}method_params", f"{CFG}preset"}
    return [
        c
        for c in columns
        if c not in SETTING_KEYS
        and c not in blocks | legacy
        and not c.startswith(PROTOCOL_COLUMN + ".")
    ]


# The threat model's protocol in one phrase, derived from the nested protocol keys of the cells'
# gradient (decision 194): "fedsgd", "fedavg K=2 b=1 lr=0.1", "aggregate N=4".
PROTOCOL_COLUMN = CFG + "gradient.protocol"


def _with_protocol_text(flat: pd.DataFrame) -> pd.DataFrame:
    """`flat` plus PROTOCOL_COLUMN when any configuration names a protocol. A configuration
    without protocol keys is FedSGD: tasks.cells leaves the paper's protocol out of the id."""
    keys = [c for c in flat.columns if c.startswith(PROTOCOL_COLUMN + ".")]
    if not keys:
        return flat
    records = flat[keys].rename(columns=lambda c: c.removeprefix(PROTOCOL_COLUMN + "."))
    return flat.assign(**{PROTOCOL_COLUMN: [_protocol_text(r) for r in records.to_dict("records")]})


def _protocol_text(r: Mapping[str, Any]) -> str:
    def given(key: str) -> Any:
        v = r.get(key)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    kind = given("kind") or "fedsgd"
    steps = given("local.local_steps")
    local = ""
    if steps is not None:
        size = given("local.local_batch_size")
        lr = float(given("local.local_lr") or 0.1)
        local = f"K={int(steps)} b={'B' if size is None else int(size)} lr={lr:g}"
    if kind == "fedavg":
        return f"fedavg {local}"
    if kind == "aggregate":
        n = f"aggregate N={int(given('n_clients') or 1)}"
        return f"{n} of fedavg {local}" if local else n
    return str(kind)


def _config_texts(df: pd.DataFrame) -> list[str]:
    """Each row's configuration JSON: its `config` column, else (old rows) its other columns."""
    texts = (
        df["config"].where(df["config"].map(lambda c: isinstance(c, str)), None)
        if "config" in df.columns
        else pd.Series(None, index=df.index, dtype=object)
    )
    missing = texts.isna()
    if missing.any():
        legacy_cols = sorted(
            c for c in df.columns if c not in _NOT_IDENTITY and not c.startswith(CFG)
        )
        texts[missing] = [
            json.dumps({c: _json_value(v) for c, v in r.items()}, sort_keys=True)
            for r in df.loc[missing, legacy_cols].to_dict("records")
        ]
    return texts.tolist()


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _cell_value(v: Any) -> Any:
    # lists (normalize means, prune fractions, channels) become hashable, readable text
    return json.dumps(v, separators=(",", ":")) if isinstance(v, list | dict) else v


def _labels(configs: pd.DataFrame, keys: list[str]) -> list[str]:
    """'gi-z/w [paper] · latent_space=z · normalize.mean=[0.5,0.5,0.5]' for each configuration
    (one row each): method [variant], the keys whose values differ between configurations of
    the same method, the budget whenever configurations differ in it, and a short hash of the
    configuration where that still leaves two alike (ids never share a column)."""
    names = _short_names(keys)
    budget = _budget_texts(configs)
    # shown when configurations spend different budgets (gradient evaluations, or matched
    # values), not merely split equal ones differently between stages
    spent = [c for c in ("budget_grad_evals", "budget_match_value") if c in configs.columns]
    show_budget = budget is not None and any(
        configs[c].nunique(dropna=False) > 1 for c in spent
    )
    labels = pd.Series("", index=configs.index, dtype=object)
    for _, group in configs.groupby("method", sort=False):
        differ = [
            k
            for k in keys
            if group[k].nunique(dropna=False) > 1 and not (show_budget and _is_budget_key(k))
        ]
        for idx, row in group.iterrows():
            variant = str(row.get("variant", "") or "")
            parts = [
                f"{names[k]}={_show(row[k])}"
                for k in differ
                if not _in_variant(names[k], row[k], variant)
            ]
            if show_budget and budget is not None:
                parts.append(str(budget.loc[idx]))
            labels[idx] = " · ".join([_method_variant(row), *parts])
    # configurations less their setting keys; one label must name exactly one of them
    ident = configs[["method", *keys]].map(str).agg("|".join, axis=1)
    per_label = ident.groupby(labels).nunique()
    for idx in labels.index[labels.isin(per_label[per_label > 1].index)]:
        labels[idx] += f" #{hashlib.sha256(ident[idx].encode()).hexdigest()[:6]}"
    return labels.tolist()


def _is_budget_key(key: str) -> bool:
    # shown by the budget text instead
    name = key.rsplit(".", 1)[-1]
    return name in ("iterations", "restarts") or name.endswith("_iterations")


def _in_variant(name: str, value: Any, variant: str) -> bool:
    # the derived variant already spells 'lr=0.01' and the preset; do not repeat them
    return f"{name}=" in variant or (name == "preset" and str(value) in variant.split())


def _method_variant(row: Mapping[str, Any]) -> str:
    variant, method = row.get("variant"), str(row["method"])
    empty = variant is None or (isinstance(variant, float) and np.isnan(variant))
    return method if empty or variant in ("", method) else f"{method} [{variant}]"


_SECTIONS = frozenset({"gradient", "victim", "generator", "config", "defense"})


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares and that keeps a nested
    option's parent ('latent_space', 'lr', 'normalize.mean', 'stylegan2.z_dim')."""
    parts = {k: k.removeprefix(CFG).split(".") for k in keys}
    out = {}
    for k, p in parts.items():
        start = 1 if len(p) < 2 or p[-2] in _SECTIONS else 2
        for n in range(start, len(p) + 1):
            name = ".".join(p[-n:])
            if not any(".".join(q[-n:]) == name for o, q in parts.items() if o != k):
                break
        out[k] = name
    return out


def _show(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _budget_texts(df: pd.DataFrame) -> pd.Series | None:
    """'z 100 + w 100 it ×4 = 800 evals' (stage iterations x restarts = victim gradient
    evaluations) per row, where the rows
    carry their budget (storage.metrics identity-and-budget block)."""
    if "budget_grad_evals" not in df.columns or df["budget_grad_evals"].isna().all():
        return None
    texts = []
    for r in df[["budget_stage_iterations", "budget_restarts", "budget_grad_evals"]].itertuples():
        if not isinstance(r.budget_stage_iterations, str):
            texts.append("budget ?")
            continue
        stages = json.loads(r.budget_stage_iterations)
        its = " + ".join(
            f"{k.removesuffix('iterations').rstrip('_')} {v}".strip() for k, v in stages.items()
        )
        texts.append(f"{its} it ×{int(r.budget_restarts)} = {int(r.budget_grad_evals)} evals")
    return pd.Series(texts, index=df.index)


def config_columns(df: pd.DataFrame) -> list[str]:
    """What identifies a method configuration: method + variant (method until variant exists),
    plus the prior's kind and checkpoint where they vary for one method, plus COLUMN (the
    full configuration's label) once identify() has run."""
    base = ["method", "variant"] if "variant" in df.columns else ["method"]
    base += _varying(df, PRIOR_AXES, within=["method"])
    return base + ([COLUMN] if COLUMN in df.columns else [])


def default_by(df: pd.DataFrame) -> list[str]:
    """Configuration columns plus the setting axes present in `df` (and every further
    configuration column that varies within a setting, e.g. a DP clip sweep or several
    victims; not e.g. defense_p, which the defense and its level already determine)."""
    setting = [a for a in SETTING_AXES if a in df.columns]
    extra = _varying(df, EXTRA_SETTING_AXES, within=setting)
    return config_columns(df) + [a for a in SETTING_AXES if a in df.columns] + extra


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(metric, True)


def unit_values(
    df: pd.DataFrame,
    metric: str,
    *,
    by: Sequence[str] = (),
    best_in_batch: bool = False,
) -> pd.DataFrame:
    """One row per (by..., gradient_id, seed) of usable cells, with the unit's `metric` value.

    `best_in_batch` keeps only the image flagged ``best_<metric>_in_batch`` (the paper's
    "best" rows); otherwise the value is the mean over the batch's images.
    """
    rows = usable(df, metric)
    if best_in_batch:
        rows = rows[rows[f"best_{metric}_in_batch"].astype(bool)]
    keys = [*by, *UNIT]
    return rows.groupby(keys, dropna=False, sort=True)[metric].mean().rename("value").reset_index()


def usable(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of ok cells with a finite metric (diverged and interrupted cells are counted apart)."""
    ok = df["status"].eq("ok") if "status" in df.columns else pd.Series(True, index=df.index)
    return df[ok & np.isfinite(df[metric].astype(float))]


def bootstrap_ci(
    values: np.ndarray, *, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float]:
    """BCa bootstrap CI of the mean (scipy.stats.bootstrap).

    NaN for a single unit (no spread to resample); a point interval for constant values, where
    BCa is undefined; the percentile method if BCa still degenerates.
    """
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return (float("nan"), float("nan"))
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa warns on degenerate resamples; we fall back
            res = stats.bootstrap(
                (values,),
                np.mean,
                confidence_level=confidence,
                n_resamples=N_RESAMPLES,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            return (low, high)
    return (float("nan"), float("nan"))


def summary(
    df: pd.DataFrame,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] = METRICS,
    *,
    best_in_batch: bool = False,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Long table, one row per group x metric: mean, ci_low, ci_high, n (units), images,
    diverged (units whose cell was not ok), best (the best mean among configurations sharing the
    same setting, i.e. the `by` columns that are not configuration columns).

    `by` defaults to default_by(df). The mean is over units (gradient cell x seed), each unit
    the mean of its batch's images (or its best image with `best_in_batch`).
    """
    df = identify(df)
    by = list(default_by(df) if by is None else by)
    if df.empty:
        return pd.DataFrame(columns=[*by, *SUMMARY_COLUMNS])
    out = [
        _metric_summary(df, by, m, best_in_batch=best_in_batch, confidence=confidence, seed=seed)
        for m in metrics
    ]
    table = pd.concat(out, ignore_index=True)
    table["best"] = _best_flags(table, by, confidence=confidence, seed=seed)
    return table[[*by, *SUMMARY_COLUMNS]]


def _metric_summary(
    df: pd.DataFrame,
    by: list[str],
    metric: str,
    *,
    best_in_batch: bool,
    confidence: float,
    seed: int,
) -> pd.DataFrame:
    rows = []
    for key, group in df.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        # units from the group itself: a key holding NaN (e.g. no generator) never matches
        # itself in a dict lookup
        units = unit_values(group, metric, best_in_batch=best_in_batch).set_index(list(UNIT))
        values = units["value"].to_numpy(float)
        enough = values.size >= MIN_N
        low, high = (
            bootstrap_ci(values, confidence=confidence, seed=seed)
            if enough
            else (float("nan"), float("nan"))
        )
        rows.append(
            {
                **dict(zip(by, key, strict=True)),
                "metric": metric,
                "mean": float(values.mean()) if values.size else float("nan"),
                "ci_low": low,
                "ci_high": high,
                "n": int(values.size),
                "images": int(usable(group, metric).shape[0]),
                "diverged": _bad_units(group),
                "note": "" if enough else too_few(values.size),
                "_units": units["value"].to_dict(),  # for the paired test of "best"
            }
        )
    return pd.DataFrame(rows)


def too_few(n: int) -> str:
    """Why a cell shows no CI or test."""
    return f"n = {n} < {MIN_N}: no CI or test"


def _bad_units(group: pd.DataFrame) -> int:
    if "status" not in group.columns:
        return 0
    bad = group[~group["status"].eq("ok")]
    return int(bad.drop_duplicates(list(UNIT)).shape[0])


def _best_flags(
    table: pd.DataFrame, by: list[str], *, confidence: float, seed: int
) -> pd.Series:
    """True where a row's mean is the best of its metric within its setting AND the best is
    separated from the second best by their paired CI (on the units both attacked, n >= MIN_N,
    the CI of best − second excluding 0 in the better direction). Ties and single entries are
    never bold: bold claims "better than the rest", which needs evidence."""
    setting = [c for c in by if c not in ("method", "variant", COLUMN, *PRIOR_AXES)]
    flags = pd.Series(False, index=table.index)
    for (metric, *_), rows in table.groupby(["metric", *setting], dropna=False, sort=False):
        ranked = rows[rows["mean"].notna()].sort_values(
            "mean", ascending=not higher_is_better(str(metric))
        )
        if len(ranked) < 2:
            continue
        best, second = ranked.iloc[0], ranked.iloc[1]
        sign = 1.0 if higher_is_better(str(metric)) else -1.0
        paired_units = pd.DataFrame({"a": best["_units"], "b": second["_units"]}).dropna()
        diff = (paired_units["a"] - paired_units["b"]).to_numpy(float) * sign
        if diff.size < MIN_N:
            continue
        low, _ = bootstrap_ci(diff, confidence=confidence, seed=seed)
        flags[ranked.index[0]] = bool(low > 0)
    return flags


@dataclass(frozen=True)
class PairedResult:
    """a − b on the units both configurations attacked (identical gradients and seeds)."""

    metric: str
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    n: int  # units in both, ok in both
    dropped: int  # units in both where either cell was not ok
    # matched-pairs rank-biserial correlation of the Wilcoxon test (Kerby 2014): (W+ − W−) /
    # (W+ + W−) in [-1, 1]; +1: a beats b on every unit
    effect_size: float = float("nan")
    note: str = ""  # why no CI / test (n < MIN_N)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select(df: pd.DataFrame, which: Selector) -> pd.DataFrame:
    """Rows of one configuration: a method name, or a mapping column -> value."""
    criteria = {"method": which} if isinstance(which, str) else dict(which)
    mask = pd.Series(True, index=df.index)
    for column, value in criteria.items():
        if column not in df.columns:
            raise KeyError(f"no column {column!r} in the metrics (have {list(df.columns)})")
        mask &= df[column].isna() if value is None else df[column].eq(value)
    return df[mask]


def paired(
    df: pd.DataFrame,
    a: Selector,
    b: Selector,
    *,
    on: Sequence[str] = UNIT,
    metric: str = "psnr",
    best_in_batch: bool = False,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedResult:
    """Paired difference a − b of per-unit values over units present and ok in both.

    CI: bootstrap of the mean difference; p: two-sided Wilcoxon signed-rank test
    (scipy.stats.wilcoxon; 1.0 when every difference is zero, NaN with no units).
    """
    rows_a, rows_b = select(df, a), select(df, b)
    va = _units_on(rows_a, metric, on, best_in_batch)
    vb = _units_on(rows_b, metric, on, best_in_batch)
    both = set(rows_a.set_index(list(on)).index) & set(rows_b.set_index(list(on)).index)
    joined = va.rename(columns={"value": "value_a"}).join(
        vb.rename(columns={"value": "value_b"}), how="inner"
    )
    diff = (joined["value_a"] - joined["value_b"]).to_numpy(float)
    enough = diff.size >= MIN_N
    nan = float("nan")
    low, high = bootstrap_ci(diff, confidence=confidence, seed=seed) if enough else (nan, nan)
    return PairedResult(
        metric=metric,
        mean_diff=float(diff.mean()) if diff.size else nan,
        ci_low=low,
        ci_high=high,
        p_wilcoxon=_wilcoxon(diff) if enough else nan,
        n=int(diff.size),
        dropped=len(both) - int(diff.size),
        effect_size=rank_biserial(diff) if enough else nan,
        note="" if enough else too_few(int(diff.size)),
    )


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation: (sum of ranks of positive differences − sum
    of ranks of negative ones) / total rank sum, zero differences dropped (as Wilcoxon's
    default zero_method does)."""
    d = diff[diff != 0]
    if d.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1; NaN kept as NaN
    and not counted among the tests). scipy has no Holm; this is its textbook definition."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        out[i] = min(1.0, running)
    return out


def _units_on(rows: pd.DataFrame, metric: str, on: Sequence[str], best: bool) -> pd.DataFrame:
    ok = usable(rows, metric)
    if best:
        ok = ok[ok[f"best_{metric}_in_batch"].astype(bool)]
    return ok.groupby(list(on), dropna=False)[metric].mean().rename("value").to_frame()


def _wilcoxon(diff: np.ndarray) -> float:
    if diff.size == 0:
        return float("nan")
    if np.all(diff == 0):
        return 1.0
    return float(stats.wilcoxon(diff).pvalue)


def paired_table(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] = METRICS,
    setting: Sequence[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Every pair of configurations that attacked identical gradients, per setting and metric.

    Rows: setting columns, a, b (configuration labels), metric, mean_diff, ci_low, ci_high,
    p_wilcoxon, n, dropped. Pairs with no shared unit are left out.
    """
    df = identify(df)
    setting = [a for a in (SETTING_AXES if setting is None else setting) if a in df.columns]
    configs = config_columns(df)
    rows = []
    for key, part in df.groupby(setting, dropna=False, sort=True) if setting else [((), df)]:
        key = key if isinstance(key, tuple) else (key,)
        labels = part[configs].drop_duplicates().sort_values(configs).to_dict("records")
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                for metric in metrics:
                    r = paired(part, a, b, metric=metric, seed=seed)
                    if r.n + r.dropped == 0:
                        continue
                    rows.append(
                        {
                            **dict(zip(setting, key, strict=True)),
                            "a": label_of(a),
                            "b": label_of(b),
                            **r.as_dict(),
                        }
                    )
    return pd.DataFrame(rows)


def label_of(config: Mapping[str, Any]) -> str:
    """'gi-z/w' or 'gi-z/w [tuned]': the configuration's display label (COLUMN once
    identify() has run)."""
    if isinstance(config.get(COLUMN), str):
        return str(config[COLUMN])
    variant = config.get("variant")
    method = str(config["method"])
    label = method if variant in (None, "", method) or pd.isna(variant) else f"{method} [{variant}]"
    prior = config.get("generator_checkpoint_sha256", config.get("generator"))
    if any(k in config for k in PRIOR_AXES) and isinstance(prior, str):
        label += f" ({prior[:12]})"
    return label


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The `by` columns that make table blocks (not configurations) of identified `df`."""
    config = config_columns(df)
    return [c for c in default_by(df) if c not in config]


def comparisons(
    df: pd.DataFrame,
    baseline: str,
    *,
    metrics: Sequence[str] = METRICS,
    seed: int = 0,
) -> pd.DataFrame:
    """The spec's comparisons of interest: in every setting, every configuration a minus the
    baseline's configuration b (the `baseline` method, or the configuration so labelled) at
    the same budget (same matched budget when the rows carry one; else every baseline column
    of the setting), on the units both attacked. Wilcoxon p, Holm-adjusted over the whole table
    (p_holm: one family, every setting and metric), rank-biserial effect size; no test below
    MIN_N units. Rows as paired_table plus p_holm."""
    df = identify(df)
    setting = setting_columns(df)
    rows = []
    for key, part in df.groupby(setting, dropna=False, sort=True) if setting else [((), df)]:
        key = key if isinstance(key, tuple) else (key,)
        is_base = part["method"].eq(baseline) | (
            part["variant"].eq(baseline) if "variant" in part.columns else False
        )
        bases = list(dict.fromkeys(part.loc[is_base, COLUMN]))
        for a in dict.fromkeys(part.loc[~is_base, COLUMN]):
            for b in _same_budget(part, a, bases):
                for metric in metrics:
                    r = paired(part, {COLUMN: a}, {COLUMN: b}, metric=metric, seed=seed)
                    if r.n + r.dropped:
                        rows.append(
                            {**dict(zip(setting, key, strict=True)), "a": a, "b": b,
                             **r.as_dict()}
                        )
    out = pd.DataFrame(rows)
    if not out.empty:
        out["p_holm"] = holm(out["p_wilcoxon"].to_numpy(float))
    return out


def _same_budget(part: pd.DataFrame, a: str, bases: list[str]) -> list[str]:
    """Baseline columns at a's matched budget (all of them when budgets are not matched)."""
    if "budget_match_value" not in part.columns:
        return bases
    value = part.loc[part[COLUMN] == a, "budget_match_value"].iloc[0]
    if pd.isna(value):
        return bases
    same = part[part[COLUMN].isin(bases) & part["budget_match_value"].eq(value)]
    return list(dict.fromkeys(same[COLUMN]))
