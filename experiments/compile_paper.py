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
compile needs less. The report ends with the paper's §A.4 prediction of the step's cost
relative to a SigLIP step (`a4`), for the measured ratio to stand beside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from jest_jax import build, sharding
from jest_jax import config as config_lib
from jest_jax.metrics import compiled_flops
from jest_jax.models import Model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accounting import a4_prediction  # noqa: E402

GiB = 2**30


def memory(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    total = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
    return {f"{k}_gib": round(v / GiB, 3) for k, v in {**parts, "total": total}.items()}


def abstract_batch(spec: config_lib.Spec, mesh, rows: int, fields: tuple[str, ...]) -> dict:
    """ShapeDtypeStructs of a (super-)batch of `rows` examples, sharded like real ones,
    with the per-example `fields` a reference cache attaches."""
    s = sharding.batch_sharding(mesh)
    size, length = spec.data.image_size, spec.data.text_len
    batch = {"image": jax.ShapeDtypeStruct((rows, size, size, 3), jnp.uint8, sharding=s),
             "tokens": jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=s)}
    for name in fields:  # the reference cache rides along with each candidate
        batch[name] = jax.ShapeDtypeStruct((rows, spec.model.embed_dim), jnp.float32,
                                           sharding=s)
    return batch


def compile_config(config, vocab_size: int) -> dict:
    """Lower and compile the train step (and scoring kernel, with selection); report."""
    spec = config_lib.validate(config, num_devices=jax.device_count(), check_files=False)
    mesh = spec.mesh.build()
    # The reference the config names, as shapes: the cache's t' and β, or a frozen model
    # of the learner's architecture.
    reference = spec.reference.abstract(Model(spec.model, vocab_size), mesh, spec.mesh)
    wired = build.wire(spec, mesh, vocab_size, reference)
    rows = wired.scorer.spec.num_candidates if wired.scorer else spec.batch_size
    state = wired.state.abstract_sharded()
    batch = abstract_batch(spec, mesh, rows, reference.batch_fields)
    ref_input = reference.step_input
    report = {"devices": mesh.size, "mesh": dict(mesh.shape), "batch": spec.batch_size,
              "candidates": rows,
              "params_m": round(sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6, 1)}
    start = time.perf_counter()
    step = wired.step.lower(state, batch, ref_input).compile()
    report["train_step"] = {**memory(step), "compile_s": round(time.perf_counter() - start, 1),
                            "tflop_per_device": round(compiled_flops(step) / 1e12, 2)}
    if wired.scorer is not None:
        replicated = sharding.replicated(mesh)
        start = time.perf_counter()
        score = jax.jit(wired.scorer, in_shardings=(
            replicated, wired.state.sharding["params"], sharding.placed(ref_input, mesh),
            sharding.batch_sharding(mesh))).lower(
                jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
                state["params"], ref_input, batch).compile()
        report["scoring"] = {**memory(score), "compile_s": round(time.perf_counter() - start, 1),
                             "tflop_per_device": round(compiled_flops(score) / 1e12, 2)}
    # The paper's §A.4 prediction of this step ÷ a SigLIP step of the same model, with
    # each patch size's share of the forward pass (r) measured by XLA.
    report["a4"] = {k: round(v, 3) for k, v in a4_prediction(spec, vocab_size).items()}
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
    config = config_lib.load(args.config)
    try:
        config_lib.set_fields(config, dict(map(config_lib.parse_assignment, args.set)), "--set")
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    # The paper's setting is the cache (§A.5); the compile reads none of its files.
    config.selection.reference.cache_dir = "" if args.online_reference else (
        config.selection.reference.cache_dir or "(compiled without files)")
    report = compile_config(config, args.vocab)
    print(json.dumps({"config": args.config, "set": args.set, **report}))


if __name__ == "__main__":
    main()
