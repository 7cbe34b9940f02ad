"""Table 1 of Jeon et al. (NeurIPS 2021, "GIAS") at CPU scale.

    python benchmarks/table1_cpu.py          # the recorded run (~20-25 min, 2 shared cores)
    python benchmarks/table1_cpu.py --quick  # tiny budget smoke test (< 1 min), to a temp dir

Real LFW faces (32 px, gray replicated to RGB, every face its own class), an untrained victim, the
pretrained DigiFace-1M DCGAN as the generative prior, B = 4, and the six columns of the paper's
Table 1: GI-x, GI-z, GI-w, GI-z/w, GI-x+BN, GI-z/w+BN. Every method attacks the same gradients
with the same restart count and the same seed per batch. Metrics: PSNR / SSIM / LPIPS, mean ± std
over all images, and "best" = mean over batches of the batch's best image (per metric).

A short sweep of η_w (the w-stage LR, which the paper fixes at 1e-3 for its own priors) runs first
on ONE held-out batch that is not in the table; the table uses the η_w whose GI-z/w run reached
the lowest final attack cost there (the gradient-matching cost an attacker can observe; the
held-out PSNR is reported beside it but not used to choose). --w-lr fixes η_w and skips the sweep.

Writes <out>.md (table, configuration, command, wall times, machine, sweep, z->w boundary check)
and <out>.png (ground truth + every method on the first batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from gi_core.attacks import AttackResult, InversionProblem, method_config, reconstruct  # noqa: E402
from gi_core.datasets import batch_indices, dataset_info, load_images, max_batches  # noqa: E402
from gi_core.generators import Generator, build_generator  # noqa: E402
from gi_core.gradients import bn_statistics, client_gradient  # noqa: E402
from gi_core.metrics import BatchMetrics, evaluate_batch, lpips_model  # noqa: E402
from gi_core.victims import build_victim  # noqa: E402

log = logging.getLogger("table1_cpu")

DATASET = "lfw-faces"
IMAGE_SIZE = 32
BATCH_SIZE = 4
GENERATOR = "digiface"
METHODS = ("gi-x", "gi-z", "gi-w", "gi-z/w", "gi-x+bn", "gi-z/w+bn")  # the paper's column order
LABELS = {"gi-x": "GI-x", "gi-z": "GI-z", "gi-w": "GI-w", "gi-z/w": "GI-z/w",
          "gi-x+bn": "GI-x+BN", "gi-z/w+bn": "GI-z/w+BN"}
DEFAULT_OUT = _ROOT / "docs" / "results" / "table1_cpu"


@dataclass(frozen=True)
class Budget:
    """Iterations, LRs and regularisers shared by the methods (see `method_params`)."""

    iterations: int  # N
    restarts: int
    split: str  # "paper": GI-z/w runs N (z) + N (w); "equal": N/2 + N/2
    x_lr: float
    z_lr: float
    w_lr: float
    tv: float
    bn: float

    def zw_iterations(self) -> tuple[int, int]:
        if self.split == "paper":
            return self.iterations, self.iterations
        return max(1, self.iterations // 2), max(1, self.iterations - self.iterations // 2)


def method_params(method: str, budget: Budget, *, w_lr: float | None = None) -> dict[str, Any]:
    """The explicit config of `method` (every field the table depends on is set here)."""
    common: dict[str, Any] = {"restarts": budget.restarts, "tv": budget.tv, "curve_every": 1,
                              "bn": budget.bn if method.endswith("+bn") else 0.0}
    n, (nz, nw), lw = budget.iterations, budget.zw_iterations(), w_lr or budget.w_lr
    if method in ("gi-x", "gi-x+bn"):
        return {**common, "iterations": n, "lr": budget.x_lr}
    if method == "gi-z":
        return {**common, "z_iterations": n, "z_lr": budget.z_lr}
    if method == "gi-w":
        return {**common, "w_iterations": n, "w_lr": lw, "start": "untrained"}
    if method in ("gi-z/w", "gi-z/w+bn"):
        return {**common, "z_iterations": nz, "z_lr": budget.z_lr, "w_iterations": nw, "w_lr": lw}
    raise ValueError(method)


# ------------------------------------------------------------------------------------------
# One batch: the client's gradient and every method's attack on it.


@dataclass
class Case:
    index: int
    images: Tensor  # (B, 3, H, W) in [0, 1]
    labels: Tensor  # (B,)
    problem: InversionProblem


@dataclass
class Run:
    method: str
    batch: int
    result: AttackResult
    metrics: BatchMetrics
    seconds: float


def make_case(victim: torch.nn.Module, batch: int) -> Case:
    indices = batch_indices(DATASET, batch_size=BATCH_SIZE, batch_index=batch,
                            image_size=IMAGE_SIZE)
    images, labels = load_images(DATASET, indices, image_size=IMAGE_SIZE)
    target = client_gradient(victim, images, labels)
    problem = InversionProblem(victim, target, labels, (3, IMAGE_SIZE, IMAGE_SIZE),
                               bn_target=bn_statistics(victim, images))
    return Case(batch, images, labels, problem)


def attack(method: str, case: Case, params: dict[str, Any], *, seed: int,
           generator: Generator) -> Run:
    start = time.perf_counter()
    result = reconstruct(method, case.problem, method_config(method, params), seed=seed,
                         generator=generator)
    seconds = time.perf_counter() - start
    metrics = evaluate_batch(result.images, case.images, labels=case.labels)
    log.info("batch %d %-10s %6.1fs status=%s PSNR %.2f SSIM %.3f LPIPS %.3f", case.index,
             method, seconds, result.status, float(metrics.psnr.mean()),
             float(metrics.ssim.mean()), float(metrics.lpips.mean()))
    return Run(method, case.index, result, metrics, seconds)


def boundary_costs(run: Run, nz: int) -> dict[str, float]:
    """Best-restart cost just before the z->w boundary and at a few w iterations after it.

    loss_curve (points, R) holds the cost *before* each step (curve_every=1), so row nz is the
    cost of the first w iterate, i.e. of the unchanged generator: the effect of the first w
    step shows at row nz + 1."""
    curve = run.result.loss_curve.min(dim=1).values
    picks = {"z last": nz - 1, "w 0": nz, "w 1": nz + 1, "w 2": nz + 2, "w 10": nz + 10,
             "w 50": nz + 50, "end": curve.shape[0] - 1}
    return {k: float(curve[i]) for k, i in picks.items() if 0 <= i < curve.shape[0]}


# ------------------------------------------------------------------------------------------
# Held-out sweep of η_w.


@dataclass
class SweepRow:
    w_lr: float
    final_cost: float
    psnr: float
    ssim: float
    lpips: float
    boundary: dict[str, float]
    seconds: float


def sweep_w_lr(victim: torch.nn.Module, generator: Generator, budget: Budget, *, batch: int,
               values: list[float], seed: int) -> list[SweepRow]:
    case = make_case(victim, batch)
    rows = []
    for w_lr in values:
        run = attack("gi-z/w", case, method_params("gi-z/w", budget, w_lr=w_lr), seed=seed,
                     generator=generator)
        cost = run.result.restart_costs[run.result.best_restart] if run.result.best_restart >= 0 \
            else torch.tensor(math.inf)
        rows.append(SweepRow(w_lr, float(cost), float(run.metrics.psnr.mean()),
                             float(run.metrics.ssim.mean()), float(run.metrics.lpips.mean()),
                             boundary_costs(run, budget.zw_iterations()[0]), run.seconds))
    return rows


# ------------------------------------------------------------------------------------------
# Aggregation and report.


def summarise(runs: list[Run]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """method -> metric -> (mean over images, std over images, mean over batches of the best)."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for method in METHODS:
        mine = [r for r in runs if r.method == method]
        out[method] = {}
        for metric, best_fn in (("psnr", max), ("ssim", max), ("lpips", min)):
            values = [float(v) for r in mine for v in getattr(r.metrics, metric)]
            bests = [best_fn(float(v) for v in getattr(r.metrics, metric)) for r in mine]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[method][metric] = (statistics.fmean(values), std, statistics.fmean(bests))
    return out


