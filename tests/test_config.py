"""Config parsing and start-up validation: each invalid field fails with its own message."""

from __future__ import annotations

import ml_collections
import pytest

from conftest import load_config
from jest_jax import config as config_lib
from jest_jax.config import ConfigError, validate


def test_parse_arg_types_from_defaults():
    arg = config_lib.parse_arg("steps=7,stage=learner,runlocal=true", steps=1, stage="x",
                           runlocal=False)
    assert (arg.steps, arg.stage, arg.runlocal) == (7, "learner", True)
    with pytest.raises(ValueError, match="unknown config argument 'stpes'"):
        config_lib.parse_arg("stpes=3", steps=1)
    with pytest.raises(ValueError, match="not of the form key=value"):
        config_lib.parse_arg("steps", steps=1)


def test_overrides_set_existing_fields_and_name_where_a_typo_was_written():
    parse = config_lib.parse_assignment
    assert parse("batch_size=1024") == ("batch_size", 1024)
    assert parse("model.remat=False") == ("model.remat", False)
    assert parse("evals.tasks=('zero_shot',)") == ("evals.tasks", ("zero_shot",))
    assert parse("data.train.split=curated") == ("data.train.split", "curated")  # bare string
    with pytest.raises(ConfigError, match="'batch_size' is not FIELD=VALUE"):
        parse("batch_size")
    config = load_config("smoke.py")
    config_lib.set_fields(config, {"batch_size": 12, "model.remat": True}, "--set")
    assert (config.batch_size, config.model.remat) == (12, True)
    for field in ("batch_sise", "model.remmat", "modle.remat", "batch_size.x"):
        with pytest.raises(ConfigError, match=rf"^--set: config\.{field} does not exist"):
            config_lib.set_fields(config, {field: 1}, "--set")
    assert config.batch_size == 12 and "batch_sise" not in config


@pytest.mark.parametrize("arg", ["stage=reference", "stage=learner", "stage=learner,runlocal=1"])
def test_shipped_configs_are_valid(arg):
    validate(load_config("shapes.py", arg), num_devices=1)
    validate(load_config("smoke.py"), num_devices=1)


def test_shapes_stage_selects_pool():
    assert load_config("shapes.py", "stage=reference").data.train.split == "curated"
    assert load_config("shapes.py", "stage=learner").data.train.split == "raw"
    with pytest.raises(ValueError, match="stage='teacher'"):
        load_config("shapes.py", "stage=teacher")


INVALID = [
    # (field path, bad value, expected message fragment)
    ("batch_size", 0, r"config.batch_size=0 is invalid: must be an integer in \[1"),
    ("batch_size", 30, "config.batch_size=30 is invalid: must be divisible by the 8 devices"),
    ("total_steps", -5, "config.total_steps=-5 is invalid"),
    ("seed", -1, r"config.seed=-1 is invalid: must be an integer in \[0"),
    ("model.patch_size", 5, "config.model.patch_size=5 is invalid: must divide data.image_size=16"),
    ("model.image_variant", "XXL", "config.model.image_variant='XXL' is invalid: must be one of"),
    ("model.dtype", "float16", "config.model.dtype='float16' is invalid"),
    ("loss.name", "hinge", "config.loss.name='hinge' is invalid: must be one of"),
    ("optimizer.learning_rate", 0.0, "config.optimizer.learning_rate=0.0 is invalid: must be > 0"),
    ("optimizer.warmup_fraction", 1.0, "config.optimizer.warmup_fraction=1.0 is invalid"),
    ("optimizer.b2", 1.0, r"config.optimizer.b2=1.0 is invalid: must be in \[0, 1\)"),
    ("optimizer.clip_norm", -1.0, "config.optimizer.clip_norm=-1.0 is invalid"),
    ("selection.method", "joint_magic", "config.selection.method='joint_magic' is invalid"),
    ("data.tokenizer", "/no/such/spm.model", "config.data.tokenizer='/no/such/spm.model'"),
    ("data.text_len", 1, "config.data.text_len=1 is invalid"),
    ("data.train.split", "", "config.data.train.split='' is invalid: must be a non-empty string"),
    ("evals.max_examples", 0, "config.evals.max_examples=0 is invalid"),
    ("evals.zero_shot.label_keys", (), r"config.evals.zero_shot.label_keys=\(\) is invalid"),
    ("evals.retrieval.kind", "probe", "config.evals.retrieval='probe' is invalid"),
    ("mesh.shape", (3,), r"config.mesh.shape=\(3,\) does not fit 8 devices"),
    ("mesh.shape", (-1, -1), "config.mesh.shape=(.*) is invalid: must give one size per axis"),
    ("selection.filter_ratio", 1.0, r"config.selection.filter_ratio=1.0 is invalid: must be in"),
    ("selection.filter_ratio", 0.3, r"= 64/\(1-0.3\) = 91.4286 is not an integer"),
    ("selection.filter_ratio", 1 - 64 / 68, "gives a super-batch of 68, which must be divisible"),
    ("selection.criterion", "learnabilty", "config.selection.criterion='learnabilty' is invalid: "
                                           "unknown criterion"),
    ("selection.criterion", "no_such_module:fn", "cannot import 'no_such_module'"),
    ("selection.implementation", "sparse", "config.selection.implementation='sparse' is invalid"),
    ("selection.sampling", "argmax", "config.selection.sampling='argmax' is invalid"),
    ("selection.score_patch_size", 3, "score_patch_size=3 is invalid: must be 0 or divide"),
    ("selection.num_chunks", 0, "config.selection.num_chunks=0 is invalid"),
    ("checkpoint.max_to_keep", 0, "config.checkpoint.max_to_keep=0 is invalid"),
    ("logging.every_steps", 0, "config.logging.every_steps=0 is invalid"),
]


