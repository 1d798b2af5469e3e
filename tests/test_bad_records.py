"""A training pool with planted bad records: each is counted, reported with its index and
skipped (or, by config, an error); batches stay full, deterministic and resumable."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jest_jax import train
from jest_jax.config import ConfigError
from jest_jax.data import load_split
from jest_jax.data.datasets import prepare_quietly
from jest_jax.data.pipeline import Preprocess, eval_batches, train_dataset
from jest_jax.data.records import BadRecordError, problem
from jest_jax.data.tokenizer import ByteTokenizer
from jest_jax.data.writer import _ImageTextBuilder
from jest_jax.metrics import read_metrics

POOL = 64
BATCH = 16


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def _good(index: int) -> dict:
    rng = np.random.default_rng(index)
    return {"image": _png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
            "caption": f"picture number {index}"}


# index -> (stored record, what the report must say). The public writer refuses all of
# these, so they are written with its builder directly, as a damaged dataset would be.
BAD = {
    5: ({"image": b"not a png at all", "caption": "x"}, "UnidentifiedImageError"),
    6: ({"image": _good(6)["image"][:400], "caption": "x"}, "Error"),  # truncated
    20: ({"image": _good(20)["image"], "caption": ""}, "caption is empty"),
    33: ({"image": _good(33)["image"], "caption": "  \n "}, "caption is empty"),
    41: ({"image": _good(41)["image"], "caption": "y" * 2000},
         "caption is 2000 bytes long, over data.max_caption_bytes=1024"),
    58: ({"image": _png(np.zeros((16, 16, 2), np.uint8)), "caption": "x"},
         r"image shape is \(16, 16, 2\)"),
    63: ({"image": b"\x89PNG\r\n\x1a\n", "caption": "x"}, "Error"),  # last: replaced by 0
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> str:
    """A TFDS ArrayRecord dataset `planted` (split `train`) of 64 records, 7 of them bad;
    returns its prepared directory (a valid `data_dir`)."""
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "caption": tfds.features.Text()})
    examples = [(i, BAD[i][0] if i in BAD else _good(i)) for i in range(POOL)]
    builder = _ImageTextBuilder(name="planted", version="1.0.0", features=features,
                                splits={"train": iter(examples)},
                                data_dir=str(tmp_path_factory.mktemp("planted")),
                                file_format="array_record")
    prepare_quietly(builder)
    return str(builder.data_dir)


def _preprocess() -> Preprocess:
    return Preprocess(16, ByteTokenizer(), 24, max_caption_bytes=1024)


def _stream_order(seed: int, positions: int) -> list[int]:
    """Record index at each stream position, read from a clean in-memory pool."""
    clean = [{"image": np.zeros((16, 16, 3), np.uint8), "caption": "ok"}] * POOL
    it = iter(train_dataset(clean, _preprocess(), batch_size=BATCH, seed=seed, num_threads=0))
    return np.concatenate([next(it)["index"] for _ in range(positions // BATCH)]).tolist()


def _replacement(record: int) -> int:
    while record in BAD:
        record = (record + 1) % POOL
    return record


def test_pipeline_skips_counts_and_reports_bad_records(planted, capfd):
    source, _ = load_split("planted", "train", planted)
    order = _stream_order(seed=3, positions=2 * POOL)  # two epochs
    # The same batches with and without reader threads, and in grain worker processes.
    for threads, workers in ((2, 0), (0, 0), (1, 2)):
        it = iter(train_dataset(source, _preprocess(), batch_size=BATCH, seed=3,
                                num_threads=threads, num_workers=workers))
        batches = [next(it) for _ in range(2 * POOL // BATCH)]
        it.close()
        assert all(b["image"].shape == (BATCH, 16, 16, 3) for b in batches)  # always full
        got = np.concatenate([b["index"] for b in batches]).tolist()
        assert got == [_replacement(r) for r in order]
        flags = np.concatenate([b["bad_records"] for b in batches]).tolist()
        assert flags == [int(r in BAD) for r in order] and sum(flags) == 2 * len(BAD)
    report = capfd.readouterr().err
    for index, (_, reason) in BAD.items():
        assert re.search(rf"skipping record {index} of the training pool: .*{reason}", report)


@pytest.mark.parametrize("workers", [0, 2])  # raised in a grain worker process: the same
def test_error_policy_names_the_first_bad_record(planted, workers):
    source, _ = load_split("planted", "train", planted)
    first = next(r for r in _stream_order(seed=3, positions=POOL) if r in BAD)
    it = iter(train_dataset(source, _preprocess(), batch_size=BATCH, seed=3, num_threads=0,
                            skip_bad_records=False, num_workers=workers))
    with pytest.raises(BadRecordError, match=rf"record {first} of the training pool is bad: "
                                             rf".*{BAD[first][1]}.*faults.bad_records='skip'"):
        for _ in range(POOL // BATCH):
            next(it)
    it.close()


def test_evaluation_reads_whole_splits_so_a_bad_record_is_an_error(planted):
    source, _ = load_split("planted", "train", planted)
    with pytest.raises(BadRecordError, match=r"record 5 is bad: UnidentifiedImageError: .*"
                                             r"\(evaluation splits, and data.train under"):
        list(eval_batches(source, _preprocess(), batch_size=BATCH))


@pytest.mark.parametrize("image,caption,expected", [
    (np.zeros((4, 4, 3), np.uint8), "fine", None),
    (np.zeros((4, 4), np.uint8), b"grey ok", None),
    (np.zeros((4, 4, 4), np.uint8), "rgba ok", None),
    (np.zeros((4, 4, 3), np.float32), "x", "image dtype is float32, expected uint8"),
    (np.zeros((48,), np.uint8), "x", r"image shape is \(48,\)"),
    (np.zeros((0, 4, 3), np.uint8), "x", r"image shape is \(0, 4, 3\)"),
    (np.zeros((4, 4, 5), np.uint8), "x", r"image shape is \(4, 4, 5\)"),
    (np.zeros((4, 4, 3), np.uint8), b"", "caption is empty"),
    (np.zeros((4, 4, 3), np.uint8), "é" * 6, "caption is 12 bytes long, over .*=10"),
])
def test_what_makes_a_record_bad(image, caption, expected):
    why = problem({"image": image, "caption": caption}, max_caption_bytes=10)
    if expected is None:
        assert why is None
    else:
        assert re.fullmatch(f".*{expected}.*", why), why


def _planted_config(config, planted: str):
    config.data.train.update(name="planted", split="train", data_dir=planted)
    config.batch_size = BATCH
    config.total_steps = 8  # two epochs of the 64-record pool
    config.checkpoint.every_steps = 2
    config.logging.every_steps = 1
    config.logging.tensorboard = False
    del config.evals.zero_shot, config.evals.retrieval
    return config


@pytest.mark.slow
def test_training_counts_bad_records_across_a_restart(tiny_config, planted, tmp_path):
    config = _planted_config(tiny_config, planted)
    work = str(tmp_path / "run")
    train.train(config, work, stop_at_step=3)
    train.train(config, work)  # the count must come back from the checkpoint
    rows = [r for r in read_metrics(work) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["data/bad_records"] == 2 * len(BAD)
    assert rows[3]["data/bad_records"] == len(BAD)  # one epoch = 4 steps
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_training_with_error_policy_stops_at_the_first_bad_record(tiny_config, planted,
                                                                   tmp_path):
    config = _planted_config(tiny_config, planted)
    config.faults.bad_records = "error"
    order = _stream_order(seed=config.seed, positions=POOL)
    position = next(p for p, r in enumerate(order) if r in BAD)
    step = position // BATCH + 1  # the error comes while drawing this step's batch
    with pytest.raises(BadRecordError, match=rf"record {order[position]} of the training pool "
                                             rf"is bad: .*{BAD[order[position]][1]}"):
        train.train(config, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == \
        [str(s) for s in range(2, step, 2)]


def test_pool_too_small_for_one_super_batch(tiny_config, planted, tmp_path):
    config = _planted_config(tiny_config, planted)
    config.batch_size = 48
    config.selection.update(method="joint", criterion="hard_learner", filter_ratio=0.5,
                            num_chunks=4)
    with pytest.raises(ConfigError, match=r"config.data.train: the training pool has 64 "
                                          r"examples, fewer than one global batch of 96.*"
                                          r"super-batch of N = .* = 96"):
        train.train(config, str(tmp_path / "run"))


def test_a_failing_cache_read_is_an_error_not_a_bad_record():
    """`attach` (the reference-embedding cache) is read outside the skipping: skipping its
    failures would silently change the batch, and no record is at fault."""
    clean = [{"image": np.zeros((16, 16, 3), np.uint8), "caption": "ok"}] * POOL
    victim = _stream_order(0, BATCH)[3]

    def attach(records: np.ndarray) -> dict:  # one call per batch, as the cache reads
        if victim in records:
            raise OSError(f"cache read of record {victim} failed")
        return {"ref_embedding": np.repeat(records[:, None], 2, axis=1).astype(np.float32)}

    batches = iter(train_dataset(clean, _preprocess(), batch_size=BATCH, seed=0,
                                 num_threads=0, attach=attach))
    with pytest.raises(OSError, match=f"cache read of record {victim} failed"):
        next(batches)
    # The replacement of a bad record gets the replacement's cache row, not the bad one's.
    pool = [{"image": np.zeros((16, 16, 3), np.uint8), "caption": "ok" if i != victim else ""}
            for i in range(POOL)]
    batch = next(iter(train_dataset(pool, _preprocess(), batch_size=BATCH, seed=0,
                                    num_threads=0, attach=lambda r: {"ref": r.astype(np.int32)})))
    np.testing.assert_array_equal(batch["ref"], batch["index"])
    assert (victim + 1) % POOL in batch["index"].tolist() and victim not in batch["index"]
