"""Bad records: what makes an image–caption record unusable, and how training skips it.

A record is bad when reading it fails (an undecodable image raises inside the data
source, or its encoded bytes do not decode: `decode_image`), its image does not have an
image's shape (H×W, or H×W×C with C in 1, 3, 4; uint8; non-empty), or its caption is
empty or longer than `data.max_caption_bytes`.
docs/reliability.md describes the skip policy and why it keeps runs resumable.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from jest_jax import log

# A run of this many bad records in a row is a broken dataset, not a few bad records.
MAX_CONSECUTIVE_BAD = 100
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (alpha dropped)
# Encodings an `image` field may hold as bytes, decoded at read time (Pillow's names).
ENCODINGS = ("JPEG", "PNG", "WEBP")


class BadRecordError(ValueError):
    """A training record that cannot be used; the message names its index and why."""


def reason(error: Exception) -> str:
    """Why a record failed: our own check's words, or the reader's exception named."""
    return str(error) if isinstance(error, BadRecordError) else f"{type(error).__name__}: {error}"


def decode_image(value: Any, min_size: int | None = None) -> np.ndarray:
    """An `image` field as a uint8 array: decoded arrays (TFDS Image features) pass
    through; encoded bytes (one of ENCODINGS, as a converter stores the original files)
    are decoded here, in the input pipeline's workers.

    `min_size`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling:
    4-64x fewer pixels) as long as both sides stay >= `min_size`; the pipeline resizes
    to that size anyway. Bytes that do not decode raise BadRecordError (a bad record).
    """
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        value = value.item()
    if not isinstance(value, bytes | bytearray | memoryview | np.bytes_):
        return np.asarray(value)
    raw = bytes(value)
    try:
        with Image.open(io.BytesIO(raw), formats=ENCODINGS) as image:
            if min_size is not None and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            if image.mode not in ("L", "RGB", "RGBA"):  # palette, CMYK, 16-bit, LA, ...
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            return np.asarray(image)  # loads (and fully decodes) the pixels
    except Exception as e:  # Pillow raises many types for bad bytes
        head = raw[:8]
        raise BadRecordError(f"image bytes ({len(raw)} bytes, starting {head!r}) do not "
                             f"decode as {'/'.join(ENCODINGS)}: {type(e).__name__}: {e}") from e


def problem(record: Mapping[str, Any], max_caption_bytes: int | None,
            needs_caption: bool = True) -> str | None:
    """Why `record` cannot be trained on (or, `needs_caption=False`, classified), or None."""
    image = np.asarray(record["image"])
    if image.dtype != np.uint8:
        return f"image dtype is {image.dtype}, expected uint8"
    shape_ok = (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in CHANNELS))
    if not shape_ok or 0 in image.shape:
        return (f"image shape is {image.shape}, expected [H, W] or [H, W, C] with C in "
                f"{CHANNELS} and H, W > 0")
    if not needs_caption:
        return None
    caption = record["caption"]
    raw = caption.encode("utf-8") if isinstance(caption, str) else bytes(caption)
    if not raw.strip():
        return "caption is empty"
    if max_caption_bytes is not None and len(raw) > max_caption_bytes:
        return f"caption is {len(raw)} bytes long, over data.max_caption_bytes={max_caption_bytes}"
    return None


class SkipBad:
    """Record index → example, replacing a bad record by the next good one in the pool.

    The replacement of record r is the first good record among r+1, r+2, … (mod the
    pool size): a pure function of r, so every process, thread and resumed run makes
    the same choice and batches stay full. `load(r)` reads and preprocesses record r
    (raising for a bad one); the example gets `bad_records`: 1 if record r was bad.
    With `skip=False` the first bad record raises BadRecordError instead.
    """

    def __init__(self, load: Callable[[int], dict[str, np.ndarray]], size: int, skip: bool,
                 pool: str = "the training pool"):
        self.load, self.size, self.skip, self.pool = load, size, skip, pool

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        why, tries = "", min(MAX_CONSECUTIVE_BAD, self.size)
        for skipped in range(tries):
            record = (index + skipped) % self.size
            try:
                example = self.load(record)
            except Exception as e:  # a data source or decoder may raise anything
                why = reason(e)
                if not self.skip:
                    raise BadRecordError(
                        f"record {record} of {self.pool} is bad: {why} (set "
                        "config.faults.bad_records='skip' to skip bad records)") from e
                # Said by whichever process met it: the others never read this record.
                log.warning(f"skipping record {record} of {self.pool}: {why}",
                            every_process=True)
                continue
            # 1 per bad record met at this stream position: a run of bad records in a row
            # is counted once each, at its own position, not again by each replacement.
            example["bad_records"] = np.int32(skipped > 0)
            return example
        raise BadRecordError(
            f"records {index} to {index + tries - 1} (mod {self.size}) of "
            f"{self.pool} are all bad (last: {why}); the dataset looks broken")
