"""JEST at the paper's scale (Evans et al. 2024): b = 32768 learner examples chosen
jointly from N = b / (1 - 0.8) = 163840 candidates per step, in 16 chunks, by
learnability against a reference model trained with configs/paper/siglip.py on curated
data.

    REF=/mnt/runs/reference_b16    # trained with configs/paper/siglip.py
    JEST=configs/paper/jest.py:model=B,data=my_pairs,data_dir=gs://bucket/tfds,\
tokenizer=/mnt/spm/c4_en_32k.model,reference=$REF,cache=$REF/cache
    python -m jest_jax.main --config $JEST --mode cache    # reference embeddings, once
    python -m jest_jax.main --config $JEST --workdir /mnt/runs/jest_b16

Args: those of configs/paper/siglip.py, and reference (its workdir), cache (the
reference-embedding cache; "" runs the reference every step), filter (f),
score_patch (Flexi-JEST scoring patch size; 0 = 16), flexi (Flexi-JEST B/16, paper §3.3:
score at patch 32, and train half of each batch at patch 32, the other half at 16).
"""

import os

import ml_collections

from jest_jax import config as jj

_SIGLIP = os.path.join(os.path.dirname(__file__), "siglip.py")  # loaded by path, as --config is


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = jj.parse_arg(arg, model="B", data="image_text_pairs", data_dir=jj.DATA_DIR,
                       tokenizer="", text_len=16, steps=100_000, fsdp=16, reference="", cache="",
                       filter=0.8, score_patch=0, flexi=False)
    base = ",".join(f"{k}={arg[k]}" for k in ("model", "data", "data_dir", "tokenizer",
                                              "text_len", "steps", "fsdp"))
    c = jj.load(f"{_SIGLIP}:{base}")
    c.selection.method = "joint"
    c.selection.criterion = "learnability"
    c.selection.filter_ratio = arg.filter
    c.selection.num_chunks = 16
    c.selection.implementation = "auto"  # matrix-free: a dense S would be 107 GB
    c.selection.score_patch_size = arg.score_patch
    if arg.flexi:
        c.selection.score_patch_size = arg.score_patch or 2 * c.model.patch_size
        c.model.low_res_patch_size = 2 * c.model.patch_size
        c.model.low_res_fraction = 0.5  # λ·b = 16384: 64 examples per device on 256
    c.selection.reference.workdir = arg.reference
    c.selection.reference.cache_dir = arg.cache
    return c
