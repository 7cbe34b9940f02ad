"""Successive-halving restart pruning and plateau stopping (issue 12): off by default, never
drop the restart with the lowest cost, deterministic, and resume bit-exactly."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.engine import prune_iterations
from gi_core.errors import ConfigError
from gi_core.gradients import client_gradient
from gi_core.victims import build_victim


def _problem(batch: int = 1) -> InversionProblem:
    x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch)
    model = build_victim("convnet", num_classes=10, image_size=16, width=4, seed=0)
    return InversionProblem(model, client_gradient(model, x, y), y, (3, 16, 16))


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()  # as a checkpoint: torch.save, then a weights_only load
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_pruning_keeps_the_lowest_cost_restart_at_every_halving() -> None:
    problem = _problem()
    config = method_config(
        "gi-x", {"iterations": 16, "restarts": 8, "prune_at": [0.25, 0.5], "curve_every": 1}
    )
    result = reconstruct("gi-x", problem, config, seed=1)
    curve = result.loss_curve  # (points, R): NaN once a restart is pruned
    for it in prune_iterations(16, config.prune_at):  # 4 and 8
        at = curve[it]
        alive_after = torch.isfinite(curve[it + 1])
        assert bool(alive_after[int(torch.nan_to_num(at, nan=torch.inf).argmin())])
        assert int(alive_after.sum()) == (int(torch.isfinite(at).sum()) + 1) // 2
    assert int(torch.isfinite(curve[-2]).sum()) == 2  # 8 -> 4 -> 2 restarts optimised
    # pruned restarts keep their images and still take part in the final choice
    assert result.restart_images.shape[0] == 8 and torch.isfinite(result.restart_costs).all()
    assert result.extras["restart_iterations"] == 8 * 5 + 4 * 4 + 2 * 7


def test_pruning_is_off_by_default_and_validated() -> None:
    config = method_config("gi-x", {"iterations": 6, "restarts": 4})
    assert config.prune_at == () and config.plateau_window == 0
    result = reconstruct("gi-x", _problem(), config, seed=0)
    assert torch.isfinite(result.loss_curve).all()
    assert result.extras["restart_iterations"] == 4 * 6
    for bad in ([0.5, 0.25], [1.0], [0.0]):
        with pytest.raises(ConfigError, match="prune_at"):
            method_config("gi-x", {"prune_at": bad})


def test_pruned_run_resumes_bit_exactly_from_any_boundary() -> None:
    problem = _problem(batch=2)
    config = method_config("gi-x", {"iterations": 12, "restarts": 4, "prune_at": [0.25, 0.5]})
    full = reconstruct("gi-x", problem, config, seed=2)
    for stop_at in (2, 4, 7):  # before, right after and between the halvings
        calls = iter(range(100))
        stopped = reconstruct(
            "gi-x",
            problem,
            config,
            seed=2,
            should_stop=lambda calls=calls, stop_at=stop_at: next(calls) == stop_at,
        )
        state = _roundtrip(stopped.state or {})
        resumed = reconstruct("gi-x", problem, config, seed=2, state=state)
        assert torch.equal(resumed.restart_images, full.restart_images)
        assert torch.equal(resumed.loss_curve.nan_to_num(-1), full.loss_curve.nan_to_num(-1))


def test_plateau_stopping_is_deterministic_and_resumes_bit_exactly() -> None:
    problem = _problem()
    # a tolerance no step can meet: the run stops `window` iterations after its first point
    config = method_config(
        "gi-x", {"iterations": 40, "restarts": 2, "plateau_window": 5, "plateau_tol": 0.5}
    )
    first = reconstruct("gi-x", problem, config, seed=3)
    again = reconstruct("gi-x", problem, config, seed=3)
    assert first.iterations == again.iterations < 40
    assert int(first.curve_iterations[-1]) == first.iterations
    assert torch.equal(first.restart_images, again.restart_images)
    calls = iter(range(100))
    stopped = reconstruct("gi-x", problem, config, seed=3, should_stop=lambda: next(calls) == 3)
    resumed = reconstruct("gi-x", problem, config, seed=3, state=_roundtrip(stopped.state or {}))
    assert resumed.iterations == first.iterations
    assert torch.equal(resumed.restart_images, first.restart_images)
    assert torch.equal(resumed.loss_curve, first.loss_curve)


def test_plateau_stops_window_iterations_after_the_last_relative_improvement() -> None:
    problem = _problem()
    window, tol = 6, 1e-3
    config = method_config(
        "gi-x",
        {
            "iterations": 60,
            "restarts": 2,
            "curve_every": 1,
            "plateau_window": window,
            "plateau_tol": tol,
        },
    )
    result = reconstruct("gi-x", problem, config, seed=0)
    # replay the rule on the recorded costs (point t = cost before step t + 1)
    best, since, expected = float("inf"), 0, 60
    for t in range(60):
        if t - since >= window:
            expected = t
            break
        now = float(result.loss_curve[t].min())
        if best == float("inf") or now < best - tol * abs(best):
            best, since = now, t + 1
    assert result.iterations == expected
    assert result.extras["restart_iterations"] == 2 * expected
