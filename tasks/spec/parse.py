"""Reading a spec: YAML text or plain data in, a validated GridSpec out, or one ConfigError
listing every bad field by its path (e.g. 'defenses[1].p: must be in [0, 1) (got 1.2)').
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gi_core.errors import ConfigError
from tasks.spec.schema import GridSpec


def parse_spec(data: Mapping[str, Any]) -> GridSpec:
    """Validate a spec given as plain data; ConfigError lists every bad field."""
    try:
        return GridSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid grid spec:\n  " + "\n  ".join(_messages(e))) from e


def spec_from_yaml(text: str) -> GridSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"grid spec is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("grid spec must be a YAML mapping at the top level")
    return parse_spec(data)


def load_spec(path: Path | str) -> GridSpec:
    return spec_from_yaml(read_spec_text(path))


def read_spec_text(path: Path | str) -> str:
    """The spec file's text; ConfigError names the file when it is missing or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"spec: {path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
            "save it as UTF-8"
        ) from e
    except OSError as e:
        raise ConfigError(f"spec: cannot read {path}: {e.strerror or e}") from e


def _messages(error: ValidationError) -> list[str]:
    lines = []
    errors = error.errors()
    for err in errors:
        if _follows_from_items(err, errors):
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "too_short":  # pydantic's "Tuple should have at least 1 item ..."
            ctx = err.get("ctx", {})
            msg = f"must list at least {ctx.get('min_length', 1)} (got {ctx.get('actual_length')})"
        where = _dotted(err["loc"])
        for line in msg.splitlines():  # semantic problems arrive as one multi-line message
            lines.append(f"{where}: {line}" if where else line)
    return lines


def _follows_from_items(err: Any, errors: list[Any]) -> bool:
    """A tuple's min_length counts only its valid items, so one bad item of a required list
    also reports 'Tuple should have at least 1 item'; that line says nothing new, drop it."""
    loc = tuple(err["loc"])
    return err["type"] == "too_short" and any(
        len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc for other in errors
    )


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('defenses', 1, 'p') -> 'defenses[1].p'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
