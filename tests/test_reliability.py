"""Runs that are killed, preempted, corrupted or hit NaN lose nothing (docs/reliability.md).

Interrupted runs are subprocesses killed for real (SIGKILL at a seeded random moment,
SIGKILL while a checkpoint is being written, SIGTERM); each is resumed and must end with
a state (params, optimizer state, step) bitwise equal to an uninterrupted run's, and
with the same metric rows.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_state
from jest_jax import build, faults, train
from jest_jax import step as step_lib
from jest_jax.checkpoint import Checkpointer, CheckpointError, checksums
from jest_jax.metrics import WALL_CLOCK, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 18  # "2k": interruption points k are drawn from a seeded generator below it
PROGRESS = re.compile(r"^\[\s*(\d+)/\d+\]")
# The interrupted runs are the real CLI (exit codes included), given the test's config.
CONFIG_FILE = """
import json
import ml_collections
def get_config():
    return ml_collections.ConfigDict(json.loads({!r}))
"""


def _short(config, steps: int = TOTAL, evals: bool = False):
    """Every step logged, a checkpoint every 2 steps, no evaluation (unless `evals`): fast
    and fine-grained."""
    config.total_steps = steps
    config.logging.every_steps = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.max_to_keep = 3
    config.logging.tensorboard = False
    if not evals:
        del config.evals.zero_shot, config.evals.retrieval
    return config


def _child(config, workdir, tmp_path, kill_in_save: int | None = None) -> subprocess.Popen:
    """The CLI on `config`; with `kill_in_save`, SIGKILLed while writing that step's
    checkpoint (tests/kill_in_save.py)."""
    # The children inherit the session's compilation cache (tests/conftest.py): they run
    # the programs the in-process straight run has compiled already.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    config_file = tmp_path / "child_config.py"
    config_file.write_text(CONFIG_FILE.format(config.to_json()))
    launcher = (["-m", "jest_jax.main"] if kill_in_save is None
                else [os.path.join(ROOT, "tests", "kill_in_save.py"), str(kill_in_save)])
    proc = subprocess.Popen([sys.executable, *launcher, "--config", str(config_file),
                             "--workdir", str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # A hung child fails the test, never hangs it; generous, so load never trips it. A
    # daemon thread: pending ones must not keep the test process alive at exit.
    watchdog = threading.Timer(1200, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return proc


def _interrupt(proc: subprocess.Popen, after_step: int, sig: int, delay: float) -> str:
    """Send `sig` `delay` s after the child logs step >= `after_step`; its whole output."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = PROGRESS.match(line)
        if m and int(m.group(1)) >= after_step:
            time.sleep(delay)
            proc.send_signal(sig)
            break
    lines.append(proc.stdout.read())
    proc.wait()
    return "".join(lines)


def _finish(proc: subprocess.Popen) -> str:
    out = proc.stdout.read()
    proc.wait()
    return out


def _assert_resumed_from(out: str, step: int) -> None:
    """The run's log says it resumed from `step` (0: started afresh, nothing committed yet)."""
    if step:
        assert f"resuming from the checkpoint at step {step} " in out, out[-2000:]
    else:
        assert "resuming from" not in out, out[-2000:]


