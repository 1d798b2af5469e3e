"""The one training loop. Every method runs here; selection is a stage of the step."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from jest_jax import config as config_lib
from jest_jax import reference as reference_lib
from jest_jax import sharding
from jest_jax.checkpoint import Checkpointer
from jest_jax.data.datasets import open_pool
from jest_jax.data.pipeline import Preprocess, train_dataset
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.evaluate import Evaluator
from jest_jax.metrics import MetricWriter, Progress, compiled_flops, log
from jest_jax.trainer import Trainer


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class Setup:
    """What both training and standalone evaluation need, built from one config."""

    trainer: Trainer
    preprocess: Preprocess
    evaluator: Evaluator
    checkpointer: Checkpointer
    reference: Any = dataclasses.field(default_factory=dict)  # the train step's `reference`
    attach: Callable[[int], dict] | None = None  # per-example extras (reference cache)


def setup(config: ml_collections.ConfigDict, workdir: str, selection: bool = True) -> Setup:
    """Validate, build mesh/model/optimizer, open every eval split and (with `selection`)
    load the reference, all before compiling."""
    config_lib.validate(config, num_devices=jax.device_count())
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
    tokenizer = make_tokenizer(config.data.tokenizer)
    preprocess = Preprocess(config.data.image_size, tokenizer, config.data.text_len)
    trainer = Trainer(config, mesh, tokenizer.vocab_size)
    evaluator = Evaluator(config, trainer, preprocess)
    reference, attach = {}, None
    if selection:  # before the checkpointer: a bad reference must not create the workdir
        trainer.scorer, reference, attach = reference_lib.make_scorer(config, trainer)
    return Setup(trainer, preprocess, evaluator,
                 Checkpointer(workdir, config.checkpoint.max_to_keep), reference, attach)


def _check_finite(step: int, metrics: dict[str, float], last_good: int | None,
                  ckpt_dir: str) -> None:
    for name in ("loss", "grad_norm"):
        if not np.isfinite(metrics[name]):
            kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_dir}"
                    if last_good is not None else "no checkpoint was written")
            raise NonFiniteLossError(
                f"non-finite {name}={metrics[name]} at step {step}; stopping: {kept}")


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at_step: int | None = None) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`; returns the final evaluation metrics.

    `stop_at_step` checkpoints and returns early at that step (the schedule still
    spans `total_steps`), e.g. for time-sliced jobs; re-running resumes from there.
    """
    s = setup(config, workdir)
    trainer, ckpt, mesh = s.trainer, s.checkpointer, s.trainer.mesh
    source, _ = open_pool(config, "data.train")
    # With selection, the pipeline delivers super-batches of N candidates.
    draw = trainer.scorer.spec.num_candidates if trainer.scorer else config.batch_size
    try:
        data = train_dataset(source, s.preprocess, batch_size=draw, attach=s.attach,
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             num_threads=config.data.num_threads)
    except ValueError as e:
        why = (f" (with selection each step draws a super-batch of N = batch_size / "
               f"(1 - selection.filter_ratio) = {draw})" if trainer.scorer else "")
        raise config_lib.ConfigError(f"config.data.train: {e}{why}") from None
    data_iter = iter(data)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    last_good = ckpt.latest_step()
    if last_good is not None:
        state = ckpt.restore(trainer.abstract_sharded_state(), data_iter)
        log(f"resuming from the checkpoint at step {last_good} in {ckpt.directory}")
    else:
        state = trainer.init_state(config.seed)
    start = int(state["step"])
    writer = MetricWriter(workdir, config.logging.tensorboard)
    writer.truncate_after(start)  # drop rows a crashed run logged after its last checkpoint

    step_fn = trainer.jit_train_step(sharding.placed(s.reference, mesh))
    batch = sharding.to_global(next(data_iter), mesh) if start < config.total_steps else None
    # XLA reports the per-device program; the run executes it on every device.
    flops_per_step = (compiled_flops(step_fn.lower(state, batch, s.reference).compile()) * mesh.size
                      if batch is not None else float("nan"))
    progress = Progress(config.total_steps, start)
    results: dict[str, float] = {}
    pending: tuple[int, dict] | None = None

    def report(step: int, metrics: dict) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, host, last_good, ckpt.directory)
        if step % config.logging.every_steps == 0 or step == config.total_steps:
            shown = {"loss": host["loss"]}
            if "selection/clean_selected" in host:
                shown["clean"] = host["selection/clean_selected"]
            progress.update(step, shown)
            writer.write(step, {**host, "steps_per_sec": progress.steps_per_sec,
                                "flops": flops_per_step * step})

    def evaluate(step: int) -> dict[str, float]:
        out = s.evaluator.run(state["params"])
        writer.write(step, out)
        log(f"[{step:>6}/{config.total_steps}] eval " +
            " ".join(f"{k}={v:.3f}" for k, v in out.items()))
        progress.restart_clock(step)
        return out

    try:
        for step in range(start + 1, config.total_steps + 1):
            state, metrics = step_fn(state, batch, s.reference)
            if pending is not None:  # fetched a step late: the device is already busy
                report(*pending)
            pending = (step, metrics)
            final, stopping = step == config.total_steps, step == stop_at_step
            if step % config.checkpoint.every_steps == 0 or final or stopping:
                report(*pending)  # never checkpoint a step whose loss was not checked
                pending = None
                # Saved before the next batch is drawn, so a resume redraws it.
                ckpt.save(step, state, data_iter)
                last_good = step
                progress.restart_clock(step)
            if (config.evals.every_steps and step % config.evals.every_steps == 0) or final:
                results = evaluate(step)
            if stopping and not final:
                log(f"stopping at step {step} (stop_at_step); re-run to resume")
                break
            if not final:
                batch = sharding.to_global(next(data_iter), mesh)
        if start >= config.total_steps:
            log(f"already trained to step {start}; evaluating the final checkpoint")
            results = s.evaluator.run(state["params"])
    finally:
        ckpt.close()
        writer.close()
    if results and jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": int(state["step"]), **results}, f, indent=2)
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, float]:
    """Standalone evaluation of a checkpoint in `workdir` (latest unless `step` is given)."""
    s = setup(config, workdir, selection=False)
    step = s.checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to evaluate in {s.checkpointer.directory}")
    state = s.checkpointer.restore(s.trainer.abstract_sharded_state(), step=step)
    s.checkpointer.close()
    results = s.evaluator.run(state["params"])
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_step{step}.json"), "w") as f:
            json.dump({"step": step, **results}, f, indent=2)
    return results


def cache_reference(config: ml_collections.ConfigDict) -> str:
    """`--mode cache`: reference embeddings of `data.train` into `selection.reference.cache_dir`."""
    config_lib.validate(config, num_devices=jax.device_count())
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
    return reference_lib.write_cache(config, mesh)
