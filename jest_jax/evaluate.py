"""Evaluators: zero-shot classification and image↔text retrieval.

Each task in `config.evals` (a dict with `kind`) maps params → `{"<task>/<metric>": value}`.
Eval splits are small; their preprocessed examples are cached on the host after the
first pass, and embeddings are computed with the same mesh as training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from jest_jax import sharding
from jest_jax.config import ConfigError
from jest_jax.data.datasets import default_templates, open_pool
from jest_jax.data.pipeline import Preprocess, eval_batches

if TYPE_CHECKING:
    from jest_jax.trainer import Trainer

GENERIC_TEMPLATES = ("a photo of a {}.", "{}")
RECALL_AT = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Row i's correct column is i; returns the fraction of rows ranking it in the top k."""
    correct = np.diagonal(similarity)[:, None]
    rank = (similarity > correct).sum(axis=1)  # ties resolved in favour of the correct item
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of nearest class embedding (rows are unit-norm embeddings)."""
    return float(np.mean(np.argmax(image_emb @ class_emb.T, axis=1) == labels))


def _templates(task: ml_collections.ConfigDict, label_key: str) -> tuple[str, ...]:
    """The task's own templates, else the dataset's (embedded datasets ship some), else generic."""
    if task.templates:
        return tuple(task.templates)
    return tuple(default_templates(task.data.name, label_key) or GENERIC_TEMPLATES)


def _split_key(data: ml_collections.ConfigDict) -> tuple[str, str, str]:
    return (data.name, data.split, data.data_dir)


class Evaluator:
    """Runs every task of `config.evals` on a set of params.

    Every eval split is opened, and its label keys checked, when the evaluator is built:
    a typo fails before training, not after it; errors name the config field.
    """

    def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer,
                 preprocess: Preprocess):
        self.config = config
        self.preprocess = preprocess
        self.mesh = trainer.mesh
        batch = sharding.batch_sharding(self.mesh)
        params = trainer.state_sharding["params"]
        out = sharding.replicated(self.mesh)
        self._embed_images = jax.jit(trainer.embed_images, in_shardings=(params, batch),
                                     out_shardings=out)
        self._embed_texts = jax.jit(trainer.embed_texts, in_shardings=(params, batch),
                                    out_shardings=out)
        self.tasks = {name: task for name, task in config.evals.items()
                      if isinstance(task, ml_collections.ConfigDict) and "kind" in task}
        self._splits: dict[tuple, tuple[Any, Any]] = {}
        for name, task in self.tasks.items():
            key = _split_key(task.data)
            if key not in self._splits:
                self._splits[key] = open_pool(config, f"evals.{name}.data")
            features = self._splits[key][1].features
            for label in task.get("label_keys", ()):
                if label not in features or not hasattr(features[label], "names"):
                    raise ConfigError(
                        f"config.evals.{name}.label_keys: {label!r} is not a class-label "
                        f"feature of {task.data.name}:{task.data.split} (features: "
                        f"{sorted(features.keys())})")
        self._examples: dict[tuple, list[dict]] = {}

    def run(self, params: Any) -> dict[str, float]:
        """`{"<task>/<metric>": value}` for every task; each eval split is embedded once."""
        results: dict[str, float] = {}
        embedded: dict[tuple, dict[str, np.ndarray]] = {}
        for name, task in self.tasks.items():
            key = _split_key(task.data)
            if key not in embedded:
                embedded[key] = self._embed_split(params, key)
            split = embedded[key]
            if task.kind == "retrieval":
                sim = split["image"] @ split["text"].T
                results.update({f"{name}/i2t_{k}": v for k, v in recall_at_k(sim).items()})
                results.update({f"{name}/t2i_{k}": v for k, v in recall_at_k(sim.T).items()})
                continue
            features = self._splits[key][1].features
            for label in task.label_keys:
                class_emb = self._class_embeddings(params, features[label].names,
                                                   _templates(task, label))
                results[f"{name}/{label}"] = zero_shot_accuracy(
                    split["image"], class_emb, split[label])
        return results

    def _batches(self, key: tuple) -> list[dict]:
        """Preprocessed eval batches, cached on the host after the first pass."""
        if key not in self._examples:
            limit = self.config.evals.max_examples
            self._examples[key] = list(eval_batches(
                self._splits[key][0], self.preprocess, batch_size=self.config.evals.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                limit=None if limit == -1 else limit))
        return self._examples[key]

    def _embed_split(self, params: Any, key: tuple) -> dict[str, np.ndarray]:
        batches = self._batches(key)
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

    def _class_embeddings(self, params: Any, names: list[str],
                          templates: tuple[str, ...]) -> np.ndarray:
        """Per class: mean of its prompt embeddings over templates, re-normalised."""
        prompts = [t.format(n) for n in names for t in templates]
        tokens = np.stack([self.preprocess.tokenizer.encode(p, self.preprocess.text_len)
                           for p in prompts])
        n_dev = self.mesh.size
        padded = -(-len(tokens) // n_dev) * n_dev
        tokens = np.pad(tokens, ((0, padded - len(tokens)), (0, 0)))
        # Every process holds all prompts; each passes its own rows of the global array.
        rows = len(tokens) // jax.process_count()
        local = tokens[jax.process_index() * rows:(jax.process_index() + 1) * rows]
        emb = np.asarray(sharding.to_host(self._embed_texts(
            params, sharding.to_global({"t": local}, self.mesh)["t"])))
        emb = emb[: len(prompts)].reshape(len(names), len(templates), -1).mean(axis=1)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)
