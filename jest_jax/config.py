"""The config contract: the documented defaults, experiment files, and start-up validation.

Each component owns its section (docs/design.md §4, "Config"): its `defaults()` documents
the fields and its `from_config` validates them, stating each allowed value once, next
to the code that uses it. This module assembles the defaults, loads experiment files by
path (`configs/*.py` are experiment files, not a package), and validates a whole config:
unknown keys at any depth (with a did-you-mean hint), every section, and the checks that
span sections. Nothing is read, built or compiled before a config has passed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any

import ml_collections

from jest_jax.checkpoint import CheckpointSpec
from jest_jax.data import sources
from jest_jax.data.pipeline import DataSpec
from jest_jax.embed import EmbedSpec
from jest_jax.evaluate import OPTIONS as EVAL_OPTIONS
from jest_jax.evaluate import REGISTRY as EVALUATORS
from jest_jax.evaluate import EvalSpec
from jest_jax.faults import FaultPolicy
from jest_jax.fields import (
    ConfigError,
    Section,
    did_you_mean,
    get_field,
    parse_assignment,
    set_fields,
)
from jest_jax.losses import Loss
from jest_jax.metrics import LoggingSpec
from jest_jax.models import ModelSpec
from jest_jax.optimizer import Optimizer
from jest_jax.reference import ReferenceSpec
from jest_jax.scoring import SelectionSpec
from jest_jax.sharding import MeshSpec

__all__ = ["ConfigError", "DATA_DIR", "Spec", "defaults", "get_field", "load", "parse_arg",
           "parse_assignment", "pool", "set_fields", "validate"]

DATA_DIR = sources.DATA_DIR
pool = sources.pool


def defaults() -> ml_collections.ConfigDict:
    """Every field with its default; experiment configs override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0                       # params, data order and selection all derive from it
    c.batch_size = 128               # global batch the learner trains on per step
    c.total_steps = 300              # learner steps; the LR schedule spans all of them
    c.data = DataSpec.defaults()
    c.model = ModelSpec.defaults()
    c.loss = Loss.defaults()
    c.optimizer = Optimizer.defaults()
    c.selection = SelectionSpec.defaults()
    c.selection.reference = ReferenceSpec.defaults()
    c.evals = EvalSpec.defaults()
    c.mesh = MeshSpec.defaults()
    c.checkpoint = CheckpointSpec.defaults()
    c.faults = FaultPolicy.defaults()
    c.logging = LoggingSpec.defaults()
    c.embed = EmbedSpec.defaults()
    return c


