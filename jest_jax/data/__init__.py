"""Datasets, tokenizers and input pipelines.

`load_split` and `write_image_text_dataset` are imported lazily so that light modules
(e.g. the tokenizer, which the models share) do not pull in TFDS.
"""

from typing import Any

__all__ = ["load_split", "write_image_text_dataset"]


def __getattr__(name: str) -> Any:
    if name == "load_split":
        from jest_jax.data.datasets import load_split

        return load_split
    if name == "write_image_text_dataset":
        from jest_jax.data.writer import write_image_text_dataset

        return write_image_text_dataset
    raise AttributeError(f"module 'jest_jax.data' has no attribute {name!r}")
