"""Reading one config section: typed, range-checked fields whose errors name the field.

Every component validates its own section with a `Section` (docs/design.md §4, "Config"):

    s = Section(config.model, "model")
    patch = s.integer("patch_size", 1)          # ConfigError: config.model.patch_size=0 ...

The message always has the form `config.<field>=<value> is invalid: <what is allowed>`.
This module imports nothing from jest_jax, so the lowest layers can use it.
"""

from __future__ import annotations

import ast
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """An invalid config field; the message names the field, its value and what is allowed."""


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """`did you mean 'x'?` for the closest of `choices`, else `typo?`."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else "typo?"


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
    """`config` value at dotted `field` ("data.train.split"); ConfigError if missing."""
    node: Any = config
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict | dict) or part not in node:
            raise ConfigError(f"config.{field} is missing")
        node = node[part]
    return node


def parse_assignment(item: str) -> tuple[str, Any]:
    """`"FIELD=VALUE"` as (FIELD, VALUE): a Python literal, else the bare string (so
    `--set data.train.source=tfds` needs no quotes); ConfigError without `=`."""
    field, sep, value = item.partition("=")
    if not sep or not field:
        raise ConfigError(f"{item!r} is not FIELD=VALUE")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def set_fields(config: ml_collections.ConfigDict, fields: Mapping[str, Any],
               where: str) -> None:
    """Sets each dotted field of `fields` in `config`. A field the config does not have is
    a ConfigError naming `where` the override was written: overrides change fields, they
    never add one (a typo would otherwise be silently ignored by every component)."""
    for field, value in fields.items():
        parent, _, last = field.rpartition(".")
        try:
            node = get_field(config, parent) if parent else config
        except ConfigError:
            node = None
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            raise ConfigError(f"{where}: config.{field} does not exist in the config")
        node[last] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Section:
    """Typed reads of the fields of one config group, at dotted `path` ("" = the top)."""

    def __init__(self, node: ml_collections.ConfigDict, path: str = ""):
        self.node = node
        self.path = path

    def field(self, name: str) -> str:
        """The dotted name of field `name`, as messages show it."""
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"config.{self.field(name)}={value!r} is invalid: {allowed}")

    def check(self, ok: bool, name: str, value: Any, allowed: str) -> None:
        if not ok:
            raise self.error(name, value, allowed)

    def get(self, name: str) -> Any:
        if name not in self.node:
            raise ConfigError(f"config.{self.field(name)} is missing")
        return self.node[name]

    def section(self, name: str) -> Section:
        value = self.get(name)
        self.check(isinstance(value, ml_collections.ConfigDict), name, value,
                   "must be a group of fields")
        return Section(value, self.field(name))

    def integer(self, name: str, low: int, high: float = float("inf")) -> int:
        value = self.get(name)
        self.check(_is_int(value) and low <= value <= high, name, value,
                   f"must be an integer in [{low}, {high}]")
        return value

    def number(self, name: str, ok: Callable[[float], bool] | None = None,
               allowed: str = "") -> float:
        """A finite number (not a bool), and in range by `ok` (`allowed` says which)."""
        value = self.get(name)
        self.check(isinstance(value, int | float) and not isinstance(value, bool)
                   and math.isfinite(value), name, value, "must be a finite number")
        if ok is not None:
            self.check(ok(value), name, value, allowed)
        return float(value)

    def choice(self, name: str, choices: Sequence[Any]) -> Any:
        value = self.get(name)
        self.check(value in choices, name, value, f"must be one of {list(choices)}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        self.check(isinstance(value, bool), name, value, "must be True or False")
        return value

    def string(self, name: str, nonempty: bool = False) -> str:
        value = self.get(name)
        self.check(isinstance(value, str) and (value != "" or not nonempty), name, value,
                   "must be a non-empty string" if nonempty else "must be a string")
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        """A free-form group (`criterion_args`): its keys are checked by its owner."""
        value = self.get(name)
        self.check(isinstance(value, ml_collections.ConfigDict | dict), name, value,
                   "must be a group of name=value fields")
        return dict(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
