"""Compile a config's train step (and its scoring kernel) ahead of time for a large mesh,
without allocating a single array, and report what one device would need.

    XLA_FLAGS=--xla_force_host_platform_device_count=256 JAX_PLATFORMS=cpu \\
        python experiments/compile_paper.py --config configs/paper/jest.py:model=B

Simulated CPU devices stand in for a 256-chip slice (v5litepod-256, v6e-256; a v4-512
or v5p-512 has 256 chips too): the SPMD partitioning and per-device shapes are XLA's real
ones, so a config that does not compile or shard is caught on a laptop. Memory is
XLA:CPU's buffer assignment for one device's program (arguments + outputs + temporaries
- donated aliases). Arguments and outputs (the sharded state and batch) are exact.
Temporaries are an upper bound: XLA:CPU computes bfloat16 in float32 and does not
schedule rematerialised blocks for memory (docs/benchmarks.md measures both), so a TPU
compile needs less.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import time

import jax
import jax.numpy as jnp

from jest_jax import reference as reference_lib
from jest_jax import sharding
from jest_jax.config import get_field
from jest_jax.metrics import compiled_flops
from jest_jax.scoring import SelectionSpec
from jest_jax.trainer import Trainer

GiB = 2**30


def load_config(spec: str):
    """`configs/paper/jest.py:model=L` → its ConfigDict."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(arg or None)


def memory(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    total = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
    return {f"{k}_gib": round(v / GiB, 3) for k, v in {**parts, "total": total}.items()}


def abstract_batch(config, trainer: Trainer, rows: int, cached: bool) -> dict:
    """ShapeDtypeStructs of a (super-)batch of `rows` examples, sharded like real ones."""
    s = sharding.batch_sharding(trainer.mesh)
    size, length = config.data.image_size, config.data.text_len
    batch = {"image": jax.ShapeDtypeStruct((rows, size, size, 3), jnp.uint8, sharding=s),
             "tokens": jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=s)}
    if cached:  # the reference cache rides along with each candidate
        for name in ("ref_image", "ref_text"):
            batch[name] = jax.ShapeDtypeStruct((rows, config.model.embed_dim), jnp.float32,
                                               sharding=s)
    return batch


def compile_config(config, vocab_size: int, cached: bool = True) -> dict:
    """Lower and compile the train step (and scoring kernel, with selection); report."""
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
    trainer = Trainer(config, mesh, vocab_size)
    spec = SelectionSpec.from_config(config)
    replicated = sharding.replicated(mesh)
    reference, rows = {}, config.batch_size
    if spec.active:
        rows = spec.num_candidates
        embed_reference = None
        if spec.needs_reference and cached:
            reference = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
                         for k in ("log_temperature", "bias")}
            embed_reference = reference_lib.cached_embeddings
        elif spec.needs_reference:  # a frozen reference of the learner's architecture
            reference = trainer.abstract_sharded_state()["params"]
            embed_reference = trainer.embeddings
        trainer.scorer = reference_lib.build_scorer(spec, trainer, embed_reference)
    state = trainer.abstract_sharded_state()
    batch = abstract_batch(config, trainer, rows, cached and spec.needs_reference)
    ref_sharding = sharding.placed(reference, mesh)
    report = {"devices": mesh.size, "mesh": dict(mesh.shape), "batch": config.batch_size,
              "candidates": rows,
              "params_m": round(sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6, 1)}
    start = time.perf_counter()
    step = trainer.jit_train_step(ref_sharding).lower(state, batch, reference).compile()
    report["train_step"] = {**memory(step), "compile_s": round(time.perf_counter() - start, 1),
                            "tflop_per_device": round(compiled_flops(step) / 1e12, 2)}
    if trainer.scorer is not None:
        start = time.perf_counter()
        score = jax.jit(trainer.scorer, in_shardings=(
            replicated, trainer.state_sharding["params"], ref_sharding,
            sharding.batch_sharding(mesh))).lower(
                jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
                state["params"], reference, batch).compile()
        report["scoring"] = {**memory(score), "compile_s": round(time.perf_counter() - start, 1),
                             "tflop_per_device": round(compiled_flops(score) / 1e12, 2)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file[:args]")
    parser.add_argument("--vocab", type=int, default=32_000,
                        help="vocabulary size (the paper's SentencePiece model: 32k)")
    parser.add_argument("--online_reference", action="store_true",
                        help="run the reference every step instead of reading the cache")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.remat=False "
                             "(VALUE is a Python literal)")
    args = parser.parse_args()
    config = load_config(args.config)
    for item in args.set:
        field, _, value = item.partition("=")
        parent, _, last = field.rpartition(".")
        node = get_field(config, parent) if parent else config
        node[last] = ast.literal_eval(value)
    report = compile_config(config, args.vocab, not args.online_reference)
    print(json.dumps({"config": args.config, "set": args.set, **report}))


if __name__ == "__main__":
    main()
