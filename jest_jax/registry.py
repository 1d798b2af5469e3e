"""Name → implementation tables: the extension points (docs/design.md §5).

A registry holds one kind of thing (criteria, selection methods, evaluators, data
sources). A config names an entry either by its registered name or as
`"package.module:attr"`, which is imported on first use, so a user's module needs no
edit to jest_jax and no import in a launcher script.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind; `what` ("criterion") and `attr` ("function") word the errors.

    `needs` names the attributes every entry has by its contract (docs/design.md §4):
    an object found at a `"module:attr"` path without them is refused by name.
    """

    def __init__(self, what: str, attr: str, needs: tuple[str, ...] = ()):
        self.what, self.attr, self.needs = what, attr, needs
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated object selectable as `name`."""

        def wrap(obj: T) -> T:
            if self._entries.get(name, obj) is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry registered as `name`, or the object at `"package.module:attr"`.

        ValueError, naming `name` and why, for an unknown name, a module that fails to
        import (in any way) or a missing attribute.
        """
        if not isinstance(name, str):
            raise ValueError(f"a {self.what} is named by a string, not {name!r}")
        if ":" not in name:
            if name not in self._entries:
                raise ValueError(f"unknown {self.what} {name!r}: registered are {self.names()}, "
                                 f"or give 'package.module:{self.attr}'")
            return self._entries[name]
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise ValueError(f"{self.what} {name!r} must be 'package.module:{self.attr}'")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a user module may fail in any way: say which and why
            raise ValueError(f"{self.what} {name!r}: cannot import {module_name!r} "
                             f"({type(e).__name__}: {e})") from None
        obj: Any = getattr(module, attr, None)
        if obj is None:
            raise ValueError(f"{self.what} {name!r}: {module_name} has no {self.attr} {attr!r}")
        missing = [n for n in self.needs if not hasattr(obj, n)]
        if missing:
            raise ValueError(f"{name!r} is not a {self.what}: it has no {missing} "
                             "(docs/design.md §4)")
        return obj

    def find(self, name: Any) -> T | None:
        """`get`, or None where it would raise (for callers that report the error later)."""
        try:
            return self.get(name)
        except ValueError:
            return None
