"""Extensions written outside jest_jax, as a user would write them: a data source, an
evaluator and a selection method, each one class registered by name. Importing this
module registers them; tests/test_extensions.py trains with them through the CLI.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import ml_collections
import numpy as np

from jest_jax import evaluate, methods
from jest_jax.data import sources
from jest_jax.fields import ConfigError, Section

COLORS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 30, 30), "green": (40, 180, 50), "blue": (40, 70, 225),
       "yellow": (240, 220, 30)}


@sources.REGISTRY.register("toy_pairs")
@dataclasses.dataclass(frozen=True)
class ToyPairs:
    """`num_examples` synthetic pairs from `seed`: a coloured square on noise, captioned
    with its number, colour and position; `label` is the colour, `quality` a float."""

    num_examples: int
    seed: int
    size: int

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(source="toy_pairs", num_examples=128, seed=0,
                                              size=16))

    @classmethod
    def from_config(cls, section: Section) -> ToyPairs:
        return cls(section.integer("num_examples", 1), section.integer("seed", 0),
                   section.integer("size", 4))

    def open(self) -> ToyPool:
        return ToyPool(self)

    def identity(self) -> dict:
        return dataclasses.asdict(self) | {"source": "toy_pairs"}


class ToyPool:
    """The records of a `ToyPairs`, each a pure function of its index."""

    features = ("image", "caption", "label", "quality")

    def __init__(self, spec: ToyPairs):
        self.spec = spec
        self.description = f"toy_pairs(seed={spec.seed})"

    def __len__(self) -> int:
        return self.spec.num_examples

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.spec.seed, index))
        size = self.spec.size
        label = int(rng.integers(len(COLORS)))
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        top, left = (int(v) for v in rng.integers(0, size // 2, 2))
        image[top:top + size // 2, left:left + size // 2] = RGB[COLORS[label]]
        where = ("top" if top < size // 4 else "bottom") + (" left" if left < size // 4
                                                            else " right")
        # Numbered first, so that captions stay distinct after truncation to text_len
        # (retrieval then has a single right answer per image: no ties).
        return {"image": image, "caption": f"pair {index}: a {COLORS[label]} square at the "
                                           f"{where}",
                "label": np.int64(label), "quality": np.float32(rng.uniform())}

    def class_names(self, feature: str) -> list[str] | None:
        return list(COLORS) if feature == "label" else None

    def templates(self, feature: str) -> list[str] | None:
        return None


@evaluate.REGISTRY.register("brute_force_recall")
@dataclasses.dataclass(frozen=True)
class BruteForceRecall:
    """Image→text recall@1 by an explicit loop over the images (to hold against the
    built-in retrieval), and the split's mean `quality` (a float field read through)."""

    name: str
    data: sources.DataSource

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(kind="brute_force_recall",
                                              data=sources.pool(split="eval")))

    @classmethod
    def from_config(cls, name: str, section: Section) -> BruteForceRecall:
        return cls(name, sources.from_config(section.section("data")))

    def check(self, pool: sources.Pool) -> None:
        if "quality" not in pool.features:
            raise ConfigError(f"config.evals.{self.name}.data: {pool.description} has no "
                              "'quality' field")

    def __call__(self, context: evaluate.EvalContext) -> dict[str, float]:
        split = context.split(self.data)
        hits = 0
        for i, image in enumerate(split["image"]):
            hits += int(np.argmax(split["text"] @ image) == i)
        return {f"{self.name}/i2t_r1": hits / len(split["image"]),
                f"{self.name}/mean_quality": float(np.mean(split["quality"]))}


@methods.REGISTRY.register("top_self_score")
@dataclasses.dataclass(frozen=True)
class TopSelfScore:
    """The b candidates with the highest (`sign=1`) or lowest (`sign=-1`) S_ii."""

    num_select: int
    sign: float
    uses_scores: ClassVar[bool] = True

    @classmethod
    def from_config(cls, section: Section, *, num_select: int,
                    num_candidates: int) -> TopSelfScore:
        args = section.section("method_args")
        sign = args.choice("sign", (1, -1)) if "sign" in args.node else 1
        return cls(num_select, float(sign))

    def __call__(self, key: jax.Array, scores) -> tuple[jax.Array, jax.Array]:
        diagonal = scores.diagonal()
        return jax.lax.top_k(self.sign * diagonal, self.num_select)[1], diagonal
