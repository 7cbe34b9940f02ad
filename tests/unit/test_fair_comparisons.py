"""Issue 8: objective options, presets, configurations kept apart, bad data refused early."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from typer.testing import CliRunner

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.registry import METHOD_NAMES, PRESETS, preset_values
from gi_core.datasets import (
    batch_indices,
    dataset_info,
    decode_image_file,
    load_images,
    max_batches,
)
from gi_core.errors import ConfigError
from gi_core.gradients import client_gradient
from gi_core.objectives import total_variation
from gi_core.victims import build_victim
from pipelines.cli import app
from storage.metrics import PARAM_COLUMNS, ROW_COLUMNS
from tasks.cells import expand
from tasks.errors import DegenerateInputError
from tasks.spec import parse_spec
from tasks.work import _refuse_degenerate

# --- objective options ---------------------------------------------------------------------


def test_zero_pad_tv_charges_the_border_and_interior_does_not() -> None:
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert float(total_variation(flat, form="interior")) == 0.0
    # zero padding right/bottom: one column and one row of |0.7 - 0| out of 8 -> 0.7/8 each
    assert float(total_variation(flat, form="zero_pad")) == pytest.approx(2 * 0.7 / 8)
    with pytest.raises(ConfigError, match="tv_form"):
        total_variation(flat, form="isotropic")


def test_signed_gradient_changes_the_trajectory_and_stays_deterministic() -> None:
    torch.manual_seed(0)
    victim = build_victim("lenet", num_classes=4, image_size=16, seed=0, width=4)
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    problem = InversionProblem(
        victim, [g.detach() for g in client_gradient(victim, images, labels)], labels, (3, 16, 16)
    )
    plain = method_config("gi-x", {"iterations": 3, "restarts": 1})
    signed = dataclasses.replace(plain, signed_grad=True)
    a = reconstruct("gi-x", problem, signed, seed=1).images
    b = reconstruct("gi-x", problem, signed, seed=1).images
    c = reconstruct("gi-x", problem, plain, seed=1).images
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- presets and variants ------------------------------------------------------------------


def test_every_method_has_both_presets_and_the_config_records_which() -> None:
    for name in METHOD_NAMES:
        for preset in PRESETS:
            assert method_config(name, preset=preset).preset == preset
    tuned = method_config("gi-x", preset="tuned")
    assert tuned != method_config("gi-x", preset="paper")  # tuned values differ, not only the label
    assert preset_values("gi-x", "tuned")["tv"] != method_config("gi-x").tv
    with pytest.raises(ConfigError, match="preset"):
        method_config("gi-x", preset="best")


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "fair",
        "data": {"dataset": "synthetic", "num_batches": 1},
        "victim": {"arch": "lenet"},
        "methods": ["gi-x"],
        "batch_sizes": [2],
    }
    return {**base, **over}


def test_an_lr_sweep_and_a_clip_sweep_are_distinct_configurations() -> None:
    plan = expand(
        parse_spec(
            spec(
                methods=[
                    {"name": "gi-x", "params": {"lr": 0.1}},
                    {"name": "gi-x", "params": {"lr": 0.01}},
                ],
                defenses=[
                    {"kind": "dp", "clip": 1.0, "sigma": 0.1},
                    {"kind": "dp", "clip": 2.0, "sigma": 0.1},
                ],
            )
        )
    )
    rows = [c.metric_axes() for c in plan.inversion_cells]
    assert {r["variant"] for r in rows} == {"paper lr=0.1", "paper lr=0.01"}
    assert {r["defense_clip"] for r in rows} == {1.0, 2.0}
    keys = {(r["variant"], r["defense_clip"]) for r in rows}
    assert len(keys) == len(rows) == 4  # every configuration its own row key
    assert {json.loads(r["method_params"])["lr"] for r in rows} == {0.1, 0.01}
    assert {r["param_lr"] for r in rows} == {0.1, 0.01}
    assert set(rows[0]) - {"method"} <= set(ROW_COLUMNS) | PARAM_COLUMNS


def test_victims_and_generators_are_grid_axes_and_labels_name_variants() -> None:
    plan = expand(
        parse_spec(
            spec(
                victim=None,
                victims=[{"arch": "lenet", "seed": 0}, {"arch": "lenet", "seed": 1}],
                generators=[{"kind": "dcgan32"}, {"kind": "dcgan64"}],
                methods=[
                    "gi-x",
                    {"name": "gi-z", "label": "latent search", "params": {"restarts": 1}},
                ],
            )
        )
    )
    assert len(plan.gradient_cells) == 2  # one per victim
    by = {
        (c.method, c.gradient.victim.seed, c.generator.kind if c.generator else None)
        for c in plan.inversion_cells
    }
    assert len(by) == len(plan.inversion_cells) == 2 * (1 + 2)
    assert {c.variant for c in plan.inversion_cells if c.method == "gi-z"} == {"latent search"}


def test_a_label_reused_for_another_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"methods\[1\]\.label"):
        parse_spec(
            spec(
                methods=[
                    {"name": "gi-x", "label": "a", "params": {"lr": 0.1}},
                    {"name": "gi-x", "label": "a", "params": {"lr": 0.2}},
                ]
            )
        )
    with pytest.raises(ConfigError, match=r"methods\[1\]\.label"):  # a label = another's name
        parse_spec(
            spec(
                methods=[
                    {"name": "gi-x", "params": {"lr": 0.1}},
                    {"name": "gi-x", "label": "paper lr=0.1", "params": {"lr": 0.01}},
                ]
            )
        )
    with pytest.raises(ConfigError, match="either victim: or victims:"):
        parse_spec(spec(victims=[{"arch": "lenet"}]))


# --- batch plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,b", [("lfw-faces", 4), ("natural-photos", 4), ("synthetic", 3)])
def test_shuffled_plan_is_disjoint_unique_and_reproducible(name: str, b: int) -> None:
    n = max_batches(name, batch_size=b, image_size=32, shuffle_seed=7)
    assert n == max_batches(name, batch_size=b, image_size=32)
    plan = [
        batch_indices(name, batch_size=b, batch_index=i, image_size=32, shuffle_seed=7)
        for i in range(n)
    ]
    flat = [i for batch in plan for i in batch]
    assert len(flat) == len(set(flat))  # disjoint
    for batch in plan:
        _, labels = load_images(name, batch, image_size=32)
        assert len(set(labels.tolist())) == b  # unique labels
    again = [
        batch_indices(name, batch_size=b, batch_index=i, image_size=32, shuffle_seed=7)
        for i in range(n)
    ]
    other = [
        batch_indices(name, batch_size=b, batch_index=i, image_size=32, shuffle_seed=8)
        for i in range(n)
    ]
    fixed = [batch_indices(name, batch_size=b, batch_index=i, image_size=32) for i in range(n)]
    assert again == plan and other != plan and fixed != plan


def test_shuffle_seed_is_part_of_the_gradient_cell_and_the_rows() -> None:
    a = expand(parse_spec(spec(data={"dataset": "synthetic", "num_batches": 1, "shuffle_seed": 3})))
    b = expand(parse_spec(spec()))
    assert a.gradient_cells[0].id != b.gradient_cells[0].id
    assert a.inversion_cells[0].metric_axes()["data_seed"] == 3


# --- degenerate and bad data ---------------------------------------------------------------


def _photo(size: int = 48) -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((size, size)))


def _folder(tmp_path: Path, classes: int = 2, per_class: int = 2) -> Path:
    root = tmp_path / "imgs"
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(np.roll(_photo(), 7 * (c + k), axis=1)).save(
                root / f"class{c}" / f"{k + 1}.png"
            )
    return root


def _plan_cli(tmp_path: Path, dataset: str, image_size: int = 32) -> tuple[int, str]:
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"name: bad\ndata: {{dataset: 'imagefolder:{dataset}', image_size: {image_size}, "
        "num_batches: 1}\nvictim: {arch: lenet}\nmethods: [gi-x]\nbatch_sizes: [2]\n"
    )
    result = CliRunner().invoke(app, ["plan", str(path), "--out", str(tmp_path / "run")])
    return result.exit_code, result.output


def test_one_class_folder_is_refused_before_anything_runs(tmp_path: Path) -> None:
    root = _folder(tmp_path, classes=1, per_class=4)
    code, out = _plan_cli(tmp_path, str(root))
    assert code == 2 and "error:" in out and "1 class" in out and "gradient is zero" in out
    assert not (tmp_path / "run").exists()


def test_corrupt_jpeg_is_named_at_validation(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    bad = root / "class1" / "0_broken.jpg"  # sorts first: in batch 0
    Image.fromarray(_photo()).save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-scan
    code, out = _plan_cli(tmp_path, str(root))
    assert code == 2 and "0_broken.jpg" in out and "does not decode" in out


def test_sixteen_bit_png_decodes_to_its_true_brightness(tmp_path: Path) -> None:
    gray8 = skdata.camera()[::8, ::8]  # (64, 64) uint8, mean ~ 0.5
    path = tmp_path / "deep.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)  # 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I")
    decoded = decode_image_file(path)
    assert decoded.shape == (3, 64, 64)
    assert float(decoded.mean()) == pytest.approx(gray8.mean() / 255, abs=1e-3)


def test_palette_and_gif_images_decode_in_colour(tmp_path: Path) -> None:
    rgb = _photo()
    path = tmp_path / "anim.gif"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    decoded = decode_image_file(path)
    assert decoded.shape == (3, 48, 48)
    truth = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert float((decoded - truth).abs().mean()) < 0.05  # palette quantisation only


def test_gif_is_a_class_member_and_unsupported_files_are_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    Image.fromarray(_photo()).convert("P").save(root / "class0" / "x.gif")
    info = dataset_info(f"imagefolder:{root}", image_size=32)
    assert info.num_samples == 5  # the gif counts, nothing is skipped silently
    other = _folder(tmp_path / "other")  # a new path: data sets are cached per process
    (other / "class1" / "notes.txt").write_text("not an image")
    code, out = _plan_cli(tmp_path, str(other))
    assert code == 2 and "notes.txt" in out and "unsupported" in out


def test_images_smaller_than_the_requested_size_are_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    code, out = _plan_cli(tmp_path, str(root), image_size=64)  # the photos are 48 px
    assert code == 2 and "smaller than data.image_size 64" in out


def test_zero_and_non_finite_gradients_fail_their_cell_with_the_reason() -> None:
    cell = expand(parse_spec(spec())).gradient_cells[0]
    with pytest.raises(DegenerateInputError, match="norm is 0.0"):
        _refuse_degenerate(cell, torch.zeros(100))
    with pytest.raises(DegenerateInputError, match="norm is nan"):
        _refuse_degenerate(cell, torch.tensor([1.0, float("nan")]))
    _refuse_degenerate(cell, torch.tensor([0.0, 1e-30]))  # tiny but non-zero: fine
