"""Performance suite (issue 12): engine vs the plain loop, batched cells, memory per group size,
time to quality with pruning / plateau stopping, device options, orchestration.

    .venv/bin/python benchmarks/performance.py [--quick] [--out docs/results/performance.md]

Writes the markdown report and, beside it, performance.json whose `cost_table` is what
`gi-eval plan` reads (pipelines/costmodel.py). Every ratio is measured within this one run;
per-iteration times are medians over iterations (robust to a shared machine's load spikes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gi_core.attacks import InversionProblem, method_config  # noqa: E402
from gi_core.attacks.batched import solve_together  # noqa: E402
from gi_core.attacks.engine import BaseConfig  # noqa: E402
from gi_core.attacks.registry import describer  # noqa: E402
from gi_core.datasets import batch_indices, dataset_info, load_images  # noqa: E402
from gi_core.generators import Generator, build_generator  # noqa: E402
from gi_core.gradients import bn_statistics, client_gradient  # noqa: E402
from gi_core.metrics import psnr  # noqa: E402
from gi_core.victims import build_victim  # noqa: E402
from tasks.batching import cell_bytes  # noqa: E402

DATASET = "lfw-faces"
READING = """How to read this: the plain loop is one restart of one cell at a time, so a ratio
above 1 is what vectorising restarts (engine) or cells (batched) buys on this machine. On a CPU
the gain comes from amortising per-call overhead and small kernels, so it is largest for small
victims at B = 1 and vanishes on ResNet18, whose convolutions already keep the cores busy (the
policy then keeps the plain path: ratio ~1 by construction, within this machine's noise). GI-z/w
is dominated by its per-image generator copies (Adam over P × R × B copies of DCGAN-64 and their
rendering), not by the victim, so batching cannot speed it up on a CPU; the fused Adam kernel is
what helps it (see device options). The GPU targets (>= 20x / >= 5x) need a GPU run."""


# -- problems -------------------------------------------------------------------------------


def problems_for(arch: str, size: int, *, batch: int, count: int) -> list[InversionProblem]:
    """`count` different batches of LFW faces against one victim (seed 0)."""
    classes = dataset_info(DATASET, image_size=size).num_classes
    model = build_victim(arch, num_classes=classes, image_size=size, width=16, seed=0)
    out = []
    for b in range(count):
        idx = batch_indices(DATASET, batch_size=batch, batch_index=b, image_size=size)
        x, y = load_images(DATASET, idx, image_size=size)
        target = client_gradient(model, x, y)
        out.append(
            InversionProblem(model, target, y, (3, size, size), bn_target=bn_statistics(model, x))
        )
    return out


def truth_for(size: int, *, batch: int, count: int) -> list[torch.Tensor]:
    out = []
    for b in range(count):
        idx = batch_indices(DATASET, batch_size=batch, batch_index=b, image_size=size)
        out.append(load_images(DATASET, idx, image_size=size)[0])
    return out


def _generator(size: int) -> Generator:
    """The DigiFace DCGAN prior (weights shipped by gan-face-generate), as in the grids."""
    return build_generator("digiface", output_size=size)


def config_for(method: str, iterations: int, restarts: int, **extra: Any) -> BaseConfig:
    if method == "gi-x":
        return method_config("gi-x", {"iterations": iterations, "restarts": restarts, **extra})
    half = max(1, iterations // 2)
    params = {"z_iterations": half, "w_iterations": half, "restarts": restarts, **extra}
    return method_config(method, params)


# -- timing ---------------------------------------------------------------------------------


def run_cells(
    method: str,
    problems: Sequence[InversionProblem],
    config: BaseConfig,
    *,
    generator: Generator | None,
    path: str,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[Any], None] | None = None,
) -> list[Any]:
    describe = describer(method)
    seeds = seeds or list(range(len(problems)))
    last = len(problems) - 1
    calls = [
        describe(
            problems[i],
            config,
            seed=seeds[i],
            generator=generator,
            progress=on_step if i == last else None,
        )
        for i in range(len(problems))
    ]
    return solve_together(calls, path=path)


def seconds_per_iteration(
    method: str,
    problems: Sequence[InversionProblem],
    config: BaseConfig,
    *,
    generator: Generator | None,
    path: str,
) -> tuple[float, str]:
    """Mean wall seconds between consecutive iterations (after the first two) and the path.

    The mean, not the median: a two-stage method (GI-z/w) mixes cheap z and dear w iterations,
    and a median of that bimodal mix is one stage's time or the other's, not their average."""
    stamps: list[float] = []
    results = run_cells(
        method,
        problems,
        config,
        generator=generator,
        path=path,
        on_step=lambda p: stamps.append(time.perf_counter()),
    )
    deltas = [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]
    return statistics.fmean(deltas), str(results[0].extras.get("path", path))


def plain_flops(
    method: str, problem: InversionProblem, *, generator: Generator | None, iterations: int
) -> float:
    """FLOPs of one iteration of the plain loop (R = 1, one cell): difference of two runs."""

    def count(its: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            run_cells(
                method, [problem], config_for(method, its, 1), generator=generator, path="loop"
            )
        return counter.get_total_flops()

    return (count(iterations + 2) - count(2)) / iterations


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- sections -------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    method: str
    victim: str
    size: int
    mode: str  # plain | engine | batched
    batch: int
    restarts: int
    cells: int
    ms_per_it: float
    path: str
    gflop_plain: float = 0.0  # FLOPs of one plain iteration (one restart, one cell)
    load: float = dataclasses.field(default_factory=lambda: os.getloadavg()[0])  # at measuring

    @property
    def images(self) -> int:
        return self.batch * self.restarts * self.cells

    @property
    def image_its(self) -> float:
        return self.images / (self.ms_per_it / 1000)

    def useful_gflops(self) -> float:
        per_restart_cell = self.gflop_plain
        return per_restart_cell * self.restarts * self.cells / (self.ms_per_it / 1000)


@dataclasses.dataclass(frozen=True)
class Case:
    """One throughput setting: plain (R = 1, one cell), engine (R restarts), and batched
    (P cells × R restarts) when `cells` > 1."""

    method: str
    arch: str
    size: int
    batch: int
    restarts: int = 4
    cells: int = 1
    repeats: int = 1  # alternating measurements of all modes; the fastest of each is kept


def throughput(cases: Sequence[Case], *, its: int) -> list[Row]:
    """Per case: plain, engine and batched measured in turn, `c.repeats` times; the fastest
    median of each mode is kept (load spikes on a shared machine only ever slow a run down)."""
    rows: list[Row] = []
    for c in cases:
        gen = _generator(c.size) if c.method != "gi-x" else None
        probs = problems_for(c.arch, c.size, batch=c.batch, count=max(1, c.cells))
        flops = plain_flops(c.method, probs[0], generator=gen, iterations=2) / 1e9
        cfg = config_for(c.method, its, c.restarts)
        modes = {
            "plain": (probs[:1], config_for(c.method, its, 1), 1, 1, "loop"),
            "engine": (probs[:1], cfg, c.restarts, 1, "auto"),
        }
        if c.cells > 1:
            modes["batched"] = (probs, cfg, c.restarts, c.cells, "auto")
        best: dict[str, tuple[float, str]] = {}
        for _ in range(c.repeats):
            for mode, (ps, conf, _r, _p, path) in modes.items():
                t, chosen = seconds_per_iteration(c.method, ps, conf, generator=gen, path=path)
                if mode not in best or t < best[mode][0]:
                    best[mode] = (t, chosen)
        for mode, (_ps, _conf, r, p, _path) in modes.items():
            t, chosen = best[mode]
            row = Row(c.method, c.arch, c.size, mode, c.batch, r, p, t * 1e3, chosen, flops)
            rows.append(row)
            print(
                f"{row.method} {row.victim}-{row.size} {mode} B={row.batch} R={r} P={p} "
                f"{row.ms_per_it:.0f} ms/it ({chosen})",
                flush=True,
            )
    return rows


CASES = [  # sized for ~10 min on a shared 2-core machine
    Case("gi-x", "convnet", 32, 1, cells=16, repeats=2),  # 64 images per batched step
    Case("gi-x", "convnet", 32, 4, cells=4, repeats=2),
    Case("gi-z/w", "convnet", 32, 1, cells=2, repeats=2),
    Case("gi-x", "resnet18", 32, 1),
    Case("gi-z/w", "resnet18", 32, 1, restarts=2),
    Case("gi-x", "resnet18", 64, 1, restarts=2),
]
QUICK_CASES = [Case("gi-x", "convnet", 32, 1, cells=4), Case("gi-z/w", "convnet", 32, 1, cells=2)]


# Stage kind -> the single-stage method that measures it and its iterations field.
STAGE_METHODS = {"x": ("gi-x", "iterations"), "z": ("gi-z", "z_iterations"),
                 "w": ("gi-w", "w_iterations")}  # fmt: skip


def stage_costs(its: int, repeats: int = 2) -> list[dict[str, Any]]:
    """The cost table's stage rows (tasks.pricing): seconds per iteration of each stage kind,
    measured with its single-stage method on convnet-32, B = 4, R = 1, gray LFW faces (as the
    CPU grids run them), at ONE torch thread, as a grid's cell runs when jobs share the cores
    (2 jobs on 2 cores); the faster of `repeats` alternating measurements (load only slows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probs = problems_for("convnet", 32, batch=4, count=1)
        gen = _generator(32)
        best: dict[str, float] = {}
        for _ in range(repeats):
            for stage, (method, field) in STAGE_METHODS.items():
                cfg = method_config(method, {field: its, "restarts": 1, "colour": "gray"})
                prior = None if stage == "x" else gen
                t, _path = seconds_per_iteration(method, probs, cfg, generator=prior, path="auto")
                best[stage] = min(best.get(stage, t), t)
                print(f"stage {stage} ({method}) {t * 1e3:.1f} ms/it at 1 thread", flush=True)
    finally:
        torch.set_num_threads(threads)
    return [
        {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "stage": stage,
            "method": STAGE_METHODS[stage][0],
            "victim": "convnet",
            "image_size": 32,
            "batch": 4,
            "restarts": 1,
            "mode": "engine",
            "seconds_per_iteration": best[stage],
            "colour": "gray",
            "load": os.getloadavg()[0],
            "threads": 1,
        }
        for stage in STAGE_METHODS
    ]


def path_grid(its: int) -> list[dict[str, Any]]:
    """vmap vs loop (plain autograd) per (B, rows) on convnet-32 GI-x: the policy's evidence."""
    out = []
    for batch in (1, 4):
        probs = problems_for("convnet", 32, batch=batch, count=1)
        for rows in (1, 4, 8):
            cfg = config_for("gi-x", its, rows)
            t = {}
            for path in ("loop", "vmap"):
                t[path], _ = seconds_per_iteration("gi-x", probs, cfg, generator=None, path=path)
            out.append(
                {
                    "batch": batch,
                    "rows": rows,
                    "loop_ms": t["loop"] * 1e3,
                    "vmap_ms": t["vmap"] * 1e3,
                    "faster": min(t, key=t.__getitem__),
                }
            )
            print(out[-1], flush=True)
    return out


def memory_per_group(sizes: Sequence[int], its: int) -> list[dict[str, Any]]:
    """Process peak RSS after each group size (run in increasing order: the peak is monotone),
    beside the batching module's estimate."""
    out = []
    probs = problems_for("convnet", 32, batch=1, count=max(sizes))
    params = sum(p.numel() for p in probs[0].victim.parameters())
    for p in sizes:
        run_cells("gi-x", probs[:p], config_for("gi-x", its, 4), generator=None, path="auto")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB
        est = cell_bytes(params=params, image_numel=3 * 32 * 32, batch=1, restarts=4, copies=0)
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        out.append(
            {"cells": p, "peak_rss_mib": rss, "estimate_mib": p * est / 2**20, "gpu_mib": gpu}
        )
    return out


def time_to_quality(its: int, batches: int) -> list[dict[str, Any]]:
    """GI-x on `batches` LFW batches (B = 1, R = 4, LeNet-32: cheap enough for 8 batches at a
    real budget here): full budget vs pruning vs pruning + plateau stopping; image·iterations
    and mean PSNR (paired: the same batches and seeds)."""
    probs = problems_for("lenet", 32, batch=1, count=batches)
    truth = truth_for(32, batch=1, count=batches)
    settings = {
        "full budget": {},
        "prune at 1/8, 1/4": {"prune_at": [0.125, 0.25]},
        "prune + plateau (window 10 %, tol 1e-3)": {
            "prune_at": [0.125, 0.25],
            "plateau_window": max(2, its // 10),
            "plateau_tol": 1e-3,
        },
    }
    out = []
    for name, extra in settings.items():
        cfg = config_for("gi-x", its, 4, **extra)
        start = time.perf_counter()
        if "plateau_window" in extra:  # plateau stopping runs cells one at a time
            results = [
                run_cells("gi-x", [p], cfg, generator=None, path="auto", seeds=[i])[0]
                for i, p in enumerate(probs)
            ]
        else:
            results = run_cells("gi-x", probs, cfg, generator=None, path="auto")
        wall = time.perf_counter() - start
        scores = [float(psnr(r.images, t).mean()) for r, t in zip(results, truth, strict=True)]
        work = sum(r.extras["restart_iterations"] for r in results)  # B = 1
        out.append(
            {
                "setting": name,
                "image_iterations": work,
                "mean_psnr": statistics.mean(scores),
                "wall_s": wall,
            }
        )
        print(out[-1], flush=True)
    return out


def device_options(its: int) -> list[dict[str, Any]]:
    """CPU-applicable options on a hand-written GI-x step (convnet-32, B = 4, R = 1, cosine +
    TV, double backward, Adam): channels_last and Adam's foreach / fused / for-loop kernels,
    each against the default (foreach Adam, contiguous) in this run, with the PSNR change after
    `its` steps from the same start (accuracy check)."""
    problem = problems_for("convnet", 32, batch=4, count=1)[0]
    truth = truth_for(32, batch=4, count=1)[0]
    options = {
        "default (foreach Adam)": ({}, False, False),
        "channels_last": ({}, True, False),
        "fused Adam": ({"fused": True}, False, False),
        "for-loop Adam": ({"foreach": False}, False, False),
        "torch.compile (inductor) of the cost": ({}, False, True),
    }
    out, base, base_psnr = [], 0.0, 0.0
    for name, (adam, channels_last, compiled) in options.items():
        try:
            ms, quality = _plain_gi_x(
                problem, truth, its, adam=adam, channels_last=channels_last, compiled=compiled
            )
        except RuntimeError as e:  # e.g. fused Adam unsupported for this device / dtype
            note = str(e).splitlines()[0][:90]
            out.append({"option": name, "ms_per_it": None, "ratio": None, "note": note})
            continue
        base, base_psnr = (ms, quality) if not out else (base, base_psnr)
        out.append(
            {"option": name, "ms_per_it": ms, "ratio": base / ms, "psnr_delta": quality - base_psnr}
        )
    return out


def _plain_gi_x(
    problem: InversionProblem,
    truth: torch.Tensor,
    its: int,
    *,
    adam: dict[str, Any],
    channels_last: bool,
    compiled: bool = False,
) -> tuple[float, float]:
    from gi_core.gradients import prepare_victim
    from gi_core.objectives import gradient_distance, total_variation

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = prepare_victim(problem.victim).to(memory_format=fmt)
    params = list(model.parameters())
    for q in params:
        q.requires_grad_(True)
    x = torch.rand(
        problem.batch_size, *problem.image_shape, generator=torch.Generator().manual_seed(0)
    )
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1, **adam)

    def cost_of(x: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(x), problem.labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return gradient_distance(grads, problem.target) + 1e-4 * total_variation(x)

    cost_fn = torch.compile(cost_of) if compiled else cost_of
    stamps = []
    for _ in range(its):
        cost = cost_fn(x)
        (x.grad,) = torch.autograd.grad(cost, [x])
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        stamps.append(time.perf_counter())
    deltas = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return statistics.median(deltas) * 1e3, float(psnr(x.detach(), truth).mean())


ELEMENTWISE = ("mul", "div", "add", "sub", "neg", "pow", "copy_", "fill_", "sqrt", "abs",
               "sign", "threshold_backward", "where", "clamp", "sum", "mean", "zero_")


def op_profile(its: int) -> list[dict[str, Any]]:
    """Where the batched GI-x step (convnet-32, B = 1, R = 4, P = 16) spends its time, from
    torch.profiler: the evidence for what bounds its share of the matmul peak."""
    from torch.profiler import ProfilerActivity, profile

    probs = problems_for("convnet", 32, batch=1, count=16)
    cfg = config_for("gi-x", its, 4)
    run_cells("gi-x", probs, cfg, generator=None, path="auto")  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_cells("gi-x", probs, cfg, generator=None, path="auto")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]

    def kind(key: str) -> str:
        name = key.removeprefix("aten::")
        if "convolution" in name:
            return "convolution"
        if name in ELEMENTWISE or name.rstrip("_") in ELEMENTWISE:
            return "elementwise"
        return "other"

    return [
        {"op": e.key, "kind": kind(e.key), "share": e.self_cpu_time_total / total,
         "calls": e.count}
        for e in top
    ]


def generator_copies(counts: Sequence[int], its: int) -> list[dict[str, Any]]:
    """ms per generator copy for render + backward of DCGAN-32 per-image copies, vmapped over
    the copies' weights as GI-z/w's and GI-w's w stage does, for each number of copies."""
    from torch.func import functional_call, vmap

    gen = _generator(32)
    buffers = {n: b.detach() for n, b in gen.named_buffers()}

    def one(w: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        return functional_call(gen, {**w, **buffers}, (z[None],))[0]

    out = []
    for n in counts:
        w = {k: p.detach().expand(n, *p.shape).clone().requires_grad_()
             for k, p in gen.named_parameters()}
        z = torch.randn(n, gen.latent_dim)

        def step(w: dict[str, torch.Tensor] = w, z: torch.Tensor = z) -> None:
            vmap(one, randomness="different")(w, z).square().sum().backward()

        step()
        seconds = min(_time(step) for _ in range(max(3, its)))
        out.append({"copies": n, "ms_per_copy": seconds * 1e3 / n})
    return out


def orchestration(quick: bool) -> list[tuple[str, str, str]]:
    from pipelines.commands import plan_report
    from tasks.cells import expand
    from tasks.spec import parse_spec

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        plan_report(ROOT / "grids/table1_cpu.yaml", Path(tmp) / "t1", calibrate=False)
        out.append(
            (
                "plan grids/table1_cpu.yaml (in process, imports done)",
                f"{time.perf_counter() - start:.2f} s",
                "<= 5 s",
            )
        )
        start = time.perf_counter()
        subprocess.run(
            [
                str(ROOT / ".venv/bin/gi-eval"),
                "plan",
                "grids/table1_cpu.yaml",
                "--out",
                str(Path(tmp) / "t1b"),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        out.append(
            (
                "`gi-eval plan grids/table1_cpu.yaml` (new process, with imports)",
                f"{time.perf_counter() - start:.2f} s",
                "<= 5 s",
            )
        )
        spec = parse_spec(_big_spec())
        start = time.perf_counter()
        plan = expand(spec)
        n = len(plan.inversion_cells)
        out.append((f"expand a {n:,}-cell grid", f"{time.perf_counter() - start:.2f} s", ""))
        out.extend(_scan_and_aggregate(Path(tmp), plan, quick))
        if not quick:
            out.append(_launch_to_first_job(Path(tmp) / "smoke"))
    return out


def _big_spec() -> dict[str, Any]:
    return {
        "name": "big",
        "data": {"dataset": "synthetic", "image_size": 32, "num_batches": 50},
        "victim": {"arch": "convnet", "width": 16, "seed": 0},
        "generator": {"kind": "dcgan32"},
        "methods": ["gi-x", "gi-x+bn", "gi-z", "gi-w", "gi-z/w", "gi-z/x", "gi-z+bn", "gi-z/w+bn"],
        "defenses": [{"kind": "sparsity", "p": [i / 25 for i in range(25)]}],
        "batch_sizes": [1],
        "seeds": list(range(10)),
    }


def _scan_and_aggregate(tmp: Path, plan: Any, quick: bool) -> list[tuple[str, str, str]]:
    import storage
    from benchmarks.storage import bench_metrics, bench_scan  # type: ignore[import-not-found]
    from pipelines.planner import grid_status

    n = 10_000 if quick else 100_000
    scan = bench_scan(tmp, [n])
    run = storage.open_run(tmp / f"scan{n}")
    start = time.perf_counter()
    status = grid_status(parse_big(), run)  # expand + resume scan, as `gi-eval plan` does
    todo = len(status.todo)
    elapsed = time.perf_counter() - start
    rows = [
        (
            f"plan + resume scan, {len(status.plan.inversion_cells):,}-cell grid against "
            f"{n:,} committed part files ({todo:,} to do)",
            f"{elapsed:.2f} s",
            "<= 10 s",
        ),
        *[(k, v, "") for k, v in scan],
    ]
    cells, per = (100, 100) if quick else (1000, 1000)
    rows.extend(
        (k, v, "<= 5 s" if "pandas" in k else "") for k, v in bench_metrics(tmp, cells, per)
    )
    return rows


def parse_big() -> Any:
    from tasks.spec import parse_spec

    return parse_spec(_big_spec())


def _launch_to_first_job(out: Path) -> tuple[str, str, str]:
    """`gi-eval run grids/smoke.yaml` until its first job record exists; then cancel it."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/gi-eval"), "run", "grids/smoke.yaml", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = None
    while proc.poll() is None and time.perf_counter() - start < 300:
        if list((out / "jobs").glob("*.json")) if (out / "jobs").is_dir() else []:
            first = time.perf_counter() - start
            break
        time.sleep(0.1)
    subprocess.run(
        [str(ROOT / ".venv/bin/gi-eval"), "cancel", str(out)],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    proc.terminate()
    proc.wait(timeout=60)
    value = f"{first:.1f} s" if first is not None else "no job within 300 s"
    return ("launch to first job record, `gi-eval run grids/smoke.yaml` (local)", value, "<= 10 s")


# -- report ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/performance.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the md from the json")
    parser.add_argument(
        "--stages", action="store_true", help="only re-measure the cost table's stage rows"
    )
    args = parser.parse_args()
    if args.render:
        args.out.write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    if args.stages:
        report = json.loads(args.out.with_suffix(".json").read_text())
        report["stage_costs"] = stage_costs(24)
        report["stage_costs_command"] = "python benchmarks/performance.py --stages"
        report["cost_table"] = family_rows(report["cost_table"]) + report["stage_costs"]
        _write(args.out, report)
        return
    quick = args.quick
    its = 8  # 5 timed deltas per mean (5 iterations gave 2: too noisy for 0.9-1.1x calls)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python benchmarks/performance.py" + (" --quick" if quick else ""),
        "load_before": _uptime(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "peak_gflops": matmul_peak_gflops(1024 if quick else 2048),
    }
    cases = QUICK_CASES if quick else CASES
    rows: list[Row] = []
    # Sections in order of importance; the json (and md) are rewritten after each one, so an
    # interrupted run still leaves every finished section (`--render` redraws the md).
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("throughput", lambda: rows.extend(throughput(cases[:3], its=its))),
        ("stage_costs", lambda: stage_costs(8 if quick else 24)),
        ("quality", lambda: time_to_quality(24 if quick else 100, 2 if quick else 8)),
        ("memory", lambda: memory_per_group([1, 4] if quick else [1, 4, 16, 64], its=2)),
        ("paths", lambda: path_grid(its)),
        ("options", lambda: device_options(its)),
        ("profile", lambda: op_profile(its)),
        ("copies", lambda: generator_copies([1, 4] if quick else [1, 4, 16], its)),
        ("orchestration", lambda: orchestration(quick)),
        ("throughput", lambda: rows.extend(throughput(cases[3:], its=its))),
    ]
    for key, step in steps:
        value = step()
        if key != "throughput":
            report[key] = value
        report["throughput"] = [
            dataclasses.asdict(r) | {"image_its": r.image_its, "useful_gflops": r.useful_gflops()}
            for r in rows
        ]
        report["cost_table"] = cost_table(rows) + report.get("stage_costs", [])
        report["seconds"] = time.perf_counter() - started
        report["load_after"] = _uptime()
        _write(args.out, report)
    print(markdown(report))


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.write_text(markdown(report))


def cost_table(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Seconds per iteration of one cell (engine; batched: per cell) for the cost model."""
    from pipelines.costmodel import family_of, forward_gflop

    out = []
    for r in rows:
        if r.mode == "plain":
            continue
        out.append(
            {
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "family": family_of(r.method),
                "victim": r.victim,
                "image_size": r.size,
                "batch": r.batch,
                "restarts": r.restarts,
                "mode": "engine" if r.mode == "engine" else "batched",
                "seconds_per_iteration": r.ms_per_it / 1000 / r.cells,
                "forward_gflop": forward_gflop(r.victim, 16, r.size),
                "load": r.load,
                "threads": torch.get_num_threads(),
            }
        )
    return out


def family_rows(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in table if "stage" not in r]


def stage_lines(r: dict[str, Any]) -> list[str]:
    """The stage rows as a markdown table, or nothing when the run measured none."""
    rows = r.get("stage_costs") or []
    if not rows:
        return []
    command = r.get("stage_costs_command", r["command"])
    lines = [
        "## Cost table: stage prices (`gi-eval plan`, seconds-matched budgets)",
        "",
        f"Command: `{command}`. One stage of each kind, measured with its single-stage",
        "method on convnet-32, B = 4, R = 1, gray LFW faces, at one torch thread (a grid's cell",
        "when jobs share the cores). tasks.pricing prices a cell stage by stage from these",
        "(GIAS = its z iterations at the z price + its w iterations at the w price), scaled",
        "linearly in batch x restarts; other victims and stages use the family rows.",
        "",
        "| stage | measured with | ms per iteration | load at measuring |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['method']} | {row['seconds_per_iteration'] * 1e3:.1f} | "
            f"{row['load']:.2f} |"
        )
    return [*lines, ""]


def targets(r: dict[str, Any]) -> list[str]:
    """Each issue-12 target with this run's number and met / missed."""
    plain = {
        (t["method"], t["victim"], t["size"], t["batch"]): t["image_its"]
        for t in r.get("throughput", [])
        if t["mode"] == "plain"
    }
    out = []
    for t in r.get("throughput", []):
        if t["mode"] == "plain":
            continue
        ratio = t["image_its"] / plain[(t["method"], t["victim"], t["size"], t["batch"])]
        big = t["batch"] * t["restarts"] * t["cells"] >= 64
        strict = t["mode"] == "batched" and t["victim"] == "convnet" and big
        share = t["useful_gflops"] / r["peak_gflops"]
        met = ratio >= 2.0 and share >= 0.45 if strict else ratio >= 1.0
        goal = ">= 2x plain and >= 45 % of peak" if strict else ">= 1.0x plain"
        out.append(
            f"- {t['method']} {t['victim']}-{t['size']} B={t['batch']} {t['mode']} "
            f"(R={t['restarts']}, P={t['cells']}): {ratio:.2f}x plain, {100 * share:.0f} % of "
            f"peak; target {goal}: {'met' if met else '**missed**'}"
        )
    q = r.get("quality", [])
    for row in q[1:]:
        fewer = q[0]["image_iterations"] / row["image_iterations"]
        drop = q[0]["mean_psnr"] - row["mean_psnr"]
        met = fewer >= 2 and drop <= 0.2
        out.append(
            f"- time to quality, {row['setting']}: {fewer:.2f}x fewer image·iterations, "
            f"PSNR {-drop:+.2f} dB vs full; target >= 2x within 0.2 dB: "
            f"{'met' if met else '**missed**'}"
        )
    return out


def _option_row(o: dict[str, Any]) -> str:
    if o["ratio"] is None:
        return f"| {o['option']} | n/a | not available: {o.get('note', '')} | |"
    return (
        f"| {o['option']} | {o['ms_per_it']:.0f} | {o['ratio']:.2f}x | {o['psnr_delta']:+.3f} dB |"
    )


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _load_words(uptime: str) -> str:
    load = float(uptime.rsplit("load average:", 1)[-1].split(",")[0])
    if load < 1.5:
        return "a quiet machine"
    return "**shared with other jobs** (absolute times are noisy under that load)"


def markdown(r: dict[str, Any]) -> str:
    peak = r["peak_gflops"]
    lines = [
        "# Performance (issue 12)",
        "",
        f"Command: `{r['command']}` (or `make bench-performance`), {r['seconds']:.0f} s in all.",
        f"Machine: {r['cpu']}, device {r['device']}, torch {r['torch']}, "
        f"{r['threads']} torch threads; {_load_words(r['load_before'])} —",
        f"`uptime` before: `{r['load_before']}`; after: `{r['load_after']}`.",
        "Every ratio below comes from this one run, and per-iteration times are means over",
        "iterations after the first two (convnet cases: the faster of",
        "two alternating repeats of every mode). No GPU was lent to this session:",
        "GPU rows (TF32/bf16, CUDA batching targets) are not measured.",
        "",
        f"Measured fp32 matmul peak (2048², same run): **{peak:.1f} GFLOP/s**.",
        "",
        "## (a) plain loop vs (b) engine vs (c) batched cells",
        "",
        "plain = one restart of one cell at a time with plain autograd (the engine's `loop` path,",
        "R = 1, P = 1); engine = R = 4 restarts in one call, path chosen by the policy; batched =",
        "P cells × R = 4 restarts in one optimisation. GI-z/w times average its z and w stages.",
        "useful GFLOP/s = FLOPs of one plain iteration (FlopCounterMode) × restarts × cells",
        "/ time.",
        "",
        "| method | victim | B | mode | R | P | path | ms/it | image·it/s | vs plain "
        "| useful GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain: dict[tuple[str, str, int, int], float] = {}
    for t in r.get("throughput", []):
        key = (t["method"], t["victim"], t["size"], t["batch"])
        if t["mode"] == "plain":
            plain[key] = t["image_its"]
        ratio = t["image_its"] / plain[key] if key in plain else float("nan")
        lines.append(
            f"| {t['method']} | {t['victim']}-{t['size']} | {t['batch']} | {t['mode']} | "
            f"{t['restarts']} | {t['cells']} | {t['path']} | {t['ms_per_it']:.0f} | "
            f"{t['image_its']:.1f} | {ratio:.2f}x | {t['useful_gflops']:.1f} | "
            f"{100 * t['useful_gflops'] / peak:.0f} % |"
        )
    lines += ["", "## Targets (this run)", "", *targets(r), "", READING]
    lines += [
        "",
        "## Path policy evidence (GI-x, convnet-32): plain autograd loop vs vmap",
        "",
        "| B | rows (P × R) | loop ms/it | vmap ms/it | faster |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['batch']} | {p['rows']} | {p['loop_ms']:.0f} | {p['vmap_ms']:.0f} | {p['faster']} |"
        for p in r.get("paths", [])
    ]
    lines += [
        "",
        "## Peak memory per group size (GI-x, convnet-32, B = 1, R = 4)",
        "",
        "Process peak RSS after running each group size (sizes in increasing order, so the",
        "peak belongs to the largest group so far); estimate = tasks.batching.cell_bytes × P.",
        "",
        "| cells P | peak RSS MiB | estimate MiB | GPU MiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m['cells']} | {m['peak_rss_mib']:.0f} | {m['estimate_mib']:.0f} | "
        f"{m['gpu_mib'] if m['gpu_mib'] is not None else 'n/a (no GPU)'} |"
        for m in r.get("memory", [])
    ]
    full = (r.get("quality") or [{}])[0]
    lines += [
        "",
        "## Time to quality (GI-x, lenet-32, B = 1, R = 4, paired batches)",
        "",
        "| setting | image·iterations | fewer than full | mean PSNR dB | Δ PSNR | wall s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {q['setting']} | {q['image_iterations']} | "
        f"{full['image_iterations'] / q['image_iterations']:.2f}x | {q['mean_psnr']:.2f} | "
        f"{q['mean_psnr'] - full['mean_psnr']:+.2f} | {q['wall_s']:.0f} |"
        for q in r.get("quality", [])
    ]
    lines += [
        "",
        "## Device options (CPU; hand-written GI-x step, convnet-32, B = 4, R = 1)",
        "",
        "| option | ms/it | speed vs default | Δ PSNR after the steps |",
        "|---|---|---|---|",
    ]
    lines += [_option_row(o) for o in r.get("options", [])]
    lines += [
        "",
        "torch.compile wraps the cost (forward, ∇θ with create_graph, distance, TV), timed",
        "after its first iteration (the compilation); it would be kept only if faster with",
        "|ΔPSNR| < 0.1 dB. On torch 2.14.1 its speed is a wrong answer: the compiled cost has",
        "the right value, but its gradient w.r.t. x has lost the gradient-matching term (checked",
        "by hand: ‖∇x‖ = 2.6e-6, exactly the TV term's, against 0.068 eager), hence the PSNR",
        "change. It is not used. TF32 / bf16 autocast apply to GPUs only (no GPU was lent).",
        "",
        "## What bounds the share of peak (torch.profiler, batched GI-x, convnet-32, B = 1, "
        "R = 4, P = 16)",
        "",
        "| op | kind | share of CPU time | calls |",
        "|---|---|---|---|",
    ]
    prof = r.get("profile", [])
    lines += [f"| `{o['op']}` | {o['kind']} | {100 * o['share']:.1f} % | {o['calls']} |"
              for o in prof]
    shares = {k: sum(o["share"] for o in prof if o["kind"] == k)
              for k in ("convolution", "elementwise")}
    lines += [
        "",
        f"Of the ten dearest ops, convolutions take {100 * shares['convolution']:.0f} % of the "
        f"CPU time and memory-bound elementwise ops {100 * shares['elementwise']:.0f} %",
        "(the double backward of the cosine cost, TV and BN's primitive ops, and Adam). Those do",
        "~1 FLOP per byte moved, so the step runs at the memory system's speed, far from a",
        "matmul's peak; 16-channel 32 px convolutions are themselves too small for it.",
        "",
        "## What bounds GI-z/w: per-image generator copies (DCGAN-32, render + backward)",
        "",
        "| copies | ms per copy |",
        "|---|---|",
    ]
    lines += [f"| {c['copies']} | {c['ms_per_copy']:.1f} |" for c in r.get("copies", [])]
    lines += [
        "",
        "The copies run as one call vmapped over their weights, whose convolutions become",
        "batched-weight (grouped) convolutions; their cost per copy rises with the number of",
        "copies on this CPU, so R restarts of GI-z/w's w stage (R × B copies) cannot beat R",
        "separate plain runs of B copies each. A Python loop over the copies was slower",
        "still when measured by hand (4 copies: 120 ms against 85 ms vmapped).",
        "",
        "## Orchestration",
        "",
        "| measurement | result | target |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v} | {t} |" for k, v, t in r.get("orchestration", [])]
    lines += ["", *stage_lines(r)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
