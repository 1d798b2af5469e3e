"""A config saved as JSON: a run's `config.json`, or one `experiments/compare.py` wrote.

    # re-run (or continue) exactly the config a past run was trained with
    python -m jest_jax.main --config configs/saved.py:runs/old/config.json --workdir runs/again
    # the harness runs each of its runs this way (its commands print with --dry-run)
    python -m jest_jax.main --config configs/saved.py:runs/study/JEST_seed0/study_config.json \\
        --workdir runs/study/JEST_seed0

The path may be on any file system jest_jax reads (gs:// included). JSON has no tuples,
so every list is read back as a tuple, which is what the config files write; the result
validates to the same `Spec` as the config it was saved from (tests/test_compare.py).
"""

from typing import Any

import ml_collections

from jest_jax import files


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Arg: the path of the JSON file."""
    if not arg:
        raise ValueError("configs/saved.py needs the path of a saved config: "
                         "configs/saved.py:<path>.json")
    if not files.is_file(arg):
        raise FileNotFoundError(f"configs/saved.py: no saved config at {arg!r}")
    return ml_collections.ConfigDict(_tuples(files.read_json(arg)))
