"""Standard zero-shot: captionless labelled splits, class names and templates from the
built-in CLIP sets, files or inline lists, top-1 / top-5 / mean per-class accuracy held
against NumPy float64 computed from the returned embeddings, prompts embedded in batches,
and the errors raised before any work."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from jest_jax import build
from jest_jax.config import ConfigError, validate
from jest_jax.data import prompts
from jest_jax.data.datasets import prepare_quietly
from jest_jax.data.shapes import encode_png
from jest_jax.data.writer import _ImageTextBuilder
from jest_jax.evaluate import class_embeddings
from jest_jax.fields import Section

CLASSES = 10
IMAGES = 40


@pytest.fixture(scope="module")
def captionless(tmp_path_factory) -> str:
    """A TFDS split `test` with images and a 10-class label (WordNet-id names, like
    ImageNet's) and no caption; returns its prepared directory."""
    rng = np.random.default_rng(0)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=[f"n{i:08d}" for i in range(CLASSES)])})
    examples = [(i, {"image": encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
                     "label": i % CLASSES}) for i in range(IMAGES)]
    builder = _ImageTextBuilder(name="captionless", version="1.0.0", features=features,
                                splits={"test": iter(examples)},
                                data_dir=str(tmp_path_factory.mktemp("captionless")),
                                file_format="array_record")
    prepare_quietly(builder)
    return str(builder.data_dir)


def _with_task(config, data_dir: str, **task):
    del config.evals.zero_shot, config.evals.retrieval
    config.evals.cifar = dict(kind="zero_shot", label_keys=("label",), data=dict(
        source="tfds", name="captionless", split="test", data_dir=data_dir), **task)
    return config


def test_builtin_sets_are_the_clip_lists():
    imagenet, cifar10 = prompts.builtin("imagenet"), prompts.builtin("cifar10")
    assert len(imagenet) == 1000 and imagenet[:3] == ["tench", "goldfish", "great white shark"]
    assert imagenet[-1] == "toilet paper"
    assert cifar10 == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                       "horse", "ship", "truck"]
    assert len(prompts.builtin("cifar100")) == 100
    for name, count in (("clip_imagenet_80", 80), ("clip_cifar_18", 18)):
        templates = prompts.builtin(name)
        assert len(templates) == len(set(templates)) == count
        assert all(t.count("{}") == 1 for t in templates)
    assert prompts.fill("a photo of a {}.", "{odd} name") == "a photo of a {odd} name."


