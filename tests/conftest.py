"""Shared fixtures: the tiny embedded dataset, built once per test worker, and tiny configs."""

from __future__ import annotations

import pytest

from configs import smoke


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
    config = smoke.get_config("steps=20")
    config.data.train.data_dir = data_dir
    config.evals.zero_shot.data.data_dir = data_dir
    config.evals.retrieval.data.data_dir = data_dir
    config.batch_size = 32
    config.evals.batch_size = 32
    config.checkpoint.every_steps = 10
    config.logging.every_steps = 5
    config.logging.tensorboard = True
    return config
