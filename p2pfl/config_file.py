"""One loader for every config model: a TOML file, then flag overrides, validated once.

`NodeConfig` (`p2pfl run`), `Scenario` (`p2pfl sim`) and `MonitorConfig` (`p2pfl monitor`) are
all read here, so a file's keys and a command's flags meet the same validation, and a bad value
becomes the same one line naming the key (`format_error`) whichever way it came.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "format_error", "load_model", "read_toml", "set_key"]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def read_toml(path: Path) -> dict[str, Any]:
    """The file's table, top-level keys spelled with `_` (a file may write them with `-`)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def format_error(exc: ValidationError) -> str:
    """One readable line per problem, naming the key and the bad value."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = (
            "" if isinstance(value, Mapping) or err["type"] == "missing" else f" (got {value!r})"
        )
        lines.append(f"config error: {key}: {msg}{shown}")
    return "\n".join(lines)


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """The plain override: a flag replaces the file's key of the same name."""
    data[key] = value


def load_model(
    model: type[M],
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    apply: Callable[[dict[str, Any], str, Any], None] = set_key,
) -> M:
    """Validate `data` (a file's table) with `overrides` applied (None or empty = not given).

    `apply` places one override into the data (`Scenario` sends most keys to its `[node]`
    table). Raises ConfigError with one line per problem, naming the key.
    """
    merged = dict(data)
    for key, value in (overrides or {}).items():
        if value is None or value == ():
            continue
        apply(merged, key, value)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_error(exc)) from None
