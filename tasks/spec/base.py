"""What every spec model shares: the locked base model, scalar-or-list fields, and the
helpers that keep dumps (and so cell ids) stable as fields are added.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _as_tuple(value: Any) -> Any:
    # Levels may be written as a scalar or a list; both become a tuple (one defense per level).
    return tuple(value) if isinstance(value, list | tuple) else (value,)


Floats = Annotated[tuple[float, ...], BeforeValidator(_as_tuple)]
Ints = Annotated[tuple[int, ...], BeforeValidator(_as_tuple)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _drop_unset(data: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    # Fields added after cells were first hashed are left out of the dump while unset, so the
    # ids of existing grids (which hash the dump) do not change.
    return {k: v for k, v in data.items() if not (k in fields and v is None)}


def _each(values: Any, ok: Any, rule: str) -> Any:
    for x in values or ():
        if not ok(x):
            raise ValueError(f"{rule} (got {x})")
    return values
