"""Shared defaults for every experiment config, and the `key=value,...` argument parser.

Every field is documented here once; experiment configs only change what differs.
"""

from __future__ import annotations

import os

import ml_collections

DATA_DIR = os.environ.get("JEST_DATA_DIR", os.path.expanduser("~/.cache/jest_jax/datasets"))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse `"a=1,b=foo"` into a ConfigDict, typed like `defaults` (which also set unset keys).

    Example: `parse_arg("stage=learner,runlocal=True", stage="reference", runlocal=False)`.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not of the form key=value")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return out


def pool(name: str = "jest_shapes", split: str = "curated", data_dir: str = DATA_DIR) -> dict:
    """A dataset split: a TFDS name (embedded builders are built on first use) + data_dir."""
    return dict(name=name, split=split, data_dir=data_dir)


def get_base_config() -> ml_collections.ConfigDict:
    """Every field with its default; experiment configs override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0                       # params, data order and selection all derive from it
    c.batch_size = 128               # global batch the learner trains on per step
    c.total_steps = 300              # learner steps; the LR schedule spans all of them

    c.data = ml_collections.ConfigDict()
    c.data.train = pool()            # the pool training batches are drawn from
    c.data.image_size = 32           # images are resized to this (square) on the host
    c.data.text_len = 32             # tokens per caption, padded / truncated
    c.data.tokenizer = "bytes"       # "bytes" or a path to a SentencePiece .model
    c.data.num_threads = 2           # grain reader threads per process
    c.data.max_caption_bytes = 1024  # a longer caption (UTF-8) is a bad record (see faults):
    #                                  web alt-text that long is markup or boilerplate. Shorter
    #                                  captions are truncated to text_len tokens as usual

    c.model = ml_collections.ConfigDict()
    c.model.image_variant = "tiny"     # tiny (CPU-sized), Ti, S, M, B, L
    c.model.text_variant = "tiny"
    c.model.patch_size = 4           # must divide data.image_size
    c.model.image_pool = "gap"       # gap (token mean) | map (attention pooling, as SigLIP;
    #                                  slower to learn for the tiny CPU model on jest_shapes)
    c.model.embed_dim = 128          # shared embedding space
    c.model.dtype = "float32"        # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = False            # recompute each transformer block in the backward pass:
    #                                  ~1/3 more compute, activations of one block kept
    c.model.temperature_init = 10.0  # SigLIP: t' = log 10
    c.model.bias_init = -10.0        # SigLIP: beta = -10

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "sigmoid"          # sigmoid (SigLIP) | softmax (CLIP)
    c.loss.implementation = "dense"  # sigmoid only. dense: the global B×B logits; chunked:
    #                                  text embeddings travel round the devices (ppermute
    #                                  ring), each holds (B/d)² logits at a time. Same value

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_fraction = 0.05  # linear warm-up share of total_steps, then cosine to 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 1e-4  # p -= wd * (lr(t)/lr_peak) * p, on projection kernels only
    c.optimizer.clip_norm = 1.0      # global gradient-norm clipping

    c.selection = ml_collections.ConfigDict()
    c.selection.method = "uniform"   # uniform (plain SigLIP) | independent | joint (JEST)
    c.selection.criterion = "learnability"  # learnability | hard_learner | easy_reference,
    #                                  or your own "package.module:function" (docs/selection.md)
    c.selection.filter_ratio = 0.0   # f: each step draws N = batch_size / (1 - f) candidates
    #                                  and trains on batch_size of them (paper: 0.8)
    c.selection.num_chunks = 16      # joint: the batch is drawn in this many chunks (paper: 16)
    c.selection.score_gain = 1.0     # g: sampling p ∝ exp(g * score) (joint; independent/sample)
    c.selection.sampling = "topk"    # independent: topk (deterministic) | sample (∝ exp(g*s))
    c.selection.implementation = "auto"  # dense (N×N scores) | matrix_free | auto (dense up
    #                                      to 256 candidates)
    c.selection.score_patch_size = 0  # Flexi-JEST: score with the learner at this patch size
    #                                   (0: model.patch_size); must divide data.image_size
    c.selection.reference = ml_collections.ConfigDict()
    c.selection.reference.workdir = ""    # a reference run's workdir; its latest checkpoint is
    #                                       loaded frozen. Needed by criteria using a reference
    c.selection.reference.cache_dir = ""  # reference embeddings of data.train, made by
    #                                       `--mode cache`; "" runs the reference every step

    c.evals = ml_collections.ConfigDict()
    c.evals.every_steps = 100        # 0: only at the end (always at the end)
    c.evals.batch_size = 256         # must be divisible by the number of devices
    c.evals.max_examples = -1        # -1: the whole split; else its first N examples
    c.evals.zero_shot = dict(
        kind="zero_shot", data=pool(split="eval"),
        label_keys=("shape", "color", "size", "position"),
        templates=(),                # (): the dataset's own prompt templates, if it has them
    )
    c.evals.retrieval = dict(kind="retrieval", data=pool(split="eval"))  # R@1/5/10, both ways
    # Each entry with a `kind` is a task: add more, or `del c.evals.retrieval` to drop one.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.axes = ("data",)          # named mesh axes; batches are split over all of them
    c.mesh.shape = (-1,)             # -1: all remaining devices
    # How parameters and optimizer moments are placed: (regex, spec) pairs; the first regex
    # that re.search-es a leaf's path ("params/img/.../kernel", "opt_state/.../mu/img/...")
    # decides. spec: "replicate" | "fsdp" (largest dim divisible by the axis "fsdp", split
    # over it) | "fsdp:<axis>" | a tuple PartitionSpec such as (None, "fsdp"). Unmatched:
    # replicated. FSDP: axes=("data", "fsdp"), shape=(-1, 8), rules=((".*", "fsdp"),).
    c.mesh.rules = ((".*", "replicate"),)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100   # also at the last step; a re-run resumes from the latest
    c.checkpoint.max_to_keep = 3     # older checkpoints are deleted

    c.faults = ml_collections.ConfigDict()  # docs/reliability.md
    c.faults.nonfinite = "stop"      # NaN/Inf in selection scores, loss, gradients or new params:
    #                                  stop (error naming the step and the first such quantity)
    #                                  | skip (keep params and optimizer state, count the step)
    c.faults.bad_records = "skip"    # data.train record with an unreadable image, a wrong image
    #                                  shape, an empty or over-long caption: skip (logged with its
    #                                  index, counted, replaced by the next good record) | error

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 10       # progress line + metrics.jsonl row every N steps
    c.logging.tensorboard = True     # also write TensorBoard event files (no TensorFlow needed)
    return c
