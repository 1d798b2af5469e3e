"""The embedded `jest_shapes` builder, `load_split` and `write_image_text_dataset`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jest_jax.data import load_split, write_image_text_dataset
from jest_jax.data.datasets import prepare_quietly
from jest_jax.data.shapes import (
    _COLOR_WORDS,
    ATTRIBUTES,
    CORRUPTIONS,
    JestShapes,
    ShapesConfig,
    family_attributes,
    zero_shot_templates,
)

TINY_SIZES = {"raw": 512, "curated": 256, "eval": 128}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _read_all(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["caption"] == y["caption"] and np.array_equal(x["image"], y["image"])
        for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`jest_shapes/tiny`, built once: ({split: examples}, info)."""
    data_dir = str(tmp_path_factory.mktemp("tiny"))
    splits, info = {}, None
    for split in TINY_SIZES:
        source, info = load_split("jest_shapes/tiny", split, data_dir)
        splits[split] = _read_all(source)
    return splits, info


def _build_custom(data_dir: Path, seed: int, **fields) -> dict[str, list[dict]]:
    fields = {"num_raw": 64, "num_curated": 16, "num_eval": 16, **fields}
    config = ShapesConfig(name=f"seed{seed}", seed=seed, **fields)
    builder = JestShapes(config=config, data_dir=str(data_dir), file_format="array_record")
    prepare_quietly(builder)
    return {s: _read_all(builder.as_data_source(split=s)) for s in ("raw", "curated", "eval")}


def test_split_sizes_and_image_format(tiny):
    splits, info = tiny
    assert {s: len(v) for s, v in splits.items()} == TINY_SIZES
    assert {s: info.splits[s].num_examples for s in TINY_SIZES} == TINY_SIZES
    for examples in splits.values():
        for ex in examples:
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
            assert isinstance(ex["caption"], bytes) and ex["caption"].strip()


def test_same_seed_same_data(tiny, tmp_path):
    splits, _ = tiny
    for split in TINY_SIZES:
        again, _ = load_split("jest_shapes/tiny", split, str(tmp_path))
        assert _same(splits[split], _read_all(again)), split


def test_data_depend_on_seed_not_on_split_size(tiny, tmp_path):
    splits, _ = tiny
    same_seed = _build_custom(tmp_path / "a", seed=0)
    other_seed = _build_custom(tmp_path / "b", seed=1)
    for split, examples in same_seed.items():
        # Per-example seeds: a smaller build is a prefix of a larger one.
        assert _same(examples, splits[split][: len(examples)]), split
        images = [e["image"] for e in other_seed[split]]
        assert not any(np.array_equal(a, b["image"]) for a, b in zip(images, examples, strict=True))


def test_class_names_and_templates(tiny):
    _, info = tiny
    for attribute, names in ATTRIBUTES.items():
        assert info.features[attribute].names == names
        for template in zero_shot_templates(attribute):
            assert template.format(names[0]).strip() != template.format("").strip()
    assert info.features["corruption"].names == CORRUPTIONS
    with pytest.raises(ValueError, match="unknown attribute"):
        zero_shot_templates("texture")


def test_raw_pool_is_a_realistic_mix(tiny):
    raw = tiny[0]["raw"]
    corruption = np.array([e["corruption"] for e in raw])
    is_clean = np.array([e["is_clean"] for e in raw])
    np.testing.assert_array_equal(is_clean, corruption == 0)
    assert 0.3 < is_clean.mean() < 0.6
    counts = np.bincount(corruption, minlength=len(CORRUPTIONS))
    assert (counts[1:] >= 0.05 * len(raw)).all(), dict(zip(CORRUPTIONS, counts, strict=True))


def test_curated_and_eval_are_clean(tiny):
    for split in ("curated", "eval"):
        for ex in tiny[0][split]:
            assert ex["is_clean"] and ex["corruption"] == 0


def test_clean_captions_name_the_object(tiny):
    hits = 0
    for ex in tiny[0]["eval"]:
        words = {ATTRIBUTES["shape"][ex["shape"]], ATTRIBUTES["color"][ex["color"]]}
        hits += any(w in ex["caption"].decode().lower() for w in words)
    assert hits / len(tiny[0]["eval"]) > 0.6


def test_images_are_all_distinct(tiny):
    images = [e["image"].tobytes() for examples in tiny[0].values() for e in examples]
    assert len(set(images)) == len(images)


def test_near_duplicates_are_close_to_their_source(tiny):
    raw = tiny[0]["raw"]
    images = np.stack([e["image"] for e in raw]).astype(np.float32)
    clean = [i for i, e in enumerate(raw) if e["corruption"] == 0]
    dup_id = CORRUPTIONS.index("near_duplicate")
    dups = [i for i, e in enumerate(raw) if e["corruption"] == dup_id]
    assert dups
    for i in dups:
        # The source is a clean pair with the very same caption.
        sources = [j for j in clean if j < i and raw[j]["caption"] == raw[i]["caption"]]
        assert sources, i
        nearest = min(np.abs(images[i] - images[j]).mean() for j in sources)
        typical = np.median(np.abs(images[clean] - images[i]).mean(axis=(1, 2, 3)))
        assert nearest < 16 and nearest < 0.5 * typical, (i, nearest, typical)


def _colour_twins(examples: list[dict]) -> int:
    """Pairs with the same shape, size and position but another colour (brute force)."""
    key = [(e["shape"], e["size"], e["position"]) for e in examples]
    return sum(key[i] == key[j] and examples[i]["color"] != examples[j]["color"]
               for i in range(len(examples)) for j in range(i))


