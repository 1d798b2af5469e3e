"""Data sources: where a pool of image–caption records comes from (docs/design.md §4,
"Data source").

Every pool in a config (`data.train`, each evaluator's `data`) is a group whose `source`
names a registered `DataSource` class (or `"package.module:Class"`); the class owns the
group's other fields. `open()` gives a `Pool`: random access to records, each a dict
with `image` (uint8 [H, W, C] or encoded bytes the source decodes), `caption` (str or
bytes) and any scalar fields (labels, flags, scores), which reach evaluators and
criteria.

Built in: `tfds`, a TFDS dataset in ArrayRecord format (embedded builders such as
`jest_shapes` are built into `data_dir` on first use).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import ml_collections

from jest_jax.fields import ConfigError, Section, get_field
from jest_jax.registry import Registry

DATA_DIR = os.environ.get("JEST_DATA_DIR", os.path.expanduser("~/.cache/jest_jax/datasets"))


class Pool(Protocol):
    """An opened split: random access to its records."""

    description: str  # for messages: "jest_shapes/tiny:eval"
    features: Sequence[str]  # the record fields

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...

    def class_names(self, feature: str) -> list[str] | None:
        """The class names of a class-label `feature`, else None."""

    def templates(self, feature: str) -> list[str] | None:
        """Zero-shot prompt templates the data ships for `feature`, else None."""


class DataSource(Protocol):
    """The contract every registered data source meets."""

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        """The group's fields, `source` included (the schema typos are checked against)."""

    @classmethod
    def from_config(cls, section: Section) -> DataSource:
        """Validate the group (ConfigError naming the field); no I/O."""

    def open(self) -> Pool:
        """The records (ValueError / FileNotFoundError saying what is wrong)."""

    def identity(self) -> dict[str, Any]:
        """What names this data: equal identities mean the same records (caches use it)."""


REGISTRY: Registry[type[DataSource]] = Registry(
    "data source", "Class", needs=("defaults", "from_config", "open", "identity"))


def pool(name: str = "jest_shapes", split: str = "curated", data_dir: str = DATA_DIR) -> dict:
    """A TFDS split as a config group (embedded builders are built on first use)."""
    return dict(source="tfds", name=name, split=split, data_dir=data_dir)


def from_config(section: Section) -> DataSource:
    """The data source the group `section` names."""
    kind = section.get("source")
    try:
        cls = REGISTRY.get(kind)
    except ValueError as e:
        raise section.error("source", kind, str(e)) from None
    return cls.from_config(section)


def open_source(source: DataSource, field: str) -> Pool:
    """`source.open()`; failures become ConfigErrors naming the config `field`."""
    try:
        return source.open()
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.{field}: {e}") from None


def open_pool(config: ml_collections.ConfigDict, field: str) -> Pool:
    """The pool at config `field` ("data.train"), opened; failures name the field."""
    return open_source(from_config(Section(get_field(config, field), field)), field)


@REGISTRY.register("tfds")
@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A split of a TFDS dataset prepared (or embedded) in `data_dir`."""

    name: str
    split: str
    data_dir: str

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(pool())

    @classmethod
    def from_config(cls, section: Section) -> TfdsSource:
        return cls(*(section.string(k, nonempty=True) for k in ("name", "split", "data_dir")))

    def open(self) -> Pool:
        from jest_jax.data.datasets import load_split  # TFDS is imported only to read data

        source, info = load_split(self.name, self.split, self.data_dir)
        return TfdsPool(self, source, info)

    def identity(self) -> dict[str, Any]:
        # URLs (gs://...) are already absolute; realpath would make them relative to the cwd.
        data_dir = self.data_dir if "://" in self.data_dir else os.path.realpath(self.data_dir)
        return {"name": self.name, "split": self.split, "data_dir": data_dir}


class TfdsPool:
    """A TFDS random-access data source with its dataset info."""

    def __init__(self, spec: TfdsSource, source: Sequence[Mapping[str, Any]], info: Any):
        self._source, self.info = source, info
        self.description = f"{spec.name}:{spec.split}"
        self.features = sorted(info.features.keys())
        self._name = spec.name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self._source[index]

    def class_names(self, feature: str) -> list[str] | None:
        feature = self.info.features[feature] if feature in self.info.features else None
        return list(feature.names) if hasattr(feature, "names") else None

    def templates(self, feature: str) -> list[str] | None:
        from jest_jax.data.datasets import default_templates

        return default_templates(self._name, feature)
