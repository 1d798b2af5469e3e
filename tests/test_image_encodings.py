"""Images stored as encoded bytes (JPEG, PNG, WebP) are decoded by the input pipeline,
under the same bad-record policy as TFDS Image features; checked against Pillow's own
decoding of the same bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jest_jax.data.datasets import prepare_quietly
from jest_jax.data.pipeline import Preprocess, eval_batches, train_dataset
from jest_jax.data.records import BadRecordError, decode_image
from jest_jax.data.tokenizer import ByteTokenizer
from jest_jax.data.writer import _ImageTextBuilder

SIZE = 16


def _encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **kwargs)
    return out.getvalue()


def _pil(raw: bytes, size: int = SIZE) -> np.ndarray:
    """The reference: Pillow's full decode, as RGB, resized like the pipeline does."""
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def _image(seed: int, shape=(20, 24, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_lossless_encodings_decode_exactly():
    rgb, grey, rgba = _image(0), _image(1, (9, 7)), _image(2, (6, 5, 4))
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True})):
        np.testing.assert_array_equal(decode_image(_encode(rgb, fmt, **kwargs)), rgb)
        np.testing.assert_array_equal(decode_image(_encode(rgba, fmt, **kwargs)), rgba)
    np.testing.assert_array_equal(decode_image(_encode(grey, "PNG")), grey)
    # A palette PNG comes back as RGB pixels.
    palette = Image.fromarray(rgb).quantize(16)
    out = io.BytesIO()
    palette.save(out, "PNG")
    np.testing.assert_array_equal(decode_image(out.getvalue()),
                                  np.asarray(palette.convert("RGB")))
    # Decoded arrays (TFDS Image features) pass through untouched.
    assert decode_image(rgb) is rgb


def test_jpeg_decodes_as_pillow_and_draft_keeps_the_target_size():
    raw = _encode(_image(3, (64, 80, 3)), "JPEG", quality=90)
    np.testing.assert_array_equal(decode_image(raw),
                                  np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    # np.bytes_ and 0-d object arrays (how some readers hand bytes over) work too.
    np.testing.assert_array_equal(decode_image(np.array(raw, dtype=object)), decode_image(raw))
    np.testing.assert_array_equal(decode_image(np.bytes_(raw)), decode_image(raw))
    # At min_size 16 libjpeg may decode at 1/4 scale (64x80 -> 16x20), never below 16.
    small = decode_image(raw, min_size=16)
    assert small.shape == (16, 20, 3)
    big = decode_image(_encode(_image(4, (64, 80, 3)), "JPEG"), min_size=40)
    assert big.shape == (64, 80, 3)  # half scale would be 32 < 40: decoded whole


def test_undecodable_bytes_are_bad_records():
    png = _encode(_image(5), "PNG")
    gif = _encode(_image(5), "GIF")
    for raw, words in ((b"hello, not an image", "starting b'hello, n'"),
                       (png[:60], "do not decode as JPEG/PNG/WEBP"),
                       (gif, "do not decode")):  # a format the pipeline does not read
        with pytest.raises(BadRecordError, match=words):
            decode_image(raw)


def _pool() -> tuple[list[dict], dict[int, str]]:
    """24 records in three encodings; records 3, 10 and 17 are undecodable."""
    pool, bad = [], {3: "garbage", 10: "truncated", 17: "gif"}
    for i in range(24):
        image = _image(100 + i, (24 + i, 30, 3))
        raw = _encode(image, ("JPEG", "PNG", "WEBP")[i % 3])
        raw = {"garbage": b"\x00" * 50, "truncated": raw[: len(raw) // 3],
               "gif": _encode(image, "GIF")}.get(bad.get(i), raw)
        pool.append({"image": raw, "caption": f"record {i}", "label": np.int64(i % 4)})
    return pool, bad


def test_pipeline_decodes_every_encoding_and_skips_bad_bytes():
    pool, bad = _pool()
    preprocess = Preprocess(SIZE, ByteTokenizer(), 16)
    batch = next(iter(train_dataset(pool, preprocess, batch_size=24, seed=0, num_threads=0)))
    # Every bad record was replaced by the next good one, and counted once.
    assert batch["bad_records"].sum() == len(bad)
    assert not set(batch["index"].tolist()) & set(bad)
    for image, index in zip(batch["image"], batch["index"], strict=True):
        # Every image is 30 px wide (< 2 * SIZE): never draft-scaled, so equal to Pillow's.
        np.testing.assert_array_equal(image, _pil(pool[index]["image"]))
    # Evaluation reads whole: the first bad record is an error naming it.
    with pytest.raises(BadRecordError, match="record 3 is bad: image bytes"):
        list(eval_batches(pool, preprocess, batch_size=8))


def test_tfds_bytes_feature_reads_through_the_pipeline(tmp_path):
    """A TFDS dataset storing the original encoded bytes (a string Tensor feature)."""
    pool, bad = _pool()
    good = [r for i, r in enumerate(pool) if i not in bad]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "caption": tfds.features.Text()})
    builder = _ImageTextBuilder(
        name="encoded", version="1.0.0", features=features,
        splits={"train": iter([(i, {"image": r["image"], "caption": r["caption"]})
                               for i, r in enumerate(good)])},
        data_dir=str(tmp_path), file_format="array_record")
    prepare_quietly(builder)
    source = builder.as_data_source(split="train")
    assert source[0]["image"] == good[0]["image"]  # the stored bytes, not re-encoded
    batches = list(eval_batches(source, Preprocess(SIZE, ByteTokenizer(), 16), batch_size=8))
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(images, np.stack([_pil(r["image"]) for r in good]))