def parse_arg(arg: str | None, **fields: Any) -> ml_collections.ConfigDict:
    """Parse `"a=1,b=foo"` into a ConfigDict, typed like `fields` (which also set unset keys).

    Example: `parse_arg("stage=learner,runlocal=True", stage="reference", runlocal=False)`.
    """
    out = ml_collections.ConfigDict(fields)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not of the form key=value")
        if key not in fields:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(fields)}")
        kind = type(fields[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return out


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of an experiment file, `"path/to/file.py[:arg]"`: its `get_config(arg)`.

    Files are loaded by path, as `--config` does, so they work from any directory and
    need not be importable.
    """
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else f"{path}.py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}")
    name = f"_jest_jax_config_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated config: each section as its component's `from_config` built it."""

    config: ml_collections.ConfigDict
    seed: int
    batch_size: int
    total_steps: int
    data: DataSpec
    model: ModelSpec
    loss: Loss
    optimizer: Optimizer
    selection: SelectionSpec
    reference: ReferenceSpec
    evals: EvalSpec
    mesh: MeshSpec
    checkpoint: CheckpointSpec
    faults: FaultPolicy
    logging: LoggingSpec
    embed: EmbedSpec


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             check_files: bool = True) -> Spec:
    """Raise ConfigError for the first invalid field, else the validated `Spec`.

    `num_devices` adds the checks against the devices; `check_files=False` skips those
    that need the run's input files (tokenizer model, reference run), for compiling from
    abstract arrays.
    """
    _known_fields(config, defaults())
    top = Section(config)
    seed = top.integer("seed", 0, 2**32 - 1)
    batch = top.integer("batch_size", 1)
    total = top.integer("total_steps", 1)
    data = DataSpec.from_config(top.section("data"), check_files)
    model = ModelSpec.from_config(top.section("model"), data.image_size, data.text_len)
    _check_low_res_part(top, model, batch)
    loss = Loss.from_config(top.section("loss"))
    optimizer = Optimizer.from_config(top.section("optimizer"), total)
    selection = SelectionSpec.from_config(top.section("selection"), batch, data.image_size)
    reference = ReferenceSpec.from_config(
        top.section("selection").section("reference"), selection.needs_reference,
        config.selection.criterion, check_files)
    evals = EvalSpec.from_config(top.section("evals"))
    _check_eval_patches(top, evals, data.image_size)
    mesh = MeshSpec.from_config(top.section("mesh"))
    if num_devices is not None:
        _fit_devices(top, mesh, num_devices, selection, evals, model)
    return Spec(config, seed, batch, total, data, model, loss, optimizer, selection, reference,
                evals, mesh, CheckpointSpec.from_config(top.section("checkpoint")),
                FaultPolicy.from_config(top.section("faults")),
                LoggingSpec.from_config(top.section("logging")),
                EmbedSpec.from_config(top.section("embed"), config))


def _check_low_res_part(top: Section, model: ModelSpec, batch: int) -> None:
    """Multi-resolution training splits the batch: λ·b must be a whole number of examples."""
    if model.low_res_patch_size in (0, model.patch_size):
        return
    part = model.low_res_fraction * batch
    top.check(abs(part - round(part)) < 1e-6, "model.low_res_fraction", model.low_res_fraction,
              f"low_res_fraction × batch_size = {part:g} must be a whole number of examples")


def _check_eval_patches(top: Section, evals: EvalSpec, image_size: int) -> None:
    """A task evaluating at another patch size (FlexiViT) needs one that tiles the images."""
    for task in evals.tasks:
        patch = getattr(task, "patch_size", 0)
        top.check(patch == 0 or image_size % patch == 0, f"evals.{task.name}.patch_size",
                  patch, f"must be 0 (the model's) or divide data.image_size={image_size}")


def _fit_devices(top: Section, mesh: MeshSpec, num_devices: int, selection: SelectionSpec,
                 evals: EvalSpec, model: ModelSpec) -> None:
    """The cross-section checks: the mesh, and every batch split over the devices."""
    mesh.check(num_devices)
    # Each resolution's part is spread over every device (docs/design.md §1, multi-resolution).
    low = model.low_res_examples(selection.num_select)
    top.check(low % num_devices == 0, "model.low_res_fraction", model.low_res_fraction,
              f"gives a low-resolution part of {low} examples (of batch_size="
              f"{selection.num_select}), which must be divisible by the {num_devices} devices "
              "of the mesh: each device trains its share of both parts")
    top.check(selection.num_select % num_devices == 0, "batch_size", selection.num_select,
              f"must be divisible by the {num_devices} devices of the mesh")
    top.check(selection.num_candidates % num_devices == 0, "selection.filter_ratio",
              top.node.selection.filter_ratio, f"gives a super-batch of "
              f"{selection.num_candidates}, which must be divisible by the {num_devices} "
              "devices of the mesh")
    top.check(evals.batch_size % num_devices == 0, "evals.batch_size", evals.batch_size,
              f"must be divisible by the {num_devices} devices of the mesh")


def _schema(path: str, key: str, value: Any, schema: ml_collections.ConfigDict) -> Any:
    """The defaults `value` at `path + key` is checked against; None: not checkable here
    (an unknown evaluator kind or data source, which its own section's check reports)."""
    if path == "evals." and key not in EVAL_OPTIONS:
        # A task may have any name; its fields are those of its evaluator kind.
        kind = value.get("kind") if isinstance(value, ml_collections.ConfigDict) else None
        cls = EVALUATORS.find(kind)
        return None if cls is None else cls.defaults()
    if key not in schema:
        where = f"config.{path[:-1]}" if path else "config"
        raise ConfigError(f"config.{path}{key} is not a known field "
                          f"({did_you_mean(key, list(schema.keys()))}); the fields of {where} "
                          f"are {sorted(schema.keys())}")
    expected = schema[key]
    if (isinstance(expected, ml_collections.ConfigDict) and "source" in expected
            and isinstance(value, ml_collections.ConfigDict)):
        # A pool's fields are those of its data source.
        cls = sources.REGISTRY.find(value.get("source"))
        return None if cls is None else cls.defaults()
    return expected


def _known_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                  path: str = "") -> None:
    """ConfigError for a key, at any depth, that the schema does not have (a typo).

    An empty group in the defaults (`selection.criterion_args`) is free-form: its owner
    checks its keys.
    """
    for key in config.keys():
        value = config[key]
        expected = _schema(path, key, value, schema)
        if isinstance(expected, ml_collections.ConfigDict):
            Section(config, path[:-1]).check(
                isinstance(value, ml_collections.ConfigDict), key, value,
                f"must be a group of fields {sorted(expected.keys())}")
            if len(expected):
                _known_fields(value, expected, f"{path}{key}.")
