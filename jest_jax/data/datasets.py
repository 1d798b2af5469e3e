"""Opening a split of a TFDS dataset, building embedded datasets on first use.

The `tfds` data source (`jest_jax.data.sources.TfdsSource`) reads through `load_split`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from jest_jax import log
from jest_jax.data.shapes import JestShapes

# Builders that ship with jest_jax and are generated locally, without download.
EMBEDDED: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {"jest_shapes": JestShapes}

# Harmless TFDS chatter when running without TensorFlow / OpenCV.
_NOISY_PREFIXES = ("OpenCV is not installed", "Variant folder")


class _DropTfdsNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISY_PREFIXES)


def silence_tfds_noise() -> None:
    """Drops TFDS's warnings about missing OpenCV and half-written folders (idempotent)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropTfdsNoise) for f in logger.filters):
        logger.addFilter(_DropTfdsNoise())


def load_split(
    name: str, split: str, data_dir: str
) -> tuple[Sequence[dict[str, Any]], tfds.core.DatasetInfo]:
    """Random-access data source of `split` of dataset `name` in `data_dir`, and its info.

    `name` is a TFDS name (``"my_data"``, ``"my_data/config:1.0.0"``). Embedded
    datasets (``jest_shapes``, ``jest_shapes/tiny``) are built into `data_dir`
    on first use; anything else must already be prepared there. `data_dir` may
    also be a prepared version directory (as returned by
    `write_image_text_dataset`). `split` accepts TFDS slicing (``"raw[:1000]"``).
    Items of the source are dicts of numpy values (text as ``bytes``).
    """
    silence_tfds_noise()
    builder = _embedded_builder(name, data_dir) or _prepared_builder(name, data_dir)
    _check_split(name, split, builder.info)
    return builder.as_data_source(split=split), builder.info


def _embedded_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder | None:
    base, config, version = _parse_name(name)
    cls = EMBEDDED.get(base)
    if cls is None:
        return None
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if config is not None and config not in configs:
        raise ValueError(f"unknown config {config!r} of {base!r}; available: {configs}")
    if version is not None and version != str(cls.VERSION):
        raise ValueError(f"{base!r} is at version {cls.VERSION}, not {version}")

    def make() -> tfds.core.DatasetBuilder:
        return cls(config=config, data_dir=data_dir, file_format="array_record")

    builder = make()
    if builder.is_prepared():
        return builder
    with _build_lock(data_dir, builder.info.full_name):
        builder = make()  # another process may have built it while we waited
        if not builder.is_prepared():
            label = f"{base}/{builder.builder_config.name}"
            # Every process that builds says so: only one per data dir does (the lock).
            log.info(f"building {label} into {data_dir} (first use)...", every_process=True)
            start = time.perf_counter()
            prepare_quietly(builder)
            log.info(f"built {label} in {time.perf_counter() - start:.1f}s", every_process=True)
    return builder


def default_templates(name: str, label_key: str) -> list[str] | None:
    """Zero-shot prompt templates an embedded dataset ships for `label_key`, else None."""
    cls = EMBEDDED.get(_parse_name(name)[0])
    if cls is None or not hasattr(cls, "zero_shot_templates"):
        return None
    return cls.zero_shot_templates(label_key)


def _parse_name(name: str) -> tuple[str, str | None, str | None]:
    """``"ds/config:1.0.0"`` -> ``("ds", "config", "1.0.0")``, missing parts None."""
    rest, _, version = name.partition(":")
    base, _, config = rest.partition("/")
    return base, config or None, version or None


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    path = epath.Path(data_dir)
    if (path / "dataset_info.json").exists():
        return tfds.builder_from_directory(path)
    hint = (f"dataset {name!r} is not prepared in {data_dir!r}. Point data_dir at the folder "
            "holding <name>/<version>/, or convert your images and captions with "
            "jest_jax.data.write_image_text_dataset(data_dir, name, splits).")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(hint) from e
    if not builder.is_prepared():
        raise FileNotFoundError(hint)
    return builder


def _check_split(name: str, split: str, info: tfds.core.DatasetInfo) -> None:
    available = list(info.splits.keys())
    # "train[:10%]+test" names the splits "train" and "test".
    for part in split.split("+"):
        base = re.sub(r"\[.*\]$", "", part.strip())
        if base not in available:
            raise ValueError(f"unknown split {base!r} of {name!r}; available splits: {available}")


@contextlib.contextmanager
def _build_lock(data_dir: str, full_name: str) -> Iterator[None]:
    """Serialises builds of one dataset across processes (local data dirs only)."""
    if "://" in data_dir:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, "." + full_name.replace("/", "_") + ".lock")
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_quietly(builder: tfds.core.DatasetBuilder) -> None:
    """`download_and_prepare` without TFDS's banners and progress bars (errors still raise)."""
    silence_tfds_noise()
    # TFDS has no getter for this switch; default to on when it is not there.
    progress_was_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        with tempfile.TemporaryDirectory() as downloads, contextlib.redirect_stdout(io.StringIO()):
            # Nothing is downloaded; a temporary dir keeps `downloads/` out of data_dir.
            builder.download_and_prepare(
                download_dir=downloads,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        tfds.display_progress_bar(progress_was_on)
