"""grain input pipelines.

Training batches come from one global shuffled stream of record indices; at step s
the global batch is stream positions [s*B, (s+1)*B) and process p reads only its
contiguous slice of it. The global batch (and its order) is therefore the same for
any number of processes, and where a run stands is one global number: `Stream` turns it
into each process's iterator state, for any number of processes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from jest_jax import files
from jest_jax.data import sources
from jest_jax.data.records import BadRecordError, SkipBad, decode_image, problem, reason
from jest_jax.data.tokenizer import BYTES, TEXT_STYLES, Tokenizer, make_tokenizer
from jest_jax.fields import ConfigError, Section

_SKIP = ("image", "caption")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """`config.data`: the training pool and how every record becomes model inputs."""

    train: sources.DataSource
    image_size: int
    text_len: int
    tokenizer: str
    text_style: str
    num_threads: int
    max_caption_bytes: int
    num_workers: int = 0

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.train = sources.pool()         # the pool training batches are drawn from
        c.image_size = 32                # images are resized to this (square) on the host
        c.text_len = 32                  # tokens per caption, padded / truncated
        c.tokenizer = BYTES              # "bytes" or a path to a SentencePiece .model
        c.text_style = "jest"            # jest | siglip | siglip2: ids, padding, EOS and
        #                                  case as jest_jax, SigLIP or SigLIP 2 expect
        #                                  (jest_jax/data/tokenizer.py, docs/pretrained.md)
        c.num_threads = 2                # grain reader threads per process
        c.num_workers = 0                # grain worker processes decoding batches (each
        #                                  with num_threads threads); 0: in this process.
        #                                  Helps when JPEG decoding is the bottleneck and
        #                                  the host has more cores than the threads can use
        #                                  (docs/data.md). Batches and checkpoints are the
        #                                  same for any value
        c.max_caption_bytes = 1024       # a longer caption (UTF-8) is a bad record (see
        #                                  faults): web alt-text that long is markup or
        #                                  boilerplate. Shorter captions are truncated to
        #                                  text_len tokens as usual
        return c

    @classmethod
    def from_config(cls, section: Section, check_files: bool = True) -> DataSpec:
        """`check_files=False` skips the tokenizer file's existence (abstract compiles)."""
        train = sources.from_config(section.section("train"))
        tokenizer = section.get("tokenizer")
        section.check(tokenizer == BYTES or (isinstance(tokenizer, str) and tokenizer and (
            not check_files or files.is_file(tokenizer))), "tokenizer", tokenizer,
            f"must be {BYTES!r} or the path of a SentencePiece .model file")
        style = section.choice("text_style", TEXT_STYLES)
        section.check(style == "jest" or tokenizer != BYTES, "text_style", style,
                      f"needs data.tokenizer to be a SentencePiece model, not {BYTES!r}")
        return cls(train=train, image_size=section.integer("image_size", 1),
                   text_len=section.integer("text_len", 2), tokenizer=tokenizer,
                   text_style=style,
                   num_threads=section.integer("num_threads", 0),
                   num_workers=section.integer("num_workers", 0),
                   max_caption_bytes=section.integer("max_caption_bytes", 1))

    def preprocess(self, check_captions: bool = True) -> Preprocess:
        """Record → model inputs with this config's tokenizer; `check_captions=False` does
        not refuse over-long captions (the reference cache embeds the pool as it is)."""
        return Preprocess(self.image_size, self.make_tokenizer(), self.text_len,
                          self.max_caption_bytes if check_captions else None)

    def make_tokenizer(self) -> Tokenizer:
        try:
            return make_tokenizer(self.tokenizer, self.text_style)
        except ValueError as e:
            raise ConfigError(f"config.data.tokenizer={self.tokenizer!r}: {e}") from None

    def identity(self) -> dict[str, Any]:
        """The training pool and the preprocessing that turns it into inputs."""
        identity = {**self.train.identity(), "image_size": self.image_size,
                    "text_len": self.text_len, "tokenizer": self.tokenizer}
        if self.text_style != "jest":  # so caches made before the field existed still match
            identity["text_style"] = self.text_style
        return identity


