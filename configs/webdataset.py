"""SigLIP reference and JEST learner on pools converted from img2dataset/webdataset shards
by `python -m jest_jax.data.convert` (docs/data.md, "From img2dataset shards to a JEST
run"), evaluated by ImageNet zero-shot (CLIP's class names and 80 templates) and COCO
5k retrieval (5 captions per image).

    C=configs/webdataset.py:data_dir=gs://bucket/pools,eval_dir=gs://bucket/tfds
    python -m jest_jax.main --config $C,stage=reference --workdir runs/reference
    python -m jest_jax.main --config $C,stage=learner,reference=runs/reference,\
cache=runs/reference/cache --mode cache
    python -m jest_jax.main --config $C,stage=learner,reference=runs/reference,\
cache=runs/reference/cache --workdir runs/jest

Args: stage (reference: SigLIP on the curated pool; learner: JEST on the raw pool),
data_dir (where the pools were converted), pool (raw pool dataset, split `raw`), curated
(curated dataset, split `curated`), reference (the reference's workdir), cache (its
embedding cache, "" to run it online), eval_dir (TFDS data_dir holding imagenet2012 and
coco_captions), steps, batch (learner batch b; candidates b / (1 - 0.8)), model (ViT
variant of both towers: Ti, S, M, B, L; tiny: the CPU-sized test model at 16 px).
"""

import ml_collections

from jest_jax import config as jj


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = jj.parse_arg(arg, stage="reference", data_dir=jj.DATA_DIR, pool="pool",
                       curated="curated", reference="", cache="", eval_dir=jj.DATA_DIR,
                       steps=20_000, batch=4096, model="B")
    if arg.stage not in ("reference", "learner"):
        raise ValueError(f"configs/webdataset.py: stage={arg.stage!r}; use reference or learner")
    c = jj.defaults()
    c.batch_size = arg.batch
    c.total_steps = arg.steps
    c.model.image_variant = c.model.text_variant = arg.model
    if arg.model == "tiny":
        c.data.image_size, c.data.text_len = 16, 24
        c.model.patch_size, c.model.embed_dim = 4, 64
    else:
        c.data.image_size, c.data.text_len = 224, 64
        c.model.patch_size, c.model.embed_dim = 16, 768
        c.model.image_pool = "map"
        c.model.dtype = "bfloat16"
        c.data.num_threads = 32  # per host: decoding JPEGs is the input pipeline's work
    if arg.stage == "reference":
        c.data.train = jj.pool(arg.curated, "curated", arg.data_dir)
    else:
        c.data.train = jj.pool(arg.pool, "raw", arg.data_dir)
        c.selection.method = "joint"
        c.selection.criterion = "learnability"
        c.selection.filter_ratio = 0.8
        c.selection.num_chunks = 16 if arg.batch >= 1024 else 2
        c.selection.reference.workdir = arg.reference
        c.selection.reference.cache_dir = arg.cache
    c.evals.every_steps = 0 if arg.model == "tiny" else 2000
    c.evals.batch_size = min(arg.batch, 1024)
    del c.evals.zero_shot, c.evals.retrieval
    c.evals.imagenet = dict(kind="zero_shot", label_keys=("label",),
                            data=jj.pool("imagenet2012", "validation", arg.eval_dir),
                            class_names=("imagenet",), templates=("clip_imagenet_80",))
    c.evals.coco = dict(kind="retrieval", captions="captions/text", group_by="",
                        data=jj.pool("coco_captions", "test", arg.eval_dir))
    c.checkpoint.every_steps = min(1000, arg.steps)
    c.logging.every_steps = min(50, max(arg.steps // 2, 1))
    return c
