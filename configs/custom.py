"""SigLIP on your own TFDS dataset (e.g. one written by `write_image_text_dataset`).

    python -m jest_jax.main --workdir runs/mine \\
        --config configs/custom.py:name=my_pairs,data_dir=/tmp/my_datasets,eval_split=test

Trains on `train_split` and evaluates retrieval on `eval_split`, plus zero-shot
classification on its `label` feature when `zero_shot=True` (the dataset must then have
class names). Every other field keeps the default its component documents
(docs/design.md §4, "Config") and can be overridden.
"""

import ml_collections

from jest_jax import config as jj


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: name, data_dir, train_split, eval_split, zero_shot, steps, image_size."""
    arg = jj.parse_arg(arg, name="", data_dir=jj.DATA_DIR, train_split="train",
                       eval_split="test", zero_shot=True, steps=1000, image_size=32)
    if not arg.name:
        raise ValueError("configs/custom.py needs name=<your TFDS dataset name>")
    c = jj.defaults()
    c.total_steps = arg.steps
    c.data.train = jj.pool(arg.name, arg.train_split, arg.data_dir)
    c.data.image_size = arg.image_size
    c.model.patch_size = max(arg.image_size // 8, 1)
    c.evals.retrieval.data = jj.pool(arg.name, arg.eval_split, arg.data_dir)
    if arg.zero_shot:
        c.evals.zero_shot.data = jj.pool(arg.name, arg.eval_split, arg.data_dir)
        c.evals.zero_shot.label_keys = ("label",)
    else:
        del c.evals.zero_shot
    return c
