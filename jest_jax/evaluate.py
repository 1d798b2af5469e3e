"""Evaluators: zero-shot classification and image↔text retrieval, and the registry for more.

`config.evals` holds a few options and any number of tasks, each a group whose `kind`
names a registered evaluator class (or `"package.module:Class"`) that validates the
task's other fields (docs/design.md §4, "Evaluator"). A task maps an `EvalContext` (the
embedded eval split, class names, a text embedder) to `{"<task>/<metric>": value}`.
Eval splits are small: their preprocessed examples are cached on the host after the
first pass, each split is embedded once per evaluation whatever the number of tasks on
it, with the same mesh as training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from jest_jax import sharding
from jest_jax.data import sources
from jest_jax.data.pipeline import Preprocess, eval_batches
from jest_jax.fields import ConfigError, Section
from jest_jax.models import Model
from jest_jax.registry import Registry

GENERIC_TEMPLATES = ("a photo of a {}.", "{}")
RECALL_AT = (1, 5, 10)
OPTIONS = ("every_steps", "batch_size", "max_examples")  # the fields of evals that are no task


def recall_at_k(similarity: np.ndarray, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Row i's correct column is i; returns the fraction of rows ranking it in the top k."""
    correct = np.diagonal(similarity)[:, None]
    rank = (similarity > correct).sum(axis=1)  # ties resolved in favour of the correct item
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of nearest class embedding (rows are unit-norm embeddings)."""
    return float(np.mean(np.argmax(image_emb @ class_emb.T, axis=1) == labels))


class EvalContext(Protocol):
    """What an evaluator is given for one set of params."""

    step: int | None  # the training step evaluated (None: a standalone --mode eval)

    def pool(self, data: sources.DataSource) -> sources.Pool:
        """The opened split (class names, templates, length)."""

    def split(self, data: sources.DataSource) -> dict[str, np.ndarray]:
        """The split embedded: unit `image` and `text` rows, plus every scalar field."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings of arbitrary strings (prompts): f[len(texts), D]."""


class Evaluator(Protocol):
    """The contract every registered evaluator kind meets."""

    name: str  # the task's key in config.evals; metrics are "<name>/<metric>"
    data: sources.DataSource  # the split it evaluates on

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        """The task's fields, `kind` included (the schema typos are checked against)."""

    @classmethod
    def from_config(cls, name: str, section: Section) -> Evaluator:
        """Validate the task (ConfigError naming the field); no I/O."""

    def check(self, pool: sources.Pool) -> None:
        """At start-up, before training: ConfigError if the data cannot serve this task."""

    def __call__(self, context: EvalContext) -> dict[str, float]: ...


REGISTRY: Registry[type[Evaluator]] = Registry("evaluator kind", "Class",
                                              needs=("defaults", "from_config", "check"))


@REGISTRY.register("retrieval")
@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Image→text and text→image recall at 1, 5 and 10 (each image's caption is its match)."""

    name: str
    data: sources.DataSource

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(kind="retrieval", data=sources.pool(split="eval")))

    @classmethod
    def from_config(cls, name: str, section: Section) -> Retrieval:
        return cls(name, sources.from_config(section.section("data")))

    def check(self, pool: sources.Pool) -> None:
        pass

    def __call__(self, context: EvalContext) -> dict[str, float]:
        split = context.split(self.data)
        sim = split["image"] @ split["text"].T
        return {**{f"{self.name}/i2t_{k}": v for k, v in recall_at_k(sim).items()},
                **{f"{self.name}/t2i_{k}": v for k, v in recall_at_k(sim.T).items()}}


