"""Zero-shot class names and prompt templates: the built-in benchmark sets, files, inline
lists.

A zero-shot task's `class_names` and `templates` fields each hold a list of strings read
one of four ways (`TextList.parse`):

- empty: the dataset's own (its ClassLabel names; its templates, else generic ones);
- one built-in set name: `class_names=("imagenet",)`, `templates=("clip_imagenet_80",)`
  (the files under `jest_jax/data/benchmarks/`, with their source and licence);
- one file path, local or `gs://...` (read with etils.epath): `.json` holds a list of
  strings, any other file one entry per line (blank lines ignored);
- the entries themselves, inline (a template holds `{}` where the class name goes).

A plain string is taken as a one-entry list, so `--config.evals.t.class_names=imagenet`
works from the command line. The set names are checked when the config is validated;
files are read by the evaluator's check, before training starts.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json

from etils import epath

from jest_jax.fields import ConfigError, Section, did_you_mean

# Built-in sets: jest_jax/data/benchmarks/<name>.txt (README.md there cites the source).
CLASS_NAME_SETS = ("imagenet", "cifar10", "cifar100")
TEMPLATE_SETS = ("clip_imagenet_80", "clip_cifar_18")
SLOT = "{}"  # where a template takes the class name


def builtin(name: str) -> list[str]:
    """A built-in set's entries, in order."""
    text = (importlib.resources.files("jest_jax.data") / "benchmarks" / f"{name}.txt").read_text(
        encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_list(path: str) -> list[str]:
    """The strings in a file: a JSON list (.json), else one per non-blank line."""
    text = epath.Path(path).read_text()
    if path.endswith(".json"):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("a .json file must hold a list of strings")
        return [s.strip() for s in items]
    return [line.strip() for line in text.splitlines() if line.strip()]


def fill(template: str, name: str) -> str:
    """The prompt of `template` for class `name` (no str.format: names may hold braces)."""
    return template.replace(SLOT, name)


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".txt", ".json"))


@dataclasses.dataclass(frozen=True)
class TextList:
    """Where one list of strings comes from: `kind` is "dataset" (none given), "set",
    "file" or "inline"; `field` is the config field, for messages."""

    kind: str
    value: tuple[str, ...]
    field: str
    templates: bool

    @classmethod
    def parse(cls, section: Section, name: str, templates: bool) -> TextList:
        """Validate field `name` of `section` (no I/O): ConfigError naming it. An absent
        field is the dataset's own (tasks written before the field existed)."""
        value = section.node[name] if name in section.node else ()
        if isinstance(value, str):  # one entry (as the command line gives it); "": none
            value = (value,) if value else ()
        section.check(isinstance(value, tuple | list) and all(
            isinstance(v, str) and v.strip() for v in value), name, value,
            "must be a list of non-empty strings")
        field, value = section.field(name), tuple(value)
        sets = TEMPLATE_SETS if templates else CLASS_NAME_SETS
        if not value:
            return cls("dataset", value, field, templates)
        if len(value) == 1 and not (templates and SLOT in value[0]):
            if value[0] in sets:
                return cls("set", value, field, templates)
            if _looks_like_path(value[0]):
                return cls("file", value, field, templates)
            what = "templates" if templates else "class_names"
            raise section.error(name, value[0], (
                f"unknown {what} set ({did_you_mean(value[0], sets)}); built-in sets: "
                f"{list(sets)}. Or give a file path (.json: a list; else one per line), or "
                + ("templates inline, each with '{}' where the class name goes"
                   if templates else "at least two class names inline")))
        if templates:
            for template in value:
                section.check(SLOT in template, name, value,
                              f"template {template!r} has no '{{}}' for the class name")
        return cls("inline", value, field, templates)

    @property
    def given(self) -> bool:
        return self.kind != "dataset"

    def load(self) -> list[str]:
        """The entries (not for kind "dataset"); ConfigError naming the field if a file is
        missing, unreadable or empty, or a template lacks '{}'."""
        if self.kind == "set":
            items = builtin(self.value[0])
        elif self.kind == "file":
            try:
                items = read_list(self.value[0])
            except (OSError, ValueError) as e:  # missing, unreadable, bad JSON
                raise ConfigError(f"config.{self.field}: cannot read {self.value[0]!r}: "
                                  f"{type(e).__name__}: {e}") from None
            if not items:
                raise ConfigError(f"config.{self.field}: {self.value[0]!r} holds no entries")
        else:
            items = list(self.value)
        if self.templates:
            for template in items:
                if SLOT not in template:
                    raise ConfigError(f"config.{self.field}: template {template!r} (from "
                                      f"{self.value[0]!r}) has no '{{}}' for the class name")
        return items
