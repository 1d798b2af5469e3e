"""The one training loop. Every method runs here; selection is a stage of the step."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from jest_jax import config as config_lib
from jest_jax import faults, sharding
from jest_jax import reference as reference_lib
from jest_jax.checkpoint import Checkpointer
from jest_jax.data.datasets import open_pool
from jest_jax.data.pipeline import Preprocess, train_dataset
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.evaluate import Evaluator
from jest_jax.metrics import (
    MetricWriter,
    Progress,
    compiled_flops,
    log,
    read_metrics,
    write_atomically,
)
from jest_jax.trainer import Trainer


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step, the first non-finite
    quantity and the last good checkpoint."""


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
    preprocess = Preprocess(config.data.image_size, tokenizer, config.data.text_len,
                            config.data.max_caption_bytes)
    try:
        trainer = Trainer(config, mesh, tokenizer.vocab_size)
    except sharding.RuleError as e:  # only the model's shapes show it: not in validate()
        raise config_lib.ConfigError(f"config.mesh.rules: {e}") from None
    evaluator = Evaluator(config, trainer, preprocess)
    reference, attach = {}, None
    if selection:  # before the checkpointer: a bad reference must not create the workdir
        trainer.scorer, reference, attach = reference_lib.make_scorer(config, trainer)
    faults.check_writable(workdir)  # before anything is trained, not at the first save
    # Only training (set up with selection) owns the workdir's checkpoints; eval only reads.
    checkpointer = Checkpointer(workdir, config.checkpoint.max_to_keep, owner=selection)
    return Setup(trainer, preprocess, evaluator, checkpointer, reference, attach)


