"""Attacks: one file per method, one `reconstruct` entry each, a registry of spec names."""

from gi_core.attacks.engine import AttackResult, InversionProblem, Progress
from gi_core.attacks.registry import METHOD_NAMES, method_config, reconstruct

__all__ = [
    "METHOD_NAMES",
    "AttackResult",
    "InversionProblem",
    "Progress",
    "method_config",
    "reconstruct",
]
