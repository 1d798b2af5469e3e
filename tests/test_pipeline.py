"""Tokenizers and grain pipelines: shapes/dtypes the model expects, sharding by process,
determinism, and checkpointable iterator state."""

from __future__ import annotations

import numpy as np
import pytest

from jest_jax.data import load_split
from jest_jax.data.pipeline import Preprocess, eval_batches, train_dataset
from jest_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, make_tokenizer


def test_byte_tokenizer_pads_truncates_and_ends():
    tok = ByteTokenizer()
    ids = tok.encode("ab", 5)
    np.testing.assert_array_equal(ids, [ord("a") + 2, ord("b") + 2, 1, 0, 0])
    assert tok.encode(b"abcdefgh", 4).tolist() == [99, 100, 101, 1]
    assert ids.dtype == np.int32 and tok.vocab_size == 258
    assert all(0 <= i < tok.vocab_size for i in tok.encode("héllo ✓", 16))


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    sentences = [f"a {c} {s} in the {p}" for c in ("red", "blue", "green") for s in
                 ("circle", "square", "star") for p in ("top", "left", "bottom")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 5),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=28,
                                   minloglevel=2)
    tok = make_tokenizer(str(tmp_path / "sp.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode("a red circle", 40)
    n = int((ids != 0).sum())
    assert ids.shape == (40,) and 0 < n < 40 and not ids[n:].any()
    assert ids.max() < tok.vocab_size
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert ids[n - 1] == sp.eos_id() + 1  # ends with the (shifted) end-of-text id
    assert sp.decode((ids[: n - 1] - 1).tolist()) == "a red circle"
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        make_tokenizer(str(tmp_path / "missing.model"))


@pytest.fixture(scope="module")
def curated(data_dir):
    return load_split("jest_shapes/tiny", "curated", data_dir)[0]


def _preprocess(size=16):
    return Preprocess(size, ByteTokenizer(), 24)


def test_train_batches_have_model_shapes(curated):
    it = iter(train_dataset(curated, _preprocess(), batch_size=8, seed=0))
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (8, 24) and batch["tokens"].dtype == np.int32
    assert batch["index"].shape == (8,) and len(set(batch["index"].tolist())) == 8
    assert batch["is_clean"].dtype == np.bool_ and batch["shape"].shape == (8,)


def test_train_stream_is_deterministic_and_reshuffles_each_epoch(curated):
    n = len(curated)

    def take(seed):
        it = iter(train_dataset(curated, _preprocess(), batch_size=n, seed=seed))
        return np.concatenate([next(it)["index"] for _ in range(2)])

    a, b = take(0), take(0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, take(1))
    it = iter(train_dataset(curated, _preprocess(), batch_size=n, seed=0))
    epoch1, epoch2 = next(it)["index"], next(it)["index"]
    assert sorted(epoch1) == list(range(n)) and sorted(epoch2) == list(range(n))
    assert not np.array_equal(epoch1, epoch2)


def test_process_shards_concatenate_to_the_global_batch(curated):
    whole = iter(train_dataset(curated, _preprocess(), batch_size=16, seed=3))
    parts = [iter(train_dataset(curated, _preprocess(), batch_size=16, seed=3,
                                process_index=p, process_count=4)) for p in range(4)]
    for _ in range(3):
        expected = next(whole)["index"]
        got = np.concatenate([next(p)["index"] for p in parts])
        np.testing.assert_array_equal(got, expected)


def test_iterator_state_restores_position(curated):
    it = iter(train_dataset(curated, _preprocess(), batch_size=8, seed=0))
    next(it)
    state = it.get_state()
    expected = [next(it)["index"] for _ in range(3)]
    fresh = iter(train_dataset(curated, _preprocess(), batch_size=8, seed=0))
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["index"], want)


def test_pool_smaller_than_batch_fails_clearly(curated):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_dataset(curated, _preprocess(), batch_size=len(curated) + 1, seed=0)


def test_eval_batches_cover_split_once_with_mask(data_dir):
    source, _ = load_split("jest_shapes/tiny", "eval", data_dir)
    batches = list(eval_batches(source, _preprocess(), batch_size=50))
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])[mask]
    np.testing.assert_array_equal(index, np.arange(len(source)))
    assert all(b["image"].shape == (50, 16, 16, 3) for b in batches)


def test_resize_to_config_image_size(curated):
    batch = next(iter(train_dataset(curated, _preprocess(24), batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 24, 24, 3)
