"""`data.num_workers`: decoding in grain worker processes changes neither the batches
nor the checkpoints (docs/data.md)."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from test_reliability import _assert_bitwise, _rows, _short

from conftest import train_state
from jest_jax import train
from jest_jax.config import ConfigError
from jest_jax.data.pipeline import DataSpec, Preprocess, train_dataset
from jest_jax.data.sources import open_pool
from jest_jax.data.tokenizer import ByteTokenizer
from jest_jax.fields import Section

BATCH = 16


def _batches(config, count: int, num_workers: int, start: int = 0) -> list[dict]:
    ds = train_dataset(open_pool(config, "data.train"),
                       Preprocess(config.data.image_size, ByteTokenizer(), config.data.text_len),
                       batch_size=BATCH, seed=5, num_threads=1, num_workers=num_workers)
    it = iter(ds)
    if start:
        it.set_state({"next_index": start})
    try:
        return [next(it) for _ in range(count)]
    finally:
        it.close()


def test_worker_batches_equal_in_process_batches_and_resume_from_a_position(tiny_config):
    # Every array of each batch, past the end of the first epoch (reshuffled).
    count = len(open_pool(tiny_config, "data.train")) // BATCH + 2
    in_process = _batches(tiny_config, count, num_workers=0)
    workers = _batches(tiny_config, count, num_workers=2)
    for a, b in zip(in_process, workers, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key
    # A position saved by one pipeline resumes in the other (the state is the same format).
    resumed = _batches(tiny_config, 3, num_workers=2, start=count - 3)
    for a, b in zip(in_process[count - 3:], resumed, strict=True):
        assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["image"], b["image"])


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_num_workers_is_validated(tiny_config, value):
    data = ml_collections.ConfigDict({**tiny_config.data.to_dict(), "num_workers": value})
    with pytest.raises(ConfigError, match="data.num_workers"):
        DataSpec.from_config(Section(data, "data"))


@pytest.mark.slow
def test_run_with_workers_resumes_bitwise(tiny_config, tmp_path):
    config = _short(tiny_config, 6)
    config.data.num_workers = 2
    train.train(config, str(tmp_path / "straight"))
    # Stopped at 4 with workers, resumed in process (the checkpointed position does not
    # depend on num_workers) and then stopped and resumed with workers again.
    resumed = tmp_path / "resumed"
    train.train(config, str(resumed), stop_at_step=2)
    config.data.num_workers = 0
    train.train(config, str(resumed), stop_at_step=4)
    config.data.num_workers = 2
    train.train(config, str(resumed))
    _assert_bitwise(train_state(config, tmp_path / "straight", 6),
                    train_state(config, resumed, 6))
    assert _rows(tmp_path / "straight") == _rows(resumed)
