"""Shared fixtures: the tiny embedded dataset, built once per test worker, and tiny configs."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest

from jest_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """One XLA compilation cache for the whole session: many tests (and the CLI runs they
    start) compile the same small programs. Made by the controlling process, before the
    xdist workers start, so they and every subprocess inherit it."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made it
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jest_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    import jax  # already imported with the old settings: tell it too

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: with -n 2 the short ones then fill the gaps, and no
    long test is left running alone at the end. First of all those that share the
    8-device process (tests/eight_devices.py): it runs at the start of one worker, and
    its tests then read its results on whichever worker they land."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 "eight_devices" not in getattr(item, "fixturenames", ())))


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.get("JAX_COMPILATION_CACHE_DIR", ""), ignore_errors=True)


def load_config(name: str, arg: str = ""):
    """The experiment config `configs/<name>` (with `arg`), loaded by path as --config does."""
    return config_lib.load(os.path.join(ROOT, "configs", name) + (f":{arg}" if arg else ""))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A data dir holding `jest_shapes/tiny` (built on first use, offline)."""
    from jest_jax.data import load_split

    path = str(tmp_path_factory.mktemp("datasets"))
    load_split("jest_shapes/tiny", "eval", path)
    return path


@pytest.fixture
def tiny_config(data_dir):
    """The smoke config pointed at the test data dir, shortened for tests."""
    config = load_config("smoke.py", "steps=20")
    config.data.train.data_dir = data_dir
    config.evals.zero_shot.data.data_dir = data_dir
    config.evals.retrieval.data.data_dir = data_dir
    config.batch_size = 32
    config.evals.batch_size = 32
    config.checkpoint.every_steps = 10
    config.logging.every_steps = 5
    config.logging.tensorboard = True
    return config


@pytest.fixture(scope="session")
def reference_workdir(data_dir, tmp_path_factory) -> str:
    """A short SigLIP reference run on the tiny curated pool, shared by the JEST tests."""
    from jest_jax import train

    config = load_config("smoke.py", "steps=10")
    for pool in (config.data.train, config.evals.zero_shot.data, config.evals.retrieval.data):
        pool.data_dir = data_dir
    config.batch_size = 32
    config.evals.batch_size = 32
    config.logging.tensorboard = False
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def eight_devices(request, tmp_path_factory) -> tuple[dict, str]:
    """The checks that need 8 simulated devices, all run in one subprocess once per
    session (tests/eight_devices.py): each part's result, and the saved arrays' dir."""
    import eight_devices

    return eight_devices.results(request, tmp_path_factory)


@pytest.fixture
def jest_config(tiny_config, reference_workdir):
    """tiny_config as a JEST learner on the tiny raw pool: N = 64 candidates, b = 32."""
    config = tiny_config
    config.data.train.split = "raw"
    config.selection.method = "joint"
    config.selection.filter_ratio = 0.5
    config.selection.num_chunks = 4
    config.selection.reference.workdir = reference_workdir
    config.logging.tensorboard = False
    return config


def train_state(config, workdir, step: int) -> dict:
    """The whole train state (params, optimizer state, step) saved at `step` in `workdir`,
    as NumPy arrays."""
    import jax
    import numpy as np

    from jest_jax import build
    from jest_jax.checkpoint import Checkpointer

    run = build.build(config, selection=False)
    checkpointer = Checkpointer(str(workdir))
    try:
        state = checkpointer.restore(run.state.abstract_sharded(), step=step)
    finally:
        checkpointer.close()
    return jax.tree.map(np.asarray, state)


def doc_criteria(tmp_path) -> str:
    """Every code block of docs/selection.md, as the module `my_criteria` in `tmp_path`
    (returned: the directory to import it from)."""
    with open(os.path.join(ROOT, "docs", "selection.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (tmp_path / "my_criteria.py").write_text("\n".join(blocks))
    return str(tmp_path)


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://jest-jax-test`: a bucket of a local GCS emulator (tests/gcs_emulator.py) that
    runs for the session; this process and its subprocesses reach it through the standard
    variables (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL)."""
    from gcs_emulator import Emulator

    emulator = Emulator().start()
    try:
        yield emulator.create_bucket("jest-jax-test")
    finally:
        emulator.stop()