class Preprocess:
    """Record → model inputs: uint8 image at `image_size`, int32 tokens, record index.

    Scalar numeric fields (labels, `is_clean`, scores, …) are kept for evaluation,
    diagnostics and criteria. An image may be a decoded array or encoded bytes (JPEG,
    PNG, WebP: `records.decode_image`). Images stay uint8 on the host; normalisation
    happens on device. A bad record (`records.problem`) raises BadRecordError.
    """

    def __init__(self, image_size: int, tokenizer: Tokenizer, text_len: int,
                 max_caption_bytes: int | None = None, captions: bool = True):
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.max_caption_bytes = max_caption_bytes
        self.captions = captions

    def without_captions(self) -> Preprocess:
        """For splits with images and labels only (zero-shot, probes): no `tokens`."""
        return Preprocess(self.image_size, self.tokenizer, self.text_len, captions=False)

    def __call__(self, record: Mapping[str, Any], index: int) -> dict[str, np.ndarray]:
        record = {**record, "image": decode_image(record["image"], self.image_size)}
        why = problem(record, self.max_caption_bytes, self.captions)
        if why is not None:
            raise BadRecordError(why)
        out = {
            "image": self._image(np.asarray(record["image"])),
            "index": np.int32(index),  # int32: JAX arrays default to 32 bits
        }
        if self.captions:
            out["tokens"] = self.tokenizer.encode(record["caption"], self.text_len)
        for key, value in record.items():
            value = np.asarray(value)
            if key not in _SKIP and value.ndim == 0 and value.dtype.kind in "biuf":
                out[key] = value
        return out

    def _image(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        image = image[..., :3].astype(np.uint8)
        if image.shape[:2] != (self.image_size, self.image_size):
            pil = Image.fromarray(image).resize((self.image_size, self.image_size), Image.BILINEAR)
            image = np.asarray(pil)
        return image


def train_dataset(
    source: Any,
    preprocess: Preprocess,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    attach: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    skip_bad_records: bool = True,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Infinite, shuffled (reshuffled each epoch) batches of this process's share.

    `attach(record_indices)` adds per-example arrays to each batch (e.g. cached reference
    embeddings: one read per batch, not per record).
    Bad records are replaced by the next good one, or raise with `skip_bad_records=False`
    (`records.SkipBad`); each
    example's `bad_records` is 1 where the record at its place was bad.
    `num_workers` > 0 decodes in that many grain worker processes (`_WorkerBatches`):
    the same batches, and the same iterator state, as in this process.
    """
    if len(source) < batch_size:
        raise ValueError(
            f"the training pool has {len(source)} examples, fewer than one global batch of "
            f"{batch_size}; use a larger pool or a smaller batch_size"
        )
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    local = batch_size // process_count
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
    ds = (
        grain.MapDataset.range(sys.maxsize)
        .map(_GlobalPosition(order, batch_size, local, process_index))
        .map(SkipBad(_Load(source, preprocess), len(source), skip_bad_records))
    )
    ds = ds.batch(local, drop_remainder=True)
    if attach is not None:  # outside SkipBad: a failing cache read is an error, not bad data
        ds = ds.map(_Attach(attach))
    # Buffer counts elements of the batched dataset: a couple of batches suffices.
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
    if num_workers:
        return _WorkerBatches(ds, options, num_workers)
    return ds.to_iter_dataset(options)


# Fields of a pool's identity that say where its records are, not which: a dataset copied
# to another disk or bucket is the same stream.
_LOCATION = ("data_dir",)


@dataclasses.dataclass(frozen=True)
class Stream:
    """What fixes the global training stream, and where a run stands in it.

    The stream is `shuffle(seed)` of the pool's record indices, reshuffled each epoch;
    step s draws its positions [s*N, (s+1)*N), N = `super_batch` (`batch_size` without
    selection). A checkpoint keeps `position(iterator)`: `stream_position`, the positions
    drawn so far, one number whatever the processes, devices or `data.num_workers`, next
    to what gives it its meaning. `resume` sets any process's iterator there, once
    `mismatch` found nothing that would make the same number mean other data.

    Bad records do not move positions: a bad record is replaced by the next good one of
    the pool (`records.SkipBad`), a function of the record index alone, so position p is
    the same example for every process count.
    """

    super_batch: int
    batch_size: int
    seed: int
    pool_size: int
    pool: dict[str, Any]

    def position(self, iterator: grain.DatasetIterator) -> dict[str, Any]:
        """The JSON a checkpoint keeps for `iterator` (any process's: they agree)."""
        batches = int(iterator.get_state()["next_index"])  # this process's = global batches
        return {"stream_position": batches * self.super_batch, **dataclasses.asdict(self)}

    def mismatch(self, saved: dict[str, Any]) -> str | None:
        """Why `saved` cannot be resumed by this stream, naming each difference; None if it can.

        A position saved before positions were global (grain's own per-process state,
        `{"next_index": k}`: k batches, the same on every process) records nothing to
        compare, and is taken as it is.
        """
        if "stream_position" not in saved:
            return None
        differ = [f"{what}={saved.get(key)!r} (this run has {getattr(self, key)!r})"
                  for key, what in (("batch_size", "batch_size"),
                                    ("super_batch", "a super-batch N"),
                                    ("seed", "seed"), ("pool_size", "data.train's size"))
                  if saved.get(key) != getattr(self, key)]
        if _which(saved.get("pool", {})) != _which(self.pool):
            differ.append(f"data.train={_which(saved.get('pool', {}))} "
                          f"(this run has {_which(self.pool)})")
        return "; ".join(differ) or None

    def resume(self, iterator: grain.DatasetIterator, saved: dict[str, Any]) -> None:
        """Put `iterator` (this process's share) at the saved position."""
        batches = (saved["stream_position"] // self.super_batch if "stream_position" in saved
                   else int(saved["next_index"]))
        iterator.set_state({"next_index": batches})


def _which(identity: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in _LOCATION}


class _WorkerBatches(grain.IterDataset):
    """`batches.to_iter_dataset(options)` decoded by `num_workers` grain worker processes.

    grain's `mp_prefetch` gives worker w the batches w, w + K, … and interleaves them
    back in order, so the batches are those of the in-process pipeline; but its own
    iterator state is one position per worker, tied to K. This iterator's state is the
    in-process one (`{"next_index": n}`, n batches delivered), so a checkpoint resumes
    with any `data.num_workers`: set_state restarts the workers at batch n.
    """

    def __init__(self, batches: grain.MapDataset, options: grain.ReadOptions, num_workers: int):
        super().__init__()
        self.batches, self.options, self.num_workers = batches, options, num_workers

    def __iter__(self) -> _WorkerIterator:
        return _WorkerIterator(self)


class _WorkerIterator(grain.DatasetIterator):
    def __init__(self, dataset: _WorkerBatches):
        super().__init__()
        self._dataset = dataset
        self._position = 0
        self._workers: grain.DatasetIterator | None = None  # started on first use

    def __next__(self) -> dict[str, np.ndarray]:
        if self._workers is None:
            _flags_for_workers()
            d = self._dataset
            self._workers = iter(d.batches[self._position:].to_iter_dataset(d.options)
                                 .mp_prefetch(grain.MultiprocessingOptions(
                                     num_workers=d.num_workers)))
        batch = next(self._workers)
        self._position += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self._stop_workers()
        self._position = int(state["next_index"])

    def close(self) -> None:
        self._stop_workers()
        super().close()

    def _stop_workers(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None


def _flags_for_workers() -> None:
    """grain reads its absl flags when it starts worker processes; a program that did not
    parse flags (a library user, pytest) gets their defaults instead of an error."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _GlobalPosition:
    """This process's j-th example → record index at its place in the global stream.

    Batches are consecutive runs of the stream, so a batch that crosses an epoch
    boundary may (rarely, and only when the pool is small) hold one record twice.
    """

    def __init__(self, order: grain.MapDataset, batch_size: int, local: int, process_index: int):
        self.order, self.batch_size, self.local, self.offset = (
            order, batch_size, local, process_index * local)

    def __call__(self, j: int) -> int:
        step, k = divmod(j, self.local)
        return int(self.order[step * self.batch_size + self.offset + k])


class _Load:
    def __init__(self, source: Any, preprocess: Preprocess):
        self.source, self.preprocess = source, preprocess

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return self.preprocess(self.source[index], index)


class _Attach:
    """Adds `attach(records)` to a batch, for the records actually used (a bad one's
    replacement)."""

    def __init__(self, attach: Callable[[np.ndarray], dict[str, np.ndarray]]):
        self.attach = attach

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, **self.attach(batch["index"])}


def eval_batches(
    source: Any,
    preprocess: Preprocess,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
    offset: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over records offset..limit; the last batch is zero-padded and
    `mask` marks real rows."""
    total = len(source) if limit is None else min(limit, len(source))
    local = batch_size // process_count
    for start in range(offset, total, batch_size):
        first = start + process_index * local
        rows = [_eval_example(source, preprocess, i)
                for i in range(first, min(first + local, total))]
        template = rows[0] if rows else preprocess(source[0], 0)
        batch = {}
        for key, value in template.items():
            stacked = np.zeros((local, *np.shape(value)), np.asarray(value).dtype)
            for r, row in enumerate(rows):
                stacked[r] = row[key]
            batch[key] = stacked
        batch["mask"] = np.arange(local) < len(rows)
        yield batch


def _eval_example(source: Any, preprocess: Preprocess, index: int) -> dict[str, np.ndarray]:
    # Read whole, never skipped over (that would change an eval metric): a bad record is an error.
    try:
        return preprocess(source[index], index)
    except Exception as e:  # the data source's decoder may raise anything
        raise BadRecordError(f"record {index} is bad: {reason(e)} (evaluation splits, and "
                             "data.train under --mode cache, are read whole, without "
                             "skipping)") from e
