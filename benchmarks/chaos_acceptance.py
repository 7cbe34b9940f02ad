"""Issue 20, acceptance 1-2 on this machine: the issue's 32-cell grid (GI-x and GI-z/w; no
defense, sparsity, noise, quantisation; 2 batches x 2 seeds; cells_per_job 2; local executor)

1. uninterrupted with `batch_cells: true` (the reference) and with `batch_cells: false`;
2. with `batch_cells: true` and 8 SIGKILLs of the driver's process group at seeded random
   moments (each rerun resumes), then run to completion;
3. every cell of 1 and 2 compared bit for bit (metrics, images, loss curves) with the reference;
4. `gi-eval verify REF --recompute 8`.

Writes docs/results/reproducibility.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chaos_acceptance.py [--out /tmp/chaos]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import storage  # noqa: E402

GRID: dict[str, Any] = {
    "name": "chaos-acceptance",
    "data": {"dataset": "lfw-faces", "image_size": 32, "num_batches": 2},
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 150, "restarts": 2}},
        {"name": "gi-z/w", "params": {"z_iterations": 25, "w_iterations": 25, "restarts": 2}},
    ],
    "defenses": [
        {"kind": "none"},
        {"kind": "sparsity", "p": 0.9},
        {"kind": "noise", "sigma": 0.01},
        {"kind": "quantize", "bits": 4},
    ],
    "batch_sizes": [2],
    "seeds": [0, 1],
    "execution": {"executor": "local", "cells_per_job": 2, "batch_cells": True, "max_parallel": 2},
}
METRICS = ["psnr", "ssim", "lpips", "final_cost", "status", "iterations", "label"]
GI_EVAL = str(Path(sys.executable).with_name("gi-eval"))


def _spec(out: Path, name: str, **execution: Any) -> Path:
    path = out / f"{name}.yaml"
    spec = {**GRID, "execution": {**GRID["execution"], **execution}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(spec: Path, run: Path, *, reuse: bool = False) -> float:
    """Run (or with `reuse`, keep a completed earlier run of) the grid; its wall seconds."""
    if reuse and (run / "reports" / "report.html").is_file():
        return float("nan")
    start = time.perf_counter()
    subprocess.run([GI_EVAL, "run", str(spec), "--out", str(run)], check=True,
                   capture_output=True, text=True)  # fmt: skip
    return time.perf_counter() - start


def _chaos(spec: Path, run: Path, *, kills: int, seed: int) -> list[str]:
    """Start the driver, SIGKILL its whole process group (driver and local jobs) after a
    seeded random delay, `kills` times; then let a last driver finish."""
    rng, log = random.Random(seed), []
    for k in range(kills):
        proc = subprocess.Popen([GI_EVAL, "run", str(spec), "--out", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        # from the end of the driver's start-up (~10 s here) into the inversions
        delay = rng.uniform(8.0, 25.0)
        try:
            proc.wait(timeout=delay)
            log.append(f"kill {k + 1}: the grid finished before {delay:.1f} s")
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        committed = len(storage.open_run(run).committed_cells()) if run.exists() else 0
        log.append(f"kill {k + 1} after {delay:.1f} s: {committed} of 32 cells committed")
        time.sleep(1.0)
    _run(spec, run)
    return log


def differing(a: Path, b: Path) -> list[str]:
    ra, rb = storage.open_run(a), storage.open_run(b)
    key = ["cell_id", "image_index"]
    x = ra.metrics().set_index(key)[METRICS].sort_index()
    y = rb.metrics().set_index(key)[METRICS].sort_index()
    assert list(x.index) == list(y.index), "the runs hold different cells"
    out = []
    for cell in sorted(set(x.index.get_level_values(0))):
        ga, gb = (storage.read_reconstruction(r.reconstruction_path(cell)) for r in (ra, rb))
        same = (
            x.loc[cell].equals(y.loc[cell])
            and ga.images.tobytes() == gb.images.tobytes()
            and ga.loss_curve.tobytes() == gb.loss_curve.tobytes()
        )
        if not same:
            out.append(cell)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/chaos-acceptance"))
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--reuse", action="store_true", help="keep completed reference runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ref, unb, chaos = (args.out / n for n in ("reference", "unbatched", "chaos"))
    t_ref = _run(_spec(args.out, "batched"), ref, reuse=args.reuse)
    t_unb = _run(_spec(args.out, "unbatched", batch_cells=False), unb, reuse=args.reuse)
    kills = _chaos(_spec(args.out, "batched"), chaos, kills=args.kills, seed=args.seed)
    diff_unb, diff_chaos = differing(ref, unb), differing(ref, chaos)
    chaos_run = storage.open_run(chaos).metrics()
    resumed = int(chaos_run.groupby("cell_id")["resumed_from_iteration"].first().notna().sum())
    verify = subprocess.run([GI_EVAL, "verify", str(ref), "--recompute", "8"],
                            capture_output=True, text=True)  # fmt: skip
    lines = [
        "# Reproducibility on this machine (issue 20, acceptance 1-2)",
        "",
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chaos_acceptance.py` "
        f"({time.strftime('%Y-%m-%d')}):",
        "the issue's 32-cell grid (GI-x and GI-z/w with DCGAN-32; none, sparsity 0.9, noise 0.01,",
        "quantisation 4 bits; 2 batches x 2 seeds; `cells_per_job: 2`; local executor).",
        "",
        "| comparison with the uninterrupted `batch_cells: true` run | cells differing |",
        "|---|---|",
        f"| `batch_cells: false`, uninterrupted | {len(diff_unb)} of 32 |",
        f"| `batch_cells: true`, {args.kills} SIGKILLs of the driver's process group | "
        f"{len(diff_chaos)} of 32 |",
        "",
        f"Wall time: reference {t_ref:.0f} s, unbatched {t_unb:.0f} s. In the interrupted run "
        f"{resumed} cells resumed from a mid-cell checkpoint.",
        "",
        "Kills:",
        "",
        *[f"- {k}" for k in kills],
        "",
        f"`gi-eval verify REFERENCE --recompute 8` (exit {verify.returncode}):",
        "",
        "```",
        verify.stdout.strip()[-1500:],
        "```",
    ]
    page = ROOT / "docs" / "results" / "reproducibility.md"
    page.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
