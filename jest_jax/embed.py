"""Embeddings of a whole pool written as `.npy` files: `--mode embed` (a model's unit image
and text embeddings, with its logit scale and bias, for analysis and external evaluation
suites; `config.embed` names the pool) and the reference cache (`--mode cache`) share the
writer.

A directory written here is whole or absent: it is filled as `<dir>.partial` and renamed
into place (an existing one is replaced only once the new one is complete). Row `i` of
`image.npy` and `text.npy` is record `i` of the pool.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from jest_jax import log, sharding
from jest_jax.data.pipeline import Preprocess, eval_batches
from jest_jax.data.sources import Pool
from jest_jax.fields import ConfigError, Section, get_field
from jest_jax.files import write_json
from jest_jax.metrics import compiled_flops


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
    """`config.embed`: what `--mode embed` embeds."""

    pool: str

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.pool = "data.train"  # the config field of the pool to embed: data.train, an eval
        #                        task's data (evals.retrieval.data), any pool group
        return c

    @classmethod
    def from_config(cls, section: Section, config: ml_collections.ConfigDict) -> EmbedSpec:
        pool = section.string("pool", nonempty=True)
        try:
            node = get_field(config, pool)
        except ConfigError:
            raise section.error("pool", pool, "names no field of this config") from None
        section.check(isinstance(node, ml_collections.ConfigDict) and "source" in node,
                      "pool", pool, "must name a pool: a group with a `source`, such as "
                      "data.train or evals.<task>.data")
        return cls(pool)


Embed = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


def write_embeddings(directory: str, embed: Embed, params: Any, pool: Pool,
                     preprocess: Preprocess, mesh: jax.sharding.Mesh, batch_size: int,
                     meta: dict[str, Any], scalars: dict[str, float] | None = None) -> str:
    """`embed(params, batch) -> (image, text)` of every record of `pool` into
    `directory`/{image,text}.npy, each of `scalars` as a 0-d `<name>.npy`, and `meta` (with
    `num_examples`, and `flops`: the pass's XLA FLOPs over all devices, which comparisons
    charge to the learners sharing a reference cache) as meta.json; returns the directory."""
    n = len(pool)
    jitted = jax.jit(embed, out_shardings=sharding.replicated(mesh))
    write = jax.process_index() == 0
    tmp = f"{directory.rstrip('/')}.partial"
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    arrays: dict[str, np.ndarray] = {}
    progress = log.Progress(-(-n // batch_size), 0)  # counts batches
    flops, batches = 0.0, 0  # every batch has the same shape (the last is padded)
    for i, local in enumerate(eval_batches(pool, preprocess, batch_size=batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())):
        batch = sharding.to_global({k: local[k] for k in ("image", "tokens")}, mesh)
        if i == 0:
            flops = compiled_flops(jitted.lower(params, batch).compile()) * mesh.size
        batches = i + 1
        image, text = sharding.to_host(jitted(params, batch))
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
        for name, value in (scalars or {}).items():
            np.save(os.path.join(tmp, f"{name}.npy"), np.float32(value))
        write_json(os.path.join(tmp, "meta.json"), {**meta, "num_examples": n,
                                                    "flops": flops * batches})
        # Swap by renames so that a crash leaves the old directory or the new one, never none.
        old = f"{directory.rstrip('/')}.old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    log.info(f"wrote {directory}")
    return directory
