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
from jest_jax.data import load_split
from jest_jax.data.pipeline import Preprocess, eval_batches

if TYPE_CHECKING:
    from jest_jax.train import Trainer

GENERIC_TEMPLATES = ("a photo of a {}.", "{}")
RECALL_AT = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Row i's correct column is i; returns the fraction of rows ranking it in the top k."""
    correct = np.diagonal(similarity)[:, None]
    rank = (similarity > correct).sum(axis=1)  # ties resolved in favour of the correct item
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(image_emb @ class_emb.T, axis=1) == labels))


def _templates(task: ml_collections.ConfigDict, dataset: str, key: str) -> tuple[str, ...]:
    if task.templates:
        return tuple(task.templates)
    if dataset.split("/")[0] == "jest_shapes":
        from jest_jax.data.shapes import zero_shot_templates

        return tuple(zero_shot_templates(key))
    return GENERIC_TEMPLATES


class Evaluator:
    """Runs every task of `config.evals` on a set of params."""

    def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer, preprocess: Preprocess):
        self.config = config
        self.trainer = trainer
        self.preprocess = preprocess
        self.mesh = trainer.mesh
        batch = sharding.batch_sharding(self.mesh)
        out = sharding.replicated(self.mesh)
        self._embed_images = jax.jit(trainer.embed_images, in_shardings=(None, batch),
                                     out_shardings=out)
        self._embed_texts = jax.jit(trainer.embed_texts, in_shardings=(None, batch),
                                    out_shardings=out)
        self._cache: dict[tuple, tuple[list[dict], Any]] = {}

    def tasks(self) -> dict[str, ml_collections.ConfigDict]:
        return {name: task for name, task in self.config.evals.items()
                if isinstance(task, ml_collections.ConfigDict) and "kind" in task}

    def run(self, params: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        embedded: dict[tuple, dict[str, np.ndarray]] = {}
        for name, task in self.tasks().items():
            key = (task.data.name, task.data.split, task.data.data_dir)
            if key not in embedded:
                embedded[key] = self._embed_split(params, task.data)
            split = embedded[key]
            if task.kind == "retrieval":
                sim = split["image"] @ split["text"].T
                results.update({f"{name}/i2t_{k}": v for k, v in recall_at_k(sim).items()})
                results.update({f"{name}/t2i_{k}": v for k, v in recall_at_k(sim.T).items()})
            else:
                info = self._cache[key][1]
                for label in task.label_keys:
                    if label not in split:
                        raise KeyError(f"config.evals.{name}.label_keys: the split "
                                       f"{task.data.name}:{task.data.split} has no label "
                                       f"feature {label!r}")
                    names = info.features[label].names
                    class_emb = self._class_embeddings(
                        params, names, _templates(task, task.data.name, label))
                    acc = zero_shot_accuracy(split["image"], class_emb, split[label])
                    results[f"{name}/{label}"] = acc
        return results

    def _examples(self, data: ml_collections.ConfigDict) -> tuple[list[dict], Any]:
        key = (data.name, data.split, data.data_dir)
        if key not in self._cache:
            source, info = load_split(data.name, data.split, data.data_dir)
            limit = self.config.evals.max_examples
            batches = list(eval_batches(
                source, self.preprocess, batch_size=self.config.evals.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                limit=None if limit == -1 else limit))
            self._cache[key] = (batches, info)
        return self._cache[key]

    def _embed_split(self, params: Any, data: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
        batches, _ = self._examples(data)
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
        emb = np.asarray(sharding.to_host(self._embed_texts(
            params, jax.device_put(tokens, sharding.batch_sharding(self.mesh)))))
        emb = emb[: len(prompts)].reshape(len(names), len(templates), -1).mean(axis=1)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)
