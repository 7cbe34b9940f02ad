"""The GPU check (`make gpu-check`, docs/gpu.md): on a machine with a CUDA device, in minutes,

1. the CUDA test tier (tests/gpu, marker `gpu`);
2. a paper-scale sample: ResNet-18 victim at 64 px, B = 4, LFW faces, GI-x and GI-z/w (GIAS)
   with a StyleGAN2 prior searched in W (random weights: no pretrained StyleGAN2 ships offline,
   so GIAS quality here is not meaningful; its time and memory are);
3. the performance benchmark's GPU rows: batched restarts (vmap vs loop), batched cells, TF32
   and bf16 autocast against plain float32;

and writes docs/results/gpu.md (and gpu.json beside it). Without a CUDA device it says so and
exits 0. Only gi_core is imported, so a GPU machine with PyTorch and scikit-image suffices.

    .venv/bin/python benchmarks/gpu_check.py [--quick] [--out docs/results/gpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gi_core.attacks import InversionProblem, method_config  # noqa: E402
from gi_core.attacks.batched import solve_together  # noqa: E402
from gi_core.attacks.registry import describer, entry_point  # noqa: E402
from gi_core.datasets import batch_indices, dataset_info, load_images  # noqa: E402
from gi_core.gradients import bn_statistics, client_gradient  # noqa: E402
from gi_core.metrics import psnr, ssim  # noqa: E402
from gi_core.stylegan2 import StyleGAN2Config, StyleGAN2Options, build_stylegan2  # noqa: E402
from gi_core.victims import build_victim  # noqa: E402

DATA = "lfw-faces"
DEV = torch.device("cuda")  # --device cpu: a dry run of the script (its numbers mean nothing)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- problems ---------------------------------------------------------------------------------


def problem(
    arch: str, size: int, *, batch: int, index: int, dev: torch.device, width: int = 16
) -> tuple[InversionProblem, torch.Tensor]:
    """One LFW batch against a seed-0 victim: the attacker's problem and the true images."""
    classes = dataset_info(DATA, image_size=size).num_classes
    normalize = (MEAN, STD) if arch.startswith("torchvision:") else None
    model = build_victim(
        arch, num_classes=classes, image_size=size, width=width, seed=0, normalize=normalize
    ).to(dev)
    idx = batch_indices(DATA, batch_size=batch, batch_index=index, image_size=size)
    x, y = load_images(DATA, idx, image_size=size)
    x, y = x.to(dev), y.to(dev)
    grads, stats = client_gradient(model, x, y), bn_statistics(model, x)
    return InversionProblem(model, grads, y, (3, size, size), bn_target=stats), x


def stylegan2_w(size: int, channels: int, dev: torch.device) -> Any:
    config = StyleGAN2Config(resolution=size, channels=(channels,) * (size.bit_length() - 2))
    return build_stylegan2(config, output_size=size, options=StyleGAN2Options("w"), seed=0).to(dev)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else None


def timed_run(call: Callable[..., Any], **kwargs: Any) -> tuple[Any, float, float]:
    """(result, mean seconds per iteration after the first two, wall seconds)."""
    stamps: list[float] = []

    def on_step(_: Any) -> None:
        sync()
        stamps.append(time.perf_counter())

    sync()
    start = time.perf_counter()
    result = call(progress=on_step, **kwargs)
    sync()
    wall = time.perf_counter() - start
    deltas = [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]
    return result, (statistics.fmean(deltas) if deltas else float("nan")), wall


