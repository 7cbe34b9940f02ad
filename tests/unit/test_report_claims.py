"""The results page's "what these numbers support" section (issue 16, Deliver 8): claims follow
the Holm-adjusted tests in their direction, untested and open comparisons are never claimed,
and the scope statements come from the rows."""

from __future__ import annotations

import math

import pandas as pd

from pipelines.report_claims import claims_markdown, scope_statements


def _tested(p_holm: float, diff: float, metric: str = "psnr", n: int = 16) -> dict:
    return {
        "defense": "none", "defense_level": 0.0, "batch_size": 4,
        "a": "gi-z/w", "b": "gi-x", "metric": metric, "mean_diff": diff,
        "ci_low": diff - 1, "ci_high": diff + 1, "p_wilcoxon": p_holm / 2, "p_holm": p_holm,
        "n": n, "dropped": 0,
    }  # fmt: skip


ROWS = pd.DataFrame(
    {
        "dataset": ["lfw-faces"] * 2, "image_size": [32, 32], "batch_size": [4, 4],
        "defense": ["none"] * 2, "defense_level": [0.0, 0.0], "gradient_id": ["g0", "g1"],
        "seed": [0, 0], "victim": ["convnet"] * 2, "victim_width": [16, 16],
        "victim_seed": [0, 0], "method": ["gi-x", "gi-z/w"], "budget_match": ["grad_evals"] * 2,
        "budget_match_value": [240.0, 240.0], "param_tuned_on": ['{"grid": "t"}', None],
    }
)  # fmt: skip


def _section(tested: list[dict]) -> str:
    return claims_markdown(pd.DataFrame(tested), ROWS, "gi-x")


def test_a_significant_comparison_is_claimed_in_its_direction() -> None:
    text = _section([_tested(0.001, -2.5), _tested(0.002, +0.05, "lpips")])
    supported = text.split("**Supported**")[1].split("**Not supported")[0]
    assert "`gi-z/w` worse than `gi-x`: PSNR ↑ -2.50" in supported
    assert "`gi-z/w` worse than `gi-x`: LPIPS ↓ +0.050" in supported  # higher LPIPS is worse


def test_an_open_or_untested_comparison_is_never_claimed() -> None:
    untested = {**_tested(math.nan, 3.0), "ci_low": math.nan, "ci_high": math.nan, "n": 2}
    text = _section([_tested(0.2, 4.0), untested])
    supported = text.split("**Supported**")[1].split("**Not supported")[0]
    assert "- none" in supported and "better than" not in text
    assert "(0 of 2)" in text and "**Not tested** (n < 5; 1)" in text


def test_scope_comes_from_the_rows() -> None:
    scope = "\n".join(scope_statements(ROWS))
    assert "lfw-faces at 32 px" in scope and "batch sizes 4" in scope
    assert "convnet width 16 seed 0, untrained" in scope
    assert "grad_evals = 240" in scope and "evaluator-side" in scope
    unmatched = ROWS.drop(columns=["budget_match", "budget_match_value", "param_tuned_on"])
    unmatched["budget_grad_evals"] = [400, 200]
    text = "\n".join(scope_statements(unmatched))
    assert "NOT matched" in text and "gi-x 400-400; gi-z/w 200-200" in text
    assert "evaluator-side" not in text
    paper_presets = ROWS.assign(param_tuned_on=["", ""])  # what untuned rows hold
    assert "evaluator-side" not in "\n".join(scope_statements(paper_presets))
