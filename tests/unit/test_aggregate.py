"""pipelines.aggregate on a synthetic metrics set whose table is known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipelines import aggregate as ag

GRADIENTS, SEEDS, B = 4, 2, 2


def _rows(method: str, *, offset: float, variant: str | None = None) -> list[dict]:
    """Unit (g, s) has image PSNRs 10 + offset + g + s + {0, 1}: unit mean 10.5 + offset + g + s,
    best-in-batch 11 + offset + g + s. SSIM constant 0.5; LPIPS 0.3 - offset / 10."""
    rows = []
    for g in range(GRADIENTS):
        for s in range(SEEDS):
            for i in range(B):
                rows.append(
                    {
                        "method": method,
                        "variant": variant or method,
                        "gradient_id": f"g{g}",
                        "seed": s,
                        "cell_id": f"{method}-{variant}-{g}-{s}",
                        "defense": "none",
                        "defense_level": 0.0,
                        "batch_size": B,
                        "psnr": 10 + offset + g + s + i,
                        "ssim": 0.5,
                        "lpips": 0.3 - offset / 10,
                        "status": "ok",
                        "best_psnr_in_batch": i == 1,
                        "best_ssim_in_batch": i == 0,
                        "best_lpips_in_batch": i == 0,
                    }
                )
    return rows


@pytest.fixture
def metrics() -> pd.DataFrame:
    return pd.DataFrame(_rows("gi-x", offset=0.0) + _rows("gi-z/w", offset=2.0))


def _row(table: pd.DataFrame, method: str, metric: str) -> pd.Series:
    hit = table[(table["method"] == method) & (table["metric"] == metric)]
    assert len(hit) == 1
    return hit.iloc[0]


def _unit_means(offset: float) -> np.ndarray:
    return np.array([10.5 + offset + g + s for g in range(GRADIENTS) for s in range(SEEDS)])


def test_summary_means_ci_n_and_best(metrics: pd.DataFrame) -> None:
    table = ag.summary(metrics)
    x, zw = _row(table, "gi-x", "psnr"), _row(table, "gi-z/w", "psnr")
    assert x["mean"] == pytest.approx(12.5) and zw["mean"] == pytest.approx(14.5)
    assert (x["n"], x["images"], x["diverged"]) == (8, 16, 0)
    # The CI resamples the 8 unit means, not the 16 images: same as scipy on the unit means.
    expected = stats.bootstrap(
        (_unit_means(0.0),),
        np.mean,
        n_resamples=ag.N_RESAMPLES,
        method="BCa",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert (x["ci_low"], x["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert x["ci_low"] < 12.5 < x["ci_high"]
    # best: higher PSNR wins, lower LPIPS wins (each by a paired CI excluding 0); equal SSIM
    # separates nothing, so neither is bold
    assert zw["best"] and not x["best"]
    assert _row(table, "gi-z/w", "lpips")["best"] and not _row(table, "gi-x", "lpips")["best"]
    assert not _row(table, "gi-x", "ssim")["best"] and not _row(table, "gi-z/w", "ssim")["best"]
    ssim = _row(table, "gi-x", "ssim")
    assert (ssim["ci_low"], ssim["ci_high"]) == (0.5, 0.5)  # constant: a point interval


def test_best_in_batch_uses_the_flagged_image(metrics: pd.DataFrame) -> None:
    table = ag.summary(metrics, metrics=["psnr"], best_in_batch=True)
    assert _row(table, "gi-x", "psnr")["mean"] == pytest.approx(13.0)
    assert _row(table, "gi-z/w", "psnr")["mean"] == pytest.approx(15.0)


def test_diverged_cells_are_counted_apart_not_averaged(metrics: pd.DataFrame) -> None:
    bad = (metrics["method"] == "gi-x") & (metrics["gradient_id"] == "g0") & (metrics["seed"] == 0)
    metrics.loc[bad, "status"] = "diverged"
    metrics.loc[bad, "psnr"] = np.nan
    row = _row(ag.summary(metrics), "gi-x", "psnr")
    assert (row["n"], row["diverged"], row["images"]) == (7, 1, 14)
    assert row["mean"] == pytest.approx(_unit_means(0.0)[1:].mean())
    assert np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])


def test_variant_groups_configurations_of_one_method() -> None:
    df = pd.DataFrame(
        _rows("gi-x", offset=0.0, variant="paper") + _rows("gi-x", offset=1.0, variant="tuned")
    )
    table = ag.summary(df, metrics=["psnr"])
    assert list(table["variant"]) == ["paper", "tuned"]
    assert list(table["mean"]) == pytest.approx([12.5, 13.5])
    # without a variant column the method is the group; a unit is still gradient x seed
    merged = ag.summary(df.drop(columns="variant"), metrics=["psnr"]).iloc[0]
    assert (merged["n"], merged["images"], merged["mean"]) == (8, 32, pytest.approx(13.0))


def test_paired_difference_ci_and_wilcoxon(metrics: pd.DataFrame) -> None:
    r = ag.paired(metrics, "gi-z/w", {"method": "gi-x"}, metric="psnr")
    # every unit differs by exactly +2 dB: point CI, exact two-sided p = 2 / 2^8
    assert (r.mean_diff, r.ci_low, r.ci_high, r.n, r.dropped) == (2.0, 2.0, 2.0, 8, 0)
    assert r.p_wilcoxon == pytest.approx(2 / 2**8)
    same = ag.paired(metrics, "gi-x", "gi-x", metric="psnr")
    assert (same.mean_diff, same.p_wilcoxon) == (0.0, 1.0)


def test_paired_uses_only_units_ok_in_both(metrics: pd.DataFrame) -> None:
    rng = np.random.default_rng(1)
    zw = metrics["method"] == "gi-z/w"
    metrics.loc[zw, "psnr"] += rng.normal(0, 1, zw.sum())
    metrics.loc[zw & (metrics["gradient_id"] == "g3"), "status"] = "diverged"
    r = ag.paired(metrics, "gi-z/w", "gi-x", metric="psnr")
    assert (r.n, r.dropped) == (6, 2)
    a = ag.unit_values(metrics[zw], "psnr").set_index(list(ag.UNIT))["value"]
    b = ag.unit_values(metrics[~zw], "psnr").set_index(list(ag.UNIT))["value"]
    diff = (a - b).dropna()
    assert r.mean_diff == pytest.approx(diff.mean())
    assert r.p_wilcoxon == pytest.approx(stats.wilcoxon(diff.to_numpy()).pvalue)
    assert r.ci_low < r.mean_diff < r.ci_high


def test_paired_table_lists_each_pair_once_per_metric(metrics: pd.DataFrame) -> None:
    table = ag.paired_table(metrics)
    assert list(table["metric"]) == ["psnr", "ssim", "lpips"]
    assert set(table["a"]) == {"gi-x"} and set(table["b"]) == {"gi-z/w"}
    assert table.loc[table["metric"] == "psnr", "mean_diff"].item() == pytest.approx(-2.0)


def test_single_unit_has_no_ci() -> None:
    df = pd.DataFrame(_rows("gi-x", offset=0.0)).query("gradient_id == 'g0' and seed == 0")
    row = ag.summary(df, metrics=["psnr"]).iloc[0]
    assert row["n"] == 1 and np.isnan(row["ci_low"]) and np.isnan(row["ci_high"])


def test_setting_axes_split_only_what_varies_within_a_setting(metrics: pd.DataFrame) -> None:
    sparse = metrics.assign(
        defense="sparsity",
        defense_level=0.9,
        defense_p=0.9,
        gradient_id=metrics["gradient_id"] + "-s",
    )
    clip = metrics.assign(defense="dp", defense_level=0.1, defense_p=np.nan)
    clip = pd.concat(
        [
            clip.assign(defense_clip=1.0, gradient_id=clip["gradient_id"] + "-c1"),
            clip.assign(defense_clip=2.0, gradient_id=clip["gradient_id"] + "-c2"),
        ]
    )
    df = pd.concat([metrics.assign(defense_p=np.nan), sparse, clip], ignore_index=True)
    by = ag.default_by(df)
    # defense_p follows from (defense, level): no extra split; the DP clip sweep is one
    assert "defense_p" not in by and "defense_clip" in by
    table = ag.summary(df, metrics=["psnr"])
    none = table[(table["defense"] == "none") & (table["method"] == "gi-x")]
    assert none["mean"].tolist() == pytest.approx([12.5])  # NaN keys still find their units
    assert len(table[table["defense"] == "dp"]) == 4  # 2 methods x 2 clips


# --- issue 16: minimum n, comparisons of interest, Holm, bold only when separated ----------


def test_below_min_n_there_is_no_ci_and_no_test_and_the_cell_says_why(
    metrics: pd.DataFrame,
) -> None:
    few = metrics[metrics["gradient_id"].isin(["g0", "g1"])]  # 2 batches x 2 seeds = 4 units
    row = _row(ag.summary(few, metrics=["psnr"]), "gi-x", "psnr")
    assert row["n"] == 4 < ag.MIN_N
    assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"]) and "n = 4 < 5" in row["note"]
    r = ag.paired(few, "gi-z/w", "gi-x", metric="psnr")
    assert r.mean_diff == 2.0 and np.isnan(r.p_wilcoxon) and np.isnan(r.ci_low)
    assert "no CI or test" in r.note
    # and no bold: "best" needs a paired CI, which needs MIN_N units
    assert not ag.summary(few, metrics=["psnr"])["best"].any()


def test_bold_needs_the_best_separated_from_the_second_by_its_paired_ci(
    metrics: pd.DataFrame,
) -> None:
    rng = np.random.default_rng(0)
    close = metrics[metrics["method"] == "gi-x"].assign(method="gi-x+bn")
    # +/- 1 dB noise around the same values: gi-x+bn's mean may be higher, but not separated
    close["psnr"] = close["psnr"] + np.repeat(rng.choice([-1.0, 1.0], len(close) // 2), 2)
    table = ag.summary(pd.concat([metrics[metrics["method"] == "gi-x"], close]), metrics=["psnr"])
    assert not table["best"].any()
    assert ag.summary(metrics, metrics=["psnr"])["best"].sum() == 1  # +2 dB on every unit


def test_holm_matches_its_definition() -> None:
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # sorted: 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    assert ag.holm(p) == pytest.approx([0.03, 0.06, 0.06, float("nan"), 0.02], nan_ok=True)


def test_comparisons_test_every_configuration_against_the_baseline_only(
    metrics: pd.DataFrame,
) -> None:
    third = metrics[metrics["method"] == "gi-x"].assign(
        method="gi-z", variant="gi-z", psnr=lambda d: d["psnr"] + 1
    )
    df = pd.concat([metrics, third], ignore_index=True)
    tested = ag.comparisons(df, "gi-x", metrics=["psnr"])
    assert sorted(tested["a"]) == ["gi-z", "gi-z/w"] and set(tested["b"]) == {"gi-x"}
    raw = tested.set_index("a")["p_wilcoxon"]
    assert tested.set_index("a")["p_holm"].to_dict() == pytest.approx(
        dict(zip(raw.index, ag.holm(raw.to_numpy()), strict=True))
    )
    zw = tested.set_index("a").loc["gi-z/w"]
    assert zw["mean_diff"] == 2.0 and zw["effect_size"] == 1.0  # wins on every unit
    # all pairs (gi-z vs gi-z/w too) stay in paired_table, i.e. the CSV
    assert len(ag.paired_table(df, metrics=["psnr"])) == 3
