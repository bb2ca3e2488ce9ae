"""Strict pydantic models read from YAML: unknown keys rejected, one clear line for every mistake."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import PrunepilotError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    # no unknown keys; no inf / nan in any number (`--timeout inf` was accepted and waited forever)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def validate(cls: type[M], data: dict | None, what: str) -> M:
    """cls.model_validate(data), turning a ValidationError into 'invalid WHAT: where: message (N more)'."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")  # a model-level check: its own sentence
        more = f" ({len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise PrunepilotError(f"invalid {what}: {where + ': ' if where else ''}{msg}{more}") from None


def load_yaml_mapping(path: str | Path, what: str) -> dict | None:
    """The YAML mapping in `path` (None for an empty file); clear errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise PrunepilotError(f"{what} file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PrunepilotError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise PrunepilotError(f"{what} {p} must be a YAML mapping")
    return data