def _steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _assert_bitwise(a: dict, b: dict) -> None:
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def _all_rows(workdir) -> list[dict]:
    """Training and evaluation rows, without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK}
            for r in read_metrics(str(workdir))]


def _rows(workdir) -> list[dict]:
    """Training rows without the wall-clock fields, which alone may differ between runs."""
    return [r for r in _all_rows(workdir) if "loss" in r]


def _straight(config, workdir) -> tuple[dict, list[dict]]:
    train.train(config, str(workdir))
    return train_state(config, workdir, config.total_steps), _rows(workdir)


@pytest.mark.slow
def test_uniform_run_killed_and_preempted_resumes_bitwise(tiny_config, tmp_path, capsys):
    config = _short(tiny_config)
    expected_state, expected_rows = _straight(config, tmp_path / "straight")
    rng = np.random.default_rng(20240611)
    work = tmp_path / "interrupted"

    # 1. kill -9 at a random moment after step k1 (mid-step, mid-log or mid-save).
    k1 = int(rng.integers(3, 7))
    proc = _child(config, work, tmp_path)
    out = _interrupt(proc, k1, signal.SIGKILL, rng.uniform(0, 0.1))
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    resumed = max(_steps(work), default=0)
    assert resumed < TOTAL

    # 2. kill -9 while the checkpoint of step k2 is being written (tests/kill_in_save.py).
    k2 = resumed + 2 * int(rng.integers(1, 3))
    proc = _child(config, work, tmp_path, kill_in_save=k2)
    out = _finish(proc)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    _assert_resumed_from(out, resumed)
    names = os.listdir(work / "checkpoints")
    if any(".orbax-checkpoint-tmp" in n for n in names):  # left by kill 1, if mid-save
        assert "warning: removing 1 half-written checkpoint(s)" in out, out[-2000:]
    assert str(k2) not in names and any(n.startswith(f"{k2}.orbax-checkpoint-tmp") for n in names)

    # 3. SIGTERM after step k3: finish the step, checkpoint, exit 0 with a message.
    k3 = int(rng.integers(k2 + 1, TOTAL - 4))
    proc = _child(config, work, tmp_path)
    out = _interrupt(proc, k3, signal.SIGTERM, 0.0)
    assert proc.returncode == 0, out[-2000:]
    _assert_resumed_from(out, k2 - 2)  # not from the half-written k2
    assert f"warning: removing 1 half-written checkpoint(s) in {work}/checkpoints " \
           f"({k2}.orbax-checkpoint-tmp" in out, out[-2000:]
    stopped = int(re.search(r"preempted: stopped after step (\d+) and wrote its checkpoint",
                            out).group(1))
    assert k3 <= stopped < TOTAL and _steps(work)[-1] == stopped
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(work / "checkpoints"))

    # 4. The same command again runs to the end.
    capsys.readouterr()
    train.train(config, str(work))
    _assert_resumed_from(capsys.readouterr().out, stopped)
    _assert_bitwise(train_state(config, work, TOTAL), expected_state)
    assert _rows(work) == expected_rows
    assert _steps(work) == [TOTAL - 4, TOTAL - 2, TOTAL]  # max_to_keep=3


@pytest.mark.slow
def test_flexi_jest_run_killed_twice_resumes_bitwise(jest_config, tmp_path, capsys):
    """JEST in its Flexi form (docs/design.md §1): scoring at patch 8, half of each batch
    trained at patch 8. It runs every part plain JEST runs (reference, selection, its
    diagnostics), plus the multi-resolution update and the FLOPs split."""
    config = _short(jest_config, 12)
    config.batch_size = 32
    config.selection.score_patch_size = 8
    config.model.low_res_patch_size = 8
    config.model.low_res_fraction = 0.5
    expected_state, expected_rows = _straight(config, tmp_path / "straight")
    assert expected_rows[-1]["flops/scoring"] > 0 and expected_rows[-1]["flops/update"] > 0
    rng = np.random.default_rng(7)
    work = tmp_path / "interrupted"
    # k2 >= 5: the second run logged step 5, so it had waited for the save before step 4's
    # to finish; there is a checkpoint to resume from, whatever the kills' timing.
    k1, k2 = sorted(int(k) for k in rng.choice(np.arange(4, 10), 2, replace=False))
    resumed = 0
    for k in (k1, k2):
        proc = _child(config, work, tmp_path)
        out = _interrupt(proc, k, signal.SIGKILL, rng.uniform(0, 0.1))
        assert proc.returncode == -signal.SIGKILL, out[-2000:]
        _assert_resumed_from(out, resumed)
        resumed = max(_steps(work), default=0)
    assert resumed >= 2
    capsys.readouterr()
    train.train(config, str(work))
    _assert_resumed_from(capsys.readouterr().out, resumed)
    _assert_bitwise(train_state(config, work, 12), expected_state)
    rows = _rows(work)
    assert rows == expected_rows and "selection/score_selected" in rows[-1]


@pytest.mark.slow
def test_identical_runs_log_identical_metrics(tiny_config, tmp_path):
    config = _short(tiny_config, 6)
    first_state, first = _straight(config, tmp_path / "a")
    second_state, second = _straight(config, tmp_path / "b")
    assert len(first) == 6 and first == second
    _assert_bitwise(first_state, second_state)


def _truncate_largest_array_file(step_dir: str) -> None:
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow
def test_corrupted_latest_checkpoint_is_reported_moved_aside_and_skipped(tiny_config, tmp_path,
                                                                          capsys):
    config = _short(tiny_config, 8)
    config.checkpoint.max_to_keep = 2
    expected_state, _ = _straight(config, tmp_path / "straight")
    work = str(tmp_path / "run")
    train.train(config, work, stop_at_step=6)
    assert _steps(work) == [4, 6]
    _truncate_largest_array_file(os.path.join(work, "checkpoints", "6"))

    capsys.readouterr()
    train.train(config, work)
    out, err = capsys.readouterr()
    assert re.search(r"warning: the checkpoint at step 6 cannot be restored \(.+\); moved it "
                     r"to .*checkpoints/6\.corrupt-[\d-]+ and resumed from step 4", err), err
    assert "resuming from the checkpoint at step 4" in out
    names = os.listdir(os.path.join(work, "checkpoints"))
    assert _steps(work) == [6, 8]  # rewritten 6, and max_to_keep=2
    assert len([n for n in names if n.startswith("6.corrupt-")]) == 1  # kept, not deleted
    _assert_bitwise(train_state(config, work, 8), expected_state)

    # A config the checkpoints no longer match: every restore fails, so nothing is moved.
    config.model.embed_dim = 32
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored \(step 8: "):
        train.train(config, work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == sorted(names)


def _reference_sums(x: np.ndarray) -> list[int]:
    """The checksum pair by Python integers: the sum of each element's bits, and their sum
    weighted by 2 * (C-order flat index) + 1, both modulo 2**32."""
    bits = [int(b) for b in x.reshape(-1).view(f"uint{8 * x.dtype.itemsize}")]
    return [sum(bits) % 2**32, sum(b * (2 * i + 1) for i, b in enumerate(bits)) % 2**32]


def test_a_flipped_byte_in_a_readable_checkpoint_fails_its_checksum_and_is_moved_aside(
        tmp_path, capsys):
    import ml_dtypes
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    state = {"params": {"w": rng.standard_normal((32, 24)).astype(np.float32),
                        "b": rng.standard_normal(24).astype(ml_dtypes.bfloat16)},
             "step": np.int32(1)}
    sums = checksums(jax.tree.map(jnp.asarray, state))["arrays"]
    assert sums == {"params/w": _reference_sums(state["params"]["w"]),
                    "params/b": _reference_sums(state["params"]["b"]),
                    "step": _reference_sums(np.asarray(state["step"]))}
    later = {**state, "step": np.int32(2)}
    ckpt = Checkpointer(str(tmp_path), owner=True)
    ckpt.save(1, jax.tree.map(jnp.asarray, state))
    ckpt.save(2, jax.tree.map(jnp.asarray, later))
    ckpt.close()

    # Flip one byte of one element of w at step 2, written back through orbax itself, so
    # the files stay valid and orbax restores the changed value without complaint (the data
    # files are compressed: a raw flip there would make them unreadable instead).
    item = tmp_path / "checkpoints" / "2" / "state"
    as_numpy = ocp.args.PyTreeRestore(restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), later))
    tampered = ocp.PyTreeCheckpointer().restore(str(item), args=as_numpy)
    w = np.array(tampered["params"]["w"])
    w.reshape(-1).view(np.uint8)[1234] ^= 0x10
    tampered["params"]["w"] = w
    ocp.PyTreeCheckpointer().save(str(tmp_path / "tampered"), tampered)
    os.rename(item, tmp_path / "original")
    os.rename(tmp_path / "tampered", item)
    reread = ocp.PyTreeCheckpointer().restore(str(item), args=as_numpy)["params"]["w"]
    assert (reread.reshape(-1).view(np.uint8)
            != later["params"]["w"].reshape(-1).view(np.uint8)).sum() == 1

    capsys.readouterr()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), later)
    ckpt = Checkpointer(str(tmp_path), owner=True)
    with pytest.raises(ValueError, match=r"checksum mismatch in 1 array\(s\) of the checkpoint "
                                         r"at step 2: params/w: the files are readable"):
        ckpt.restore_params(abstract["params"], 2)  # a reference or evaluation read
    step, restored, _, _ = ckpt.restore_latest_good(abstract)  # (…, counters, position)
    ckpt.close()
    assert step == 1 and int(restored["step"]) == 1
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    err = capsys.readouterr().err
    assert re.search(r"warning: the checkpoint at step 2 cannot be restored \(ChecksumError: "
                     r"checksum mismatch in 1 array\(s\) .*: params/w: .*\); moved it to "
                     r".*checkpoints/2\.corrupt-[\d-]+ and resumed from step 1", err), err
    assert [n.split(".")[0] for n in sorted(os.listdir(tmp_path / "checkpoints"))] == ["1", "2"]
    assert os.path.isdir(tmp_path / "checkpoints" / "1")


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path, where):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run" if where == "under_a_file" else tmp_path / "file"
    with pytest.raises(faults.WorkdirError,
                       match=re.escape(f"--workdir '{workdir}' is not writable: ")):
        train.train(tiny_config, str(workdir))


def test_unwritable_workdir_from_the_cli_exits_1_with_the_message(tmp_path, data_dir):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
    result = subprocess.run(
        [sys.executable, "-m", "jest_jax.main", "--config", "configs/smoke.py",
         "--workdir", str(workdir)], cwd=ROOT, env={**os.environ, "JEST_DATA_DIR": data_dir},
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 1
    assert f"error: --workdir '{workdir}' is not writable" in result.stderr


# --- non-finite values -------------------------------------------------------------------

NAN_CRITERION = """
import jax.numpy as jnp
def always_nan(learner, reference):
    return learner * jnp.nan