@REGISTRY.register("zero_shot")
@dataclasses.dataclass(frozen=True)
class ZeroShot:
    """Top-1 accuracy of the nearest class prompt, per class-label feature.

    A class's embedding is the mean of its prompts over the templates, re-normalised.
    Templates: the task's own, else the dataset's (embedded datasets ship some), else
    generic ones.
    """

    name: str
    data: sources.DataSource
    label_keys: tuple[str, ...]
    templates: tuple[str, ...]

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(
            kind="zero_shot", data=sources.pool(split="eval"),
            label_keys=("shape", "color", "size", "position"),
            templates=(),            # (): the dataset's own prompt templates, if it has them
        ))

    @classmethod
    def from_config(cls, name: str, section: Section) -> ZeroShot:
        data = sources.from_config(section.section("data"))
        keys = section.get("label_keys")
        section.check(isinstance(keys, tuple | list) and len(keys) > 0
                      and all(isinstance(k, str) and k for k in keys), "label_keys", keys,
                      "must be a non-empty list of label feature names")
        templates = section.get("templates")
        section.check(isinstance(templates, tuple | list)
                      and all(isinstance(t, str) and "{}" in t for t in templates),
                      "templates", templates, "must be a list of prompt strings, each with one "
                      "'{}' for the class name (empty: the dataset's own)")
        return cls(name, data, tuple(keys), tuple(templates))

    def check(self, pool: sources.Pool) -> None:
        for label in self.label_keys:
            if pool.class_names(label) is None:
                raise ConfigError(
                    f"config.evals.{self.name}.label_keys: {label!r} is not a class-label "
                    f"feature of {pool.description} (features: {sorted(pool.features)})")

    def __call__(self, context: EvalContext) -> dict[str, float]:
        pool, split = context.pool(self.data), context.split(self.data)
        out = {}
        for label in self.label_keys:
            names = pool.class_names(label)
            templates = self.templates or tuple(pool.templates(label) or GENERIC_TEMPLATES)
            prompts = [t.format(n) for n in names for t in templates]
            emb = context.embed_texts(prompts).reshape(len(names), len(templates), -1)
            emb = emb.mean(axis=1)
            class_emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
            out[f"{self.name}/{label}"] = zero_shot_accuracy(split["image"], class_emb,
                                                             split[label])
        return out


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """`config.evals`: when to evaluate, how, and the tasks."""

    every_steps: int
    batch_size: int
    max_examples: int
    tasks: tuple[Evaluator, ...]

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.every_steps = 100          # 0: only at the end (always at the end)
        c.batch_size = 256           # must be divisible by the number of devices
        c.max_examples = -1          # -1: the whole split; else its first N examples
        c.zero_shot = ZeroShot.defaults()
        c.retrieval = Retrieval.defaults()  # R@1/5/10, both ways
        # Every other entry is a task: a group with a `kind`. Add more, or
        # `del c.evals.retrieval` to drop one.
        return c

    @classmethod
    def from_config(cls, section: Section) -> EvalSpec:
        every = section.integer("every_steps", 0)
        batch = section.integer("batch_size", 1)
        limit = section.get("max_examples")
        section.check(isinstance(limit, int) and not isinstance(limit, bool)
                      and (limit == -1 or limit > 0), "max_examples", limit,
                      "must be -1 (whole split) or a positive integer")
        tasks = []
        for name in section.node.keys():
            if name in OPTIONS:
                continue
            task = section.node[name]
            if not isinstance(task, ml_collections.ConfigDict) or "kind" not in task:
                raise section.error(name, task, "must be a dict with a `kind`, one of "
                                    f"{REGISTRY.names()} or 'package.module:Class'")
            try:
                kind = REGISTRY.get(task.kind)
            except ValueError as e:
                raise section.error(name, task.kind, str(e)) from None
            tasks.append(kind.from_config(name, section.section(name)))
        return cls(every, batch, limit, tuple(tasks))

    def due(self, step: int) -> bool:
        """Whether the periodic evaluation runs after `step` (the final one always does)."""
        return bool(self.every_steps and step % self.every_steps == 0)


