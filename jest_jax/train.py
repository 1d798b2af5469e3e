"""The one training loop, and the other run modes (evaluate a checkpoint, cache the
reference, write a pool's embeddings). Every method runs here; selection is a stage of
the step (`jest_jax.step`)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from jest_jax import build, faults, files, log, sharding
from jest_jax import config as config_lib
from jest_jax import reference as reference_lib
from jest_jax.checkpoint import Checkpointer, latest_step, read_params
from jest_jax.data import sources
from jest_jax.data.pipeline import Stream, train_dataset
from jest_jax.embed import write_embeddings
from jest_jax.metrics import DataWait, MetricWriter, StepProfile, read_metrics


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step, the first non-finite
    quantity and the last good checkpoint."""


def train(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None,
          profile_steps: tuple[int, int] | None = None) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`; returns the final evaluation metrics.

    `stop_at_step` checkpoints and returns early at that step (the schedule still
    spans `total_steps`), e.g. for time-sliced jobs; re-running resumes from there.
    A preemption notice (SIGTERM) checkpoints after the current step and returns.
    `profile_steps=(A, B)` traces steps A to B into `workdir/profile` (`metrics.StepProfile`).
    `workdir` may be a bucket path (`gs://...`). The log also goes to `workdir/log.txt`.
    """
    # Listening from the start: a notice during set-up or compilation is not lost.
    with faults.Preemption() as preemption, log.FileLog() as file_log:
        return _train(config, workdir, stop_at_step, profile_steps, preemption, file_log)


def _draw(run: build.Run) -> int:
    """Examples drawn per step: with selection, a super-batch of N candidates."""
    scorer = run.wired.scorer
    return scorer.spec.num_candidates if scorer else run.spec.batch_size


def train_data(run: build.Run, pool: sources.Pool | None = None):
    """The training pipeline of `run`: (super-)batches of this process's share."""
    spec, scorer, draw = run.spec, run.wired.scorer, _draw(run)
    pool = sources.open_source(spec.data.train, "data.train") if pool is None else pool
    try:
        return train_dataset(pool, run.preprocess, batch_size=draw,
                             attach=run.wired.reference.attach, seed=spec.seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             num_threads=spec.data.num_threads,
                             num_workers=spec.data.num_workers,
                             skip_bad_records=spec.faults.skip_bad_records)
    except ValueError as e:
        why = (f" (with selection each step draws a super-batch of N = batch_size / "
               f"(1 - selection.filter_ratio) = {draw})" if scorer else "")
        raise config_lib.ConfigError(f"config.data.train: {e}{why}") from None


