"""Selection criteria: elementwise maps from pair-loss blocks to scores (DESIGN.md §4).

A criterion is a pure JAX function `(learner, reference) -> scores` over blocks of
equal shape: the full `N×N` pair-loss matrix, the `m×N` / `N×m` blocks of the
matrix-free path, or the length-N diagonal. It must be elementwise, because the
matrix-free path evaluates it on blocks and must agree with the dense path.

Add one in your own module, no change to this package needed::

    # mymodule.py
    def confident_learner(learner, reference):
        return -learner
    confident_learner.needs_reference = False   # default True: a reference is loaded

and name it in the config: `--config.selection.criterion=mymodule:confident_learner`.
`register` does the same for a short name once the module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax

Criterion = Callable[[jax.Array, "jax.Array | None"], jax.Array]

_REGISTRY: dict[str, Criterion] = {}


def register(name: str, *, needs_reference: bool = True) -> Callable[[Criterion], Criterion]:
    """Decorator: make `fn` selectable as `selection.criterion = name`."""

    def wrap(fn: Criterion) -> Criterion:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"criterion {name!r} is already registered")
        fn.needs_reference = needs_reference
        _REGISTRY[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    """The registered criterion names."""
    return sorted(_REGISTRY)


def get(name_or_path: str | Criterion) -> Criterion:
    """A registered name, `"package.module:function"`, or a criterion function itself."""
    if callable(name_or_path):
        return name_or_path
    if not isinstance(name_or_path, str):
        raise ValueError(f"a criterion is a name or a function, not {name_or_path!r}")
    if ":" not in name_or_path:
        if name_or_path not in _REGISTRY:
            raise ValueError(f"unknown criterion {name_or_path!r}: registered are {names()}, "
                             "or give 'package.module:function'")
        return _REGISTRY[name_or_path]
    module_name, _, attr = name_or_path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"criterion {name_or_path!r} must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user module may fail in any way: say which and why
        raise ValueError(f"criterion {name_or_path!r}: cannot import {module_name!r} "
                         f"({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"criterion {name_or_path!r}: {module_name} has no function {attr!r}")
    return fn


def needs_reference(criterion: Criterion) -> bool:
    """Whether `criterion` reads reference losses (functions say so via `needs_reference`)."""
    return bool(getattr(criterion, "needs_reference", True))


@register("learnability")
def learnability(learner: jax.Array, reference: jax.Array | None) -> jax.Array:
    """Hard for the learner, easy for the reference: the paper's default (JEST)."""
    return learner - reference


@register("hard_learner", needs_reference=False)
def hard_learner(learner: jax.Array, reference: jax.Array | None) -> jax.Array:
    """Hard-example mining: high learner loss."""
    del reference
    return learner


@register("easy_reference")
def easy_reference(learner: jax.Array, reference: jax.Array | None) -> jax.Array:
    """Data quality under the reference: low reference loss (the learner is ignored)."""
    del learner
    return -reference
