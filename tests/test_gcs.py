"""Runs whose files live in a bucket (`gs://`), against a local GCS emulator
(fake-gcs-server, started by the `gcs_bucket` fixture): killed and resumed, a damaged
checkpoint, a JEST learner whose reference and cache are in the bucket, a missing bucket.
Also the logs a preemption must not lose (`log.txt`, TensorBoard with no step twice) and
`--profile_steps`, checked in the same runs. docs/reliability.md says what is guaranteed.
"""

from __future__ import annotations

import os
import re
import signal

import jax
import numpy as np
import pytest
from test_reliability import _assert_bitwise, _child, _interrupt, _rows, _short

from conftest import train_state
from jest_jax import faults, files, train
from jest_jax.metrics import WALL_CLOCK, event_records


def _steps(workdir: str) -> list[int]:
    """The committed checkpoints: in a bucket, orbax marks each with commit_success.txt."""
    directory = files.join(workdir, "checkpoints")
    return sorted(int(d) for d in files.listdir(directory)
                  if d.isdigit() and files.exists(files.join(directory, d, "commit_success.txt")))


def _events(workdir: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every TensorBoard event file of `workdir`,
    read back with the tensorboardX protobuf, independently of the writer's code."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    directory = files.join(workdir, "tensorboard")
    for name in files.listdir(directory):
        for record in event_records(files.read_bytes(files.join(directory, name))):
            event = Event.FromString(record[12:-4])
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def _truncate_largest_array_object(step_dir: str) -> None:
    """Halve the largest array file of a saved state (one object in a bucket)."""
    state = files.join(step_dir, "state")
    arrays = [p for p in files.walk_files(state) if "/d/" in f"/{p}"]
    sizes = {p: len(files.read_bytes(files.join(state, p))) for p in arrays}
    path = files.join(state, max(sizes, key=sizes.get))
    files.write_atomically(path, files.read_bytes(path)[: sizes[max(sizes, key=sizes.get)] // 2])


def _profiles(workdir: str) -> list[str]:
    directory = files.join(workdir, "profile")
    return [p for p in files.walk_files(directory) if p.endswith(".xplane.pb")] \
        if files.exists(directory) else []


@pytest.mark.slow
def test_gs_run_killed_damaged_and_resumed_matches_a_local_run(tiny_config, tmp_path,
                                                               gcs_bucket, capsys):
    """A run in a bucket, killed (-9) mid-run, its newest checkpoint then damaged, resumed:
    it falls back to the checkpoint before, and ends bitwise equal to a local-disk run, with
    the same metric rows, TensorBoard events with no step twice, one log.txt across both
    starts, and the profiles asked for."""
    config = _short(tiny_config, 10)
    config.logging.tensorboard = True
    local = str(tmp_path / "local")
    train.train(config, local, profile_steps=(2, 3))
    expected_state, expected_rows = train_state(config, local, 10), _rows(local)
    assert _profiles(local)

    work = f"{gcs_bucket}/run"
    proc = _child(config, work, tmp_path)
    out = _interrupt(proc, 7, signal.SIGKILL, 0.0)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    # Step 7 logged: the save of step 6 had started, so step 4's had been committed.
    saved = _steps(work)
    assert saved and saved[-1] >= 4, saved
    bad = saved[-1]
    _truncate_largest_array_object(files.join(work, "checkpoints", str(bad)))

    capsys.readouterr()
    train.train(config, work, profile_steps=(8, 9))
    stdout, stderr = capsys.readouterr()
    assert re.search(rf"warning: the checkpoint at step {bad} cannot be restored \(.+\); moved "
                     rf"it to {work}/checkpoints/{bad}\.corrupt-[\d-]+ and resumed from step "
                     rf"{bad - 2}", stderr), stderr
    assert f"resuming from the checkpoint at step {bad - 2} in {work}/checkpoints" in stdout
    assert any(n.startswith(f"{bad}.corrupt-") for n in files.listdir(f"{work}/checkpoints"))

    _assert_bitwise(train_state(config, work, 10), expected_state)
    assert _rows(work) == expected_rows

    events, local_events = _events(work), _events(local)
    assert len(events) == len({(tag, step) for tag, step, _ in events})  # no step twice
    assert sorted(step for tag, step, _ in events if tag == "loss") == list(range(1, 11))
    assert sorted(e for e in events if e[0] not in WALL_CLOCK) == \
        sorted(e for e in local_events if e[0] not in WALL_CLOCK)

    log = files.read_text(f"{work}/log.txt")
    starts = [m.start() for m in re.finditer(r"^--- [\d: -]+ started ---$", log, re.M)]
    assert len(starts) == 2, log  # the killed start, then the resumed one, in one file
    killed, resumed = log[starts[0]:starts[1]], log[starts[1]:]
    assert re.search(r"^\[\s+7/10\]", killed, re.M), killed  # the line the kill followed
    assert f"resuming from the checkpoint at step {bad - 2}" in resumed
    assert f"warning: the checkpoint at step {bad} cannot be restored" in resumed
    assert re.search(r"^\[\s+10/10\]", resumed, re.M)
    assert _profiles(work)
    assert f"wrote the profile of --profile_steps to {work}/profile" in stdout


def test_jest_learner_reads_its_reference_and_cache_from_gs(jest_config, reference_workdir,
                                                            gcs_bucket, tmp_path):
    from jest_jax import config as config_lib
    from jest_jax.reference import OnlineReference, ReferenceCache

    reference = f"{gcs_bucket}/reference"
    files.copy_tree(reference_workdir, reference)
    config = _short(jest_config, 2)
    config.selection.reference.workdir = reference
    spec = config_lib.validate(config)
    mesh = spec.mesh.build()
    remote = OnlineReference.load(reference, spec.data, mesh, spec.mesh)
    here = OnlineReference.load(reference_workdir, spec.data, mesh, spec.mesh)
    _assert_bitwise(jax.tree.map(np.asarray, remote.params), jax.tree.map(np.asarray, here.params))

    # The cache of the bucket's reference, written straight into the bucket by --mode
    # cache's code (tensorstore), and the same cache on local disk: the same rows.
    config.selection.reference.cache_dir = str(tmp_path / "cache")
    train.cache_reference(config)
    config.selection.reference.cache_dir = f"{gcs_bucket}/cache"
    train.cache_reference(config)
    cache = ReferenceCache(config_lib.validate(config).reference, spec.data)
    assert cache.meta["reference_workdir"] == reference
    config.selection.reference.cache_dir = str(tmp_path / "cache")
    local = ReferenceCache(config_lib.validate(config).reference, spec.data)
    rows = np.arange(cache.meta["num_examples"])
    for key, value in local(rows).items():
        np.testing.assert_array_equal(cache(rows)[key], value, err_msg=key)
    config.selection.reference.cache_dir = f"{gcs_bucket}/cache"
    train.train(config, f"{gcs_bucket}/jest")
    rows = _rows(f"{gcs_bucket}/jest")
    assert [r["step"] for r in rows] == [1, 2] and "selection/score_selected" in rows[-1]


def test_a_missing_bucket_fails_at_start_up_naming_the_path(tiny_config, gcs_bucket):
    with pytest.raises(faults.WorkdirError,
                       match=r"--workdir 'gs://no-such-bucket/run' is not writable: "
                             r"'gs://no-such-bucket/run/\.write-test-\d+-\d+': the bucket does not "
                             r"exist"):
        train.train(tiny_config, "gs://no-such-bucket/run")
    assert not files.exists(f"{gcs_bucket}/run-never")


def test_a_sentencepiece_model_in_a_bucket(tmp_path, gcs_bucket):
    from bigvision_files import sentencepiece_model

    from jest_jax.data.tokenizer import make_tokenizer

    path = sentencepiece_model(tmp_path, "a red square and two blue circles".split())
    with open(path, "rb") as f:
        files.write_atomically(f"{gcs_bucket}/spm/sp.model", f.read())
    here, there = make_tokenizer(path, "jest"), make_tokenizer(f"{gcs_bucket}/spm/sp.model", "jest")
    assert there.vocab_size == here.vocab_size
    for text in ("a red circle", "two squares"):
        np.testing.assert_array_equal(there.encode(text, 8), here.encode(text, 8))


def test_a_published_checkpoint_in_a_bucket(tmp_path, gcs_bucket):
    """A big_vision .npz read from gs:// gives the params a local copy gives, and the
    reference identity (which names its embedding cache) records the object's size."""
    from bigvision_files import save_npz, siglip_tree

    from jest_jax.models import big_vision
    from jest_jax.reference import ReferenceSpec, pretrained_model

    local = save_npz(tmp_path / "ckpt.npz", siglip_tree(0))
    with open(local, "rb") as f:
        files.write_atomically(f"{gcs_bucket}/ckpt/siglip.npz", f.read())
    model = pretrained_model("tiny/4", 16, 8, 40)
    fields = big_vision.Fields("model.init_from", "model.init_resize_posemb", "the test model")
    params = {}
    for path in (local, f"{gcs_bucket}/ckpt/siglip.npz"):
        with big_vision.NpzCheckpoint(path, "model.init_from") as file:
            params[path] = file.params(model, fields, False)
    for a, b in zip(*(jax.tree.leaves(p) for p in params.values()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    spec = ReferenceSpec(workdir="", cache_dir="", checkpoint=f"{gcs_bucket}/ckpt/siglip.npz",
                         variant="tiny/4", resize_posemb=False, needed=True)
    identity = spec.checkpoint_identity()
    assert identity["size"] == os.path.getsize(local) and identity["mtime"] > 0


def test_event_files_are_cut_back_to_a_step_and_lose_a_torn_record(tmp_path):
    """What a resume does to a killed run's TensorBoard file (locally; the bucket case is in
    the kill test above): events past the step go, a half-written last record too."""
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.event_pb2 import Event

    from jest_jax.metrics import events_up_to

    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 6):
            writer.add_scalar("loss", 10.0 - step, step)
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    torn = data + event_records(data)[-1][:20]  # a kill in the middle of the next record
    kept = [Event.FromString(r[12:-4]) for r in event_records(events_up_to(torn, 3))]
    assert [(e.step, [v.simple_value for v in e.summary.value]) for e in kept] == \
        [(0, []), (1, [9.0]), (2, [8.0]), (3, [7.0])]  # step 0: the file-version record
    assert events_up_to(data, 5) == data  # nothing past 5: the bytes unchanged


@pytest.mark.slow
def test_the_converter_reads_tars_from_and_writes_its_pool_to_a_bucket(gcs_bucket, tmp_path):
    """docs/data.md's at-scale path: webdataset tars in a bucket, the ArrayRecord pool
    written to a bucket, then read from there as training reads it."""
    from test_convert import _cli, _webdataset

    from jest_jax.data import load_split

    shards = _webdataset(tmp_path / "shards")
    files.copy_tree(str(tmp_path / "shards"), f"{gcs_bucket}/shards")
    data = f"{gcs_bucket}/pools"
    result = _cli(["--input", f"{gcs_bucket}/shards/{{000000..000002}}.tar", "--data_dir",
                   data, "--name", "wds_pool", "--split", "raw", "--num_workers", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted 3 tar(s): 38 records stored, 3 skipped" in result.stdout
    assert not files.exists(f"{data}/wds_pool/1.0.0.incomplete")
    source, info = load_split("wds_pool", "raw", data)
    assert info.splits["raw"].shard_lengths == [15, 15, 8]
    assert [source[i]["uid"].decode() for i in range(len(source))] == shards["kept"]
    for i in range(len(source)):
        assert source[i]["image"] == shards["images"][source[i]["uid"].decode()]
