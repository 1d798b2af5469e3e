"""Datasets: embedded TFDS builders, user-data conversion and split loading."""

from jest_jax.data.datasets import load_split
from jest_jax.data.writer import write_image_text_dataset

__all__ = ["load_split", "write_image_text_dataset"]
