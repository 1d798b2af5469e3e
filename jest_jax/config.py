"""Start-up validation of experiment configs: one clear message naming the field.

Runs before any data is read or anything is compiled.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from configs import common
from jest_jax import criteria
from jest_jax.models import VARIANTS
from jest_jax.scoring import IMPLEMENTATIONS, METHODS, super_batch_size

EVAL_KINDS = ("zero_shot", "retrieval")
EVAL_OPTIONS = ("every_steps", "batch_size", "max_examples")
NONFINITE_POLICIES = ("stop", "skip")
BAD_RECORD_POLICIES = ("skip", "error")


class ConfigError(ValueError):
    """An invalid config field; the message names the field, its value and what is allowed."""


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
    """`config` value at dotted `field` ("data.train.split"); ConfigError if missing."""
    node: Any = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config.{field} is missing")
        node = node[part]
    return node


def _int(config, field: str, low: int, high: float = float("inf")) -> int:
    value = get_field(config, field)
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           field, value, f"must be an integer in [{low}, {high}]")
    return value


def _float(config, field: str, ok: Callable[[float], bool] = lambda v: True,
           allowed: str = "") -> float:
    """A finite number (not a bool), and in range by `ok` (`allowed` says which)."""
    value = get_field(config, field)
    _check(isinstance(value, (int, float)) and not isinstance(value, bool)
           and math.isfinite(value), field, value, "must be a finite number")
    _check(ok(value), field, value, allowed)
    return float(value)


def _choice(config, field: str, choices: tuple) -> Any:
    value = get_field(config, field)
    _check(value in choices, field, value, f"must be one of {list(choices)}")
    return value


def _pool(config, field: str) -> None:
    for key in ("name", "split", "data_dir"):
        value = get_field(config, f"{field}.{key}")
        _check(isinstance(value, str) and value != "", f"{field}.{key}", value,
               "must be a non-empty string")


@functools.cache
def _schema() -> ml_collections.ConfigDict:
    """Every known field: the shared defaults of `configs/common.py`, which document them."""
    return common.get_base_config()


def _known_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                  path: str = "") -> None:
    """ConfigError for a key, at any depth, that the schema does not have (a typo)."""
    tasks = {task.kind: task for name, task in _schema().evals.items() if name not in EVAL_OPTIONS}
    for key in config.keys():
        value, field = config[key], f"{path}{key}"
        if path == "evals." and key not in EVAL_OPTIONS:
            # A task may have any name; its fields are those of the shipped task of its kind.
            kind = value.get("kind") if isinstance(value, ml_collections.ConfigDict) else None
            expected = tasks.get(kind)  # an unknown kind is reported by the task checks
        elif key in schema:
            expected = schema[key]
        else:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "typo?"
            where = f"config.{path[:-1]}" if path else "config"
            raise ConfigError(f"config.{field} is not a known field ({hint}); the fields of "
                              f"{where} are {sorted(schema.keys())}")
        if isinstance(expected, ml_collections.ConfigDict):
            _check(isinstance(value, ml_collections.ConfigDict), field, value,
                   f"must be a group of fields {sorted(expected.keys())}")
            _known_fields(value, expected, field + ".")


def _bool(config, field: str) -> bool:
    value = get_field(config, field)
    _check(isinstance(value, bool), field, value, "must be True or False")
    return value


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError for the first invalid field; `num_devices` enables mesh checks."""
    _known_fields(config, _schema())
    _int(config, "seed", 0, 2**32 - 1)
    batch = _int(config, "batch_size", 1)
    _int(config, "total_steps", 1)

    _pool(config, "data.train")
    image_size = _int(config, "data.image_size", 1)
    _int(config, "data.text_len", 2)
    _int(config, "data.num_threads", 0)
    _int(config, "data.max_caption_bytes", 1)
    tokenizer = get_field(config, "data.tokenizer")
    _check(tokenizer == "bytes" or (isinstance(tokenizer, str) and os.path.isfile(tokenizer)),
           "data.tokenizer", tokenizer,
           "must be 'bytes' or the path of a SentencePiece .model file")

    for tower in ("image_variant", "text_variant"):
        _choice(config, f"model.{tower}", tuple(VARIANTS))
    patch = _int(config, "model.patch_size", 1)
    _check(image_size % patch == 0, "model.patch_size", patch,
           f"must divide data.image_size={image_size}")
    _int(config, "model.embed_dim", 1)
    _choice(config, "model.dtype", ("float32", "bfloat16"))
    _choice(config, "model.image_pool", ("map", "gap"))
    _bool(config, "model.remat")
    _float(config, "model.temperature_init", lambda v: v > 0, "must be > 0")
    _float(config, "model.bias_init")

    loss = _choice(config, "loss.name", ("sigmoid", "softmax"))
    implementation = _choice(config, "loss.implementation", ("dense", "chunked"))
    _check(implementation == "dense" or loss == "sigmoid", "loss.implementation",
           implementation, "'chunked' exists for the sigmoid loss only; use 'dense'")

    _float(config, "optimizer.learning_rate", lambda v: v > 0, "must be > 0")
    _float(config, "optimizer.warmup_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _float(config, "optimizer.b1", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _float(config, "optimizer.b2", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _float(config, "optimizer.weight_decay", lambda v: v >= 0, "must be >= 0")
    _float(config, "optimizer.clip_norm", lambda v: v > 0, "must be > 0")

    super_batch = _selection(config, batch, image_size)

    _int(config, "evals.every_steps", 0)
    _int(config, "evals.batch_size", 1)
    max_examples = get_field(config, "evals.max_examples")
    _check(isinstance(max_examples, int) and not isinstance(max_examples, bool)
           and (max_examples == -1 or max_examples > 0),
           "evals.max_examples", max_examples, "must be -1 (whole split) or a positive integer")
    for name, task in config.evals.items():
        if name in EVAL_OPTIONS:
            continue
        _check(isinstance(task, ml_collections.ConfigDict) and task.get("kind") in EVAL_KINDS,
               f"evals.{name}", task if not isinstance(task, ml_collections.ConfigDict)
               else task.get("kind"), f"must be a dict with kind in {list(EVAL_KINDS)}")
        _pool(config, f"evals.{name}.data")
        if task.kind == "zero_shot":
            keys = get_field(config, f"evals.{name}.label_keys")
            _check(isinstance(keys, (tuple, list)) and len(keys) > 0
                   and all(isinstance(k, str) and k for k in keys), f"evals.{name}.label_keys",
                   keys, "must be a non-empty list of label feature names")
            templates = get_field(config, f"evals.{name}.templates")
            _check(isinstance(templates, (tuple, list))
                   and all(isinstance(t, str) and "{}" in t for t in templates),
                   f"evals.{name}.templates", templates,
                   "must be a list of prompt strings, each with one '{}' for the class name "
                   "(empty: the dataset's own)")

    axes, shape = get_field(config, "mesh.axes"), get_field(config, "mesh.shape")
    _check(isinstance(axes, (tuple, list)) and len(axes) > 0 and len(set(axes)) == len(axes)
           and all(isinstance(a, str) and a for a in axes),
           "mesh.axes", axes, "must be a non-empty list of distinct axis names (strings)")
    _check(isinstance(shape, (tuple, list)) and len(shape) == len(axes)
           and all(isinstance(s, int) and not isinstance(s, bool) and (s == -1 or s > 0)
                   for s in shape)
           and list(shape).count(-1) <= 1,
           "mesh.shape", shape, f"must give one size per axis of {tuple(axes)} "
           "(positive, or -1 once for 'the rest')")
    rules = get_field(config, "mesh.rules")
    _check(isinstance(rules, (tuple, list)), "mesh.rules", rules,
           "must be a list of (regex, spec) pairs")
    from jest_jax.sharding import mesh_shape, parse_rule

    for i, rule in enumerate(rules):
        try:
            parse_rule(rule, axes)
        except ValueError as e:
            raise ConfigError(f"config.mesh.rules[{i}]={rule!r} is invalid: {e}") from None
    if num_devices is not None:

        try:
            mesh_shape(axes, shape, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(batch % num_devices == 0, "batch_size", batch,
               f"must be divisible by the {num_devices} devices of the mesh")
        _check(super_batch % num_devices == 0, "selection.filter_ratio",
               config.selection.filter_ratio, f"gives a super-batch of {super_batch}, which "
               f"must be divisible by the {num_devices} devices of the mesh")
        eval_batch = config.evals.batch_size
        _check(eval_batch % num_devices == 0, "evals.batch_size", eval_batch,
               f"must be divisible by the {num_devices} devices of the mesh")

    _int(config, "checkpoint.every_steps", 1)
    _int(config, "checkpoint.max_to_keep", 1)
    _choice(config, "faults.nonfinite", NONFINITE_POLICIES)
    _choice(config, "faults.bad_records", BAD_RECORD_POLICIES)
    _int(config, "logging.every_steps", 1)
    _bool(config, "logging.tensorboard")


def _selection(config, batch: int, image_size: int) -> int:
    """Check `config.selection`; returns the super-batch size N."""
    method = _choice(config, "selection.method", METHODS)
    ratio = _float(config, "selection.filter_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)")
    try:
        super_batch = super_batch_size(batch, ratio)
    except ValueError as e:
        raise ConfigError(f"config.selection.filter_ratio={ratio!r} is invalid: {e}; choose "
                          "f so that batch_size / (1 - f) is a whole number") from None
    _check(method == "uniform" or ratio > 0, "selection.filter_ratio", ratio,
           f"must be > 0 for method {method!r}: with 0 the super-batch is the batch and "
           "there is nothing to select from (the paper uses 0.8)")
    chunks = _int(config, "selection.num_chunks", 1)
    if method == "joint":
        _check(batch % chunks == 0, "selection.num_chunks", chunks,
               f"must divide batch_size={batch}")
    _float(config, "selection.score_gain")
    _choice(config, "selection.sampling", ("topk", "sample"))
    _choice(config, "selection.implementation", IMPLEMENTATIONS)
    patch = _int(config, "selection.score_patch_size", 0)
    _check(patch == 0 or image_size % patch == 0, "selection.score_patch_size", patch,
           f"must be 0 or divide data.image_size={image_size}")
    name = get_field(config, "selection.criterion")
    try:
        criterion = criteria.get(name)
    except ValueError as e:
        raise ConfigError(f"config.selection.criterion={name!r} is invalid: {e}") from None
    for key in ("workdir", "cache_dir"):
        value = get_field(config, f"selection.reference.{key}")
        _check(isinstance(value, str), f"selection.reference.{key}", value, "must be a string")
    if method != "uniform" and criteria.needs_reference(criterion):
        workdir = config.selection.reference.workdir
        _check(workdir != "", "selection.reference.workdir", workdir,
               f"criterion {name!r} needs a reference model: give the workdir of a run "
               "trained on curated data")
        ckpt_dir = os.path.join(workdir, "checkpoints")
        _check(os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)),
               "selection.reference.workdir", workdir,
               "has no checkpoint; train the reference there first")
    return super_batch
