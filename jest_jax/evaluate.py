"""Evaluators: zero-shot classification, image↔text retrieval (one or several captions
per image) and the few-shot linear probe, and the registry for more.

`config.evals` holds a few options and any number of tasks, each a group whose `kind`
names a registered evaluator class (or `"package.module:Class"`) that validates the
task's other fields (docs/design.md §4, "Evaluator"). A task maps an `EvalContext` (the
embedded eval split, class names, a text embedder) to `{"<task>/<metric>": value}`; the
metrics themselves are NumPy functions in `jest_jax.eval_metrics`.
Eval splits are small: their preprocessed examples are cached on the host after the
first pass, each split is embedded once per evaluation and patch size whatever the number
of tasks on it, with the same mesh as training.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from jest_jax import eval_metrics, sharding
from jest_jax.data import prompts, sources
from jest_jax.data.pipeline import Preprocess, eval_batches
from jest_jax.fields import ConfigError, Section
from jest_jax.models import Model
from jest_jax.registry import Registry

GENERIC_TEMPLATES = ("a photo of a {}.", "{}")
OPTIONS = ("every_steps", "batch_size", "max_examples")  # the fields of evals that are no task
recall_at_k = eval_metrics.recall_at_k


class EvalContext(Protocol):
    """What an evaluator is given for one set of params."""

    step: int | None  # the training step evaluated (None: a standalone --mode eval)

    def pool(self, data: sources.DataSource) -> sources.Pool:
        """The opened split (class names, templates, length)."""

    def split(self, data: sources.DataSource, patch_size: int = 0) -> dict[str, np.ndarray]:
        """The split embedded: unit `image` rows, unit `text` rows (only when the split has
        captions), the record `index` and every scalar field. With `patch_size` the images
        go through the image tower at that patch size (0: the model's own)."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings of arbitrary strings (prompts): f[len(texts), D], in device
        calls of at most `evals.batch_size` texts."""

    def record_texts(self, data: sources.DataSource, path: str) -> list[list[str]]:
        """Each record's strings at feature `path` ("captions", "captions/text"), in the
        order of `split(data)`'s rows; read from the records once per run, not per
        evaluation."""


class Evaluator(Protocol):
    """The contract every registered evaluator kind meets."""

    name: str  # the task's key in config.evals; metrics are "<name>/<metric>"
    data: sources.DataSource  # the split it evaluates on
    # Optional: `extra_data`, {field: split} of the other splits it reads (a probe's train
    # split), opened and checked like `data`.

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        """The task's fields, `kind` included (the schema typos are checked against)."""

    @classmethod
    def from_config(cls, name: str, section: Section) -> Evaluator:
        """Validate the task (ConfigError naming the field); no I/O."""

    def check(self, pool: sources.Pool) -> None:
        """At start-up, before training: ConfigError if the data cannot serve this task
        (called for `data` and each split of `extra_data`)."""

    def __call__(self, context: EvalContext) -> dict[str, float]: ...


REGISTRY: Registry[type[Evaluator]] = Registry("evaluator kind", "Class",
                                              needs=("defaults", "from_config", "check"))


@REGISTRY.register("retrieval")
@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Image→text and text→image recall at 1, 5 and 10.

    One caption per record (`caption`) by default, its image its match. With several
    captions per image (the COCO / Flickr30k protocol, `eval_metrics.multi_caption_recall`)
    either `captions` names a sequence feature of each record (`"captions/text"` reads the
    field `text` of a sequence of dicts, like TFDS `coco_captions`), or `group_by` names a
    scalar feature shared by the records of one image (one record per caption). Image→text
    is a hit when any of the image's captions is in the top k; text→image ranks each
    caption's image among all images.
    """

    name: str
    data: sources.DataSource
    captions: str
    group_by: str

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(
            kind="retrieval", data=sources.pool(split="eval"),
            captions="",             # "": the `caption` of each record; else a feature
            #                          holding several ("captions", "captions/text")
            group_by="",             # "": one image per record; else the feature naming
            #                          each record's image (one record per caption)
        ))

    @classmethod
    def from_config(cls, name: str, section: Section) -> Retrieval:
        # Absent fields: tasks written before they existed.
        captions, group_by = (section.node.get(k, "") for k in ("captions", "group_by"))
        for key, value in (("captions", captions), ("group_by", group_by)):
            section.check(isinstance(value, str), key, value, "must be a feature name or ''")
        section.check(not (captions and group_by), "group_by", group_by,
                      "cannot be combined with captions: give one of the two")
        return cls(name, sources.from_config(section.section("data")), captions, group_by)

    def check(self, pool: sources.Pool) -> None:
        needed = [self.captions.split("/")[0]] if self.captions else ["caption"]
        needed += [self.group_by] if self.group_by else []
        for feature in needed:
            if feature not in pool.features:
                raise ConfigError(f"config.evals.{self.name}.data: {pool.description} has "
                                  f"no {feature!r} feature (features: {sorted(pool.features)})")

    def __call__(self, context: EvalContext) -> dict[str, float]:
        split = context.split(self.data)
        if self.captions:
            # From the records (the embedded split holds scalars), cached across evaluations.
            per_image = context.record_texts(self.data, self.captions)
            text = context.embed_texts([t for texts in per_image for t in texts])
            owner = np.repeat(np.arange(len(per_image)), [len(t) for t in per_image])
            metrics = eval_metrics.multi_caption_recall(split["image"] @ text.T, owner)
        elif self.group_by:
            _, first, owner = np.unique(split[self.group_by], return_index=True,
                                        return_inverse=True)
            metrics = eval_metrics.multi_caption_recall(
                split["image"][first] @ split["text"].T, owner.reshape(-1))
        else:
            sim = split["image"] @ split["text"].T
            metrics = {**{f"i2t_{k}": v for k, v in recall_at_k(sim).items()},
                       **{f"t2i_{k}": v for k, v in recall_at_k(sim.T).items()}}
        return {f"{self.name}/{k}": v for k, v in metrics.items()}


def _texts(record: Any, path: str) -> list[str]:
    """The captions at `path` ("captions" or "captions/text") of a record, as strings."""
    value = record
    for part in path.split("/"):
        value = value[part]
    values = [value] if isinstance(value, str | bytes) else list(np.asarray(value).reshape(-1))
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


@REGISTRY.register("zero_shot")
@dataclasses.dataclass(frozen=True)
class ZeroShot:
    """Zero-shot classification by the nearest class prompt, per class-label feature:
    top-1 (`<task>/<label>`), top-5 (`<task>/<label>_top5`) and mean per-class accuracy
    (`<task>/<label>_mean_per_class`).

    A class's embedding is the mean of its prompts over the templates, re-normalised.
    Class names: the task's (`class_names`: a built-in set, a file or a list;
    `jest_jax.data.prompts`), else the dataset's ClassLabel names. Templates: the task's,
    else the dataset's own (embedded datasets ship some), else generic ones. Needs only
    an image and a label per record: the split may have no captions.
    """

    name: str
    data: sources.DataSource
    label_keys: tuple[str, ...]
    class_names: prompts.TextList
    templates: prompts.TextList
    patch_size: int = 0

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(
            kind="zero_shot", data=sources.pool(split="eval"),
            label_keys=("shape", "color", "size", "position"),
            class_names=(),          # (): the dataset's ClassLabel names; else a built-in
            #                          set (("imagenet",)), a file or the names (one label key)
            templates=(),            # (): the dataset's own, else generic; else a built-in
            #                          set (("clip_imagenet_80",)), a file or the templates
            patch_size=0,            # 0: the model's; else images at this patch size (e.g.
            #                          Flexi-JEST's low resolution); must divide image_size
        ))

    @classmethod
    def from_config(cls, name: str, section: Section) -> ZeroShot:
        data = sources.from_config(section.section("data"))
        keys = section.get("label_keys")
        keys = (keys,) if isinstance(keys, str) else keys
        section.check(isinstance(keys, tuple | list) and len(keys) > 0
                      and all(isinstance(k, str) and k for k in keys), "label_keys", keys,
                      "must be a non-empty list of label feature names")
        class_names = prompts.TextList.parse(section, "class_names", templates=False)
        section.check(not class_names.given or len(keys) == 1, "label_keys", keys,
                      "must name one label feature when class_names is given")
        templates = prompts.TextList.parse(section, "templates", templates=True)
        patch = section.integer("patch_size", 0) if "patch_size" in section.node else 0
        return cls(name, data, tuple(keys), class_names, templates, patch)

    def check(self, pool: sources.Pool) -> None:
        for label in self.label_keys:
            if label not in pool.features:
                raise ConfigError(
                    f"config.evals.{self.name}.label_keys: {pool.description} has no label "
                    f"feature {label!r}, and zero-shot classification needs a label per "
                    f"image (features: {sorted(pool.features)})")
            self._texts(pool, label)  # reads the files: a missing one fails now

    def _texts(self, pool: sources.Pool, label: str) -> tuple[list[str], list[str]]:
        """The class names and templates for `label` (ConfigError if they do not fit)."""
        own = pool.class_names(label)
        if self.class_names.given:
            names = self.class_names.load()
            if own is not None and len(own) != len(names):
                raise ConfigError(
                    f"config.evals.{self.name}.class_names: {len(names)} names, but "
                    f"{label!r} of {pool.description} has {len(own)} classes")
        elif own is None:
            raise ConfigError(
                f"config.evals.{self.name}.label_keys: {label!r} is not a class-label "
                f"feature of {pool.description}; name its classes with class_names "
                f"(features: {sorted(pool.features)})")
        else:
            names = own
        templates = (self.templates.load() if self.templates.given
                     else pool.templates(label) or list(GENERIC_TEMPLATES))
        return names, templates

    def __call__(self, context: EvalContext) -> dict[str, float]:
        pool = context.pool(self.data)
        # patch_size is passed only when set: a custom EvalContext may predate the argument.
        split = (context.split(self.data, self.patch_size) if self.patch_size
                 else context.split(self.data))
        out = {}
        for label in self.label_keys:
            names, templates = self._texts(pool, label)
            class_emb = class_embeddings(context.embed_texts, names, templates)
            try:
                metrics = eval_metrics.classification(split["image"] @ class_emb.T,
                                                      split[label])
            except ValueError as e:
                raise ValueError(f"evals.{self.name} on {pool.description}: {e}") from None
            out[f"{self.name}/{label}"] = metrics["top1"]
            out[f"{self.name}/{label}_top5"] = metrics["top5"]
            out[f"{self.name}/{label}_mean_per_class"] = metrics["mean_per_class"]
        return out


def class_embeddings(embed_texts: Callable[[Sequence[str]], np.ndarray], names: Sequence[str],
                     templates: Sequence[str], max_prompts: int = 8192) -> np.ndarray:
    """Unit class embeddings f[classes, D]: each class's prompts embedded, averaged over
    the templates and re-normalised. Asked of `embed_texts` (which batches device calls)
    a group of classes at a time, so host memory stays at `max_prompts` rows."""
    per_call = max(1, max_prompts // len(templates))
    out = []
    for start in range(0, len(names), per_call):
        group = names[start:start + per_call]
        emb = embed_texts([prompts.fill(t, n) for n in group for t in templates])
        out.append(emb.reshape(len(group), len(templates), -1).mean(axis=1))
    emb = np.concatenate(out)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


@REGISTRY.register("few_shot")
@dataclasses.dataclass(frozen=True)
class FewShot:
    """Few-shot linear probe on frozen image embeddings (`<task>/<k>shot`, for each k).

    For each k of `shots`, k examples of every class of `train_data` are drawn (by
    `seed`), a closed-form ridge regression onto one-hot labels is fitted to their unit
    image embeddings (`eval_metrics.ridge_probe_accuracy`), and its accuracy is measured
    on the held-out `data`. Captions are not needed. `train_data` is embedded whole:
    point it at a slice (`split="train[:50000]"`) of a large split.
    """

    name: str
    data: sources.DataSource
    train_data: sources.DataSource
    label_key: str
    shots: tuple[int, ...]
    l2_reg: float
    seed: int

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(
            kind="few_shot",
            data=sources.pool(split="eval"),          # the held-out split scored
            train_data=sources.pool(split="curated"),  # the k shots are drawn from it
            label_key="shape",       # an integer class-label feature of both splits
            shots=(1, 5, 10),        # k examples per class, one probe for each k
            l2_reg=1.0,              # ridge penalty on the (unit-norm) embedding weights
            seed=0,                  # which k examples are drawn
        ))

    @classmethod
    def from_config(cls, name: str, section: Section) -> FewShot:
        shots = section.get("shots")
        section.check(isinstance(shots, tuple | list) and len(shots) > 0 and all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in shots),
            "shots", shots, "must be a non-empty list of positive integers")
        return cls(name, sources.from_config(section.section("data")),
                   sources.from_config(section.section("train_data")),
                   section.string("label_key", nonempty=True), tuple(shots),
                   section.number("l2_reg", lambda v: v > 0, "must be > 0"),
                   section.integer("seed", 0, 2**32 - 1))

    @property
    def extra_data(self) -> dict[str, sources.DataSource]:
        return {"train_data": self.train_data}

    def check(self, pool: sources.Pool) -> None:
        if self.label_key not in pool.features:
            raise ConfigError(
                f"config.evals.{self.name}.label_key: {pool.description} has no label "
                f"feature {self.label_key!r} (features: {sorted(pool.features)})")

    def __call__(self, context: EvalContext) -> dict[str, float]:
        train, test = context.split(self.train_data), context.split(self.data)
        train_y, test_y = (s[self.label_key].astype(np.int64) for s in (train, test))
        names = context.pool(self.data).class_names(self.label_key)
        classes = len(names) if names else int(max(train_y.max(), test_y.max())) + 1
        out = {}
        for k in self.shots:
            try:
                chosen = eval_metrics.few_shot_indices(train_y, k, self.seed)
            except ValueError as e:
                raise ValueError(f"evals.{self.name}: train_data "
                                 f"{context.pool(self.train_data).description}: {e}") from None
            out[f"{self.name}/{k}shot"] = eval_metrics.ridge_probe_accuracy(
                train["image"][chosen], train_y[chosen], test["image"], test_y, classes,
                self.l2_reg)
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
        self._jit_args = dict(in_shardings=(params_sharding, batch), out_shardings=out)
        self._model = model
        # Image embedders by patch size (0: the model's own); others compiled on first use.
        self._embed_images: dict[int, Callable] = {
            0: jax.jit(model.embed_images, **self._jit_args)}
        self._embed_texts = jax.jit(model.embed_texts, **self._jit_args)
        self._pools: dict[str, sources.Pool] = {}
        for task in spec.tasks:
            # Every split a task reads: `data`, and any `extra_data` (a probe's train split).
            for field, data in {"data": task.data, **getattr(task, "extra_data", {})}.items():
                key = _key(data)
                if key not in self._pools:
                    self._pools[key] = sources.open_source(data, f"evals.{task.name}.{field}")
                task.check(self._pools[key])
        # A split without captions (ImageNet, CIFAR) is embedded as images only.
        self._preprocess = {key: preprocess if "caption" in pool.features
                            else preprocess.without_captions()
                            for key, pool in self._pools.items()}
        self._batches: dict[str, list[dict]] = {}
        self._texts: dict[tuple[str, str], list[list[str]]] = {}

    def context(self, params: Any, step: int | None = None) -> EvalContext:
        """What tasks are given for `params`: each split embedded on first request."""
        return _Context(self, params, step)

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """`{"<task>/<metric>": value}` for every task; each eval split is embedded once
        (per patch size)."""
        context = self.context(params, step)
        results: dict[str, float] = {}
        for task in self.spec.tasks:
            results.update(task(context))
        return results

    def batches(self, key: str) -> list[dict]:
        """Preprocessed eval batches of a split, cached on the host after the first pass."""
        if key not in self._batches:
            limit = self.spec.max_examples
            self._batches[key] = list(eval_batches(
                self._pools[key], self._preprocess[key], batch_size=self.spec.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                limit=None if limit == -1 else limit))
        return self._batches[key]

    def record_texts(self, key: str, path: str, indices: np.ndarray) -> list[list[str]]:
        """The strings at `path` of records `indices` of a split, read once: the indices
        are those of its cached `batches`, the same at every evaluation."""
        if (key, path) not in self._texts:
            pool = self._pools[key]
            self._texts[key, path] = [_texts(pool[int(i)], path) for i in indices]
        return self._texts[key, path]

    def embed_split(self, params: Any, key: str, patch_size: int = 0) -> dict[str, np.ndarray]:
        """Split `key` embedded; `patch_size` 0 is the model's own (`_Context.split` maps
        the model's patch size to 0, so each resolution is embedded and cached once)."""
        batches = self.batches(key)
        if patch_size not in self._embed_images:
            self._embed_images[patch_size] = jax.jit(
                functools.partial(self._model.embed_images, patch_size=patch_size),
                **self._jit_args)
        embed_images = self._embed_images[patch_size]
        images, texts = [], []
        for local in batches:
            batch = sharding.to_global({k: local[k] for k in ("image", "tokens") if k in local},
                                       self.mesh)
            images.append(embed_images(params, batch["image"]))
            if "tokens" in batch:
                texts.append(self._embed_texts(params, batch["tokens"]))
        extras = [{k: v for k, v in b.items() if k not in ("image", "tokens")} for b in batches]
        host = sharding.to_host({"image": images, "text": texts, "extras": extras})
        mask = np.concatenate([e["mask"] for e in host["extras"]])
        out = {"image": np.concatenate(host["image"])[mask]}
        if texts:
            out["text"] = np.concatenate(host["text"])[mask]
        for k in host["extras"][0]:
            if k != "mask":
                out[k] = np.concatenate([e[k] for e in host["extras"]])[mask]
        return out

    def embed_texts(self, params: Any, texts: Sequence[str]) -> np.ndarray:
        """Unit embeddings of `texts`, `evals.batch_size` per device call (1000 classes ×
        80 templates are 80,000 prompts: never one call)."""
        size = self.spec.batch_size  # divisible by the devices (validated)
        out = []
        for start in range(0, len(texts), size):
            chunk = texts[start:start + size]
            tokens = np.stack([self.preprocess.tokenizer.encode(t, self.preprocess.text_len)
                               for t in chunk])
            # Every call has `size` rows (padding rows are embedded and dropped): one
            # compiled program, the one `embed_split` uses, whatever the number of
            # classes and templates of each task.
            tokens = np.pad(tokens, ((0, size - len(tokens)), (0, 0)))
            # Every process holds all texts; each passes its own rows of the global array.
            rows = len(tokens) // jax.process_count()
            local = tokens[jax.process_index() * rows:(jax.process_index() + 1) * rows]
            emb = np.asarray(sharding.to_host(self._embed_texts(
                params, sharding.to_global({"t": local}, self.mesh)["t"])))
            out.append(emb[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _key(data: sources.DataSource) -> str:
    return repr(sorted(data.identity().items()))


class _Context:
    """`EvalContext` for one evaluation: splits embedded on first request, then reused."""

    def __init__(self, runner: EvalRunner, params: Any, step: int | None):
        self._runner, self._params, self.step = runner, params, step
        self._splits: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def pool(self, data: sources.DataSource) -> sources.Pool:
        return self._runner._pools[_key(data)]

    def split(self, data: sources.DataSource, patch_size: int = 0) -> dict[str, np.ndarray]:
        key = _key(data)
        if patch_size == self._runner._model.spec.patch_size:
            patch_size = 0  # the model's own: the same embeddings
        if (key, patch_size) not in self._splits:
            self._splits[key, patch_size] = self._runner.embed_split(self._params, key,
                                                                     patch_size)
        return self._splits[key, patch_size]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._runner.embed_texts(self._params, texts)

    def record_texts(self, data: sources.DataSource, path: str) -> list[list[str]]:
        return self._runner.record_texts(_key(data), path, self.split(data)["index"])