def test_class_names_and_templates_from_files(tmp_path, tiny_config, captionless):
    (tmp_path / "names.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "names.txt").write_text("cat\n\n dog \n")
    assert prompts.read_list(str(tmp_path / "names.json")) == ["x", "y"]
    assert prompts.read_list(str(tmp_path / "names.txt")) == ["cat", "dog"]
    for value, kind, loaded in ((str(tmp_path / "names.txt"), "file", ["cat", "dog"]),
                                ("cifar10", "set", prompts.builtin("cifar10")),
                                (("ant", "bee"), "inline", ["ant", "bee"]), ((), "dataset", None)):
        names = prompts.TextList.parse(Section(ConfigDict(dict(class_names=value)), "t"),
                                       "class_names", templates=False)
        assert names.kind == kind and (names.load() if names.given else None) == loaded
    # gs:// paths are files too (read through etils.epath, not at validation).
    remote = prompts.TextList.parse(Section(ConfigDict(dict(t="gs://b/t.txt")), "x"), "t", True)
    assert remote.kind == "file"
    # A templates file with a line lacking '{}' fails when the evaluator checks the data.
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo\n")
    config = _with_task(tiny_config, captionless, templates=(str(tmp_path / "t.txt"),))
    with pytest.raises(ConfigError, match=r"config.evals.cifar.templates: template 'a photo' "
                                          r"\(from .*t.txt'\) has no '\{\}'"):
        build.build(config, selection=False)


@pytest.mark.parametrize("task,message", [
    (dict(class_names=("imagenett",)), r"config.evals.cifar.class_names='imagenett' is "
     r"invalid: unknown class_names set \(did you mean 'imagenet'\?\)"),
    (dict(templates="clip_imagenet"), r"config.evals.cifar.templates='clip_imagenet' is "
     r"invalid: unknown templates set \(did you mean 'clip_imagenet_80'\?\)"),
    (dict(templates=("a photo of a {}.", "a photo")), r"config.evals.cifar.templates=.* is "
     r"invalid: template 'a photo' has no '\{\}' for the class name"),
    (dict(templates=("a photo",)), r"config.evals.cifar.templates=.* is "
     r"invalid: template 'a photo' has no '\{\}' for the class name"),
    (dict(label_keys=("label", "other"), class_names="cifar10"),
     "config.evals.cifar.label_keys=.* is invalid: must name one label feature"),
])
def test_invalid_zero_shot_fields_fail_validation(tiny_config, captionless, task, message):
    config = _with_task(tiny_config, captionless)
    config.evals.cifar.update(task)
    with pytest.raises(ConfigError, match=message):
        validate(config, num_devices=1)


@pytest.mark.parametrize("task,message", [
    (dict(label_keys=("fine_label",)), r"config.evals.cifar.label_keys: captionless:test has "
     r"no label feature 'fine_label', and zero-shot classification needs a label per image"),
    (dict(class_names="cifar100"), r"config.evals.cifar.class_names: 100 names, but 'label' "
     r"of captionless:test has 10 classes"),
    (dict(class_names="/no/such/names.txt"), r"config.evals.cifar.class_names: cannot read "
     r"'/no/such/names.txt'"),
])
def test_zero_shot_data_errors_before_any_work(tiny_config, captionless, task, message):
    config = _with_task(tiny_config, captionless)
    config.evals.cifar.update(task)
    with pytest.raises(ConfigError, match=message):
        build.build(config, selection=False)


def test_retrieval_on_a_captionless_split_is_refused(tiny_config, captionless):
    config = _with_task(tiny_config, captionless)
    config.evals.cifar.kind = "retrieval"
    del config.evals.cifar.label_keys
    with pytest.raises(ConfigError, match="config.evals.cifar.data: captionless:test has no "
                                          "'caption' feature"):
        build.build(config, selection=False)


def _brute_force(image: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    logits = image @ class_emb.T
    ranks = []
    for row, label in zip(logits, labels, strict=True):
        ranks.append(sum(row[c] > row[label] for c in range(len(row))))
        gap = np.min(np.abs(np.delete(row, label) - row[label]))
        assert gap > 1e-5, "a near-tie: float32 rounding could decide this rank"
    ranks = np.array(ranks)
    per_class = [np.mean(ranks[labels == c] == 0) for c in np.unique(labels)]
    return {"top1": np.mean(ranks < 1), "top5": np.mean(ranks < 5),
            "mean_per_class": np.mean(per_class)}


def test_zero_shot_on_a_captionless_split_matches_numpy(tiny_config, captionless):
    config = _with_task(tiny_config, captionless, class_names="cifar10",
                        templates=("clip_cifar_18",))
    run = build.build(config, selection=False)
    params = run.state.init(0)["params"]
    runner = run.evaluator
    calls = []
    embed = runner._embed_texts
    runner._embed_texts = lambda p, tokens: (calls.append(tokens.shape[0]), embed(p, tokens))[1]
    results = runner.run(params)
    # 10 classes x 18 templates = 180 prompts, in calls of at most evals.batch_size = 32.
    assert len(calls) == 6 and max(calls) <= config.evals.batch_size

    (task,) = run.spec.evals.tasks
    split = runner.context(params).split(task.data)
    assert "text" not in split and split["image"].shape[0] == IMAGES
    # Independent embeddings: every prompt in a single call of the model, float64 after.
    names, templates = prompts.builtin("cifar10"), prompts.builtin("clip_cifar_18")
    tokens = np.stack([run.preprocess.tokenizer.encode(t.replace("{}", n), 24)
                       for n in names for t in templates])
    emb = np.asarray(jax.jit(run.model.embed_texts)(params, tokens), np.float64)
    emb = emb.reshape(CLASSES, len(templates), -1).mean(axis=1)
    class_emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    expected = _brute_force(split["image"].astype(np.float64), class_emb, split["label"])
    np.testing.assert_array_equal(split["label"], np.arange(IMAGES) % CLASSES)
    assert results == pytest.approx({"cifar/label": expected["top1"],
                                     "cifar/label_top5": expected["top5"],
                                     "cifar/label_mean_per_class": expected["mean_per_class"]})


def test_zero_shot_at_another_patch_size_matches_numpy(tiny_config, captionless):
    """A task's `patch_size` (Flexi-JEST's low-resolution zero-shot) embeds the images at
    that patch size: its accuracy is NumPy's on images embedded independently at patch 8,
    and differs from the full-resolution task's embeddings."""
    config = _with_task(tiny_config, captionless, class_names="cifar10",
                        templates=("clip_cifar_18",))
    config.evals.cifar_low = config.evals.cifar.copy_and_resolve_references()
    config.evals.cifar_low.patch_size = 8  # the model's is 4, its images 16 px
    run = build.build(config, selection=False)
    params = run.state.init(0)["params"]
    results = run.evaluator.run(params)

    full, low = run.spec.evals.tasks
    context = run.evaluator.context(params)
    split = context.split(low.data)
    (key,) = run.evaluator._pools  # both tasks read the one split
    images = np.concatenate([b["image"][b["mask"]] for b in run.evaluator.batches(key)])
    emb = np.asarray(jax.jit(run.model.embed_images, static_argnums=2)(params, images, 8),
                     np.float64)
    full_emb = np.asarray(jax.jit(run.model.embed_images)(params, images), np.float64)
    assert np.abs(emb - full_emb).max() > 1e-2  # another resolution, other embeddings
    np.testing.assert_allclose(context.split(low.data, 8)["image"], emb, atol=1e-5)
    np.testing.assert_allclose(split["image"], full_emb, atol=1e-5)
    class_emb = class_embeddings(context.embed_texts, prompts.builtin("cifar10"),
                                 prompts.builtin("clip_cifar_18")).astype(np.float64)
    expected = _brute_force(emb, class_emb, split["label"])
    # At patch 4 the accuracy differs: the task did run its images at patch 8.
    assert _brute_force(full_emb, class_emb, split["label"]) != pytest.approx(expected)
    assert {k: v for k, v in results.items() if k.startswith("cifar_low/")} == pytest.approx(
        {"cifar_low/label": expected["top1"], "cifar_low/label_top5": expected["top5"],
         "cifar_low/label_mean_per_class": expected["mean_per_class"]})


def test_a_zero_shot_patch_size_that_does_not_divide_the_images_is_refused(tiny_config,
                                                                         captionless):
    config = _with_task(tiny_config, captionless, patch_size=5)
    with pytest.raises(ConfigError, match=r"config.evals.cifar.patch_size=5 is invalid: must "
                                          r"be 0 \(the model's\) or divide data.image_size=16"):
        build.build(config, selection=False)
