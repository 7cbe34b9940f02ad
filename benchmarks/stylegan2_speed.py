"""ms per iteration of GI-z/w with a StyleGAN2 prior at 64 px (issue 11, acceptance 4).

Problem: natural-photos at 64 px, torchvision ResNet-18 victim (random init, ImageNet
normalisation inside), StyleGAN2 64 px searched in W (noise fixed), a few iterations of each
stage; reports the median wall time per iteration of the z stage and of the w stage (per-image
synthesis copies), measured between progress callbacks. Weights are random: speed does not
depend on their values. Writes docs/results/stylegan2_speed.md (appends one row per run).

    .venv/bin/python benchmarks/stylegan2_speed.py --channels 512 --batch 4 --restarts 1
    .venv/bin/python benchmarks/stylegan2_speed.py --device cuda --batch 4 --restarts 4
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.datasets import load_images
from gi_core.gradients import client_gradient
from gi_core.stylegan2 import StyleGAN2Config, StyleGAN2Options, build_stylegan2, parameter_counts
from gi_core.victims import build_victim

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "stylegan2_speed.md"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=4, help="per stage")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    config = StyleGAN2Config(resolution=64, channels=(args.channels,) * 5)
    gen = build_stylegan2(config, output_size=64, options=StyleGAN2Options("w"), seed=0).to(dev)
    victim = build_victim(
        "torchvision:resnet18", num_classes=11, image_size=64, normalize=(MEAN, STD)
    ).to(dev)
    x, y = load_images("natural-photos", list(range(0, 16 * args.batch, 16)), image_size=64)
    x, y = x.to(dev), y.to(dev)
    problem = InversionProblem(victim, client_gradient(victim, x, y), y, (3, 64, 64))
    n = args.iterations
    cfg = method_config("gi-z/w", {"z_iterations": n, "w_iterations": n, "restarts": args.restarts})
    stamps: list[tuple[str, float]] = []

    def on_progress(p) -> None:  # type: ignore[no-untyped-def]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((p.stage, time.perf_counter()))

    start = time.perf_counter()
    reconstruct("gi-z/w", problem, cfg, seed=0, generator=gen, progress=on_progress)
    per_stage = {}
    for stage in ("z", "w"):
        times = [t for s, t in stamps if s == stage]
        steps = [b - a for a, b in zip(times, times[1:], strict=False)]
        per_stage[stage] = 1000 * statistics.median(steps) if steps else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    _, synthesis = parameter_counts(config)
    row = (
        f"| {dev.type} ({platform.machine()}, {args.threads} threads) | {args.channels} | "
        f"{synthesis / 1e6:.1f} M | {args.batch} | {args.restarts} | {per_stage['z']:.0f} | "
        f"{per_stage['w']:.0f} | {peak:.1f} | {time.perf_counter() - start:.0f} |"
    )
    print(row)
    if not OUT.exists():
        OUT.write_text(
            "# GI-z/w with StyleGAN2 at 64 px: ms per iteration\n\n"
            "`benchmarks/stylegan2_speed.py` (median over the iterations of each stage).\n\n"
            "| device | channels | synthesis params | B | R | z stage ms/it | w stage ms/it "
            "| peak GiB | wall s |\n|---|---|---|---|---|---|---|---|---|\n"
        )
    with OUT.open("a") as f:
        f.write(row + "\n")


if __name__ == "__main__":
    main()