always_nan.needs_reference = False
"""


def _nan_selection(config, tmp_path, monkeypatch, policy: str):
    (tmp_path / "nan_criteria.py").write_text(NAN_CRITERION)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _short(config, 4)
    config.data.train.split = "raw"
    config.selection.update(method="joint", criterion="nan_criteria:always_nan",
                            filter_ratio=0.5, num_chunks=4)
    config.faults.nonfinite = policy
    return config


def test_nan_selection_scores_stop_the_run_naming_them(tiny_config, tmp_path, monkeypatch):
    config = _nan_selection(tiny_config, tmp_path, monkeypatch, "stop")
    with pytest.raises(train.NonFiniteLossError,
                       match=r"non-finite selection scores at step 1 \(loss=.*no checkpoint was "
                             r"written. config.faults.nonfinite='skip'"):
        train.train(config, str(tmp_path / "run"))
    assert _steps(tmp_path / "run") == []
    # The error that ended the run is the last line of its log.txt.
    last = (tmp_path / "run" / "log.txt").read_text().splitlines()[-1]
    assert last.startswith("error: non-finite selection scores at step 1 (loss="), last


@pytest.mark.slow
def test_nan_selection_scores_skipped_leave_the_initial_state(tiny_config, tmp_path, monkeypatch,
                                                             capsys):
    config = _nan_selection(tiny_config, tmp_path, monkeypatch, "skip")
    train.train(config, str(tmp_path / "run"))
    assert "warning: non-finite selection scores at step 4: update skipped (4 skipped" in \
        capsys.readouterr().err
    assert [r["faults/skipped_steps"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]
    final = train_state(config, tmp_path / "run", 4)
    init = jax.tree.map(np.asarray, build.build(config, selection=False).state.init(config.seed))
    assert final.pop("step") == 4
    init.pop("step")
    _assert_bitwise(final, init)  # not one update got through


def _poison_loss_at_record(monkeypatch, record: int) -> None:
    """The loss of any batch holding `record` is NaN (its gradients stay finite)."""
    original = step_lib.batch_loss

    def poisoned(model, loss, mesh, params, batch):
        value = original(model, loss, mesh, params, batch)
        return jnp.where(jnp.any(batch["index"] == record), jnp.nan, value)

    monkeypatch.setattr(step_lib, "batch_loss", poisoned)


def _record_first_seen_at(config, step: int) -> int:
    """A record of the batch of `step` that no earlier or later step of the run draws."""
    from jest_jax.data.pipeline import Preprocess, train_dataset
    from jest_jax.data.sources import open_pool
    from jest_jax.data.tokenizer import make_tokenizer

    preprocess = Preprocess(config.data.image_size, make_tokenizer(config.data.tokenizer),
                            config.data.text_len)
    it = iter(train_dataset(open_pool(config, "data.train"), preprocess,
                            batch_size=config.batch_size, seed=config.seed, num_threads=0))
    batches = [next(it)["index"] for _ in range(config.total_steps)]
    others = set(np.concatenate(batches[:step - 1] + batches[step:]).tolist())
    return next(int(i) for i in batches[step - 1] if int(i) not in others)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_at_one_step(tiny_config, tmp_path, monkeypatch, capsys, policy):
    config = _short(tiny_config, 6)
    config.checkpoint.every_steps, config.checkpoint.max_to_keep = 1, 10
    config.faults.nonfinite = policy
    _poison_loss_at_record(monkeypatch, _record_first_seen_at(config, 3))
    work = tmp_path / "run"
    if policy == "stop":
        with pytest.raises(train.NonFiniteLossError,
                           match=r"non-finite loss at step 3 \(loss=nan, grad_norm=[\d.e+-]+\); "
                                 r"stopping: the last good checkpoint \(step 2\) is kept"):
            train.train(config, str(work))
        assert _steps(work) == [1, 2]
        return
    train.train(config, str(work))
    assert "warning: non-finite loss at step 3: update skipped (1 skipped" in \
        capsys.readouterr().err
    rows = _rows(work)
    assert [r["faults/skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    states = {s: train_state(config, work, s) for s in (2, 3, 4)}
    assert (states[2].pop("step"), states[3].pop("step")) == (2, 3)
    _assert_bitwise(states[2], states[3])  # step 3 changed nothing
    assert not np.array_equal(states[4]["params"]["bias"], states[3]["params"]["bias"])
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)


def test_nan_gradients_with_finite_loss_are_named(tiny_config, tmp_path, monkeypatch):
    original = step_lib.batch_loss

    def nan_gradients(model, loss, mesh, params, batch):  # d/db sqrt(b - b) is inf, times 0
        return (original(model, loss, mesh, params, batch)
                + 0.0 * jnp.sqrt(params["bias"] - params["bias"]))

    monkeypatch.setattr(step_lib, "batch_loss", nan_gradients)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"non-finite gradients at step 1 \(loss=[\d.]+, grad_norm=nan\)"):
        train.train(_short(tiny_config, 2), str(tmp_path / "run"))


def test_health_names_the_failed_checks_first_cause_first():
    ok, bad = np.bool_(True), np.bool_(False)
    assert faults.Health(ok, ok, ok, ok).failed() == []
    assert faults.Health(ok, bad, bad, ok).failed() == ["loss", "gradients"]
    assert faults.Health(bad, ok, ok, bad).failed() == ["selection scores", "updated state"]


def test_sigterm_handler_is_installed_and_restored():
    before = signal.getsignal(signal.SIGTERM)
    never = lambda step: False  # noqa: E731  JAX's sync point: not asked without distributed
    with faults.Preemption() as preemption:
        assert not preemption.reached(1, never)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, does not kill
        assert preemption.reached(2, never)
    assert signal.getsignal(signal.SIGTERM) is before


def test_metrics_tolerate_a_half_written_last_line(tmp_path):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(str(tmp_path)) == rows


def test_sigterm_during_setup_is_not_lost(tiny_config, tmp_path, monkeypatch, capsys):
    """A notice that comes before training (set-up, restore, compilation can take minutes at
    scale) still stops the run after its first step, with a checkpoint."""
    config = _short(tiny_config, 4)
    real_build = build.build

    def build_then_sigterm(*args, **kwargs):
        out = real_build(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(build, "build", build_then_sigterm)
    train.train(config, str(tmp_path / "run"))
    assert "preempted: stopped after step 1 and wrote its checkpoint" in capsys.readouterr().out
    assert _steps(tmp_path / "run") == [1]


@pytest.mark.slow
def test_preempted_at_an_eval_step_evaluates_it_on_resume(tiny_config, tmp_path, monkeypatch):
    """Preemption checkpoints and stops before the evaluation of its step; the resumed run
    owes it, so the metric log (eval rows included) equals an uninterrupted run's."""
    config = _short(tiny_config, 6, evals=True)
    config.evals.every_steps = 2
    train.train(config, str(tmp_path / "straight"))
    expected = _all_rows(tmp_path / "straight")

    monkeypatch.setattr(faults.Preemption, "reached", lambda self, step, sync: step == 4)
    train.train(config, str(tmp_path / "run"))
    assert _steps(tmp_path / "run") == [2, 4]
    assert max(r["step"] for r in read_metrics(str(tmp_path / "run"))) == 4
    monkeypatch.undo()
    train.train(config, str(tmp_path / "run"))
    assert _all_rows(tmp_path / "run") == expected
    assert [r["step"] for r in expected if "loss" not in r] == [2, 4, 6]


def test_damaged_reference_checkpoint_is_a_clear_error(jest_config, reference_workdir, tmp_path):
    import shutil

    from jest_jax import config as config_lib
    from jest_jax.reference import OnlineReference

    damaged = tmp_path / "reference"
    shutil.copytree(reference_workdir, damaged)
    step = max(_steps(damaged))
    # Every data file: a reference restores params only, and how orbax spreads params and
    # optimizer moments over its data files depends on the timing of the write.
    for path in glob.glob(str(damaged / "checkpoints" / str(step) / "state" / "**" / "d" / "*"),
                          recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    jest_config.selection.reference.workdir = str(damaged)
    with pytest.raises(CheckpointError, match=rf"config.selection.reference.workdir='{damaged}': "
                                              rf"its checkpoint at step {step} cannot be restored"):
        spec = config_lib.validate(jest_config)
        OnlineReference.load(str(damaged), spec.data, spec.mesh.build(), spec.mesh)
    assert _steps(damaged) == _steps(reference_workdir)  # read-only: nothing moved