def table_markdown(summary: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    head = "| | " + " | ".join(LABELS[m] for m in METHODS) + " |"
    lines = [head, "|---" * (len(METHODS) + 1) + "|"]
    rows = (("psnr", "PSNR", "{:.2f}", "↑"), ("ssim", "SSIM", "{:.3f}", "↑"),
            ("lpips", "LPIPS", "{:.3f}", "↓"))
    for metric, name, fmt, arrow in rows:
        means = [summary[m][metric][0] for m in METHODS]
        bests = [summary[m][metric][2] for m in METHODS]
        top = max(means) if arrow == "↑" else min(means)
        top_best = max(bests) if arrow == "↑" else min(bests)
        cells = []
        for m in METHODS:
            mean, std, _ = summary[m][metric]
            text = f"{fmt.format(mean)} ± {fmt.format(std)}"
            cells.append(f"**{text}**" if mean == top else text)
        lines.append(f"| {name} {arrow} mean ± std | " + " | ".join(cells) + " |")
        cells = [f"**{fmt.format(b)}**" if b == top_best else fmt.format(b) for b in bests]
        lines.append(f"| {name} {arrow} best | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_batch_markdown(runs: list[Run], batches: list[int]) -> str:
    lines = ["| batch | " + " | ".join(LABELS[m] for m in METHODS) + " |",
             "|---" * (len(METHODS) + 1) + "|"]
    for b in batches:
        cells = []
        for m in METHODS:
            run = next(r for r in runs if r.method == m and r.batch == b)
            cells.append(f"{float(run.metrics.psnr.mean()):.2f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_check(summary: dict[str, dict[str, tuple[float, float, float]]]) -> list[str]:
    psnr = {m: summary[m]["psnr"][0] for m in METHODS}
    gap = psnr["gi-z/w"] - psnr["gi-x"]
    best = max(METHODS, key=lambda m: psnr[m])
    order = " > ".join(LABELS[m] for m in sorted(METHODS, key=lambda m: -psnr[m]))
    return [
        f"- mean PSNR GI-z/w − GI-x = {gap:+.2f} dB (target ≥ +1.5 dB): "
        f"{'met' if gap >= 1.5 else 'NOT met'}",
        f"- best mean PSNR: {LABELS[best]} (target GI-z/w+BN): "
        f"{'met' if best == 'gi-z/w+bn' else 'NOT met'}",
        f"- ordering by mean PSNR: {order}",
    ]


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        model = names[0] if names else model
    return (f"{model}, {os.cpu_count()} logical CPUs visible, torch.set_num_threads("
            f"{torch.get_num_threads()}), torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}; CPUs shared "
            "with other jobs, so wall times are noisy")


def save_grid(runs: list[Run], cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("ground truth", [c.images for c in cases])]
    for m in METHODS:
        imgs = [next(r for r in runs if r.method == m and r.batch == c.index) for c in cases]
        rows.append((LABELS[m], [r.result.images[r.metrics.perm] for r in imgs]))
    columns = sum(c.images.shape[0] for c in cases)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 1.2, 1.15 * len(rows)),
                             squeeze=False)
    for i, (name, batches) in enumerate(rows):
        images = torch.cat(batches).clamp(0, 1)
        for j in range(columns):
            ax = axes[i][j]
            ax.imshow(images[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if i == 0:
                ax.set_title(f"batch {cases[j // BATCH_SIZE].index}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------


@dataclass
class Settings:
    args: argparse.Namespace
    budget: Budget
    batches: list[int]
    sweep_batch: int | None
    sweep_values: list[float] = field(default_factory=list)


def parse(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget smoke test (< 1 min)")
    p.add_argument("--batches", type=int, default=5, help="table batches 0..n-1 (default 5)")
    p.add_argument("--iterations", type=int, default=130, help="N, iterations per stage")
    p.add_argument("--restarts", type=int, default=2, help="paper: 4; 2 to fit 2 shared cores")
    p.add_argument("--split", choices=("paper", "equal"), default="paper",
                   help="GI-z/w budget: 'paper' = N (z) + N (w); 'equal' = N/2 + N/2")
    p.add_argument("--victim", choices=("convnet", "resnet18", "lenet"), default="convnet")
    p.add_argument("--width", type=int, default=16, help="convnet width")
    p.add_argument("--victim-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="attack seed of batch b is seed + b")
    p.add_argument("--x-lr", type=float, default=0.1, help="GI-x Adam LR (Geiping et al.)")
    p.add_argument("--z-lr", type=float, default=3e-2, help="η_z (paper: 3e-2)")
    p.add_argument("--w-lr", type=float, default=None,
                   help="η_w; when given the held-out sweep is skipped (paper: 1e-3)")
    p.add_argument("--sweep-w-lr", default="1e-3,1e-4",
                   help="η_w values tried on the held-out batch")
    p.add_argument("--sweep-batch", type=int, default=None,
                   help="held-out batch of the sweep (default: the data set's last batch)")
    p.add_argument("--tv", type=float, default=1e-4)
    p.add_argument("--bn", type=float, default=1e-2, help="BN-prior weight of the +BN columns")
    p.add_argument("--grid-batches", type=int, default=2, help="batches shown in the PNG")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output prefix (default {DEFAULT_OUT.relative_to(_ROOT)}; "
                        "--quick: a temp dir)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because on 2 cores shared with other jobs 2 threads "
                        "ran 8-20x slower per iteration (OpenMP workers waiting on each other)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.iterations, args.restarts = 1, 6, 2
        args.sweep_w_lr, args.grid_batches = "1e-3,1e-4", 1
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="table1_quick_")) / "table1_cpu" if args.quick \
            else DEFAULT_OUT
    available = max_batches(DATASET, batch_size=BATCH_SIZE, image_size=IMAGE_SIZE)
    batches = list(range(args.batches))
    sweep_batch = None if args.w_lr is not None else \
        (available - 1 if args.sweep_batch is None else args.sweep_batch)
    if args.batches > available - (sweep_batch is not None):
        p.error(f"{DATASET} has {available} disjoint batches of {BATCH_SIZE}")
    if sweep_batch in batches:
        p.error(f"the sweep batch {sweep_batch} must not be a table batch")
    budget = Budget(args.iterations, args.restarts, args.split, args.x_lr, args.z_lr,
                    args.w_lr or 0.0, args.tv, args.bn)
    values = [float(v) for v in args.sweep_w_lr.split(",")] if sweep_batch is not None else []
    return Settings(args, budget, batches, sweep_batch, values)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = parse(argv)
    torch.set_num_threads(s.args.threads)
    t0 = time.perf_counter()
    info = dataset_info(DATASET, image_size=IMAGE_SIZE)
    victim = build_victim(s.args.victim, num_classes=info.num_classes, image_size=IMAGE_SIZE,
                          width=s.args.width, seed=s.args.victim_seed)
    generator = build_generator(GENERATOR, output_size=IMAGE_SIZE)
    lpips_model()  # load once, outside the timed attacks

    sweep: list[SweepRow] = []
    sweep_seconds = 0.0
    budget = s.budget
    if s.sweep_batch is not None:
        t = time.perf_counter()
        sweep = sweep_w_lr(victim, generator, budget, batch=s.sweep_batch, values=s.sweep_values,
                           seed=s.args.seed + s.sweep_batch)
        sweep_seconds = time.perf_counter() - t
        chosen = min(sweep, key=lambda r: r.final_cost).w_lr
        budget = dataclasses.replace(budget, w_lr=chosen)
        log.info("sweep: η_w = %g chosen by final cost", chosen)

    cases = [make_case(victim, b) for b in s.batches]
    runs = [attack(m, c, method_params(m, budget), seed=s.args.seed + c.index, generator=generator)
            for c in cases for m in METHODS]
    total = time.perf_counter() - t0

    s.args.out.parent.mkdir(parents=True, exist_ok=True)
    png = s.args.out.with_suffix(".png")
    save_grid(runs, cases[: s.args.grid_batches], png)
    md = report(s, budget, runs, sweep, sweep_seconds=sweep_seconds, total=total, png=png,
                victim=victim)
    s.args.out.with_suffix(".md").write_text(md)
    print(md)
    log.info("wrote %s and %s", s.args.out.with_suffix(".md"), png)


def report(s: Settings, budget: Budget, runs: list[Run], sweep: list[SweepRow], *,
           sweep_seconds: float, total: float, png: Path, victim: torch.nn.Module) -> str:
    summary = summarise(runs)
    nz, nw = budget.zw_iterations()
    n_params = sum(p.numel() for p in victim.parameters())
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    per_method = {m: sum(r.seconds for r in runs if r.method == m) for m in METHODS}
    statuses = sorted({f"{LABELS[r.method]}: {r.result.status}" for r in runs
                       if r.result.status != "ok"})
    lines = [
        "# Table 1 at CPU scale (LFW faces, DigiFace prior)",
        "",
        f"Command: `.venv/bin/python benchmarks/table1_cpu.py{(' ' + argv) if argv else ''}`"
        + ("  (QUICK smoke mode: numbers mean nothing)" if s.args.quick else ""),
        "",
        f"{len(s.batches)} batches × B = {BATCH_SIZE} = {len(s.batches) * BATCH_SIZE} images; "
        "mean ± std over all images; *best* = mean over batches of the batch's best image "
        "(highest PSNR, highest SSIM, lowest LPIPS, each taken separately). Bold: best column.",
        "",
        table_markdown(summary),
        "",
        "Target (paper's ordering):",
        *target_check(summary),
        "",
        "Mean PSNR per batch (dB):",
        "",
        per_batch_markdown(runs, s.batches),
        "",
        f"![reconstructions]({png.name})",
        "",
        "## Configuration",
        "",
        f"- data: `{DATASET}` (skimage LFW subset: real gray 25×25 faces, resized to "
        f"{IMAGE_SIZE}×{IMAGE_SIZE}, replicated to 3 channels; each face its own class, 100 "
        f"classes), table batches `batch_indices(batch_index={s.batches[0]}..{s.batches[-1]})` "
        "(disjoint, unique labels)",
        f"- victim: `{s.args.victim}`" + (f" width {s.args.width}" if s.args.victim == "convnet"
                                           else "")
        + f", {n_params:,} parameters, random init seed {s.args.victim_seed} (untrained), BN "
        "with batch statistics; the client gradient is the mean cross-entropy gradient over the "
        "batch; labels known to the attacker",
        f"- prior: `{GENERATOR}` (pretrained DCGAN, DigiFace-1M synthetic faces, 64 px, "
        f"average-pooled to {IMAGE_SIZE} px, eval-mode BN)",
        f"- budget: N = {budget.iterations} iterations; GI-x, GI-x+BN, GI-z, GI-w: N; "
        f"GI-z/w and GI-z/w+BN: {nz} (z) + {nw} (w)"
        + (" (the paper's protocol: the w stage is added on top of a full z search)"
           if budget.split == "paper" else " (equal total iterations)"),
        f"- Adam, LR ×0.1 at 3/8, 5/8, 7/8 of each stage; GI-x LR {budget.x_lr}, η_z "
        f"{budget.z_lr}, η_w {budget.w_lr:g}"
        + (" (chosen by the held-out sweep below)" if sweep else " (fixed on the command line)"),
        f"- cost: negative cosine gradient distance + TV {budget.tv:g}; +BN columns add the BN "
        f"prior with weight {budget.bn:g}; GI-w starts from an untrained DCGAN-initialised copy "
        "of the same architecture",
        f"- restarts: {budget.restarts} per attack, the restart with the lowest final cost is "
        f"kept; attack seed of batch b = {s.args.seed} + b (same seed for every method)",
        f"- machine: {machine()}",
    ]
    if statuses:
        lines.append(f"- non-ok statuses: {', '.join(statuses)}")
    lines += [
        "",
        "## Wall time",
        "",
        f"Total {total / 60:.1f} min (including {sweep_seconds / 60:.1f} min of sweep and setup). "
        "Per method, summed over the table batches:",
        "",
        "| method | seconds | s / iteration |",
        "|---|---|---|",
    ]
    for m in METHODS:
        iters = len(s.batches) * (nz + nw if m.startswith("gi-z/w") else budget.iterations)
        lines.append(f"| {LABELS[m]} | {per_method[m]:.0f} | {per_method[m] / iters:.3f} |")
    lines += ["", *boundary_section(runs, nz), *sweep_section(sweep, s.sweep_batch)]
    return "\n".join(lines) + "\n"


def boundary_section(runs: list[Run], nz: int) -> list[str]:
    zw = [r for r in runs if r.method == "gi-z/w"]
    if not zw or nz < 1:
        return []
    keys = list(boundary_costs(zw[0], nz))
    rows = [boundary_costs(r, nz) for r in zw]
    lines = [
        "## Cost across the z→w boundary (GI-z/w, best restart, table batches)",
        "",
        "Cost before the step of the given iteration; `w 0` is the unchanged generator, so the "
        "first w step's effect shows at `w 1`.",
        "",
        "| batch | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for r, row in zip(zw, rows, strict=True):
        lines.append(f"| {r.batch} | " + " | ".join(f"{row.get(k, math.nan):.4f}" for k in keys)
                     + " |")
    return [*lines, ""]


def sweep_section(sweep: list[SweepRow], batch: int | None) -> list[str]:
    if not sweep:
        return []
    keys = list(sweep[0].boundary)
    lines = [
        f"## Held-out sweep of η_w (GI-z/w on batch {batch}, not in the table)",
        "",
        "Chosen by the lowest final attack cost (observable by an attacker); PSNR/SSIM/LPIPS "
        "shown for information only.",
        "",
        "| η_w | final cost | PSNR | SSIM | LPIPS | " + " | ".join(f"cost {k}" for k in keys)
        + " | seconds |",
        "|---" * (6 + len(keys)) + "|",
    ]
    for r in sweep:
        lines.append(
            f"| {r.w_lr:g} | {r.final_cost:.4f} | {r.psnr:.2f} | {r.ssim:.3f} | {r.lpips:.3f} | "
            + " | ".join(f"{r.boundary.get(k, math.nan):.4f}" for k in keys)
            + f" | {r.seconds:.0f} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    main()
