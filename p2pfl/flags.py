"""Command-line flags derived from a config model, so that a field is written once.

`model_options(NodeConfig)` gives a typer command one option per field: `--field-name`, its
help the field's description (choices of a Literal when it has none) and its default, its
metavar the field's type. The values reach the command as `overrides`, keyed like the TOML
file, for `p2pfl.config_file.load_model`. Flag values are passed on as text (numbers parsed as
TOML would), so pydantic validates a flag and a file key alike and a bad value gets the same
one-line message either way.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["Flag", "model_options"]

R = TypeVar("R")


@dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line when not `--field-name VALUE`."""

    name: str | None = None
    """The flag, e.g. `--peer` for `peers` (a list field's flag names one item)."""
    split: str | None = None
    """A list field given as one separated value (`--discovery mdns,presence`), not repeated."""


def model_options(
    model: type[BaseModel], flags: Mapping[str, Flag] | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate a command taking `overrides`: it gets one option per field of `model`.

    The command's own parameters come first; `overrides` maps each field's key (its alias if
    it has one) to the flag's value, None when the flag was not given.
    """
    spelled = flags or {}

    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        own = inspect.signature(func)
        hints = typing.get_type_hints(func)
        explicit = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in own.parameters.values()
            if p.name != "overrides"
        ]
        options = {
            f"cfg_{key}": _Option(key, field, spelled.get(key, Flag()))
            for name, field in model.model_fields.items()
            for key in [field.alias or name]
        }
        unknown = set(spelled) - {o.key for o in options.values()}
        if unknown:
            raise ValueError(f"{model.__name__} has no field {sorted(unknown)}")

        @functools.wraps(func)
        def command(**kwargs: Any) -> R:
            overrides = {o.key: o.value(kwargs.pop(param)) for param, o in options.items()}
            return func(**kwargs, overrides=overrides)

        params = [*explicit, *(o.parameter(param) for param, o in options.items())]
        command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


class _Option:
    """One field as a typer option."""

    def __init__(self, key: str, field: FieldInfo, flag: Flag) -> None:
        self.key = key
        self.field = field
        self.flag = flag
        self.type, self.many = _item_type(field.annotation)

    def parameter(self, param: str) -> inspect.Parameter:
        name = self.flag_name()
        repeated = self.many and self.flag.split is None
        if self.type is bool:
            if self.field.default is True:  # a switch that is on can be turned off
                name = f"{name}/--no-{name.removeprefix('--')}"
            option = typer.Option(None, name, help=self.help())
            annotation: Any = bool | None
        else:
            option = typer.Option(None, name, help=self.help(), metavar=self.metavar())
            annotation = list[str] | None if repeated else str | None
        return inspect.Parameter(
            param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
        )

    def flag_name(self) -> str:
        return self.flag.name or "--" + self.key.replace("_", "-")

    def help(self) -> str:
        text = self.field.description or " | ".join(map(str, _choices(self.type))) + "."
        default = self.field.default
        if self.type is bool and default is True:
            default = self.flag_name().removeprefix("--")
        if "[default:" in text or default is None or default is False or default == ():
            return text
        if self.many:
            default = (self.flag.split or ",").join(map(str, default))
        return f"{text} [default: {default}]"

    def metavar(self) -> str:
        name = {int: "int", float: "float", Path: "path"}.get(self.type, "str")
        return f"<list[{name}]>" if self.many and self.flag.split is None else f"<{name}>"

    def value(self, given: Any) -> Any:
        """The flag's value as the file would hold it (None: not given)."""
        if given is None or isinstance(given, bool):
            return given
        if self.many:
            items = given.split(self.flag.split) if self.flag.split else given
            items = [self.scalar(s.strip()) for s in items if s.strip() or not self.flag.split]
            return items if items or self.flag.split else None
        return self.scalar(given)

    def scalar(self, text: str) -> Any:
        if self.type not in (int, float):
            return text
        for number in (int, float):
            try:
                return number(text)
            except ValueError:
                pass
        return text  # pydantic says why it is not a number, as for the file


def _item_type(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, False); `tuple[X, ...]` -> (X, True)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _choices(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
