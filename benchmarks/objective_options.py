"""Measure the effect of each GI-x objective option on one fixed problem (issue 8, item 1).

Problem (the issue's acceptance problem): lfw-faces 32 px, `convnet` width 16 seed 0, B = 4,
batches 0-3 of the unshuffled plan, 400 iterations, 4 restarts, no defense. Every variant attacks
the identical gradients with the same seeds; one option is changed at a time from the paper
preset, then the options are combined. Writes docs/results/objective_options.md.

    .venv/bin/python benchmarks/objective_options.py --batches 2   # the option sweep
    .venv/bin/python benchmarks/objective_options.py --tuned       # acceptance: tuned preset
    .venv/bin/python benchmarks/objective_options.py --quick       # 1 batch, 100 iterations

The sweep writes docs/results/objective_options.md; --tuned appends the `preset: tuned` row
measured on batches 0-3 (the issue's acceptance problem) to docs/results/gix_tuned.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.datasets import batch_indices, dataset_info, load_images
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.metrics import evaluate_batch, lpips_model
from gi_core.victims import build_victim

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "objective_options.md"

# (label, GI-x params on top of the paper preset), one knob at a time, then combinations.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("paper (TV 1e-4 interior, Adam)", {}),
    ("TV 0.2 interior", {"tv": 0.2}),
    ("TV 0.2 zero_pad", {"tv": 0.2, "tv_form": "zero_pad"}),
    ("TV 0.2 interior + signed", {"tv": 0.2, "signed_grad": True}),
    ("TV 1e-4 zero_pad", {"tv_form": "zero_pad"}),
    ("TV 1e-4 + signed", {"signed_grad": True}),
    ("TV 0.2 zero_pad + signed", {"tv": 0.2, "tv_form": "zero_pad", "signed_grad": True}),
    ("TV 0.05 zero_pad", {"tv": 0.05, "tv_form": "zero_pad"}),
]


def problems(batches: int) -> list[tuple[InversionProblem, torch.Tensor]]:
    info = dataset_info("lfw-faces", image_size=32)
    victim = build_victim("convnet", num_classes=info.num_classes, image_size=32, seed=0, width=16)
    out = []
    for b in range(batches):
        idx = batch_indices("lfw-faces", batch_size=4, batch_index=b, image_size=32)
        images, labels = load_images("lfw-faces", idx, image_size=32)
        grads = [g.detach() for g in client_gradient(victim, images, labels)]
        problem = InversionProblem(
            victim, grads, labels, tuple(images.shape[1:]), bn_target=bn_statistics(victim, images)
        )
        out.append((problem, images))
    return out


def measure(params: dict[str, Any], cases: list[Any], iterations: int) -> dict[str, float]:
    preset = params.pop("preset", "paper") if "preset" in params else "paper"
    config = method_config(
        "gi-x", {"iterations": iterations, "restarts": 4, **params}, preset=preset
    )
    psnr, ssim, lp, mean_gap, start = [], [], [], [], time.perf_counter()
    for b, (problem, truth) in enumerate(cases):
        result = reconstruct("gi-x", problem, config, seed=b)
        scores = evaluate_batch(result.images, truth, labels=problem.labels, lpips=lpips_model())
        psnr += scores.psnr.tolist()
        ssim += scores.ssim.tolist()
        lp += scores.lpips.tolist()
        mean_gap.append(float(result.images.mean() - truth.mean()))
    n = len(psnr)
    return {
        "psnr": sum(psnr) / n,
        "ssim": sum(ssim) / n,
        "lpips": sum(lp) / n,
        "brightness": sum(mean_gap) / len(mean_gap),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tuned", action="store_true", help="only the tuned preset, batches 0-3")
    args = parser.parse_args()
    batches, iterations = (1, 100) if args.quick else (args.batches, 400)
    torch.set_num_threads(1)
    if args.tuned:
        tuned_check(problems(4))
        return
    cases = problems(batches)
    rows = []
    for label, params in VARIANTS:
        r = measure(params, cases, iterations)
        rows.append((label, params, r))
        print(
            f"{label:40s} PSNR {r['psnr']:6.2f}  SSIM {r['ssim']:.3f}  LPIPS {r['lpips']:.3f}",
            flush=True,
        )
    if not args.quick:
        write(rows, batches, iterations)


def tuned_check(cases: list[Any]) -> None:
    """Issue 8 acceptance 1: GI-x with `preset: tuned` on batches 0-3, 400 its, 4 restarts."""
    from gi_core.attacks.registry import preset_values

    values = {k: v for k, v in preset_values("gi-x", "tuned").items() if k != "preset"}
    paper = measure({}, cases, 400)
    tuned = measure({**values, "preset": "tuned"}, cases, 400)
    out = OUT.with_name("gix_tuned.md")
    out.write_text(
        "\n".join(
            [
                "# GI-x with the tuned preset (issue 8, acceptance 1)",
                "",
                "Command: `.venv/bin/python benchmarks/objective_options.py --tuned`",
                "",
                "lfw-faces 32 px, `convnet` width 16 seed 0, B = 4, batches 0-3 of the unshuffled "
                "plan (16 images), 400 iterations, 4 restarts, no defense, seed = batch index.",
                "",
                "| preset | values | PSNR | SSIM | LPIPS | brightness |",
                "|---|---|---|---|---|---|",
                f"| paper | (config defaults) | {paper['psnr']:.2f} | {paper['ssim']:.3f} | "
                f"{paper['lpips']:.3f} | {paper['brightness']:+.3f} |",
                f"| tuned | `{values}` | {tuned['psnr']:.2f} | {tuned['ssim']:.3f} | "
                f"{tuned['lpips']:.3f} | {tuned['brightness']:+.3f} |",
                "",
                "Target: tuned >= 19 dB mean PSNR: " + ("met" if tuned["psnr"] >= 19 else "MISSED"),
                "",
            ]
        )
    )
    print(out.read_text())


def write(rows: list[Any], batches: int, iterations: int) -> None:
    base = rows[0][2]["psnr"]
    lines = [
        "# GI-x objective options: measured effect of each",
        "",
        "Command: `.venv/bin/python benchmarks/objective_options.py --batches 2`",
        "",
        f"lfw-faces 32 px, `convnet` width 16 seed 0 (untrained, batch-statistics BN), B = 4, "
        f"batches 0-{batches - 1} of the unshuffled plan ({4 * batches} images), {iterations} "
        "iterations, 4 restarts, no defense, attack seed = batch index; lr 0.1, box "
        "parametrisation. Every row attacks the identical gradients. *brightness* = mean pixel "
        "of the reconstruction minus mean pixel of the truth (batch-averaged).",
        "",
        "| variant | params | PSNR | Δ vs paper | SSIM | LPIPS | brightness | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, params, r in rows:
        lines.append(
            f"| {label} | `{params}` | {r['psnr']:.2f} | {r['psnr'] - base:+.2f} | "
            f"{r['ssim']:.3f} | {r['lpips']:.3f} | {r['brightness']:+.3f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Sources: `tv_form: zero_pad` and `signed_grad: true` follow the peers' published GI-x "
        "recipes (inversefed's signed Adam, the official GIAS code's signed Adam; zero-padded TV "
        "as in the peer implementation the issue measured). TV weight ≈ 0.2 is the peers' "
        "default; the paper's appendix gives 1e-4.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread; other jobs shared the CPU, so seconds are noisy.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
