"""SigLIP at the JEST paper's scale (Evans et al. 2024, §A; Zhai et al. 2023): the
uniform baseline, and the recipe for the reference model JEST scores with.

    # on every worker of a TPU pod slice (docs/tpu.md)
    python -m jest_jax.main --workdir /mnt/runs/siglip_b16 \\
        --config configs/paper/siglip.py:model=B,data=my_pairs,data_dir=gs://bucket/tfds,\
tokenizer=/mnt/spm/c4_en_32k.model

Args: model=B|L (ViT-B/16 or L/16 towers), data (TFDS name of an image–text dataset
with `image` and `caption` features, prepared under data_dir; its `train` split is
trained on, `validation` evaluated by retrieval), data_dir, tokenizer (SentencePiece
.model path), text_len (tokens per caption, default 16), steps, fsdp (devices each
parameter is split over).
"""

import ml_collections

from jest_jax import config as jj


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = jj.parse_arg(arg, model="B", data="image_text_pairs", data_dir=jj.DATA_DIR,
                       tokenizer="", text_len=16, steps=100_000, fsdp=16)
    if arg.model not in ("B", "L"):
        raise ValueError(f"configs/paper: model={arg.model!r}; use B or L")
    c = jj.defaults()
    c.batch_size = 32768             # the paper's learner batch b
    c.total_steps = arg.steps        # 100k steps = 3.3B examples seen; set to your budget
    c.data.train = jj.pool(arg.data, "train", arg.data_dir)
    c.data.image_size = 256
    # 16 tokens: the length of LiT and of big_vision's SigLIP example config, and the one at
    # which this model's patch-32 forward pass costs 0.29 of a patch-16 one, the paper's
    # "72% fewer FLOPs" (§3.3); at 64 tokens it costs 0.39 (docs/benchmarks.md). The
    # published SigLIP B/16 and L/16 checkpoints take 64: text_len=64 to use one.
    c.data.text_len = arg.text_len
    c.data.tokenizer = arg.tokenizer or "bytes"  # the paper: a 32k SentencePiece vocabulary
    c.data.num_threads = 32          # per host: TPU VMs have many cores to decode JPEGs
    c.model.image_variant = arg.model
    c.model.text_variant = arg.model
    c.model.patch_size = 16
    c.model.image_pool = "map"       # SigLIP's attention-pooling head
    c.model.embed_dim = {"B": 768, "L": 1024}[arg.model]
    c.model.dtype = "bfloat16"       # activations in bf16, params and optimizer in f32
    c.model.remat = True             # 128 examples × 256 tokens per device on 256 devices
    c.loss.implementation = "chunked"  # never materialise the 32k × 32k logits
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_fraction = 0.01  # 1% linear warm-up, then cosine
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.weight_decay = 1e-4
    c.optimizer.clip_norm = 1.0
    c.evals.every_steps = 5000
    c.evals.batch_size = 4096
    c.evals.max_examples = 10_000
    # Zero-shot classification needs class names; add a task for a dataset that has them.
    del c.evals.zero_shot
    c.evals.retrieval.data = jj.pool(arg.data, "validation", arg.data_dir)
    # Batch over all devices; parameters and Adam moments split over groups of `fsdp`.
    c.mesh.axes = ("data", "fsdp")
    c.mesh.shape = (-1, arg.fsdp)
    c.mesh.rules = ((".*", "fsdp"),)
    c.checkpoint.every_steps = 1000  # a preemption loses at most this many steps
    c.checkpoint.max_to_keep = 3
    c.logging.every_steps = 50
    return c
