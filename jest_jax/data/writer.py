"""Converting user images and captions into a TFDS ArrayRecord dataset."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jest_jax.data.datasets import prepare_quietly, silence_tfds_noise
from jest_jax.data.shapes import encode_png

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


def write_image_text_dataset(
    data_dir: str,
    name: str,
    splits: Mapping[str, Iterable[dict]],
    class_names: Sequence[str] | None = None,
    version: str = "1.0.0",
) -> str:
    """Writes image–caption pairs as the TFDS dataset `name` in `data_dir`.

    Each example is ``{"image": uint8[H, W, 3], "caption": str}`` plus
    ``"label": int`` (an index into `class_names`) when `class_names` is given.
    Examples are validated as they stream in and stored in the order given.
    Returns the dataset directory ``data_dir/name/version``; read it back with
    ``load_split(name, split, data_dir)``. Refuses to overwrite an existing
    dataset of the same name and version.
    """
    silence_tfds_noise()
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} must be snake_case (lowercase letters, digits, _)")
    if not splits:
        raise ValueError("splits is empty: give at least one split, e.g. {'train': examples}")
    for split in splits:
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            raise ValueError(f"split name {split!r} must be letters, digits or '_'")
    if class_names is not None:
        class_names = list(class_names)
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError("class_names must be a non-empty list of distinct names")

    features: dict[str, tfds.features.FeatureConnector] = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "caption": tfds.features.Text(),
    }
    if class_names is not None:
        features["label"] = tfds.features.ClassLabel(names=class_names)
    builder = _ImageTextBuilder(
        name=name,
        version=version,
        features=tfds.features.FeaturesDict(features),
        splits={s: _encoded(s, examples, class_names) for s, examples in splits.items()},
        data_dir=data_dir,
        file_format="array_record",
    )
    if builder.is_prepared():
        raise FileExistsError(
            f"dataset {name!r} version {version} already exists at {builder.data_dir}; "
            "delete it or write under another name or version")
    prepare_quietly(builder)
    return str(builder.data_dir)


def _encoded(
    split: str, examples: Iterable[dict], class_names: list[str] | None
) -> Iterator[tuple[int, dict]]:
    """Validates and PNG-encodes examples lazily, so splits may be streams."""
    index = -1
    for index, example in enumerate(examples):
        where = f"split {split!r}, example {index}"
        yield index, _encode_example(example, class_names, where)
    if index < 0:
        raise ValueError(f"split {split!r} has no examples")


def _encode_example(example: Any, class_names: list[str] | None, where: str) -> dict:
    if not isinstance(example, Mapping):
        raise ValueError(
            f"{where}: expected a dict with 'image' and 'caption', got {type(example).__name__}")
    allowed = {"image", "caption"} | ({"label"} if class_names is not None else set())
    missing = {"image", "caption"} - set(example)
    if missing:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)}")
    if "label" in example and class_names is None:
        raise ValueError(f"{where}: has a 'label' but no class_names were given")
    if "label" not in example and class_names is not None:
        raise ValueError(f"{where}: missing 'label' (required when class_names is given)")
    extra = set(example) - allowed
    if extra:
        raise ValueError(f"{where}: unexpected key(s) {sorted(extra)}; allowed: {sorted(allowed)}")

    image = example["image"]
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: image dtype must be uint8, got {image.dtype}")
    if image.ndim != 3:
        raise ValueError(f"{where}: image must have shape [H, W, 3], got {image.shape}")
    if image.shape[-1] != 3:
        raise ValueError(f"{where}: image must have 3 (RGB) channels, got {image.shape[-1]} "
                         f"(shape {image.shape})")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: image is empty, shape {image.shape}")

    caption = example["caption"]
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be a str, got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError(f"{where}: caption is empty")

    out = {"image": encode_png(image), "caption": caption}
    if class_names is not None:
        label = example["label"]
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"{where}: label must be an int, got {type(label).__name__}")
        if not 0 <= label < len(class_names):
            raise ValueError(f"{where}: label {label} out of range [0, {len(class_names)})")
        out["label"] = int(label)
    return out


class _ImageTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder for one dataset given as in-memory or streamed splits.

    TFDS's own `AdhocBuilder` imports TensorFlow to type-check its inputs,
    hence this small replacement.
    """

    def __init__(self, *, name: str, version: str, features: tfds.features.FeaturesDict,
                 splits: Mapping[str, Iterator[tuple[int, dict]]], **kwargs: Any):
        # Set before DatasetBuilder.__init__, which reads them to locate the data.
        self.name = name
        self.VERSION = tfds.core.Version(version)
        self._features = features
        self._splits = splits
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # No dataset code file to point at (and TFDS's lookup needs `importlib_resources`).
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs written by jest_jax.data.write_image_text_dataset.",
            features=self._features,
            disable_shuffling=True,  # record i of a split is the i-th example given
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager
        return {split: self._generate_examples(ex) for split, ex in self._splits.items()}

    def _generate_examples(self, examples: Iterator) -> Iterator[tuple[int, dict]]:
        yield from examples
