"""Multi-caption retrieval (the COCO / Flickr30k protocol), with the captions as a
sequence feature (TFDS coco_captions' layout) or as one record per caption grouped by an
image id: both give the same recalls, equal to a NumPy brute force over embeddings
computed independently by the model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jest_jax import build
from jest_jax.config import ConfigError
from jest_jax.data.datasets import prepare_quietly
from jest_jax.data.shapes import encode_png
from jest_jax.data.writer import _ImageTextBuilder

WORDS = "red blue green dog cat tree car boat sky house small big old new".split()
IMAGES = 12


def _captions() -> list[list[str]]:
    rng = np.random.default_rng(3)
    return [[f"{i}.{j} " + " ".join(rng.choice(WORDS, 3)) for j in range(1 + i % 5)]
            for i in range(IMAGES)]


def _build(directory, name: str, features: dict, examples: list) -> str:
    builder = _ImageTextBuilder(name=name, version="1.0.0",
                                features=tfds.features.FeaturesDict(features),
                                splits={"test": iter(enumerate(examples))},
                                data_dir=str(directory), file_format="array_record")
    prepare_quietly(builder)
    return str(builder.data_dir)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[str, str]:
    """The same 12 images and 33 captions twice: `coco_like` (a sequence of
    {text, id} per image) and `per_caption` (one record per caption, shuffled, with the
    image's `image_id`)."""
    rng = np.random.default_rng(4)
    images = [encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
              for _ in range(IMAGES)]
    captions = _captions()
    image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    coco = _build(tmp_path_factory.mktemp("coco"), "coco_like", {
        "image": image, "captions": tfds.features.Sequence(
            {"text": tfds.features.Text(), "id": np.int64})},
        [{"image": images[i], "captions": {"text": c, "id": list(range(len(c)))}}
         for i, c in enumerate(captions)])
    rows = [(i, c) for i, texts in enumerate(captions) for c in texts]
    order = rng.permutation(len(rows))
    grouped = _build(tmp_path_factory.mktemp("grouped"), "per_caption", {
        "image": image, "caption": tfds.features.Text(),
        "image_id": tfds.features.Scalar(np.int64)},
        [{"image": images[rows[r][0]], "caption": rows[r][1], "image_id": 100 + rows[r][0]}
         for r in order])
    return coco, grouped


def _config(tiny_config, datasets):
    coco, grouped = datasets
    del tiny_config.evals.zero_shot, tiny_config.evals.retrieval
    tiny_config.evals.coco = dict(kind="retrieval", captions="captions/text",
                                  data=dict(source="tfds", name="coco_like", split="test",
                                            data_dir=coco))
    tiny_config.evals.grouped = dict(kind="retrieval", group_by="image_id",
                                     data=dict(source="tfds", name="per_caption",
                                               split="test", data_dir=grouped))
    return tiny_config


def test_multi_caption_recall_matches_brute_force(tiny_config, datasets):
    run = build.build(_config(tiny_config, datasets), selection=False)
    params = run.state.init(0)["params"]
    results = run.evaluator.run(params)
    coco_task = run.spec.evals.tasks[0]
    image = run.evaluator.context(params).split(coco_task.data)["image"].astype(np.float64)
    captions = _captions()
    flat = [c for texts in captions for c in texts]
    owner = [i for i, texts in enumerate(captions) for _ in texts]
    tokens = np.stack([run.preprocess.tokenizer.encode(c, 24) for c in flat])
    text = np.asarray(jax.jit(run.model.embed_texts)(params, tokens), np.float64)
    sim = image @ text.T
    for k in (1, 5, 10):
        i2t = t2i = 0
        for i in range(IMAGES):
            ranked = sorted(range(len(flat)), key=lambda c, i=i: -sim[i, c])
            i2t += any(owner[c] == i for c in ranked[:k])
        for c in range(len(flat)):
            gaps = np.abs(np.delete(sim[:, c], owner[c]) - sim[owner[c], c])
            assert gaps.min() > 1e-5, "a near-tie: float32 rounding could decide this rank"
            t2i += sorted(range(IMAGES), key=lambda j, c=c: -sim[j, c]).index(owner[c]) < k
        for task in ("coco", "grouped"):
            assert results[f"{task}/i2t_r{k}"] == pytest.approx(i2t / IMAGES)
            assert results[f"{task}/t2i_r{k}"] == pytest.approx(t2i / len(flat))
    assert 0 < results["coco/i2t_r1"] < 1 or 0 < results["coco/t2i_r1"] < 1


def test_multi_caption_errors(tiny_config, datasets):
    config = _config(tiny_config, datasets)
    config.evals.coco.captions = "sentences"
    with pytest.raises(ConfigError, match="config.evals.coco.data: coco_like:test has no "
                                          "'sentences' feature"):
        build.build(config, selection=False)
    config.evals.coco.captions = "captions/text"
    config.evals.grouped.captions = "caption"
    with pytest.raises(ConfigError, match="config.evals.grouped.group_by='image_id' is "
                                          "invalid: cannot be combined with captions"):
        build.build(config, selection=False)
