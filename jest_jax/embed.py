"""Embeddings of a whole pool: `--mode embed` writes a model's unit image and text
embeddings, with its logit scale and bias, as `.npy` files (for analysis and external
evaluation suites; `config.embed` names the pool); `--mode cache` writes the reference's
embeddings of data.train into a sharded reference cache (`cache_store`), every process
its own shards, resumably.

A `.npy` directory is whole or absent: it is filled as `<dir>.partial` and renamed into
place (an existing one is replaced only once the new one is complete). Row `i` of
`image.npy` and `text.npy` is record `i` of the pool.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jest_jax import log, sharding
from jest_jax.cache_store import CacheStore
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


def write_cache(store: CacheStore, embed: Embed, params: Any, pool: Pool,
                preprocess: Preprocess, mesh: jax.sharding.Mesh, batch_size: int,
                layout: dict[str, Any], meta: dict[str, Any]) -> None:
    """`embed(params, batch)` of every record of `pool` into the cache `store` whose
    `layout.json` is `layout` (plus the embeddings' `width`): each process embeds and
    writes its own shards (the uncommitted ones, dealt round-robin), then process 0
    writes `meta.json` (`meta` and `layout`, with `flops` as in `write_embeddings` and
    the shard count). A cache with
    this layout left unfinished is resumed from its committed shards; one with another
    layout is replaced."""
    process, processes = jax.process_index(), jax.process_count()
    n, shard_rows = layout["num_examples"], layout["shard_rows"]
    num_shards = -(-n // shard_rows)
    local = batch_size // processes

    def run(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
        return (*embed(params, batch), batch["index"])

    jitted = jax.jit(run, out_shardings=sharding.batch_sharding(mesh))
    first = next(eval_batches(pool, preprocess, batch_size=local, limit=1))
    empty = sharding.to_global({k: np.zeros_like(first[k])
                                for k in ("image", "tokens", "index")}, mesh)
    compiled = jitted.lower(params, empty).compile()
    flops = compiled_flops(compiled) * mesh.size * -(-n // batch_size)
    layout = {**layout, "width": int(jax.eval_shape(run, params, empty)[0].shape[1])}
    if process == 0:
        _open_for_writing(store, layout)
    # Every process must deal the same shards: process 0's view of the markers decides.
    committed = np.zeros(num_shards + 1, np.int32)
    if process == 0:
        committed[list(store.committed())] = 1
        committed[num_shards] = store.read_json("meta.json") is not None
    committed = np.asarray(multihost_utils.broadcast_one_to_all(committed))
    if committed[num_shards]:
        log.info(f"{store.directory} is a complete cache of this pool and reference already")
        return
    todo = [k for k in range(num_shards) if not committed[k]]

    def calls(shards: list[int]) -> int:  # embedding calls a process makes for `shards`
        return sum(-(-(min(n, (k + 1) * shard_rows) - k * shard_rows) // local) for k in shards)

    mine = todo[process::processes]
    # Collective calls: every process makes as many, the short ones with empty batches.
    total_calls = max(calls(todo[q::processes]) for q in range(processes))
    log.info(f"cache: {num_shards} shards of {shard_rows} rows, {num_shards - len(todo)} "
             f"committed before, {len(todo)} to write over {processes} process(es)")
    mine_rows = sum(min(n, (k + 1) * shard_rows) - k * shard_rows for k in mine)
    done, made, clock = 0, 0, time.perf_counter()
    for k in mine:
        start, stop = k * shard_rows, min(n, (k + 1) * shard_rows)
        image = text = None
        for local_batch in eval_batches(pool, preprocess, batch_size=local, offset=start,
                                        limit=stop):
            batch = sharding.to_global({key: local_batch[key] for key in empty}, mesh)
            out_image, out_text, index = (_local_rows(a) for a in compiled(params, batch))
            if image is None:
                image = np.zeros((stop - start, out_image.shape[1]), np.float32)
                text = np.zeros_like(image)
            rows = index[local_batch["mask"]] - start
            image[rows] = out_image[local_batch["mask"]]
            text[rows] = out_text[local_batch["mask"]]
            made += 1
        store.write_shard(k, start, image, text, {"rows": [start, stop], "process": process})
        done += stop - start
        rate = done / (time.perf_counter() - clock)
        log.info(f"[cache] process {process}: {done}/{mine_rows} rows of its share "
                 f"({mine.index(k) + 1}/{len(mine)} shards committed), {rate:.1f} rows/s",
                 every_process=True)
    for _ in range(made, total_calls):
        compiled(params, empty)
    sharding.sync_processes(f"jest_jax: cache {store.directory} shards written")
    if process == 0:
        missing = sorted(set(range(num_shards)) - set(store.committed()))
        if missing:  # a marker lost between the writes and here: not a complete cache
            raise RuntimeError(f"{store.directory}: shards {missing} have no commit marker "
                               "after every process finished; run --mode cache again")
        store.write_json("meta.json", {**meta, **layout, "num_shards": num_shards,
                                       "flops": flops})
    sharding.sync_processes(f"jest_jax: cache {store.directory} committed")
    log.info(f"wrote {store.directory}")


def _open_for_writing(store: CacheStore, layout: dict[str, Any]) -> None:
    """Resume the cache if it has `layout`; else (re)create it."""
    old = store.read_json("layout.json")
    if old == json.loads(json.dumps(layout)):
        return
    if store.is_cache():
        log.info(f"note: {store.directory} holds a cache of another pool, reference or "
                 "format; replacing it")
        store.clear()
    store.create(layout)


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in global order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
