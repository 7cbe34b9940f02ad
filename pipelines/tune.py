"""`gi-eval tune SPEC`: the tuning protocol of a fair comparison (docs/tuning.md).

One Optuna study (TPE, seeded) per method AND budget of the grid, the same number of trials
each, searching every option that applies to the method (signed Adam, TV weight and form,
every stage's learning rate, BN weight, the stage split), with the method's published recipe
as trial 0 of every study. Trials run on HELD-OUT samples: the last `tuning.batches`
consecutive batches of the plan that share no sample with the evaluation at any batch size
(tasks.spec.tuning_batches). Trials are ordinary grid cells: every round asks each study for a
few configurations, writes them as labelled method entries into the tuning grid
(`<name>-tune`, its own run directory), runs it with the same flow and executor as an
evaluation, and tells Optuna each configuration's mean PSNR (or LPIPS, `tuning.objective`)
over the held-out images; both are recorded.

This is evaluator-side tuning: the criterion uses the ground truth, which an attacker does not
have. It answers "how strong can each method be made", which is what a fair comparison needs;
reports say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gi_core.attacks.registry import RGAP_METHODS, method_config
from gi_core.errors import ConfigError
from pipelines.planner import GridPlan, read_spec, run_dir_for
from pipelines.report import SOURCE_LINE  # the tuned spec names the grid it came from
from storage.layout import RunLayout
from storage.run import open_run
from tasks.cells import expand, resolve_config
from tasks.spec import (
    GridSpec,
    MethodSpec,
    canonical_json,
    data_colour,
    evaluation_samples,
    mark_provenance,
    tuning_batches,
    tuning_context,
    tuning_samples,
    variant_labels,
)

# Default search space per method: param -> (low, high) log-uniform, [low, high, "linear"], or
# a list of choices. Every option that applies to a method is searched (issue 16, Deliver 4):
# TV weight and form, signed-gradient Adam (every stage of every method is optimised with Adam;
# inversefed and the official GIAS code both use the signed form), every stage's learning
# rate, the BN-prior weight of the "+bn" variants and the stage split of two-stage methods.
SPLIT = "z_fraction"  # pseudo-parameter: share of the entry's total iterations in the z stage
_COMMON: dict[str, Any] = {
    "tv": (1e-5, 1.0),
    "tv_form": ["interior", "zero_pad"],
    "signed_grad": [False, True],
}
_SPACE: dict[str, dict[str, Any]] = {
    "gi-x": {"lr": (0.01, 0.3)},
    "gi-z": {"z_lr": (3e-3, 0.3)},
    "gi-w": {"w_lr": (1e-5, 1e-2)},
    "gi-z/w": {"z_lr": (3e-3, 0.3), "w_lr": (1e-5, 1e-2), SPLIT: [0.1, 0.9, "linear"]},
    "gi-z/x": {"z_lr": (3e-3, 0.3), "x_lr": (0.01, 0.3), SPLIT: [0.1, 0.9, "linear"]},
    # GGL has no Adam stage: its options are CMA-ES's step size and population, the KL weight
    "ggl": {"kl": (1e-3, 1.0), "sigma": (0.1, 2.0), "population": [8, 16, 32, 50]},
    # GIFD: both stages' learning rates, the first ball's radius, the latent/feature split
    "gifd": {
        "z_lr": (3e-3, 0.3),
        "f_lr": (3e-3, 0.3),
        "radius": (100.0, 1e4),
        SPLIT: [0.1, 0.9, "linear"],
    },
}
_NO_ADAM = ("ggl",)  # methods without Adam stages: `signed_grad` does not apply
_BN_SPACE: dict[str, Any] = {"bn": (1e-4, 0.1)}
ROUND_SIZE = 4  # configurations per study per grid run: fewer runs, still a guided search
# Trial 0 of EVERY study is the method's published recipe, enqueued the same way for all:
# pixel methods get their peers' default recipe (inversefed's `signed=True, boxed=True,
# lr=0.1, total_variation` with a zero-padded TV, as the GIAS code ships it for GI-x),
# generator methods the paper's values (Jeon et al. 2021, appendix: the `paper` preset).
_PIXEL_RECIPE: dict[str, Any] = {"tv": 0.2, "tv_form": "zero_pad", "signed_grad": True, "lr": 0.1}
_PIXEL_METHODS = ("gi-x", "gi-x+bn")
_SECOND_STAGE = ("w_iterations", "x_iterations", "f_iterations")


def default_space(method: str) -> dict[str, Any]:
    if method in RGAP_METHODS:
        raise ConfigError(
            f"tuning: {method} is R-GAP's closed form (decision 241): it has nothing to tune; "
            "leave it out of the methods you tune"
        )
    base = method.removesuffix("+bn")
    bn = _BN_SPACE if method.endswith("+bn") else {}
    common = {k: v for k, v in _COMMON.items() if not (k == "signed_grad" and base in _NO_ADAM)}
    return {**common, **_SPACE.get(base, {}), **bn}


@dataclass(frozen=True)
class Study:
    """One (method, budget) of the grid: each budget is tuned at that budget."""

    key: str  # "gi-x @ iterations=400, restarts=1"
    entry: MethodSpec  # the first grid entry with this method and budget
    budget: dict[str, int]


@dataclass(frozen=True)
class Trial:
    method: str  # the study key
    number: int
    params: dict[str, Any]  # the searched values only (SPLIT as a fraction)
    psnr: float  # mean over the held-out images; nan if the trial's cells did not commit
    lpips: float = math.nan


@dataclass(frozen=True)
class TuneResult:
    trials: list[Trial]
    best: dict[str, Trial]  # per study key
    tuned_spec: Path
    report: Path


def tune(
    spec_path: Path,
    *,
    out: Path | None,
    executor: str | None,
    trials: int | None,
    write_spec: Path | None,
    run_grid: Callable[[Path, Path], None],
) -> TuneResult:
    """Run the protocol; `run_grid(spec_path, run_dir)` runs one grid (the CLI's run)."""
    import optuna

    spec, _ = read_spec(spec_path)
    batch_size = spec.batch_sizes[0]
    held_out = tuning_batches(spec, batch_size)  # ConfigError (exit 2) before any trial runs
    n_trials = trials or spec.tuning.trials
    studies = {s.key: s for s in grid_studies(spec)}
    for s in studies.values():
        _space(spec, s)  # validate every space before the first round
    run_dir = out or RunLayout(run_dir_for(spec, None)).tuning_root
    layout = RunLayout(run_dir)
    layout.specs_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimisers = {key: _study(optuna, spec, s) for key, s in studies.items()}
    done: list[Trial] = []
    entries: list[dict[str, Any]] = []
    count = dict.fromkeys(studies, 0)
    while len(done) < n_trials * len(studies):
        asked = []
        for key, s in studies.items():
            for _ in range(min(ROUND_SIZE, n_trials - count[key])):
                count[key] += 1
                t = optimisers[key].ask()
                params = {k: _suggest(t, k, v) for k, v in _space(spec, s).items()}
                entry = _entry(s, t.number, params, len(studies) > len(_names(studies)))
                asked.append((s, t, params, entry["label"]))
                entries.append(entry)
        tuning_spec = _tuning_spec(spec, entries, held_out, batch_size, executor)
        path = layout.round_spec(len(done))
        path.write_text(yaml.safe_dump(tuning_spec, sort_keys=False))
        run_grid(path, run_dir)
        scores = _scores(run_dir)
        ran = _trial_configs(path)
        for s, t, params, label in asked:
            psnr, lpips = scores.get((s.entry.name, ran[s.entry.name, label]), (math.nan, math.nan))
            value = lpips if spec.tuning.objective == "lpips" else psnr
            if math.isfinite(value):
                optimisers[s.key].tell(t, value)
            else:  # every cell of the trial diverged or failed: no number, a failed trial
                optimisers[s.key].tell(t, state=optuna.trial.TrialState.FAIL)
            done.append(Trial(s.key, t.number, params, psnr, lpips))
    best = {key: _best(spec, [t for t in done if t.method == key]) for key in studies}
    tuned = write_spec or spec_path.with_name(spec_path.stem + ".tuned.yaml")
    write_tuned_spec(
        spec_path, spec, studies, best, tuned, held_out=held_out, batch_size=batch_size
    )
    report = write_report(run_dir, spec, done, best, held_out=held_out, batch_size=batch_size)
    return TuneResult(done, best, tuned, report)


def tuning_stage(
    grid: GridPlan,
    *,
    executor: str | None,
    run_grid: Callable[[Path, Path], None],
) -> Path:
    """`tuning.stage: true`: tune the grid on its own data, victim and budgets first, then
    return the tuned spec to evaluate (else the grid's own spec path). Cached and resumable
    like any cell: trials are cells of runs/<name>-tune, and a rerun asks the seeded sampler
    the same questions, gets the same stored answers and so submits only what is missing."""
    if not grid.spec.tuning.stage:
        return grid.spec_path
    tune_dir = grid.layout.tuning_root
    tuned = RunLayout(tune_dir).tuned_spec
    tuned.parent.mkdir(parents=True, exist_ok=True)
    result = tune(
        grid.spec_path, out=tune_dir, executor=executor, trials=None, write_spec=tuned,
        run_grid=run_grid,
    )  # fmt: skip
    return result.tuned_spec


def reuse_notes(spec: GridSpec) -> list[str]:
    """One line per method entry whose tuned values were tuned elsewhere: which grid, and
    what differs from this one (printed by `gi-eval run`; every row carries the same)."""
    colour = data_colour(spec)
    configs = [
        resolve_config(m, spec.budgets.iterations_scale, colour=colour) for m in spec.methods
    ]
    labels = variant_labels(spec.methods, configs)
    notes = []
    for m, config, label in zip(spec.methods, configs, labels, strict=True):
        marked = mark_provenance(spec, m.name, config)
        origin = json.loads(marked.tuned_on) if marked.tuned_on else {}
        if origin.get("differs"):
            notes.append(
                f"{m.name} [{label}]: values tuned on grid {origin.get('grid')!r}, not this "
                f"one; differs here: {', '.join(origin['differs'])}"
            )
    return notes


def _trial_configs(round_spec: Path) -> dict[tuple[str, str], str]:
    """(method, trial label) -> the resolved config JSON its cells ran with: at a matched
    budget (`budgets.match`) the cells' iterations are the matched ones, not the entry's."""
    spec, _ = read_spec(round_spec)
    return {
        (c.method, c.variant): canonical_json(c.config_dict) for c in expand(spec).inversion_cells
    }


def _names(studies: Mapping[str, Study]) -> set[str]:
    return {s.entry.name for s in studies.values()}


def _best(spec: GridSpec, trials: Sequence[Trial]) -> Trial:
    scored = [t for t in trials if math.isfinite(_objective(spec, t))]
    if not scored:
        raise ConfigError(
            f"tuning: every trial of {trials[0].method} failed or diverged; see the tuning "
            "run's failures (`gi-eval status`) and lower the search space's learning rates"
        )
    return max(scored, key=lambda t: _signed(spec, _objective(spec, t)))


def _objective(spec: GridSpec, t: Trial) -> float:
    return t.lpips if spec.tuning.objective == "lpips" else t.psnr


def _signed(spec: GridSpec, value: float) -> float:
    """The objective as a number to maximise (LPIPS is lower-is-better)."""
    return -value if spec.tuning.objective == "lpips" else value


def budget_of(m: MethodSpec) -> dict[str, int]:
    """The entry's budget: iterations per stage and restarts (before iterations_scale)."""
    config = dataclasses.asdict(method_config(m.name, m.params, preset=m.preset))
    stages = {
        k: int(v) for k, v in config.items() if k == "iterations" or k.endswith("_iterations")
    }
    return {**stages, "restarts": int(config["restarts"])}


def grid_studies(spec: GridSpec) -> list[Study]:
    """One study per (method, budget) of the tuned methods, in grid order."""
    wanted = spec.tuning.methods
    names = {m.name for m in spec.methods}
    missing = sorted(set(wanted or ()) - names)
    if missing:
        raise ConfigError(f"tuning.methods: {missing} are not methods of this grid")
    studies: dict[str, Study] = {}
    for m in spec.methods:
        if (wanted is not None and m.name not in wanted) or m.name in RGAP_METHODS:
            continue  # R-GAP is closed form: evaluated as it is, never tuned
        budget = budget_of(m)
        key = f"{m.name} @ " + _budget_text(spec, budget)
        studies.setdefault(key, Study(key, m, budget))
    return list(studies.values())


def _budget_text(spec: GridSpec, budget: Mapping[str, int]) -> str:
    """A study's budget as its key shows it: the matched budget when the grid matches one
    (every entry of a method then runs at it, whatever iterations the entry names)."""
    if spec.budgets.match is not None:
        return f"{spec.budgets.match}={spec.budgets.value:g} (matched)"
    return ", ".join(f"{k}={v}" for k, v in budget.items())


def entry_params(entry: MethodSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's params with searched values, the stage split turned into iterations (the
    entry's total z + w (or x) iterations is kept: the split moves budget, never adds it)."""
    # a trial's values are not tuned values: a tuned entry's `tuned_on` does not carry over
    kept = {k: v for k, v in entry.params.items() if k != "tuned_on"}
    out = {**kept, **{k: v for k, v in params.items() if k != SPLIT}}
    if SPLIT in params:
        budget = budget_of(entry)
        second = next(k for k in _SECOND_STAGE if k in budget)
        total = budget["z_iterations"] + budget[second]
        z = min(total - 1, max(1, round(total * float(params[SPLIT]))))
        out.update({"z_iterations": z, second: total - z})
    return out


def _space(spec: GridSpec, study: Study) -> dict[str, Any]:
    method = study.entry.name
    space = dict(spec.tuning.space.get(method) or default_space(method))
    for name in space:  # validated by building a config with the space's first value
        if name == SPLIT:
            budget = budget_of(study.entry)
            if "z_iterations" not in budget or not set(_SECOND_STAGE) & set(budget):
                raise ConfigError(f"tuning.space.{method}.{SPLIT}: {method} has one stage")
            continue
        method_config(method, {name: _first(space[name])})
    return space


def _first(spec: Any) -> Any:
    if isinstance(spec, Mapping):
        return spec["choices"][0]
    return spec[0]


def _suggest(trial: Any, name: str, spec: Any) -> Any:
    if isinstance(spec, Mapping) or (isinstance(spec, list) and not _is_range(spec)):
        choices = spec["choices"] if isinstance(spec, Mapping) else spec
        return trial.suggest_categorical(name, list(choices))
    low, high, *scale = spec
    if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
        return trial.suggest_int(name, low, high, log=scale != ["linear"])
    value = trial.suggest_float(name, float(low), float(high), log=scale != ["linear"])
    return float(f"{value:.3g}")  # 3 significant digits: readable specs and labels


def _is_range(spec: Sequence[Any]) -> bool:
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in spec[:2])
    return numeric and len(spec) in (2, 3) and (len(spec) == 2 or spec[2] in ("log", "linear"))


def published_recipe(study: Study) -> dict[str, Any]:
    """Trial 0 of the study (every key, restricted to the search space by the caller)."""
    method = study.entry.name
    paper = dataclasses.asdict(method_config(method, preset="paper"))
    if method in _PIXEL_METHODS:
        return {**paper, **_PIXEL_RECIPE}  # bn (gi-x+bn): the paper's value
    budget = {k: v for k, v in paper.items() if k.endswith("_iterations")}
    second = next((k for k in _SECOND_STAGE if k in budget), None)
    if "z_iterations" in budget and second is not None:  # the paper's split (4000 + 4000)
        paper[SPLIT] = budget["z_iterations"] / (budget["z_iterations"] + budget[second])
    return paper


def _study(optuna: Any, spec: GridSpec, study: Study) -> Any:
    sampler = optuna.samplers.TPESampler(seed=spec.tuning.seed, n_startup_trials=4)
    direction = "minimize" if spec.tuning.objective == "lpips" else "maximize"
    optimiser = optuna.create_study(direction=direction, sampler=sampler)
    recipe = published_recipe(study)
    space = _space(spec, study)
    optimiser.enqueue_trial({k: recipe[k] for k in space if k in recipe})
    return optimiser


def _entry(study: Study, number: int, params: dict[str, Any], several: bool) -> dict[str, Any]:
    # labels name the budget when a method is tuned at several budgets (labels are per method)
    tag = study.key.split(" @ ")[1] + " " if several else ""
    return {
        "name": study.entry.name,
        "preset": "paper",
        "params": entry_params(study.entry, params),
        "label": f"{tag}trial-{number:03d}",
    }


def _tuning_spec(
    spec: GridSpec,
    entries: list[dict[str, Any]],
    held_out: range,
    batch_size: int,
    executor: str | None,
) -> dict[str, Any]:
    data = spec.model_dump(mode="json", exclude_none=True)
    data["name"] = f"{spec.name}-tune"
    data["data"] = {
        **data["data"],
        "first_batch": held_out.start,
        "num_batches": len(held_out),
    }
    data["batch_sizes"] = [batch_size]
    data["methods"] = entries
    data["defenses"] = [{"kind": "none"}]
    data["seeds"] = [spec.seeds[0]]
    data.pop("tuning", None)
    if executor:
        data["execution"] = {**data["execution"], "executor": executor}
    return data


def _scores(run_dir: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """Mean (PSNR, LPIPS) per (method, resolved config JSON) over the held-out images: keyed
    by the configuration, not the trial label, so a configuration committed under another
    label (a rerun) still counts. A trial with a diverged cell gets no score (it fails)."""
    df = open_run(run_dir).metrics()
    by = df.groupby(["method", "method_params"])
    complete = by["status"].agg(lambda s: bool((s == "ok").all()))
    psnr, lpips = by["psnr"].mean(), by["lpips"].mean()
    return {k: (float(psnr[k]), float(lpips[k])) for k in psnr.index if complete[k]}


def write_tuned_spec(
    spec_path: Path,
    spec: GridSpec,
    studies: Mapping[str, Study],
    best: Mapping[str, Trial],
    path: Path,
    *,
    held_out: range,
    batch_size: int,
) -> None:
    """The original spec with each entry's study's chosen values in its params, and where they
    were tuned (`tuned_on`). An entry with `preset: paper` keeps the paper's values when
    another entry of its method and budget takes the tuned ones (e.g. Table 1's paper/tuned
    pairs)."""
    data = yaml.safe_load(spec_path.read_text())
    data.get("tuning", {}).pop("stage", None)  # a tuned spec is evaluated, not tuned again
    colour = data_colour(spec)
    chosen = _entry_studies(spec, studies)
    for i, key in chosen.items():
        entry = data["methods"][i]
        base = {"name": entry} if isinstance(entry, str) else dict(entry)
        params = entry_params(spec.methods[i], best[key].params)
        config = resolve_config(
            MethodSpec(name=spec.methods[i].name, params=params),
            spec.budgets.iterations_scale,
            colour=colour,
        )
        context = tuning_context(spec, spec.methods[i].name, config)
        context["held_out"] = f"B={batch_size} batches {held_out.start}-{held_out.stop - 1}"
        base["params"] = {**params, "tuned_on": canonical_json(context)}
        data["methods"][i] = base
    objective = spec.tuning.objective.upper()
    header = (
        f"# Written by `gi-eval tune {spec_path}`: each method's values were chosen by Optuna\n"
        f"# (TPE, seed {spec.tuning.seed}) for the best mean {objective} on held-out batches "
        f"{held_out.start}-{held_out.stop - 1}\n"
        f"# of B = {batch_size}, at each entry's own budget. "
        f"{held_out_statement(spec, batch_size, held_out)}\n"
        "# Evaluator-side tuning (uses the ground truth).\n"
        f"{SOURCE_LINE}{spec_path} sha256 {hashlib.sha256(spec_path.read_bytes()).hexdigest()}\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=1000))


def _entry_studies(spec: GridSpec, studies: Mapping[str, Study]) -> dict[int, str]:
    """Grid entry index -> the key of the study whose values it takes."""
    by_budget = {(s.entry.name, canonical_json(s.budget)): s.key for s in studies.values()}
    keys = {
        i: by_budget.get((m.name, canonical_json(budget_of(m)))) for i, m in enumerate(spec.methods)
    }
    tuned_sibling = {key for i, key in keys.items() if key and spec.methods[i].preset != "paper"}
    return {
        i: key
        for i, key in keys.items()
        if key and not (spec.methods[i].preset == "paper" and key in tuned_sibling)
    }


def held_out_statement(spec: GridSpec, batch_size: int, held_out: range) -> str:
    """What the tuned spec's header may claim: disjointness BY SAMPLE INDEX from every image
    the evaluation attacks (all batch sizes), checked here, never assumed from batch numbers."""
    tuned_on = tuning_samples(spec, batch_size, held_out)
    evaluated = evaluation_samples(spec)
    shared = sorted(tuned_on & evaluated)
    if shared:
        return (
            f"WARNING: NOT held out: {len(shared)} of its {len(tuned_on)} samples "
            f"({shared[:8]}) are also evaluation samples"
        )
    sizes = ", ".join(str(b) for b in spec.batch_sizes)
    return (
        f"Its {len(tuned_on)} samples are disjoint by sample index from all "
        f"{len(evaluated)} evaluation samples (batches {spec.data.first_batch}-"
        f"{spec.data.first_batch + spec.data.num_batches - 1} at B = {sizes})."
    )


def trials_frame(trials: Sequence[Trial]) -> pd.DataFrame:
    rows = [
        {"method": t.method, "trial": t.number, "psnr": t.psnr, "lpips": t.lpips, **t.params}
        for t in trials
    ]
    return pd.DataFrame(rows).sort_values(["method", "trial"]).reset_index(drop=True)


def convergence(values: Sequence[float], *, maximise: bool) -> tuple[int, str]:
    """(trial of the last improvement of the best-so-far, verdict) for one study's objective
    values in trial order: converged-looking when the best has not moved for the last third
    of the trials (at least 2), else "still improving"."""
    best, last = math.nan, 0
    for i, v in enumerate(values):
        if math.isfinite(v) and (not math.isfinite(best) or (v > best if maximise else v < best)):
            best, last = v, i
    flat, n = len(values) - 1 - last, len(values)
    if flat >= max(2, math.ceil(n / 3)):
        return last, f"flat for the last {flat} of {n} trials"
    return last, f"still improving (best at trial {last} of {n}): more trials may help"


def write_report(
    run_dir: Path,
    spec: GridSpec,
    trials: Sequence[Trial],
    best: Mapping[str, Trial],
    *,
    held_out: range,
    batch_size: int,
) -> Path:
    """reports/tuning.md, tuning.csv and tuning.png (objective per trial, best so far)."""
    run = RunLayout(run_dir)
    run.reports_dir.mkdir(parents=True, exist_ok=True)
    df = trials_frame(trials)
    df.to_csv(run.report_file("tuning.csv"), index=False)
    objective = spec.tuning.objective
    maximise = objective == "psnr"
    _plot(df, run.report_file("tuning.png"), objective=objective)
    lines = [
        f"# Tuning of grid `{spec.name}`",
        "",
        f"Held-out batches {held_out.start}-{held_out.stop - 1} of B = {batch_size} "
        f"({spec.data.dataset}, colour model {data_colour(spec)}). "
        f"{held_out_statement(spec, batch_size, held_out)}",
        "",
        f"**Optimised: mean {objective.upper()} over the held-out images** "
        f"({'maximised' if maximise else 'minimised'}); PSNR and LPIPS are recorded for every "
        "trial. This is evaluator-side tuning: the criterion uses the ground truth. One study per "
        "method and budget, the same number of trials each; trial 0 of every study is the "
        "method's published recipe (pixel methods: their peers' default, inversefed's signed "
        "Adam with TV 0.2; generator methods: the paper's values); the rest are TPE proposals "
        "over every option that applies (docs/tuning.md).",
        "",
        "| study | trials | recipe PSNR / LPIPS | best PSNR / LPIPS | best trial "
        "| convergence | chosen values |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, b in best.items():
        own = df[df["method"] == key]
        recipe = own[own["trial"] == 0].iloc[0]
        _, verdict = convergence(list(own[objective]), maximise=maximise)
        lines.append(
            f"| {key} | {len(own)} | {recipe['psnr']:.2f} / {recipe['lpips']:.3f} | "
            f"{b.psnr:.2f} / {b.lpips:.3f} | {b.number} | {verdict} | `{b.params}` |"
        )
    lines += [
        "",
        "![best so far against trials, per study](tuning.png)",
        "",
        "All trials:",
        "",
        _markdown(df),
        "",
    ]
    run.report_file("tuning.md").write_text("\n".join(lines))
    return run.report_file("tuning.md")


def _markdown(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _plot(df: pd.DataFrame, path: Path, *, objective: str) -> None:
    """One panel per study: every trial's objective and the best so far against trials, so a
    reader sees whether the search had converged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = list(dict.fromkeys(df["method"]))
    cols = min(4, len(studies))
    rows = math.ceil(len(studies) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, studies, strict=False):
        own = df[df["method"] == key]
        values = own[objective]
        best = values.cummax() if objective == "psnr" else values.cummin()
        ax.plot(own["trial"], values, "o", alpha=0.6, label="trial")
        ax.plot(own["trial"], best, "-", label="best so far")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"held-out {objective.upper()}" + (" (dB)" if objective == "psnr" else ""))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(studies) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
