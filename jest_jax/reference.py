"""The frozen reference model behind a learner run, and its embedding cache (paper §A.5).

The reference is a run of this framework (usually SigLIP on a curated pool) named by
`selection.reference.workdir`: its saved `config.json` rebuilds the model and its
latest checkpoint gives the params. Because it is frozen, its embeddings of every
example of the learner's pool can be computed once (`--mode cache`) into
`selection.reference.cache_dir`; the learner's pipeline then attaches them to each
candidate and no reference forward pass runs while training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from jest_jax import sharding
from jest_jax.checkpoint import Checkpointer, CheckpointError, brief
from jest_jax.config import ConfigError
from jest_jax.data.datasets import open_pool
from jest_jax.data.pipeline import Preprocess, eval_batches
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.metrics import Progress, log
from jest_jax.scoring import Scorer, SelectionSpec
from jest_jax.selection import Embeddings
from jest_jax.trainer import Trainer

_WORKDIR = "selection.reference.workdir"
_CACHE = "selection.reference.cache_dir"
# Preprocessing the reference must share with the learner: both see the same batch.
_SHARED_DATA_FIELDS = ("image_size", "text_len", "tokenizer")
CACHE_FORMAT = 1


@dataclasses.dataclass
class Reference:
    """A frozen reference: its trainer (model), params and checkpoint step."""

    trainer: Trainer
    params: dict
    step: int
    workdir: str


def _latest_step(workdir: str) -> int:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] \
        if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise ConfigError(f"config.{_WORKDIR}={workdir!r} has no checkpoint: train the "
                          "reference there first")
    return max(steps)


def load(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Reference:
    """Rebuild and restore the reference named by `selection.reference.workdir`."""
    workdir = config.selection.reference.workdir
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"config.{_WORKDIR}={workdir!r} is not a run's workdir "
                          "(no config.json)")
    with open(path) as f:
        ref_config = ml_collections.ConfigDict(json.load(f))
    for key in _SHARED_DATA_FIELDS:
        if ref_config.data[key] != config.data[key]:
            raise ConfigError(
                f"config.{_WORKDIR}: the reference was trained with data.{key}="
                f"{ref_config.data[key]!r} but this run uses {config.data[key]!r}; the "
                "learner and reference score the same inputs, so they must match")
    step = _latest_step(workdir)
    # Placed by the learner's rules on the learner's mesh, whatever the reference ran on.
    ref_config.mesh = config.mesh
    try:
        trainer = Trainer(ref_config, mesh, make_tokenizer(ref_config.data.tokenizer).vocab_size)
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"config.{_WORKDIR}={workdir!r}: its config.json lacks a field this "
                          f"version needs ({e}); it was written by an older jest_jax, so "
                          "retrain the reference") from None
    checkpointer = Checkpointer(workdir)  # read-only use: nothing there is moved or removed
    try:
        state = checkpointer.restore(trainer.abstract_sharded_state(), step=step)
    except Exception as e:  # tensorstore/orbax raise many types for damaged files
        raise CheckpointError(
            f"config.{_WORKDIR}={workdir!r}: its checkpoint at step {step} cannot be restored "
            f"({brief(e)}). Training in that workdir again moves a damaged checkpoint aside "
            "and resumes from the previous one; or point to another reference run") from None
    finally:
        checkpointer.close()
    return Reference(trainer, state["params"], step, os.path.realpath(workdir))


def _preprocess(config: ml_collections.ConfigDict) -> Preprocess:
    return Preprocess(config.data.image_size, make_tokenizer(config.data.tokenizer),
                      config.data.text_len)


def _pool_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
    pool = config.data.train
    # URLs (gs://...) are already absolute; realpath would make them relative to the cwd.
    data_dir = pool.data_dir if "://" in pool.data_dir else os.path.realpath(pool.data_dir)
    return {"name": pool.name, "split": pool.split, "data_dir": data_dir,
            **{k: config.data[k] for k in _SHARED_DATA_FIELDS}}


def write_cache(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> str:
    """Embed every example of `data.train` with the reference into `selection.reference.
    cache_dir`; returns the directory. An existing cache is replaced only once the new
    one is complete."""
    directory = config.selection.reference.cache_dir
    if not directory:
        raise ConfigError(f"config.{_CACHE} is empty: set where the cache should go")
    if not config.selection.reference.workdir:
        raise ConfigError(f"config.{_WORKDIR} is empty: name the reference run to cache")
    ref = load(config, mesh)
    source, _ = open_pool(config, "data.train")
    n = len(source)
    embed = jax.jit(lambda p, b: ref.trainer.embeddings(p, b)[:2],  # (image, text)
                    out_shardings=sharding.replicated(mesh))
    write = jax.process_index() == 0
    tmp = f"{directory.rstrip('/')}.partial"
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    arrays: dict[str, np.ndarray] = {}
    batch_size = config.evals.batch_size
    progress = Progress(-(-n // batch_size), 0)  # counts batches
    log(f"caching reference embeddings (step {ref.step} of {ref.workdir}) of "
        f"{config.data.train.name}:{config.data.train.split}, {n} examples -> {directory}")
    for i, local in enumerate(eval_batches(source, _preprocess(config), batch_size=batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())):
        batch = sharding.to_global({k: local[k] for k in ("image", "tokens")}, mesh)
        image, text = sharding.to_host(embed(ref.params, batch))
        index = sharding.to_host(sharding.to_global({"i": local["index"],
                                                     "m": local["mask"]}, mesh))
        rows = index["i"][index["m"]]
        if write:
            for name, value in (("image", image), ("text", text)):
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        os.path.join(tmp, f"{name}.npy"), "w+", np.float32, (n, value.shape[1]))
                arrays[name][rows] = np.asarray(value, np.float32)[index["m"]]
        if (i + 1) % 20 == 0:
            progress.update(i + 1, {})
    if write:
        for array in arrays.values():
            array.flush()
        meta = {"format": CACHE_FORMAT, "reference_workdir": ref.workdir,
                "reference_step": ref.step, "num_examples": n, "pool": _pool_key(config),
                "log_temperature": float(ref.params["log_temperature"]),
                "bias": float(ref.params["bias"]), "created": time.strftime("%Y-%m-%d %H:%M")}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        # Swap by renames so that a crash leaves the old cache or the new one, never none.
        old = f"{directory.rstrip('/')}.old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    log(f"wrote {directory}")
    return directory


class ReferenceCache:
    """Read side of the cache: `cache(index)` → that example's reference embeddings."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.directory = directory = config.selection.reference.cache_dir
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"config.{_CACHE}={directory!r} holds no reference cache: "
                              "create it with `python -m jest_jax.main --mode cache` and the "
                              "same config")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != CACHE_FORMAT:
            raise ConfigError(f"config.{_CACHE}={directory!r}: cache format "
                              f"{self.meta.get('format')} is not {CACHE_FORMAT}; re-create it")
        if self.meta["pool"] != _pool_key(config):
            raise ConfigError(f"config.{_CACHE}={directory!r} was made for {self.meta['pool']}, "
                              f"but this run trains on {_pool_key(config)}; re-create it")
        workdir = os.path.realpath(config.selection.reference.workdir)
        if (self.meta["reference_workdir"], self.meta["reference_step"]) != (
                workdir, _latest_step(workdir)):
            raise ConfigError(
                f"config.{_CACHE}={directory!r} holds step {self.meta['reference_step']} of "
                f"{self.meta['reference_workdir']}, not the latest checkpoint of "
                f"config.{_WORKDIR}={workdir!r}; re-create it")
        self.image = np.load(os.path.join(directory, "image.npy"), mmap_mode="r")
        self.text = np.load(os.path.join(directory, "text.npy"), mmap_mode="r")
        pool_size = len(open_pool(config, "data.train")[0])
        if not self.meta["num_examples"] == len(self.image) == len(self.text) == pool_size:
            raise ConfigError(f"config.{_CACHE}={directory!r} holds {len(self.image)} rows but "
                              f"the pool has {pool_size} examples (rebuilt?); re-create it")

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """The reference's t' and β, passed to the train step as its `reference`."""
        return {k: np.float32(self.meta[k]) for k in ("log_temperature", "bias")}

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return {"ref_image": np.array(self.image[index]), "ref_text": np.array(self.text[index])}