class _Training:
    """A run training in its workdir: the loop, and what it keeps between steps."""

    def __init__(self, run: build.Run, workdir: str, checkpointer: Checkpointer):
        self.run, self.workdir, self.ckpt = run, workdir, checkpointer
        self.spec = run.spec
        pool = sources.open_source(self.spec.data.train, "data.train")
        self.data = iter(train_data(run, pool))
        # The data position a checkpoint keeps is global: any process count resumes it.
        self.stream = Stream(super_batch=_draw(run), batch_size=self.spec.batch_size,
                             seed=self.spec.seed, pool_size=len(pool),
                             pool=self.spec.data.train.identity())
        files.makedirs(workdir)
        # Run totals that must survive restarts; saved in each checkpoint.
        self.counters = {"skipped_steps": 0, "bad_records": 0}
        restored = checkpointer.restore_latest_good(run.state.abstract_sharded(),
                                                    self.stream.mismatch)
        if restored is not None:
            self.last_good, self.state, saved, position = restored
            self.stream.resume(self.data, position)
            self.counters.update(saved)
            log.info(f"resuming from the checkpoint at step {self.last_good} in "
                     f"{checkpointer.directory}")
        else:
            self.last_good, self.state = None, run.initial_state()
        self.start = int(self.state["step"])
        # Only once the checkpoints accepted this config: a config that cannot resume them
        # must not overwrite the one they were trained with (learners read it as a reference).
        if jax.process_index() == 0:
            files.write_atomically(files.join(workdir, "config.json"),
                             self.spec.config.to_json_best_effort(indent=2))
        self.writer = MetricWriter(workdir, self.spec.logging.tensorboard)
        self.writer.truncate_after(self.start)  # rows a crashed run logged after its checkpoint
        self.progress = log.Progress(self.spec.total_steps, self.start)
        self.data_wait = DataWait()

    def next_batch(self) -> tuple[dict, jax.Array]:
        """The next global batch, and how many bad records were passed over to fill it."""
        batch = sharding.to_global(self.data_wait.next(self.data), self.run.mesh)
        return batch, batch.pop("bad_records")

    def run_loop(self, stop_at_step: int | None, preemption: faults.Preemption,
                 profile: StepProfile) -> dict[str, float]:
        """Train from `start` to the end (or to `stop_at_step`, or a preemption); the
        results of the last evaluation."""
        total, step_fn = self.spec.total_steps, self.run.wired.step
        reference = self.run.wired.reference.step_input
        if self.start >= total:
            log.info(f"already trained to step {self.start}; evaluating the final checkpoint")
            return self.run.evaluator.run(self.state["params"], self.start)
        batch, bad = self.next_batch()
        flops = self.run.wired.flops(batch, reference)
        # Start the first step together: the processes compiled it at their own pace.
        sharding.sync_processes(f"jest_jax: step {self.start} compiled")
        if self.owes_evaluation():
            self.evaluate(self.start)
        self.data_wait.restart()  # not the set-up, compilation and owed evaluation
        results: dict[str, float] = {}
        pending: tuple | None = None
        for step in range(self.start + 1, total + 1):
            profile.before(step)
            self.state, metrics, health = step_fn(self.state, batch, reference)
            profile.after(step, self.state)
            if pending is not None:  # fetched a step late: the device is already busy
                self.report(*pending)
            pending = (step, metrics, health, bad, flops)
            final, stopping = step == total, step == stop_at_step
            preempted = preemption.reached(step, self.ckpt.reached_preemption)
            if self.spec.checkpoint.due(step) or final or stopping or preempted:
                self.report(*pending)  # never checkpoint a step that was not checked
                pending = None
                self.save(step)
            if preempted and not final:
                log.info(f"preempted: stopped after step {step} and wrote its checkpoint in "
                         f"{self.ckpt.directory}; re-run the same command to resume")
                break
            if self.spec.evals.due(step) or final:
                results = self.evaluate(step)
            if stopping and not final:
                log.info(f"stopping at step {step} (stop_at_step); re-run to resume")
                break
            if not final:
                batch, bad = self.next_batch()
        return results

    def report(self, step: int, metrics: dict, health: faults.Health, bad: jax.Array,
               flops_per_step: dict[str, float]) -> None:
        """Check a step's health and log its metrics (fetched a step late)."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        failed = jax.device_get(health).failed()
        self.counters["bad_records"] += int(bad.sum())
        if failed:
            if self.spec.faults.stop_on_nonfinite:
                kept = (f"the last good checkpoint (step {self.last_good}) is kept in "
                        f"{self.ckpt.directory}" if self.last_good is not None
                        else "no checkpoint was written")
                raise NonFiniteLossError(
                    f"non-finite {failed[0]} at step {step} (loss={host['loss']}, grad_norm="
                    f"{host['grad_norm']}); stopping: {kept}. config.faults.nonfinite='skip' "
                    "would skip such steps instead")
            self.counters["skipped_steps"] += 1
            log.warning(f"non-finite {', '.join(failed)} at step {step}: update skipped "
                        f"({self.counters['skipped_steps']} skipped in this run)")
        if step % self.spec.logging.every_steps == 0 or step == self.spec.total_steps:
            shown = {"loss": host["loss"]}
            if "selection/clean_selected" in host:
                shown["clean"] = host["selection/clean_selected"]
            self.progress.update(step, shown)
            self.writer.write(step, {**host, "steps_per_sec": self.progress.steps_per_sec,
                                     "data_wait": self.data_wait.fraction(),
                                     **{k: v * step for k, v in flops_per_step.items()},
                                     "faults/skipped_steps": self.counters["skipped_steps"],
                                     "data/bad_records": self.counters["bad_records"]})

    def evaluate(self, step: int) -> dict[str, float]:
        out = self.run.evaluator.run(self.state["params"], step)
        self.writer.write(step, out)
        log.info(f"[{step:>6}/{self.spec.total_steps}] eval " +
                 " ".join(f"{k}={v:.3f}" for k, v in out.items()))
        self.progress.restart_clock(step)
        self.data_wait.restart()
        return out

    def owes_evaluation(self) -> bool:
        """A preemption stops before the evaluation of its step, and a kill can land in
        one: the resume step's evaluation is owed, so the log matches an uninterrupted
        run's."""
        return (0 < self.start < self.spec.total_steps and self.spec.evals.due(self.start)
                and not any(r["step"] == self.start and "loss" not in r
                            for r in read_metrics(self.workdir)))

    def save(self, step: int) -> None:
        # Saved before the next batch is drawn, so a resume redraws it.
        self.ckpt.save(step, self.state, self.stream.position(self.data), dict(self.counters))
        self.last_good = step
        self.progress.restart_clock(step)
        self.data_wait.restart()

    def close(self) -> None:
        self.ckpt.close()  # waits for the saves in flight
        self.writer.close()
        self.data.close()  # stops grain's worker processes (data.num_workers) now, not at exit


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None,
           profile_steps: tuple[int, int] | None, preemption: faults.Preemption,
           file_log: log.FileLog) -> dict[str, float]:
    run = build.build(config)  # before the checkpointer: a bad reference must not create it
    faults.check_writable(workdir)  # before anything is trained, not at the first save
    file_log.attach(files.join(workdir, "log.txt"))
    training = _Training(run, workdir, Checkpointer(workdir, run.spec.checkpoint.max_to_keep,
                                                    owner=True))
    try:
        profile = StepProfile(profile_steps, workdir, training.start)
        try:
            results = training.run_loop(stop_at_step, preemption, profile)
        finally:
            profile.stop()
    finally:
        training.close()
    if results and jax.process_index() == 0:
        files.write_json(files.join(workdir, "final_metrics.json"),
                   {"step": int(training.state["step"]), **results})
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, float]:
    """Standalone evaluation of a checkpoint in `workdir` (latest unless `step` is given).

    Only the params are restored: no optimizer state is built or read.
    """
    run = build.build(config, selection=False)
    faults.check_writable(workdir)  # the results are written there
    params, step = read_params(workdir, run.state.abstract_params(), step)  # read-only
    results = run.evaluator.run(params)
    if jax.process_index() == 0:
        files.write_json(files.join(workdir, f"eval_step{step}.json"), {"step": step, **results})
    return results


