"""ms/iteration of GI-x with R restarts in one vectorised pass vs a plain per-restart loop.

    .venv/bin/python benchmarks/restarts_speed.py [--iterations 20] [--out FILE.md]

Both variants run the same engine; the loop variant calls GI-x once per restart (R = 1 each),
which is what per-restart Python loops in published code do. Reported as a ratio measured in one
run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from gi_core.attacks import InversionProblem
from gi_core.attacks.gi_x import GIXConfig, initial_images, reconstruct
from gi_core.datasets import batch_indices, dataset_info, load_images
from gi_core.gradients import client_gradient
from gi_core.victims import build_victim

READING = """Reading: both variants do the same arithmetic; vectorising saves per-call overhead
(Python, dispatch, small kernels), which dominates small victims. A CPU ResNet18 step is
compute-bound already (each convolution saturates the cores), so there the batched form gains
nothing and its batching bookkeeping can cost a few percent. The gain expected from one pass is
on GPUs, where R small launches become one large one; no GPU was lent to this session, so that
is not measured here.
"""


def problem_for(arch: str, *, batch: int, size: int) -> InversionProblem:
    indices = batch_indices("lfw-faces", batch_size=batch, batch_index=0, image_size=size)
    images, labels = load_images("lfw-faces", indices, image_size=size)
    classes = dataset_info("lfw-faces", image_size=size).num_classes
    model = build_victim(arch, num_classes=classes, image_size=size, width=16, seed=0)
    return InversionProblem(model, client_gradient(model, images, labels), labels, (3, size, size))


def ms_per_iteration(
    problem: InversionProblem, *, restarts: int, iterations: int, vectorised: bool
) -> float:
    init = initial_images(problem, restarts=restarts, seed=0)
    config = GIXConfig(iterations=iterations, restarts=restarts if vectorised else 1)
    reconstruct(problem, GIXConfig(iterations=2, restarts=restarts), init=init)  # warm-up
    start = time.perf_counter()
    if vectorised:
        reconstruct(problem, config, init=init)
    else:
        for r in range(restarts):
            reconstruct(problem, config, init=init[r : r + 1])
    return 1000 * (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/results/restarts_speed.md"))
    args = parser.parse_args()
    rows = []
    for arch in ("convnet", "resnet18"):
        problem = problem_for(arch, batch=args.batch, size=args.size)
        kw = {"restarts": args.restarts, "iterations": args.iterations}
        vec = ms_per_iteration(problem, vectorised=True, **kw)
        loop = ms_per_iteration(problem, vectorised=False, **kw)
        rows.append(f"| {arch} | {vec:.0f} | {loop:.0f} | {loop / vec:.2f}x |")
    text = "\n".join(
        [
            "# GI-x: vectorised restarts vs a per-restart loop",
            "",
            "Command: `.venv/bin/python benchmarks/restarts_speed.py "
            f"--iterations {args.iterations}`",
            f"Setting: B = {args.batch}, R = {args.restarts}, {args.size} px LFW faces, Adam, "
            f"cosine distance + TV; CPU: {platform.processor() or platform.machine()}, "
            f"torch threads = {torch.get_num_threads()}, torch {torch.__version__}.",
            "",
            "| victim | vectorised ms/iteration | loop ms/iteration | loop / vectorised |",
            "|---|---|---|---|",
            *rows,
            "",
            READING,
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
