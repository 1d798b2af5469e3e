"""A published-format SigLIP checkpoint through the command line: as the JEST reference
(online and cached select the same), as the learner's init (its first loss is the
reference's own loss on that batch), and `--mode embed` (checked against the float64
forward pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from bigvision_files import (
    image_embeddings,
    save_npz,
    sentencepiece_model,
    siglip_tree,
    sigmoid_loss,
    text_embeddings,
)

from conftest import ROOT, load_config
from jest_jax import build, sharding, train
from jest_jax import config as config_lib
from jest_jax.data import sources
from jest_jax.fields import ConfigError
from jest_jax.metrics import read_metrics
from jest_jax.reference import ReferenceCache

TEXT_LEN = 12


def _cli(args: list[str], data_dir: str, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "JEST_DATA_DIR": data_dir}
    result = subprocess.run([sys.executable, "-m", "jest_jax.main", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result


@pytest.fixture
def siglip_files(data_dir, tmp_path):
    """A SentencePiece model on the pool's words and a tiny SigLIP checkpoint for it."""
    raw = sources.TfdsSource("jest_shapes/tiny", "raw", data_dir).open()
    words = sorted({w.strip(".,").lower() for i in range(len(raw))
                    for w in raw[i]["caption"].decode().split()} - {""})
    sp = sentencepiece_model(tmp_path, words, vocab_size=64)
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=sp).get_piece_size()
    tree = siglip_tree(7, image_size=16, patch=4, text_len=TEXT_LEN, vocab=vocab, scale=0.1)
    return sp, save_npz(tmp_path / "siglip_tiny.npz", tree), tree


def _common(sp: str) -> list[str]:
    return ["--config.data.tokenizer=" + sp, "--config.data.text_style=siglip",
            f"--config.data.text_len={TEXT_LEN}", "--config.batch_size=32",
            "--config.evals.batch_size=32", "--config.logging.every_steps=1",
            "--config.logging.tensorboard=False"]


def _losses(workdir) -> list[dict]:
    return [r for r in read_metrics(str(workdir)) if "loss" in r]


@pytest.mark.slow
def test_jest_with_a_published_reference_cached_and_online(data_dir, tmp_path, siglip_files):
    sp, npz, _ = siglip_files
    jest = ["--config", "configs/smoke.py:steps=2", *_common(sp),
            "--config.data.train.split=raw", "--config.selection.method=joint",
            "--config.selection.filter_ratio=0.5", "--config.selection.num_chunks=4",
            "--config.selection.reference.checkpoint=" + npz,
            "--config.selection.reference.variant=tiny/4"]
    _cli([*jest, "--workdir", str(tmp_path / "online")], data_dir)
    cache = "--config.selection.reference.cache_dir=" + str(tmp_path / "cache")
    _cli([*jest, cache, "--mode", "cache"], data_dir)
    meta = json.load(open(tmp_path / "cache" / "meta.json"))
    assert meta["reference_checkpoint"]["variant"] == "tiny/4"
    _cli([*jest, cache, "--workdir", str(tmp_path / "cached")], data_dir)
    # The cache serves this checkpoint, variant and resizing only.
    config = load_config("smoke.py", "steps=2")
    config.data.train.data_dir, config.data.train.split = data_dir, "raw"
    config.data.tokenizer, config.data.text_style, config.data.text_len = sp, "siglip", TEXT_LEN
    config.selection.method, config.selection.filter_ratio = "joint", 0.5
    config.selection.reference.update(dict(checkpoint=npz, variant="tiny/4",
                                           resize_posemb=True, cache_dir=str(tmp_path / "cache")))
    spec = config_lib.validate(config)
    with pytest.raises(ConfigError, match="was made with the reference .*re-create it"):
        ReferenceCache(spec.reference, spec.data)
    online, cached = _losses(tmp_path / "online"), _losses(tmp_path / "cached")
    assert [r["step"] for r in online] == [1, 2]
    for a, b in zip(online, cached, strict=True):
        for key in ("loss", "selection/score_selected", "selection/self_score_selected",
                    "selection/clean_selected"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)

    # Index for index: the runs' first super-batch under three selection keys.
    config.selection.reference.resize_posemb = False  # as the runs had it
    config.selection.num_chunks, config.batch_size, config.evals.batch_size = 4, 32, 32
    for pool in (config.evals.zero_shot.data, config.evals.retrieval.data):
        pool.data_dir = data_dir
    runs = {}
    for name, cache_dir in (("online", ""), ("cached", str(tmp_path / "cache"))):
        c = config.copy_and_resolve_references()
        c.selection.reference.cache_dir = cache_dir
        run = build.build(c)
        batch = sharding.to_global(next(iter(train.train_data(run))), run.mesh)
        runs[name] = (run, batch)
    (online_run, online_batch), (cached_run, cached_batch) = runs["online"], runs["cached"]
    assert cached_run.wired.reference.attach is not None
    np.testing.assert_array_equal(online_batch["index"], cached_batch["index"])
    params = online_run.state.init(0)["params"]
    for seed in range(3):
        picks = [jax.jit(run.wired.scorer)(jax.random.key(seed), params,
                                           run.wired.reference.step_input, batch)[0]
                 for run, batch in (runs["online"], runs["cached"])]
        np.testing.assert_array_equal(*picks)