def cache_reference(config: ml_collections.ConfigDict) -> str:
    """`--mode cache`: reference embeddings of `data.train` into `selection.reference.cache_dir`."""
    spec = config_lib.validate(config, num_devices=jax.device_count())
    return reference_lib.write_cache(spec.reference, spec.data, spec.mesh.build(), spec.mesh,
                                     spec.evals.batch_size)


def embed(config: ml_collections.ConfigDict, workdir: str | None, output: str) -> str:
    """`--mode embed`: the unit image and text embeddings of the pool `config.embed.pool`
    names, and the logit scale exp(t') and bias, as .npy files in `output`.

    The model is the latest checkpoint in `workdir`, else `model.init_from` (a published
    checkpoint, used as it is); only the params are read.
    """
    if files.is_url(output):  # before anything is built: it cannot be written
        raise config_lib.ConfigError(
            f"--output {output!r} is a URL: --mode embed writes .npy memory maps to a local "
            "directory; write them there and copy them up (gcloud storage cp -r), or use "
            "--mode cache, which writes a bucket")
    run = build.build(config, selection=False)
    step = latest_step(workdir) if workdir else None
    if step is not None:
        params, _ = read_params(workdir, run.state.abstract_params(), step)  # read-only
        described = f"step {step} of {files.absolute(workdir, resolve_links=True)}"
    else:
        if not run.spec.model.init_from:
            where = f"{workdir} has no checkpoint" if workdir else "no --workdir was given"
            raise FileNotFoundError(f"nothing to embed with: {where} and config.model."
                                    "init_from is empty")
        params = sharding.from_host(run.initial_params(), run.state.abstract_params())
        described = run.spec.model.init_from
    field = run.spec.embed.pool
    pool = sources.open_pool(config, field)
    log.info(f"embedding {pool.description} ({field}, {len(pool)} examples) with "
             f"{described} -> {output}")
    scalars = jax.device_get({"log_temperature": params["log_temperature"],
                              "bias": params["bias"]})
    return write_embeddings(
        output, lambda p, b: run.model.embeddings(p, b)[:2], params, pool,
        run.spec.data.preprocess(check_captions=False), run.mesh, run.spec.evals.batch_size,
        {"pool": field, "data": pool.description, "model": described},
        {"logit_scale": float(np.exp(scalars["log_temperature"])),
         "logit_bias": float(scalars["bias"])})