def _nonfinite_error(step: int, code: int, metrics: dict[str, float], last_good: int | None,
                     ckpt_dir: str) -> NonFiniteLossError:
    first = faults.nonfinite_quantities(code)[0]
    kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_dir}"
            if last_good is not None else "no checkpoint was written")
    return NonFiniteLossError(
        f"non-finite {first} at step {step} (loss={metrics['loss']}, grad_norm="
        f"{metrics['grad_norm']}); stopping: {kept}. config.faults.nonfinite='skip' would "
        "skip such steps instead")


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at_step: int | None = None) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`; returns the final evaluation metrics.

    `stop_at_step` checkpoints and returns early at that step (the schedule still
    spans `total_steps`), e.g. for time-sliced jobs; re-running resumes from there.
    A preemption notice (SIGTERM) checkpoints after the current step and returns.
    """
    # Listening from the start: a notice during set-up or compilation is not lost.
    with faults.Preemption() as preemption:
        return _train(config, workdir, stop_at_step, preemption)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None,
           preemption: faults.Preemption) -> dict[str, float]:
    s = setup(config, workdir)
    trainer, ckpt, mesh = s.trainer, s.checkpointer, s.trainer.mesh
    source, _ = open_pool(config, "data.train")
    # With selection, the pipeline delivers super-batches of N candidates.
    draw = trainer.scorer.spec.num_candidates if trainer.scorer else config.batch_size
    try:
        data = train_dataset(source, s.preprocess, batch_size=draw, attach=s.attach,
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             num_threads=config.data.num_threads,
                             bad_records=config.faults.bad_records)
    except ValueError as e:
        why = (f" (with selection each step draws a super-batch of N = batch_size / "
               f"(1 - selection.filter_ratio) = {draw})" if trainer.scorer else "")
        raise config_lib.ConfigError(f"config.data.train: {e}{why}") from None
    data_iter = iter(data)
    os.makedirs(workdir, exist_ok=True)

    # Run totals that must survive restarts; saved in each checkpoint.
    counters = {"skipped_steps": 0, "bad_records": 0}
    restored = ckpt.restore_latest_good(trainer.abstract_sharded_state(), data_iter)
    if restored is not None:
        last_good, state, saved = restored
        counters.update(saved)
        log(f"resuming from the checkpoint at step {last_good} in {ckpt.directory}")
    else:
        last_good, state = None, trainer.init_state(config.seed)
    start = int(state["step"])
    # Only once the checkpoints accepted this config: a config that cannot resume them
    # must not overwrite the one they were trained with (learners read it as a reference).
    if jax.process_index() == 0:
        write_atomically(os.path.join(workdir, "config.json"),
                          config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, config.logging.tensorboard)
    writer.truncate_after(start)  # drop rows a crashed run logged after its last checkpoint

    def next_batch() -> tuple[dict, jax.Array]:
        """The next global batch, and how many bad records were passed over to fill it."""
        batch = sharding.to_global(next(data_iter), mesh)
        return batch, batch.pop("bad_records")

    step_fn = trainer.jit_train_step(sharding.placed(s.reference, mesh))
    batch, bad = next_batch() if start < config.total_steps else (None, None)
    # XLA reports the per-device program; the run executes it on every device.
    flops_per_step = (compiled_flops(step_fn.lower(state, batch, s.reference).compile()) * mesh.size
                      if batch is not None else float("nan"))
    progress = Progress(config.total_steps, start)
    results: dict[str, float] = {}
    pending: tuple[int, dict, jax.Array] | None = None

    def report(step: int, metrics: dict, bad: jax.Array) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        code = int(host.pop(faults.NONFINITE))
        counters["bad_records"] += int(bad.sum())
        if code:
            if config.faults.nonfinite == "stop":
                raise _nonfinite_error(step, code, host, last_good, ckpt.directory)
            counters["skipped_steps"] += 1
            log(f"warning: non-finite {', '.join(faults.nonfinite_quantities(code))} at step "
                f"{step}: update skipped ({counters['skipped_steps']} skipped in this run)")
        if step % config.logging.every_steps == 0 or step == config.total_steps:
            shown = {"loss": host["loss"]}
            if "selection/clean_selected" in host:
                shown["clean"] = host["selection/clean_selected"]
            progress.update(step, shown)
            writer.write(step, {**host, "steps_per_sec": progress.steps_per_sec,
                                "flops": flops_per_step * step,
                                "faults/skipped_steps": counters["skipped_steps"],
                                "data/bad_records": counters["bad_records"]})

    def evaluate(step: int) -> dict[str, float]:
        out = s.evaluator.run(state["params"])
        writer.write(step, out)
        log(f"[{step:>6}/{config.total_steps}] eval " +
            " ".join(f"{k}={v:.3f}" for k, v in out.items()))
        progress.restart_clock(step)
        return out

    def eval_due(step: int) -> bool:
        return bool(config.evals.every_steps and step % config.evals.every_steps == 0)

    preemption.sync_point = ckpt.reached_preemption
    try:
        if 0 < start < config.total_steps and eval_due(start) and not any(
                r["step"] == start and "loss" not in r for r in read_metrics(workdir)):
            # A preemption stops before the evaluation of its step, and a kill can land in
            # one: the step's evaluation is owed, so the log matches an uninterrupted run's.
            evaluate(start)
        for step in range(start + 1, config.total_steps + 1):
            state, metrics = step_fn(state, batch, s.reference)
            if pending is not None:  # fetched a step late: the device is already busy
                report(*pending)
            pending = (step, metrics, bad)
            final, stopping = step == config.total_steps, step == stop_at_step
            preempted = preemption.reached(step)
            if step % config.checkpoint.every_steps == 0 or final or stopping or preempted:
                report(*pending)  # never checkpoint a step that was not checked
                pending = None
                # Saved before the next batch is drawn, so a resume redraws it.
                ckpt.save(step, state, data_iter, dict(counters))
                last_good = step
                progress.restart_clock(step)
            if preempted and not final:
                log(f"preempted: stopped after step {step} and wrote its checkpoint in "
                    f"{ckpt.directory}; re-run the same command to resume")
                break
            if eval_due(step) or final:
                results = evaluate(step)
            if stopping and not final:
                log(f"stopping at step {step} (stop_at_step); re-run to resume")
                break
            if not final:
                batch, bad = next_batch()
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
