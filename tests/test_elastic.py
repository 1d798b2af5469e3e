"""Elastic resume, in one process: the data position a checkpoint keeps is one global
number that any process count turns into the same examples (bad-record replacements
included); what would change the data order is named; checkpoints written before the
position was global still resume, on any process count. The multi-process CLI runs are
in tests/test_multihost.py."""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from test_bad_records import BATCH, POOL, _preprocess, planted  # noqa: F401 (a fixture)

from jest_jax.checkpoint import Checkpointer
from jest_jax.data import load_split
from jest_jax.data.pipeline import Stream, train_dataset


def _stream(**changes) -> Stream:
    fields = dict(super_batch=BATCH, batch_size=BATCH // 2, seed=3, pool_size=POOL,
                  pool={"name": "planted", "split": "train", "data_dir": "/a"})
    return Stream(**{**fields, **changes})


def _shares(source, count: int) -> list:
    return [iter(train_dataset(source, _preprocess(), batch_size=BATCH, seed=3, num_threads=0,
                               process_index=p, process_count=count)) for p in range(count)]


def _global_batch(iterators: list) -> dict[str, list[int]]:
    parts = [next(it) for it in iterators]
    return {key: np.concatenate([p[key] for p in parts]).tolist()
            for key in ("index", "bad_records")}


def test_a_position_saved_by_two_processes_resumes_on_one_and_four(planted):  # noqa: F811
    source, _ = load_split("planted", "train", planted)
    whole = _shares(source, 1)
    expected = [_global_batch(whole) for _ in range(2 * POOL // BATCH)]  # two epochs
    # Bad records were met and replaced in the batches to come, so positions are tested
    # through the replacements too.
    assert sum(sum(b["bad_records"]) for b in expected[3:]) > 0
    two = _shares(source, 2)
    for _ in range(3):
        _global_batch(two)
    stream = _stream()
    saved = stream.position(two[1])  # any process's: they agree
    assert saved == stream.position(two[0])
    assert saved["stream_position"] == 3 * BATCH
    for count in (1, 4):
        resumed = _shares(source, count)
        for it in resumed:
            stream.resume(it, saved)
        assert [_global_batch(resumed) for _ in range(len(expected) - 3)] == expected[3:], count


def test_what_changes_the_data_order_is_named():
    saved = _stream().position(_FakeIterator(5))
    assert _stream().mismatch(saved) is None
    # Where the dataset lives may change (copied to another disk or bucket).
    moved = _stream(pool={"name": "planted", "split": "train", "data_dir": "gs://b/d"})
    assert moved.mismatch(saved) is None
    assert _stream(batch_size=4).mismatch(saved) == "batch_size=8 (this run has 4)"
    assert _stream(super_batch=32).mismatch(saved) == "a super-batch N=16 (this run has 32)"
    assert _stream(seed=4).mismatch(saved) == "seed=3 (this run has 4)"
    assert _stream(pool_size=65, pool={"name": "other", "split": "train"}).mismatch(saved) == (
        "data.train's size=64 (this run has 65); data.train={'name': 'planted', 'split': "
        "'train'} (this run has {'name': 'other', 'split': 'train'})")


class _FakeIterator:
    def __init__(self, batches: int):
        self.batches = batches

    def get_state(self) -> dict:
        return {"next_index": self.batches}


def test_a_checkpoint_written_before_positions_were_global_resumes_on_any_count(
        planted, tmp_path):  # noqa: F811
    """The old format: grain's iterator state per process (`data/process_<i>-of-<n>.json`)."""
    source, _ = load_split("planted", "train", planted)
    it = _shares(source, 1)[0]
    for _ in range(5):
        next(it)
    state = {"w": jax.numpy.arange(4.0), "step": jax.numpy.int32(5)}
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    manager.close()
    data = tmp_path / "checkpoints" / "5" / "data"
    # As if two processes had written it (each file holds the same global batch count).
    written = (data / "process_0-of-1.json").read_text()
    for name in ("process_0-of-2.json", "process_1-of-2.json"):
        (data / name).write_text(written)
    os.remove(data / "process_0-of-1.json")

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    checkpointer = Checkpointer(str(tmp_path))
    try:
        step, restored, counters, position = checkpointer.restore_latest_good(
            abstract, _stream().mismatch)
    finally:
        checkpointer.close()
    assert step == 5 and position == {"next_index": 5} and counters == {}
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    resumed = _shares(source, 1)
    _stream().resume(resumed[0], position)
    expected = [_global_batch([it]) for _ in range(3)]
    assert [_global_batch(resumed) for _ in range(3)] == expected
