"""Spec names -> attack entry points. One entry per name; unknown names raise ConfigError.

Every entry point has the signature `reconstruct(problem, config, *, seed, generator=None,
init=None, state=None, progress=None, should_stop=None) -> AttackResult`; a method whose module
also has `describe` (same arguments, returning its `StagesCall`) can be batched
(gi_core.attacks.batched).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gi_core.attacks.engine import AttackResult, BaseConfig, InversionProblem, StagesCall
from gi_core.errors import ConfigError

BN_WEIGHT = 1e-2  # default BN-prior weight of the "+bn" variants
# `paper`: the paper's appendix values (the config classes' defaults, plus `defaults` below).
# `tuned`: values chosen by `gi-eval tune` on held-out batches (docs/results/tuning.md): they
# replace the paper's values of the parameters that were searched; everything else stays.
PRESETS = ("paper", "tuned")


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # gi_core.attacks.<module> with `reconstruct` and a `*Config` class
    config: str
    reference: str
    uses_generator: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)
    tuned: Mapping[str, Any] = field(default_factory=dict)


# `preset: tuned`, chosen by `gi-eval tune grids/table1_cpu.yaml` (Optuna TPE, 8 trials per
# method, held-out LFW batches 23-24 of B = 4, convnet width 16, 32 px; docs/results/tuning.md).
# gi-x and gi-z/w were searched; the others inherit the values of the searched method whose
# stages they share (their own learning rates that were not searched keep the paper's values).
# `tuned_on` records where (tasks.spec.tuning_context); a grid that uses the preset elsewhere
# marks every row with what differs (tasks.spec.mark_provenance). They were tuned before the
# colour model existed, i.e. with LFW's gray faces attacked as colour images.
def _tuned_on(method: str, budget: dict[str, int]) -> str:
    context = {
        "grid": "table1-cpu",
        "dataset": "lfw-faces",
        "image_size": 32,
        "colour": "rgb",
        "victims": [{"arch": "convnet", "width": 16, "seed": 0, "checkpoint": None}],
        "method": method,
        "budget": budget,
        "held_out": "B=4 batches 23-24",
    }
    return json.dumps(context, sort_keys=True, separators=(",", ":"))


_TUNED_GIX: dict[str, Any] = {
    "tv": 0.235,
    "tv_form": "zero_pad",
    "lr": 0.016,
    "signed_grad": True,
    "tuned_on": _tuned_on("gi-x", {"iterations": 400, "restarts": 1}),
}
_TUNED_GIZW: dict[str, Any] = {
    "tv": 0.886,
    "tv_form": "interior",
    "z_lr": 0.00929,
    "w_lr": 0.000115,
    "tuned_on": _tuned_on("gi-z/w", {"z_iterations": 100, "w_iterations": 100, "restarts": 1}),
}
_TUNED_LATENT = {k: _TUNED_GIZW[k] for k in ("tv", "tv_form", "z_lr", "tuned_on")}
_TUNED_W = {k: _TUNED_GIZW[k] for k in ("tv", "tv_form", "w_lr", "tuned_on")}

_METHODS = [
    Method(
        "gi-x",
        "gi_x",
        "GIXConfig",
        "Geiping et al. 2020 (Inverting Gradients)",
        False,
        tuned=_TUNED_GIX,
    ),
    Method(
        "gi-x+bn",
        "gi_x",
        "GIXConfig",
        "Yin et al. 2021 (See through Gradients)",
        False,
        {"bn": BN_WEIGHT},
        tuned=_TUNED_GIX,
    ),
    Method(
        "gi-z",
        "gi_z",
        "GIZConfig",
        "Jeon et al. 2021, latent search (GI-z)",
        True,
        tuned=_TUNED_LATENT,
    ),
    Method(
        "gi-w",
        "gi_w",
        "GIWConfig",
        "Jeon et al. 2021, generator-parameter search (GI-w)",
        True,
        tuned=_TUNED_W,
    ),
    Method(
        "gi-z/w", "gias", "GIASConfig", "Jeon et al. 2021, GIAS (GI-z/w)", True, tuned=_TUNED_GIZW
    ),
    Method(
        "gi-z/x",
        "gi_zx",
        "GIZXConfig",
        "Jeon et al. 2021, latent then pixel search (GI-z/x)",
        True,
        tuned=_TUNED_LATENT,
    ),
    Method(
        "gi-z+bn",
        "gi_z",
        "GIZConfig",
        "Jeon et al. 2021 GI-z + BN prior of Yin et al.",
        True,
        {"bn": BN_WEIGHT},
        tuned=_TUNED_LATENT,
    ),
    Method(
        "gi-z/w+bn",
        "gias",
        "GIASConfig",
        "Jeon et al. 2021 GIAS + BN prior of Yin et al.",
        True,
        {"bn": BN_WEIGHT},
        tuned=_TUNED_GIZW,
    ),
    # Successors of GIAS (issue 19, Deliver 6), on the same priors, cost and budget accounting.
    Method(
        "ggl",
        "ggl",
        "GGLConfig",
        "Li et al. 2022 (GGL, CVPR): gradient-free CMA-ES latent search + KL regulariser",
        True,
    ),
    Method(
        "gifd",
        "gifd",
        "GIFDConfig",
        "Fang et al. 2023 (GIFD, ICCV): latent, then feature maps layer by layer in l1 balls",
        True,
    ),
]
# R-GAP (Zhu & Blaschko 2021) and R-GAP+G (Jeon et al. 2021, App. C): closed form per layer;
# victims of R-GAP's form only (gi_core.attacks.rgap.check_victim), batch size 1.
_METHODS += [
    Method("rgap", "rgap", "RGAPConfig", "Zhu & Blaschko 2021 (R-GAP), closed form", False),
    Method(
        "rgap+g",
        "rgap",
        "RGAPGConfig",
        "Jeon et al. 2021 App. C: R-GAP with the generator for the lowest layers",
        True,
    ),
]
RGAP_METHODS = ("rgap", "rgap+g")
METHODS: dict[str, Method] = {}
for _m in _METHODS:
    if _m.name in METHODS:
        raise ConfigError(f"duplicate method name {_m.name!r} in the registry")
    METHODS[_m.name] = _m
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method: unknown {name!r}; known: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def uses_generator(name: str) -> bool:
    return get_method(name).uses_generator


def config_class(name: str) -> type[BaseConfig]:
    method = get_method(name)
    cls: type[BaseConfig] = getattr(_module(method), method.config)
    return cls


def preset_values(name: str, preset: str) -> dict[str, Any]:
    """The parameter values a preset sets for `name` (on top of the config's defaults)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown {preset!r}; known: {', '.join(PRESETS)}")
    method = get_method(name)
    values = {**method.defaults, **(method.tuned if preset == "tuned" else {})}
    return {**values, "preset": preset}


def method_config(
    name: str, params: Mapping[str, Any] | None = None, *, preset: str | None = None
) -> BaseConfig:
    """The frozen config of `name`: the preset's values (default `paper`) overridden by
    `params`. A stored full config (which carries its own `preset`) round-trips unchanged."""
    params = dict(params or {})
    preset = preset or params.pop("preset", "paper")
    params.pop("preset", None)
    cls = config_class(name)
    known = {f.name for f in dataclasses.fields(cls)} - {"preset"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"params.{unknown[0]}: not a parameter of {name}; known: {', '.join(sorted(known))}"
        )
    return cls(**{**preset_values(name, preset), **params})


def entry_point(name: str) -> Callable[..., AttackResult]:
    fn: Callable[..., AttackResult] = _module(get_method(name)).reconstruct
    return fn


def describer(name: str) -> Callable[..., StagesCall]:
    """The `describe` of method `name`: its stages as a description, solved by the caller."""
    fn: Callable[..., StagesCall] | None = getattr(_module(get_method(name)), "describe", None)
    if fn is None:
        raise ConfigError(f"method: {name} does not describe its stages; it cannot be batched")
    return fn


def describes(name: str) -> bool:
    """Whether method `name` describes its stages (else it runs alone: GGL's CMA-ES)."""
    return hasattr(_module(get_method(name)), "describe")


def reconstruct(
    name: str, problem: InversionProblem, config: BaseConfig | None = None, **kwargs: Any
) -> AttackResult:
    """Run the method `name` on `problem` (config defaults to the method's defaults)."""
    return entry_point(name)(problem, config or method_config(name), **kwargs)


def _module(method: Method) -> Any:
    return importlib.import_module(f"gi_core.attacks.{method.module}")