def _smoke_with(field: str, value, **more):
    """The smoke config with dotted `field` set to `value` (and `more`, "__" for "."),
    whatever the type: rebuilt from a dict, past ConfigDict's own type checks, as a
    config from JSON or a user's file would be."""
    tree = load_config("smoke.py").to_dict()
    for name, v in {field: value, **{k.replace("__", "."): v for k, v in more.items()}}.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node[leaf] = v
    return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("field,value,message", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_config_fails_with_its_message(field, value, message):
    with pytest.raises(ConfigError, match=message):
        validate(_smoke_with(field, value), num_devices=8)


def test_unknown_top_level_field_is_named():
    config = load_config("smoke.py")
    config.unlock()
    config.batchsize = 64
    with pytest.raises(ConfigError, match="config.batchsize is not a known field"):
        validate(config, num_devices=1)


def test_messages_are_distinct():
    messages = set()
    for field, value, _ in INVALID:
        with pytest.raises(ConfigError) as err:
            validate(_smoke_with(field, value), num_devices=8)
        messages.add(str(err.value))
    assert len(messages) == len(INVALID)


# Typos at any depth, wrong types, the fault policies, and checks that need other fields.
MORE_INVALID = [
    # (field, bad value, other fields, expected message fragment)
    ("checkpoints", {}, {}, r"config.checkpoints is not a known field \(did you mean "
                            r"'checkpoint'\?\); the fields of config are \["),
    ("optimizer.learnng_rate", 1e-3, {}, r"config.optimizer.learnng_rate is not a known field "
                                         r"\(did you mean 'learning_rate'\?\)"),
    ("data.train.splt", "raw", {}, r"config.data.train.splt is not a known field \(did you "
                                   r"mean 'split'\?\); the fields of config.data.train are"),
    ("selection.reference.cache", "x", {}, r"config.selection.reference.cache is not a known "
                                           r"field \(did you mean 'cache_dir'\?\)"),
    ("evals.zero_shot.label_key", ("shape",), {}, "config.evals.zero_shot.label_key is not a "
                                                  "known field"),
    ("evals.mine", {"kind": "retrieval", "data": {"name": "x", "split": "y", "data_dir": "z"},
                    "labels": 1}, {}, r"config.evals.mine.labels is not a known field \(typo"),
    ("faults.on_nan", "skip", {}, "config.faults.on_nan is not a known field"),
    ("model", 3, {}, r"config.model=3 is invalid: must be a group of fields \["),
    ("batch_size", "64", {}, r"config.batch_size='64' is invalid: must be an integer"),
    ("batch_size", 64.0, {}, r"config.batch_size=64.0 is invalid: must be an integer"),
    ("total_steps", True, {}, "config.total_steps=True is invalid: must be an integer"),
    ("optimizer.learning_rate", "1e-3", {}, "config.optimizer.learning_rate='1e-3' is invalid"),
    ("logging.tensorboard", "yes", {}, "config.logging.tensorboard='yes' is invalid: must be "
                                       "True or False"),
    ("evals.zero_shot.templates", ("a photo", "a {}"), {}, r"config.evals.zero_shot.templates"
     r"=.* is invalid: template 'a photo' has no '\{\}' for the class name"),
    ("faults.nonfinite", "ignore", {}, r"config.faults.nonfinite='ignore' is invalid: must be "
                                       r"one of \['stop', 'skip'\]"),
    ("faults.bad_records", "drop", {}, r"config.faults.bad_records='drop' is invalid: must be "
                                       r"one of \['skip', 'error'\]"),
    ("data.max_caption_bytes", 0, {}, r"config.data.max_caption_bytes=0 is invalid"),
    ("mesh.shape", (2, 2), {"mesh__axes": ("data", "model")},
     r"config.mesh.shape=\(2, 2\) uses 4 devices, but 8 are available"),
    ("selection.num_chunks", 24, {"selection__method": "joint", "selection__filter_ratio": 0.5,
                                  "selection__criterion": "hard_learner"},
     "config.selection.num_chunks=24 is invalid: must divide batch_size=64"),
    ("selection.filter_ratio", 0.7, {"selection__method": "joint"},
     r"= 64/\(1-0.7\) = 213.333 is not an integer"),
    ("selection.method", "independent", {"selection__filter_ratio": 0.5},
     "config.selection.reference.workdir='' is invalid: criterion 'learnability' needs a "
     "reference model"),
    ("selection.reference.workdir", "/no/such/run", {"selection__method": "joint",
                                                     "selection__filter_ratio": 0.5},
     "config.selection.reference.workdir='/no/such/run' is invalid: has no checkpoint"),
    ("evals.batch_size", 60, {}, "config.evals.batch_size=60 is invalid: must be divisible by "
                                 "the 8 devices"),
    ("model.remat", 1, {}, "config.model.remat=1 is invalid: must be True or False"),
    ("evals.max_examples", True, {}, "config.evals.max_examples=True is invalid: must be -1"),
    ("mesh.shape", (True,), {}, r"config.mesh.shape=\(True,\) is invalid: must give one size"),
    ("mesh.axes", ("data", ""), {"mesh__shape": (-1, 1)},
     r"config.mesh.axes=\('data', ''\) is invalid: .*\(strings\)"),
    ("optimizer.learning_rate", float("inf"), {},
     "config.optimizer.learning_rate=inf is invalid: must be a finite number"),
    ("model.bias_init", float("nan"), {}, "config.model.bias_init=nan is invalid: must be a "
                                          "finite number"),
]


@pytest.mark.parametrize("field,value,more,message", MORE_INVALID,
                         ids=[f"{f}={v!r}" for f, v, _, _ in MORE_INVALID])
def test_more_invalid_configs_fail_with_their_message(field, value, more, message):
    with pytest.raises(ConfigError, match=message):
        validate(_smoke_with(field, value, **more), num_devices=8)


def test_more_invalid_messages_are_distinct():
    messages = set()
    for field, value, more, _ in MORE_INVALID:
        with pytest.raises(ConfigError) as err:
            validate(_smoke_with(field, value, **more), num_devices=8)
        messages.add(str(err.value))
    assert len(messages) == len(MORE_INVALID)


def test_every_default_field_is_known_and_valid():
    validate(ml_collections.ConfigDict(config_lib.defaults().to_dict()), num_devices=1)


def _joint(**selection):
    config = load_config("smoke.py")
    config.selection.update({"method": "joint", "filter_ratio": 0.8, **selection})
    return config


def test_joint_selection_fields_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="num_chunks=7 is invalid: must divide batch_size=64"):
        validate(_joint(num_chunks=7, criterion="hard_learner"))
    validate(_joint(criterion="hard_learner"))  # no reference needed, none required
    with pytest.raises(ConfigError, match="filter_ratio=0.0 is invalid: must be > 0 for method"):
        validate(_joint(criterion="hard_learner", filter_ratio=0.0))
    with pytest.raises(ConfigError, match="criterion 'learnability' needs a reference model"):
        validate(_joint())
    config = _joint()
    config.selection.reference.workdir = str(tmp_path)
    with pytest.raises(ConfigError, match="workdir=.* is invalid: has no checkpoint"):
        validate(config)