@contextmanager
def precision(mode: str) -> Iterator[None]:
    """fp32 (TF32 off), tf32 (TF32 matmul + cuDNN), or bf16 (autocast around the attack)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    ctx = torch.autocast(DEV.type, dtype=torch.bfloat16) if mode == "bf16" else nullcontext()
    try:
        with ctx:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- 1. the CUDA test tier --------------------------------------------------------------------


def test_tier() -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
           "--tb=line", "-rfE", "tests/gpu"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "rc": proc.returncode,
        "summary": lines[-1] if lines else "(no output)",
        "failures": failures,
        "seconds": time.perf_counter() - start,
        "tail": "\n".join(lines[-80:]),
    }


# -- 2. paper-scale sample --------------------------------------------------------------------


def paper_scale(quick: bool, rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """ResNet-18 at 64 px, B = 4, two batches; GI-x and GI-z/w (StyleGAN2 in W, 512 channels)."""
    dev = DEV
    size, batch = 64, 4
    gix_its, zw_its, restarts = (4, 2, 2) if quick else (500, 100, 4)
    gen = stylegan2_w(size, 64 if quick else 512, dev)
    for index in range(2):
        prob, truth = problem("torchvision:resnet18", size, batch=batch, index=index, dev=dev)
        cases = {
            "gi-x": (method_config("gi-x", {"iterations": gix_its, "restarts": restarts}), None),
            "gi-z/w": (
                method_config(
                    "gi-z/w",
                    {"z_iterations": zw_its, "w_iterations": zw_its, "restarts": restarts},
                ),
                gen,
            ),
        }
        for method, (config, generator) in cases.items():
            if DEV.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fn = entry_point(method)
            result, per_it, wall = timed_run(
                fn, problem=prob, config=config, seed=index, generator=generator
            )
            rows.append(
                {
                    "method": method,
                    "batch": index,
                    "iterations": result.iterations,
                    "restarts": restarts,
                    "ms_per_it": 1e3 * per_it,
                    "wall_s": wall,
                    "peak_gib": peak_gib(),
                    "psnr": float(psnr(result.images, truth).mean()),
                    "ssim": float(ssim(result.images, truth).mean()),
                    "status": result.status,
                    "path": str(result.extras.get("path", "")),
                }
            )
            print(rows[-1], flush=True)
            save()  # each cell is reported even if a later one runs out of time


# -- 3. benchmark rows ------------------------------------------------------------------------


def restarts_rows(quick: bool) -> list[dict[str, Any]]:
    """GI-x, convnet and ResNet-18 at 32 px, B = 4: ms per iteration at R = 1 and R = 8 on the
    vmap and loop paths; 'per restart' speed-up = R x t(R=1) / t(R)."""
    dev, its = DEV, (4 if quick else 40)
    rows = []
    for arch in ("convnet", "resnet18"):
        prob, _ = problem(arch, 32, batch=4, index=0, dev=dev)
        fn = describer("gi-x")
        for path in ("loop", "vmap"):
            times = {}
            for r in (1, 8):
                config = method_config("gi-x", {"iterations": its, "restarts": r})
                _, per_it, _ = timed_run(_solve_one, fn=fn, problem=prob, config=config, path=path)
                times[r] = per_it
            rows.append(
                {
                    "victim": arch,
                    "path": path,
                    "ms_R1": 1e3 * times[1],
                    "ms_R8": 1e3 * times[8],
                    "per_restart_speedup": 8 * times[1] / times[8],
                }
            )
            print(rows[-1], flush=True)
    return rows


def _solve_one(
    *, fn: Callable[..., Any], problem: Any, config: Any, path: str, progress: Any
) -> Any:
    return solve_together([fn(problem, config, seed=0, progress=progress)], path=path)


def cells_rows(quick: bool) -> list[dict[str, Any]]:
    """8 GI-x cells (convnet 32 px, B = 1, R = 1): one after another vs one batched solve."""
    dev, its, count = DEV, (4 if quick else 60), 8
    probs = [problem("convnet", 32, batch=1, index=i, dev=dev)[0] for i in range(count)]
    config = method_config("gi-x", {"iterations": its, "restarts": 1})
    fn, describe = entry_point("gi-x"), describer("gi-x")

    def sequential() -> None:
        for i, p in enumerate(probs):
            fn(p, config, seed=i)

    def batched() -> None:
        solve_together([describe(p, config, seed=i) for i, p in enumerate(probs)])

    out = {}
    for name, run in (("sequential", sequential), ("batched", batched)):
        run()  # warm-up (kernels, allocator)
        sync()
        start = time.perf_counter()
        run()
        sync()
        out[name] = time.perf_counter() - start
    row = {"cells": count, "iterations": its, **{f"{k}_s": v for k, v in out.items()}}
    row["speedup"] = out["sequential"] / out["batched"]
    print(row, flush=True)
    return [row]


def repeat_rows(quick: bool) -> list[dict[str, Any]]:
    """Same cell twice, same seed: are the bits equal on this device? (GI-x, convnet and
    ResNet-18 at 32 px, B = 4, R = 2; default kernels, TF32 off)."""
    its, rows = (4 if quick else 50), []
    with precision("fp32"):
        for arch in ("convnet", "resnet18"):
            prob, _ = problem(arch, 32, batch=4, index=0, dev=DEV)
            config = method_config("gi-x", {"iterations": its, "restarts": 2})
            fn = entry_point("gi-x")
            a, b = (fn(prob, config, seed=1).images for _ in range(2))
            rows.append(
                {
                    "victim": arch,
                    "iterations": its,
                    "bit_identical": bool(torch.equal(a, b)),
                    "max_abs_diff": float((a - b).abs().max()),
                }
            )
            print(rows[-1], flush=True)
    return rows


def precision_rows(quick: bool) -> list[dict[str, Any]]:
    """GI-x on ResNet-18 (torchvision) at 64 px, B = 4, R = 4: fp32 vs TF32 vs bf16 autocast,
    ms per iteration and final PSNR from the same start (seed)."""
    dev, its = DEV, (4 if quick else 300)
    prob, truth = problem("torchvision:resnet18", 64, batch=4, index=0, dev=dev)
    config = method_config("gi-x", {"iterations": its, "restarts": 4})
    fn = entry_point("gi-x")
    rows: list[dict[str, Any]] = []
    for mode in ("fp32", "tf32", "bf16"):
        try:
            with precision(mode):
                result, per_it, _ = timed_run(
                    lambda progress: fn(prob, config, seed=0, progress=progress)
                )
        except RuntimeError as e:  # an op without a bf16 kernel, say
            rows.append({"mode": mode, "note": str(e).splitlines()[0][:120]})
            continue
        quality = float(psnr(result.images.float(), truth).mean())
        rows.append({"mode": mode, "ms_per_it": 1e3 * per_it, "psnr": quality})
        print(rows[-1], flush=True)
    base = rows[0].get("ms_per_it")
    for row in rows:
        if base and row.get("ms_per_it"):
            row["speedup"] = base / row["ms_per_it"]
    return rows


# -- report -----------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _merged(r: dict[str, Any]) -> str:
    dates = r.get("section_dates") or {}
    return "".join(f"; {k} from the run of {d}" for k, d in dates.items())


def markdown(r: dict[str, Any]) -> str:
    tier = r.get("tests", {})
    parts = [
        "# GPU check\n",
        "Made by `make gpu-check` (`python benchmarks/gpu_check.py`"
        f"{' --quick' if r['quick'] else ''}) on {r['device']} (CUDA {r['cuda']}, "
        f"torch {r['torch']}, Python {r['python']}), {r['date']}, "
        f"{r['seconds']:.0f} s in all. Every ratio below was measured within one run"
        f"{_merged(r)}.\n",
        "## 1. CUDA test tier\n",
        f"`{tier.get('command', '')}`: **{tier.get('summary', 'not run')}** "
        f"({tier.get('seconds', 0):.0f} s).\n",
    ]
    if tier.get("failures"):
        parts.append("Failures:\n\n" + "\n".join(f"- `{f}`" for f in tier["failures"]) + "\n")
    parts += [
        "## 2. Paper-scale sample\n",
        "torchvision ResNet-18 (random init, ImageNet normalisation inside), 64 px LFW faces, "
        "B = 4, two batches. GI-z/w searches a StyleGAN2 64 px prior (512 channels) in W whose "
        "weights are **random** (no pretrained StyleGAN2 ships offline): its PSNR says nothing "
        "about GIAS; its time and memory are what a paper-scale GIAS cell costs. TF32 off.\n",
        table(r.get("paper_scale", [])),
        "## 3. Benchmark rows\n",
        "### Batched restarts (GI-x, 32 px, B = 4)\n",
        "per-restart speed-up = 8 x t(R = 1) / t(R = 8): what running 8 restarts together buys.\n",
        table(r.get("restarts", [])),
        "### Batched cells (8 GI-x cells, convnet 32 px, B = 1, R = 1)\n",
        table(r.get("cells", [])),
        "### Precision (GI-x, ResNet-18 64 px, B = 4, R = 4, same seed)\n",
        table(r.get("precision", [])),
        "### Repeatability (same cell, same seed, twice)\n",
        table(r.get("repeat", [])),
    ]
    if r.get("errors"):
        parts.append("## Sections that failed\n\n" + "\n".join(f"- {e}" for e in r["errors"]))
    return "\n".join(parts) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script itself")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu.md")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections, e.g. tests,paper_scale")
    ap.add_argument("--merge", type=Path, help="a gpu.json whose other sections to keep")
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the script (no numbers)")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine: skipped (nothing written)")
        return 0
    start = time.perf_counter()
    report: dict[str, Any] = {
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu (dry run)",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "errors": [],
    }
    sample: list[dict[str, Any]] = []
    report["paper_scale"] = sample

    def save() -> None:
        report["seconds"] = time.perf_counter() - start
        _write(args.out, report)

    sections: dict[str, Callable[[], Any]] = {
        "restarts": lambda: restarts_rows(args.quick),
        "cells": lambda: cells_rows(args.quick),
        "precision": lambda: precision_rows(args.quick),
        "repeat": lambda: repeat_rows(args.quick),
        "paper_scale": lambda: paper_scale(args.quick, sample, save) or sample,
    }
    if not args.skip_tests:
        sections = {"tests": test_tier, **sections}
    if args.only:
        sections = {k: v for k, v in sections.items() if k in args.only.split(",")}
    if args.merge:  # sections from an earlier run of the same check, named as such in the page
        earlier = json.loads(args.merge.read_text())
        kept = [k for k in ("tests", "restarts", "cells", "precision", "repeat", "paper_scale")
                if k in earlier and k not in sections]  # fmt: skip
        report.update({k: earlier[k] for k in kept})
        dates = earlier.get("section_dates", {})
        report["section_dates"] = {k: dates.get(k, earlier["date"]) for k in kept}
    for name, section in sections.items():
        report.setdefault("section_dates", {})[name] = report["date"]
        try:
            report[name] = section()
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # record, go on to the next
            report["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        save()
    print(f"gpu-check: wrote {args.out}")
    return 0


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    if os.environ.get("OUT"):  # the lent GPU machine's result folder
        for path in (out, out.with_suffix(".json")):
            (Path(os.environ["OUT"]) / path.name).write_text(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
