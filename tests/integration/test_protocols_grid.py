"""Issue 19, Acceptance 2: a tiny grid over the three protocols (FedSGD, FedAvg, an aggregate
of clients), batches with repeated labels and the two new defenses (label disguise, Soteria),
through `gi-eval run` on the inline executor. Every row carries the threat-model manifest.
The new methods run through `gi-eval run` in test_successors_grid.py (GGL, GIFD) and
test_rgap_grid.py (R-GAP, R-GAP+G)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from storage.run import open_run

GRID = {
    "name": "protocols-tiny",
    # natural-photos: 13 classes of 16 crops each, so batches can repeat labels
    "data": {
        "dataset": "natural-photos",
        "image_size": 32,
        "num_batches": 1,
        "batch_labels": "random",
    },
    "victim": {"arch": "convnet", "width": 4, "seed": 0},
    "generator": {"kind": "dcgan32"},
    "methods": [
        {"name": "gi-x", "params": {"iterations": 4, "restarts": 1}},
        {"name": "gi-z/w", "params": {"z_iterations": 2, "w_iterations": 2, "restarts": 1,
                                       "labels": "count"}},
    ],
    "defenses": [{"kind": "none"}, {"kind": "disguise", "k": 1}, {"kind": "soteria", "p": 0.4}],
    "protocols": [
        {"kind": "fedsgd"},
        {"kind": "fedavg", "local_steps": 2, "local_batch_size": 1, "local_lr": 0.1},
        {"kind": "aggregate", "n_clients": 2},
    ],
    "batch_sizes": [2],
    "seeds": [0],
    "execution": {"executor": "inline"},
}
MANIFEST = ["tm_labels", "tm_bn_stats", "protocol", "local_steps", "local_batch_size",
            "local_lr", "n_clients", "batch_labels", "tm_colour", "tm_prior", "labels",
            "label_accuracy"]


def _gi_eval(*args: str) -> str:
    script = Path(sys.executable).with_name("gi-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    assert proc.returncode == 0, f"gi-eval {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_protocols_repeated_labels_and_disguise_through_gi_eval_run(tmp_path: Path) -> None:
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "run"
    printed = _gi_eval("run", str(spec), "--out", str(out))
    # 3 protocols x 3 defenses = 9 gradients, x 2 methods = 18 cells
    assert "18 of 18 cells committed" in printed
    df = open_run(out).metrics()
    assert len(df) == 18 * 2  # B = 2 rows per cell: the attacked client's images only
    assert set(df["defense"]) == {"none", "disguise", "soteria"}
    assert set(df.loc[df.defense == "soteria", "defense_level"]) == {0.4}
    assert set(df.loc[df.defense == "soteria", "protocol"]) == {"fedsgd", "fedavg", "aggregate"}
    for column in MANIFEST:
        assert column in df.columns, column
    assert df[[c for c in MANIFEST if not c.startswith("local_")]].notna().all().all()
    assert df.loc[df.protocol != "fedavg", "local_steps"].isna().all()
    by = df.groupby("protocol")
    assert set(by.groups) == {"fedsgd", "fedavg", "aggregate"}
    assert set(df.loc[df.protocol == "aggregate", "n_clients"]) == {2}
    fedavg = df[df.protocol == "fedavg"]
    assert set(fedavg["local_steps"]) == {2} and set(fedavg["local_lr"]) == {0.1}
    # the label-disguise batches hold one label; the attacker recovers counts on them
    disguised = df[df.defense == "disguise"]
    assert set(disguised["batch_labels"]) == {"1"}
    assert (disguised.groupby("cell_id")["label"].nunique() == 1).all()
    assert set(df.loc[df.method == "gi-z/w", "tm_labels"]) == {"recovered:count"}
    assert set(df.loc[df.method == "gi-x", "tm_labels"]) == {"given"}
    assert set(df["tm_prior"]) == {"dcgan32", "none"}
    assert df["psnr"].notna().all() and (df["status"] == "ok").all()
    # a cell's scored images are the attacked client's (client 0 = the FedSGD cell's batch)
    fedsgd_samples = set(df.loc[(df.protocol == "fedsgd") & (df.defense == "none"), "sample_index"])
    aggregate_samples = set(
        df.loc[(df.protocol == "aggregate") & (df.defense == "none"), "sample_index"]
    )
    assert fedsgd_samples == aggregate_samples