def test_confusable_build_is_families_in_any_colour(tiny, tmp_path):
    splits = _build_custom(tmp_path, 0, families=16, num_raw=320)
    triples = {tuple(f.values()) for f in family_attributes(0, 16)}
    assert len(triples) == 16
    for examples in splits.values():
        for e in examples:
            assert (e["shape"], e["size"], e["position"]) in triples
    # Clean captions always name the colour (in one of its words).
    for e in splits["curated"] + [e for e in splits["raw"] if e["is_clean"]]:
        words = _COLOR_WORDS[ATTRIBUTES["color"][e["color"]]]
        assert any(w in e["caption"].decode().lower() for w in words), e["caption"]
    assert 0.3 < np.mean([e["is_clean"] for e in splits["raw"]]) < 0.6  # still a noisy pool
    # A super-batch's worth (320) holds far more pairs that differ only in colour than the
    # default build's (there: 162 triples; about 51040 / 162 * 7 / 8 = 276 expected).
    default = _colour_twins(tiny[0]["raw"][:320])
    assert _colour_twins(splits["raw"]) > 8 * default > 0
    with pytest.raises(ValueError, match="only 162"):
        family_attributes(0, 163)


def test_load_split_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"available splits: \['raw', 'curated', 'eval'\]"):
        load_split("jest_shapes/tiny", "train", str(tmp_path))
    with pytest.raises(ValueError, match="available: \\['default', 'tiny', 'confusable'\\]"):
        load_split("jest_shapes/huge", "raw", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'not_here'.*write_image_text_dataset"):
        load_split("not_here", "train", str(tmp_path))


def test_concurrent_first_use_builds_once(tmp_path):
    code = ("import sys; from jest_jax.data import load_split; "
            "load_split('jest_shapes/tiny', 'eval', sys.argv[1])")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=1800) for p in procs]  # a hang guard only
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("building jest_shapes/tiny" in out for out, _ in outputs) == 1


def _pairs(rng: np.random.Generator, n: int, num_classes: int | None) -> list[dict]:
    examples = []
    for i in range(n):
        image = rng.integers(0, 256, (8 + i, 5 + 2 * i, 3), dtype=np.uint8)
        ex = {"image": image, "caption": f"pair {i} é"}
        if num_classes:
            ex["label"] = i % num_classes
        examples.append(ex)
    return examples


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    class_names = ["cat", "dog", "bird"]
    splits = {"train": _pairs(rng, 7, 3), "test": _pairs(rng, 3, 3)}
    path = write_image_text_dataset(str(tmp_path), "my_pairs", splits, class_names=class_names)
    assert Path(path) == tmp_path / "my_pairs" / "1.0.0"
    for split, examples in splits.items():
        for data_dir in (str(tmp_path), path):
            source, info = load_split("my_pairs", split, data_dir)
            assert info.features["label"].names == class_names
            got = _read_all(source)
            assert len(got) == len(examples)
            for g, want in zip(got, examples, strict=True):
                np.testing.assert_array_equal(g["image"], want["image"])
                assert g["caption"].decode() == want["caption"] and g["label"] == want["label"]
    with pytest.raises(FileExistsError, match="already exists"):
        write_image_text_dataset(str(tmp_path), "my_pairs", splits, class_names=class_names)


def test_writer_without_labels(tmp_path):
    splits = {"train": _pairs(np.random.default_rng(1), 2, None)}
    write_image_text_dataset(str(tmp_path), "captions_only", splits)
    source, info = load_split("captions_only", "train", str(tmp_path))
    assert "label" not in info.features and len(source) == 2


_GOOD = {"image": np.zeros((4, 4, 3), np.uint8), "caption": "ok", "label": 0}


@pytest.mark.parametrize("bad, class_names, message", [
    ({**_GOOD, "image": np.zeros((4, 4, 3), np.float32)}, ["a"], "dtype must be uint8"),
    ({**_GOOD, "image": np.zeros((4, 4), np.uint8)}, ["a"], r"shape \[H, W, 3\]"),
    ({**_GOOD, "image": np.zeros((4, 4, 4), np.uint8)}, ["a"], r"3 \(RGB\) channels"),
    ({**_GOOD, "image": [[0]]}, ["a"], "numpy array"),
    ({**_GOOD, "caption": "  "}, ["a"], "caption is empty"),
    ({**_GOOD, "caption": b"bytes"}, ["a"], "caption must be a str"),
    ({**_GOOD, "label": 3}, ["a", "b"], r"label 3 out of range \[0, 2\)"),
    ({**_GOOD, "label": 1.0}, ["a", "b"], "label must be an int"),
    ({"image": _GOOD["image"], "caption": "ok"}, ["a"], "missing 'label'"),
    (_GOOD, None, "no class_names"),
    ({"caption": "ok", "label": 0}, ["a"], r"missing key\(s\) \['image'\]"),
    ({**_GOOD, "text": "x"}, ["a"], r"unexpected key\(s\) \['text'\]"),
])
def test_writer_rejects_bad_examples(tmp_path, bad, class_names, message):
    good = dict(_GOOD) if class_names else {"image": _GOOD["image"], "caption": "ok"}
    with pytest.raises(ValueError, match=r"split 'train', example 1: .*" + message):
        write_image_text_dataset(
            str(tmp_path), "bad_pairs", {"train": [good, bad]}, class_names=class_names)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "My-Pairs"}, "snake_case"),
    ({"splits": {}}, "splits is empty"),
    ({"splits": {"train[:5]": []}}, "split name"),
    ({"class_names": ["a", "a"]}, "distinct"),
])
def test_writer_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"data_dir": str(tmp_path), "name": "pairs", "splits": {"train": []}, **kwargs}
    with pytest.raises(ValueError, match=message):
        write_image_text_dataset(**args)
