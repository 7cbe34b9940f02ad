"""Grid spec: parsing, defaults, and one combined ConfigError naming every bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gi_core.errors import ConfigError
from tasks.spec import GridSpec, load_spec, parse_spec, spec_from_yaml

SMOKE = """
name: smoke
data:    {dataset: synthetic, image_size: 32, num_batches: 2}
victim:  {arch: lenet, width: 16, seed: 0, checkpoint: null}
generator: {kind: dcgan32, checkpoint: null}
methods:
  - gi-x
  - {name: gi-z/w, params: {restarts: 2}}
defenses:
  - {kind: none}
  - {kind: sparsity, p: [0.5, 0.9]}
  - {kind: dp, clip: 1.0, sigma: 1e-1}
batch_sizes: [1, 4]
seeds: [0]
budgets: {iterations_scale: 0.5}
execution: {executor: local, cells_per_job: 4, max_parallel: 2, slurm: {partition: gpu}}
storage: {keep_restarts: false}
"""


def base(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "t",
        "data": {"dataset": "synthetic", "num_batches": 2},
        "victim": {"arch": "lenet"},
        "methods": ["gi-x"],
    }
    return {**spec, **over}


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def test_full_yaml_parses(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(SMOKE)
    spec = load_spec(path)
    assert spec.methods[0].name == "gi-x" and spec.methods[0].params == {}
    assert spec.methods[1].params == {"restarts": 2}
    assert spec.defenses[1].p == (0.5, 0.9) and spec.defenses[2].sigma == (0.1,)
    assert [d.level for f in spec.defenses for d in f.expand()] == [0.0, 0.5, 0.9, 0.1]
    assert spec.execution.slurm.partition == "gpu" and spec.execution.slurm.cpus_per_task == 4
    assert spec.budgets.iterations_scale == 0.5


def test_defaults_and_frozen() -> None:
    spec = parse_spec(base())
    assert [d.kind for d in spec.defenses] == ["none"]
    assert spec.batch_sizes == (1,) and spec.seeds == (0,) and spec.generator is None
    assert spec.execution.executor == "local" and spec.storage.keep_restarts is False
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "x"  # type: ignore[misc]


def test_canonical_json_is_independent_of_spelling() -> None:
    a = spec_from_yaml(SMOKE)
    reordered = SMOKE.replace(
        "{kind: dp, clip: 1.0, sigma: 1e-1}", "{sigma: 0.1, kind: dp, clip: 1}"
    )
    b = spec_from_yaml(reordered)
    assert a.canonical_json() == b.canonical_json()
    assert GridSpec.model_validate_json(a.model_dump_json()).canonical_json() == a.canonical_json()


def test_every_structural_error_is_named_at_once() -> None:
    errs = errors_of(
        base(
            defenses=[
                {"kind": "none"},
                {"kind": "sparsity", "p": 1.2},
                {"kind": "dp", "sigma": 0.1},
                {"kind": "quantize", "bits": [8, 40]},
                {"kind": "noise", "sigma": -1},
                {"kind": "none", "p": 0.5},
                {"kind": "blur"},
            ],
            execution={"executor": "pbs"},
            data={"dataset": "mnist", "image_size": 8},
            batch_sizes=[0],
            unknown_key=1,
            name="a/b",
        )
    )
    assert "defenses[1].p: must be in [0, 1) (got 1.2)" in errs
    assert "defenses[2]: dp needs 'clip'" in errs
    assert "defenses[3].bits: must be in 1..32 (got 40)" in errs
    assert "defenses[4].sigma: must be a finite number >= 0 (got -1.0)" in errs
    assert "defenses[5]: none does not take 'p'" in errs
    assert any(e.startswith("defenses[6].kind:") for e in errs)
    assert any(e.startswith("execution.executor:") for e in errs)
    assert any(e.startswith("data.dataset: unknown data set 'mnist'") for e in errs)
    assert any(e.startswith("data.image_size:") for e in errs)
    assert "batch_sizes: must be >= 1 (got 0)" in errs
    assert any(e.startswith("unknown_key:") for e in errs)
    assert any(e.startswith("name:") for e in errs)


def test_methods_are_validated_with_the_registry() -> None:
    errs = errors_of(
        base(
            methods=[
                "gi-x",
                "gi-y",
                {"name": "gi-x", "params": {"iterations": 0}},
                {"name": "gi-x", "params": {"lr": 0.1, "hue": 3}},
                {"name": "gi-x", "prams": {}},
            ]
        )
    )
    assert errs[0].startswith("methods[4].prams:")  # structural errors come first
    spec_errs = errors_of(
        base(
            methods=[
                "gi-x",
                "gi-y",
                {"name": "gi-x", "params": {"iterations": 0}},
                {"name": "gi-x", "params": {"lr": 0.1, "hue": 3}},
            ]
        )
    )
    assert spec_errs[0].startswith("methods[1].name: unknown method 'gi-y'; known: gi-x,")
    assert spec_errs[1] == "methods[2].params.iterations: must be >= 1 (got 0)"
    assert spec_errs[2].startswith("methods[3].params.hue: not a parameter of gi-x")
    assert len(spec_errs) == 3


def test_generator_required_only_by_generator_methods() -> None:
    assert parse_spec(base(methods=["gi-x", "gi-x+bn"])).generator is None
    errs = errors_of(base(methods=["gi-x", "gi-z/w", "gi-z/w+bn"]))
    assert errs == [
        "generator: required by gi-z/w, gi-z/w+bn (write e.g. generator: {kind: dcgan32})"
    ]


def test_missing_checkpoints_are_named(tmp_path: Path) -> None:
    real = tmp_path / "victim.pt"
    real.write_bytes(b"x")
    assert parse_spec(base(victim={"arch": "lenet", "checkpoint": str(real)})).victim.checkpoint
    errs = errors_of(
        base(
            victim={"arch": "lenet", "checkpoint": str(tmp_path / "no.pt")},
            generator={"kind": "dcgan32", "checkpoint": "/no/g.pt"},
        )
    )
    assert errs[0].startswith("victim.checkpoint: no such file")
    assert errs[1].startswith("generator.checkpoint: no such file '/no/g.pt'")


def test_batch_sizes_must_fit_the_data_set() -> None:
    errs = errors_of(base(batch_sizes=[1, 48], data={"dataset": "synthetic", "num_batches": 2}))
    assert len(errs) == 1 and errs[0].startswith("batch_sizes[1]: 'synthetic'")
    assert "supplies only 1 non-overlapping batches of 48" in errs[0]
    errs = errors_of(base(data={"dataset": "imagefolder:/no/such/dir"}))
    assert errs[0].startswith("data.dataset:")


def test_yaml_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        spec_from_yaml("name: [unclosed")
    with pytest.raises(ConfigError, match="mapping"):
        spec_from_yaml("- a\n- b\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_label_recovery_mode_is_checked_against_batch_sizes() -> None:
    idlg = {"name": "gi-x", "params": {"labels": "idlg"}}
    errs = errors_of(base(methods=[idlg], batch_sizes=[1, 4]))
    assert errs == [
        "methods[0].params.labels: idlg recovers the label of a single image; "
        "use batch_sizes: [1] or labels: yin"
    ]
    assert parse_spec(base(methods=[idlg], batch_sizes=[1])).batch_sizes == (1,)
    bad = errors_of(base(methods=[{"name": "gi-x", "params": {"labels": "guess"}}]))
    assert bad[0].startswith("methods[0].params.labels: must be one of")