class EvalRunner:
    """Runs every task of an `EvalSpec` on a set of params.

    Every eval split is opened, and each task's check run, when the runner is built: a
    typo fails before training, not after it; errors name the config field.
    """

    def __init__(self, spec: EvalSpec, model: Model, mesh: jax.sharding.Mesh,
                 params_sharding: Any, preprocess: Preprocess):
        self.spec, self.mesh, self.preprocess = spec, mesh, preprocess
        batch = sharding.batch_sharding(mesh)
        out = sharding.replicated(mesh)
        self._embed_images = jax.jit(model.embed_images, in_shardings=(params_sharding, batch),
                                     out_shardings=out)
        self._embed_texts = jax.jit(model.embed_texts, in_shardings=(params_sharding, batch),
                                    out_shardings=out)
        self._pools: dict[str, sources.Pool] = {}
        for task in spec.tasks:
            key = _key(task.data)
            if key not in self._pools:
                self._pools[key] = sources.open_source(task.data, f"evals.{task.name}.data")
            task.check(self._pools[key])
        self._batches: dict[str, list[dict]] = {}

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """`{"<task>/<metric>": value}` for every task; each eval split is embedded once."""
        context = _Context(self, params, step)
        results: dict[str, float] = {}
        for task in self.spec.tasks:
            results.update(task(context))
        return results

    def batches(self, key: str) -> list[dict]:
        """Preprocessed eval batches of a split, cached on the host after the first pass."""
        if key not in self._batches:
            limit = self.spec.max_examples
            self._batches[key] = list(eval_batches(
                self._pools[key], self.preprocess, batch_size=self.spec.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                limit=None if limit == -1 else limit))
        return self._batches[key]

    def embed_split(self, params: Any, key: str) -> dict[str, np.ndarray]:
        batches = self.batches(key)
        images, texts = [], []
        for local in batches:
            batch = sharding.to_global({"image": local["image"], "tokens": local["tokens"]},
                                       self.mesh)
            images.append(self._embed_images(params, batch["image"]))
            texts.append(self._embed_texts(params, batch["tokens"]))
        extras = [{k: v for k, v in b.items() if k not in ("image", "tokens")} for b in batches]
        host = sharding.to_host({"image": images, "text": texts, "extras": extras})
        mask = np.concatenate([e["mask"] for e in host["extras"]])
        out = {"image": np.concatenate(host["image"])[mask],
               "text": np.concatenate(host["text"])[mask]}
        for k in host["extras"][0]:
            if k != "mask":
                out[k] = np.concatenate([e[k] for e in host["extras"]])[mask]
        return out

    def embed_texts(self, params: Any, texts: Sequence[str]) -> np.ndarray:
        tokens = np.stack([self.preprocess.tokenizer.encode(t, self.preprocess.text_len)
                           for t in texts])
        n_dev = self.mesh.size
        padded = -(-len(tokens) // n_dev) * n_dev
        tokens = np.pad(tokens, ((0, padded - len(tokens)), (0, 0)))
        # Every process holds all texts; each passes its own rows of the global array.
        rows = len(tokens) // jax.process_count()
        local = tokens[jax.process_index() * rows:(jax.process_index() + 1) * rows]
        emb = np.asarray(sharding.to_host(self._embed_texts(
            params, sharding.to_global({"t": local}, self.mesh)["t"])))
        return emb[: len(texts)]


def _key(data: sources.DataSource) -> str:
    return repr(sorted(data.identity().items()))


class _Context:
    """`EvalContext` for one evaluation: splits embedded on first request, then reused."""

    def __init__(self, runner: EvalRunner, params: Any, step: int | None):
        self._runner, self._params, self.step = runner, params, step
        self._splits: dict[str, dict[str, np.ndarray]] = {}

    def pool(self, data: sources.DataSource) -> sources.Pool:
        return self._runner._pools[_key(data)]

    def split(self, data: sources.DataSource) -> dict[str, np.ndarray]:
        key = _key(data)
        if key not in self._splits:
            self._splits[key] = self._runner.embed_split(self._params, key)
        return self._splits[key]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._runner.embed_texts(self._params, texts)
