"""Command-line entry point.

    python -m jest_jax.main --config configs/smoke.py --workdir runs/smoke
    python -m jest_jax.main --config configs/shapes.py:stage=learner --workdir runs/learner \\
        --config.total_steps=1000
    python -m jest_jax.main --config configs/smoke.py --workdir runs/smoke --mode eval
    # a bucket as the workdir; a profile of steps 100 to 110 into its profile/
    python -m jest_jax.main --config configs/smoke.py --workdir gs://bucket/smoke \
        --profile_steps=100:110
    # unit embeddings of config.embed.pool (default data.train) with the latest checkpoint
    python -m jest_jax.main --config configs/smoke.py --workdir runs/smoke --mode embed \
        --output runs/smoke/embeddings
    # reference embeddings of data.train, computed once (see configs/shapes.py)
    python -m jest_jax.main --config configs/shapes.py:stage=learner,method=joint,\
reference=runs/ref,cache=runs/ref/cache --mode cache

    # one of several processes (each with its own --process_id); TPU VMs need no flags
    python -m jest_jax.main --config ... --workdir ... --coordinator_address=host0:1234 \\
        --num_processes=2 --process_id=0

Re-running the same command on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from jest_jax import config as config_lib
from jest_jax import log, sharding, train
from jest_jax.checkpoint import CheckpointError
from jest_jax.data.records import BadRecordError
from jest_jax.faults import WorkdirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go "
                                "(train and eval modes).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "cache", "embed"],
                          "train: train or resume; eval: evaluate the latest checkpoint; "
                          "cache: embed data.train with the reference into "
                          "selection.reference.cache_dir (on every process, each writing its "
                          "own shards; re-run to resume); embed: write the embeddings of "
                          "config.embed.pool by the workdir's latest checkpoint (else "
                          "model.init_from) to --output.")
_OUTPUT = flags.DEFINE_string("output", None, "embed mode: the directory the .npy files "
                              "go to.")
_STEP = flags.DEFINE_integer("step", None, "eval mode: the checkpoint step (default latest).")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "train mode: checkpoint and exit at "
                                "this step (the schedule still spans total_steps); re-run "
                                "to resume. For time-sliced jobs.")
_PROFILE = flags.DEFINE_string("profile_steps", None, "train mode: A:B writes a jax.profiler "
                               "trace of steps A to B into <workdir>/profile, for "
                               "TensorBoard's profile plugin.")
# Multi-process runs outside Cloud TPU VMs (which are detected): every process gets the
# same command with its own --process_id.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, from 0.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" chatter
    config = _CONFIG.value
    try:
        config_lib.validate(config)  # device-independent checks, before any device is touched
    except (config_lib.ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if _MODE.value in ("train", "eval") and not _WORKDIR.value:
        sys.exit(f"error: --workdir is required in {_MODE.value} mode")
    if _MODE.value == "embed" and not _OUTPUT.value:
        sys.exit("error: --output is required in embed mode")
    try:
        profile_steps = parse_steps(_PROFILE.value) if _PROFILE.value else None
    except ValueError as e:
        sys.exit(f"error: --profile_steps={_PROFILE.value!r} is invalid: {e}")

    try:  # before anything touches a device
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
    except ValueError as e:
        sys.exit(f"error: {e}")

    try:
        results = _run_mode(config, profile_steps)
    except (config_lib.ConfigError, train.NonFiniteLossError, FileNotFoundError, WorkdirError,
            BadRecordError, CheckpointError) as e:
        sharding.fail_processes(f"error: {e}")  # every process of the run ends with it
    except Exception as e:
        if not sharding.multi_process():
            raise
        sharding.fail_processes(f"error: {type(e).__name__}: {e}", traceback.format_exc())
    sharding.stop_failure_watch()  # ended normally, or preempted: nothing to publish
    for name, value in sorted(results.items()):
        log.info(f"{name:32s} {value:.4f}")


def _run_mode(config, profile_steps: tuple[int, int] | None) -> dict[str, float]:
    """Run --mode; the final metrics to print (none for cache and embed)."""
    if _MODE.value == "train":
        return train.train(config, _WORKDIR.value, stop_at_step=_STOP_AT.value,
                           profile_steps=profile_steps)
    if _MODE.value == "eval":
        return train.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value)
    if _MODE.value == "embed":
        train.embed(config, _WORKDIR.value, _OUTPUT.value)
    else:
        train.cache_reference(config)
    return {}


def parse_steps(text: str) -> tuple[int, int]:
    """`"A:B"` -> (A, B): the training steps A to B, 1 <= A <= B."""
    first, sep, last = text.partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError("must be A:B, two step numbers (e.g. 100:110)")
    a, b = int(first), int(last)
    if not 1 <= a <= b:
        raise ValueError("needs 1 <= A <= B")
    return a, b


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
