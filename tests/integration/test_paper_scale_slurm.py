"""The paper-scale pieces end to end on the real Slurm cluster, at toy size.

A StyleGAN2 prior converted with `gi-eval convert-generator` from a rosinality-format file
built here (32 px, 4 blocks of 8 channels), a torchvision ResNet-18 victim with ImageNet input
normalisation, and an `imagenet:` validation-layout folder built from photos shipped in
scikit-image: every method of the registry whose threat model fits (EXCLUDED says why the others
do not) runs as job arrays on Slurm and commits.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gi_core.attacks.registry import METHOD_NAMES, config_class, uses_generator
from gi_core.stylegan2 import StyleGAN2Config, build_stylegan2
from storage.run import open_run
from tasks.cells import expand
from tasks.spec import load_spec

if TYPE_CHECKING:
    from tests.integration.conftest import SlurmCluster

CONFIG = StyleGAN2Config(resolution=32, channels=(8, 8, 8, 8), z_dim=8, w_dim=8, mapping_layers=2)
SHORT = {"iterations": 3, "z_iterations": 2, "w_iterations": 2, "x_iterations": 2}
# Methods whose threat model this grid cannot hold, each covered by its own grid test.
EXCLUDED = {
    "rgap": "inverts one image of an rgapnet-style chain, not a ResNet (test_rgap_grid)",
    "rgap+g": "inverts one image of an rgapnet-style chain, not a ResNet (test_rgap_grid)",
    "gifd": "searches a DCGAN-kind prior's feature maps; StyleGAN2 has none (test_successors_grid)",
}
METHODS = tuple(name for name in METHOD_NAMES if name not in EXCLUDED)


def _gi_eval() -> list[str]:
    script = Path(sys.executable).with_name("gi-eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _imagenet_folder(root: Path) -> Path:
    import skimage.data

    classes = {"n01440764": ("coffee", "astronaut"), "n02123045": ("chelsea", "rocket")}
    for wnid, names in classes.items():
        for name in names:
            path = root / "val" / wnid / f"ILSVRC2012_val_{name}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(path, "JPEG")
    return root


def _rosinality_file(path: Path) -> Path:
    """A rosinality-format training checkpoint (g_ema) holding a seeded random StyleGAN2."""
    ours = build_stylegan2(CONFIG, output_size=32, seed=11).state_dict()
    sd: dict[str, torch.Tensor] = {}
    for i in range(CONFIG.mapping_layers):
        sd[f"style.{i + 1}.weight"] = ours[f"mapping.fc{i}.weight"]
        sd[f"style.{i + 1}.bias"] = ours[f"mapping.fc{i}.bias"]
    sd["input.input"] = ours["synthesis.b4.const"][None]

    def layer(dst: str, src: str, *, rgb: bool) -> None:
        sd[f"{dst}.conv.weight"] = ours[f"{src}.weight"][None]
        sd[f"{dst}.conv.modulation.weight"] = ours[f"{src}.affine.weight"]
        sd[f"{dst}.conv.modulation.bias"] = ours[f"{src}.affine.bias"]
        if rgb:
            sd[f"{dst}.bias"] = ours[f"{src}.bias"].reshape(1, 3, 1, 1)
        else:
            sd[f"{dst}.noise.weight"] = ours[f"{src}.noise_strength"].reshape(1) + 0.1
            sd[f"{dst}.activate.bias"] = ours[f"{src}.bias"]

    layer("conv1", "synthesis.b4.conv1", rgb=False)
    layer("to_rgb1", "synthesis.b4.torgb", rgb=True)
    for k, res in enumerate((8, 16, 32)):
        layer(f"convs.{2 * k}", f"synthesis.b{res}.conv0", rgb=False)
        layer(f"convs.{2 * k + 1}", f"synthesis.b{res}.conv1", rgb=False)
        layer(f"to_rgbs.{k}", f"synthesis.b{res}.torgb", rgb=True)
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(CONFIG.w_dim)}, path)
    return path


def _spec(data: Path, weights: Path) -> dict[str, Any]:
    methods = []
    for name in METHODS:
        fields = {f.name for f in dataclasses.fields(config_class(name))}
        params = {"restarts": 2, **{k: v for k, v in SHORT.items() if k in fields}}
        methods.append({"name": name, "params": params})
    return {
        "name": "paper-scale-toy",
        "data": {"dataset": f"imagenet:{data}", "image_size": 32, "num_batches": 1},
        "victim": {
            "arch": "torchvision:resnet18",
            "seed": 0,
            "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        },
        "generator": {"kind": "stylegan2", "checkpoint": str(weights), "latent_space": "w"},
        "methods": methods,
        "batch_sizes": [2],
        "execution": {
            "executor": "slurm",
            "cells_per_job": 4,
            "slurm": {"cpus_per_task": 1, "gpus_per_task": 0, "mem_gb": 2, "timeout_min": 20},
        },
    }


@pytest.mark.slurm
def test_stylegan2_and_torchvision_victim_grid_commits_every_method(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    data = _imagenet_folder(tmp_path / "imagenet")
    weights = tmp_path / "stylegan2-toy.pt"
    convert = subprocess.run(
        [*_gi_eval(), "convert-generator", str(_rosinality_file(tmp_path / "g.pt")), str(weights)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert convert.returncode == 0, convert.stderr
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(_spec(data, weights), sort_keys=False))
    out = tmp_path / "run"
    proc = subprocess.run(
        [*_gi_eval(), "run", str(spec), "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    run = open_run(out)
    expected = {c.id for c in expand(load_spec(spec)).inversion_cells}
    assert len(expected) == len(METHODS)
    assert run.committed_cells() == expected
    df = run.metrics()
    assert set(df["method"]) == set(METHODS)
    assert set(df["status"]) == {"ok"}
    assert len(df) == 2 * len(METHODS)
    assert df["slurm_job_id"].notna().all()  # ran as Slurm jobs, not in process
    with_prior = df[df["method"].map(uses_generator)]
    assert set(with_prior["generator"]) == {"stylegan2"}
