"""Selection methods: how the batch is chosen from the scored super-batch.

A method is a class registered under the name `selection.method` gives it (or named as
`"package.module:Class"`). `from_config` builds it from `config.selection`: the shared
fields there (`num_chunks`, `score_gain`, `sampling`) are already validated by
`scoring.SelectionSpec`; a method checks how they fit it, and validates its own
`selection.method_args`. Called inside the jitted step, it returns the chosen indices
and the scores it chose by (checked for NaN/+inf by the step's guard). docs/design.md
§4, "Selection method", has the contract; `jest_jax.selection` the kernels.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax

from jest_jax import selection
from jest_jax.fields import Section
from jest_jax.registry import Registry
from jest_jax.selection import Scores


class SelectionMethod(Protocol):
    """The contract every registered selection method meets."""

    # False: the method needs no scores, so no model runs on the candidates (uniform).
    uses_scores: ClassVar[bool]

    @classmethod
    def from_config(cls, section: Section, *, num_select: int,
                    num_candidates: int) -> SelectionMethod:
        """This method for `config.selection` (ConfigError naming a field that does not fit)."""

    def __call__(self, key: jax.Array, scores: Scores | None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """(distinct indices int32[num_select], the scores the choice was made from, or
        None). `scores` is None when `uses_scores` is False."""


REGISTRY: Registry[type[SelectionMethod]] = Registry("selection method", "Class",
                                                     needs=("uses_scores", "from_config"))


@REGISTRY.register("uniform")
@dataclasses.dataclass(frozen=True)
class Uniform:
    """Plain SigLIP: a uniformly random batch (all of it when N = b)."""

    num_select: int
    num_candidates: int
    uses_scores: ClassVar[bool] = False

    @classmethod
    def from_config(cls, section: Section, *, num_select: int, num_candidates: int) -> Uniform:
        return cls(num_select, num_candidates)

    def __call__(self, key: jax.Array, scores: Scores | None) -> tuple[jax.Array, None]:
        return selection.uniform_select(key, self.num_candidates, self.num_select), None


@REGISTRY.register("independent")
@dataclasses.dataclass(frozen=True)
class Independent:
    """Each candidate scored alone (its row of S summed over the super-batch): the top b,
    or b sampled ∝ exp(g·s) (`selection.sampling`)."""

    num_select: int
    sampling: str
    score_gain: float
    uses_scores: ClassVar[bool] = True

    @classmethod
    def from_config(cls, section: Section, *, num_select: int,
                    num_candidates: int) -> Independent:
        return cls(num_select, section.get("sampling"), float(section.get("score_gain")))

    def __call__(self, key: jax.Array, scores: Scores | None) -> tuple[jax.Array, jax.Array]:
        per_example = scores.row_sums()
        return selection.independent_select(key, per_example, self.num_select, self.sampling,
                                             self.score_gain), per_example


@REGISTRY.register("joint")
@dataclasses.dataclass(frozen=True)
class Joint:
    """JEST: the batch drawn jointly in `num_chunks` chunks, each conditioned on the
    chunks before it (the paper's Algorithm 1)."""

    num_select: int
    num_chunks: int
    score_gain: float
    uses_scores: ClassVar[bool] = True

    @classmethod
    def from_config(cls, section: Section, *, num_select: int, num_candidates: int) -> Joint:
        chunks = section.get("num_chunks")
        section.check(num_select % chunks == 0, "num_chunks", chunks,
                      f"must divide batch_size={num_select}")
        return cls(num_select, chunks, float(section.get("score_gain")))

    def __call__(self, key: jax.Array, scores: Scores | None) -> tuple[jax.Array, jax.Array]:
        return selection.joint_sample(key, scores, self.num_select, self.num_chunks,
                                      self.score_gain)