@pytest.mark.slow
def test_learner_from_a_published_checkpoint_and_embed_mode(data_dir, tmp_path, siglip_files):
    sp, npz, tree = siglip_files
    model = ["--config.model.image_pool=map", "--config.model.image_head=False",
             "--config.model.text_pool=last", "--config.model.embed_dim=64",
             "--config.model.init_from=" + npz]
    args = ["--config", "configs/smoke.py:steps=1", *_common(sp), *model]
    # The checkpoint as it is: embeddings of data.train, with no workdir.
    out = tmp_path / "embeddings"
    _cli([*args, "--mode", "embed", "--output", str(out)], data_dir)
    image, text = np.load(out / "image.npy"), np.load(out / "text.npy")
    scale, bias = float(np.load(out / "logit_scale.npy")), float(np.load(out / "logit_bias.npy"))
    np.testing.assert_allclose(scale, np.exp(tree["t"][0]), rtol=1e-6)
    assert bias == float(tree["b"][0])
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)

    # In-process, the same config: its preprocessing and its first training batch.
    config = load_config("smoke.py", "steps=1")
    config.data.train.data_dir = data_dir
    for task in ("zero_shot", "retrieval"):
        config.evals[task].data.data_dir = data_dir
    config.data.tokenizer, config.data.text_style, config.data.text_len = sp, "siglip", TEXT_LEN
    config.batch_size = 32
    config.model.update(dict(image_pool="map", image_head=False, text_pool="last",
                             embed_dim=64, init_from=npz))
    run = build.build(config)
    pool = sources.open_source(run.spec.data.train, "data.train")
    assert len(image) == len(text) == len(pool)
    rows = [run.preprocess(pool[i], i) for i in range(6)]
    images = np.stack([r["image"] for r in rows])
    tokens = np.stack([r["tokens"] for r in rows])
    np.testing.assert_allclose(image[:6], image_embeddings(tree, images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text[:6], text_embeddings(tree, tokens), rtol=1e-5, atol=1e-6)

    # The learner's first loss is the reference's own loss on its first batch: the
    # float64 forward pass of the file on that batch's preprocessed rows (not jest_jax's
    # import, which `--mode embed` above used).
    batch = next(iter(train.train_data(run)))
    first_images, first_tokens = np.asarray(batch["image"]), np.asarray(batch["tokens"])
    assert len(first_images) == 32
    rows = [run.preprocess(pool[int(i)], int(i)) for i in np.asarray(batch["index"])[:4]]
    np.testing.assert_array_equal(first_tokens[:4], np.stack([r["tokens"] for r in rows]))
    _cli([*args, "--workdir", str(tmp_path / "learner")], data_dir)
    (row,) = _losses(tmp_path / "learner")
    assert row["step"] == 1
    expected = sigmoid_loss(image_embeddings(tree, first_images),
                            text_embeddings(tree, first_tokens),
                            float(np.exp(tree["t"][0])), float(tree["b"][0]))
    np.testing.assert_allclose(row["loss"], expected, rtol=1e-5)


def test_a_reference_of_another_image_size_stops_the_cli(data_dir, tmp_path, siglip_files):
    sp, npz, _ = siglip_files  # written for 16 px images
    result = _cli(["--config", "configs/smoke.py:steps=2", *_common(sp),
                   "--config.data.image_size=32", "--config.selection.method=joint",
                   "--config.selection.filter_ratio=0.5",
                   "--config.selection.reference.checkpoint=" + npz,
                   "--config.selection.reference.variant=tiny/4",
                   "--workdir", str(tmp_path / "run")], data_dir, returncode=1)
    assert ("error: config.data.image_size=32 is invalid: config.selection.reference."
            "checkpoint=") in result.stderr
    assert "selection.reference.resize_posemb=True" in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