def cached_embeddings(scalars: dict[str, jax.Array], batch: dict[str, jax.Array]) -> Embeddings:
    """The reference `Embeddings` of a batch whose pipeline attached the cache."""
    return Embeddings(batch["ref_image"], batch["ref_text"], scalars["log_temperature"],
                      scalars["bias"])


def make_scorer(config: ml_collections.ConfigDict, trainer: Trainer
                ) -> tuple[Scorer | None, Any, Callable[[int], dict] | None]:
    """(scorer, reference for the train step, per-example attach for the pipeline).

    Plain SigLIP needs no scorer; criteria without a reference load none; with
    `selection.reference.cache_dir` set the reference comes from the cache.
    """
    spec = SelectionSpec.from_config(config)
    if config.selection.reference.cache_dir and not spec.needs_reference:
        log(f"note: config.{_CACHE} is set but method={spec.method!r} with this criterion "
            "uses no reference; the cache is not read")
    if not spec.active:
        return None, {}, None
    if not spec.needs_reference:
        return build_scorer(spec, trainer), {}, None
    if config.selection.reference.cache_dir:
        cache = ReferenceCache(config)
        return build_scorer(spec, trainer, cached_embeddings), cache.scalars, cache
    ref = load(config, trainer.mesh)
    return build_scorer(spec, trainer, ref.trainer.embeddings), ref.params, None


def build_scorer(spec: SelectionSpec, trainer: Trainer,
                 embed_reference: Callable | None = None) -> Scorer:
    """The learner's scorer: its embeddings (at the scoring patch size), the reference's
    (`cached_embeddings`, a reference trainer's `embeddings`, or None), and a dense score
    matrix split by rows over the trainer's mesh."""
    embed = functools.partial(trainer.embeddings, patch_size=spec.score_patch_size)
    return Scorer(spec, embed, embed_reference, sharding.rows_sharding(trainer.mesh))
