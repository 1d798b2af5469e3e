"""Selection criteria: elementwise maps from pair-loss blocks to scores (docs/design.md §1, §4).

A criterion is a pure JAX function of two pair-loss blocks of equal shape, the
learner's and the reference's: the full `N×N` matrix, the `m×N` / `N×m` blocks of the
matrix-free path, or the length-N diagonal. It must be elementwise in (i, j), because
the matrix-free path evaluates it block by block and must agree with the dense path.

Besides the two blocks a criterion may take

* keyword hyperparameters, set in `selection.criterion_args` (checked against its
  signature when the config is validated), and
* `context`, a `Context`: the step, and per-example vectors for the block's rows
  (images) and columns (texts): every scalar field of the candidates' records and
  model-derived terms such as embedding norms. They keep it elementwise in (i, j).

Add one in your own module, no change to this package needed::

    # mymodule.py
    def confident_learner(learner, reference):
        return -learner
    confident_learner.needs_reference = False   # default True: a reference is loaded

and name it in the config: `--config.selection.criterion=mymodule:confident_learner`.
`register` does the same for a short name once the module is imported.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jest_jax.fields import ConfigError, did_you_mean
from jest_jax.registry import Registry

Criterion = Callable[..., jax.Array]

REGISTRY: Registry[Criterion] = Registry("criterion", "function")
CONTEXT = "context"  # the parameter name through which a criterion receives its Context


def register(name: str, *, needs_reference: bool = True) -> Callable[[Criterion], Criterion]:
    """Decorator: make `fn` selectable as `selection.criterion = name`."""

    def wrap(fn: Criterion) -> Criterion:
        fn.needs_reference = needs_reference
        return REGISTRY.register(name)(fn)

    return wrap


def names() -> list[str]:
    """The registered criterion names."""
    return REGISTRY.names()


def get(name_or_path: str | Criterion) -> Criterion:
    """A registered name, `"package.module:function"`, or a criterion function itself."""
    if callable(name_or_path):
        return name_or_path
    fn = REGISTRY.get(name_or_path)
    if not callable(fn):
        raise ValueError(f"criterion {name_or_path!r} is not a function")
    return fn


def needs_reference(criterion: Criterion | Bound) -> bool:
    """Whether `criterion` reads reference losses (functions say so via `needs_reference`)."""
    fn = criterion.fn if isinstance(criterion, Bound) else criterion
    return bool(getattr(fn, "needs_reference", True))


@dataclasses.dataclass(frozen=True)
class Context:
    """What a criterion may read besides the pair-loss blocks, for one block of S.

    `fields` holds one f[N] vector per per-example quantity of the N candidates;
    `rows` / `cols` are the candidate indices of the block's rows (images) and columns
    (texts). `row(name)` is shaped to broadcast over the block's columns and `col(name)`
    over its rows, so `learner - reference + w * context.row("quality")` stays
    elementwise. On the diagonal (`diagonal=True`) the block is a vector whose entry k
    pairs row `rows[k]` with column `cols[k]`, and both come back as vectors.
    """

    step: Any = 0
    fields: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    rows: jax.Array | None = None
    cols: jax.Array | None = None
    diagonal: bool = False

    def block(self, rows: jax.Array, cols: jax.Array) -> Context:
        """This context for the block of rows `rows` and columns `cols`."""
        return dataclasses.replace(self, rows=rows, cols=cols, diagonal=False)

    def diag(self, num_candidates: int) -> Context:
        """This context for the diagonal S_ii of all `num_candidates`."""
        every = jnp.arange(num_candidates)
        return dataclasses.replace(self, rows=every, cols=every, diagonal=True)

    def _vector(self, name: str) -> jax.Array:
        if name not in self.fields:
            raise ConfigError(f"the criterion reads the per-example field {name!r}, but the "
                              f"candidates carry {sorted(self.fields)}; check "
                              "config.selection.criterion and criterion_args")
        value = jnp.asarray(self.fields[name])
        return value.astype(jnp.promote_types(value.dtype, jnp.float32))

    def row(self, name: str) -> jax.Array:
        """Field `name` of each row's example: f[M, 1] (f[N] on the diagonal)."""
        value = self._vector(name)[self.rows]
        return value if self.diagonal else value[:, None]

    def col(self, name: str) -> jax.Array:
        """Field `name` of each column's example: f[1, K] (f[N] on the diagonal)."""
        value = self._vector(name)[self.cols]
        return value if self.diagonal else value[None, :]

    @property
    def positive(self) -> jax.Array:
        """bool: where row and column are the same example (the matched pairs)."""
        if self.diagonal:
            return jnp.ones(self.rows.shape, bool)
        return self.rows[:, None] == self.cols[None, :]


@dataclasses.dataclass(frozen=True)
class Bound:
    """A criterion with its hyperparameters bound, called as `(learner, reference, context)`."""

    fn: Criterion
    args: tuple[tuple[str, Any], ...] = ()
    wants_context: bool = False

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))

    def __call__(self, learner: jax.Array, reference: jax.Array | None,
                 context: Context) -> jax.Array:
        kwargs = dict(self.args)
        if self.wants_context:
            kwargs[CONTEXT] = context
        return self.fn(learner, reference, **kwargs)


def bind(criterion: str | Criterion | Bound, args: Mapping[str, Any] | None = None,
         field: str = "selection.criterion_args") -> Bound:
    """`criterion` with hyperparameters `args`, checked against its signature.

    ConfigError naming `config.<field>.<arg>` for an argument it does not take, or
    `config.<field>` for a required one missing.
    """
    if isinstance(criterion, Bound):
        return criterion
    fn = get(criterion)
    args = dict(args or {})
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # not introspectable (a C function): take it as it is
        return Bound(fn, tuple(sorted(args.items())))
    name = getattr(fn, "__name__", str(fn))
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ValueError(f"criterion {name!r} must take the learner's and the reference's "
                         "pair losses as its first two arguments")
    # What follows the two blocks (or `*blocks`) may be named in criterion_args.
    after = [p for p in params if p not in positional[:2] and p.kind != p.VAR_POSITIONAL]
    rest = [p for p in after if p.name != CONTEXT
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = [p.name for p in rest]
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        for arg, value in args.items():
            if arg not in takes:
                raise ConfigError(
                    f"config.{field}.{arg}={value!r} is invalid: criterion {name!r} takes no "
                    f"argument {arg!r} ({did_you_mean(arg, takes)}); it takes {takes}")
    missing = [p.name for p in rest if p.default is p.empty and p.name not in args]
    if missing:
        raise ConfigError(f"config.{field} is missing {missing}: criterion {name!r} needs "
                          "them (set them in the config file, e.g. "
                          f"c.{field}.{missing[0]} = ...)")
    wants = any(p.name == CONTEXT for p in after)
    return Bound(fn, tuple(sorted(args.items())), wants)


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
