"""A public SigLIP or SigLIP 2 checkpoint (big_vision .npz) on your own image–text pool:
fine-tuned (role=finetune), or as the frozen reference of JEST (role=jest) with a learner
trained from scratch. docs/pretrained.md has the files, sizes and tokenizers.

    C4=/mnt/spm/c4_en.model    # gs://t5-data/vocabs/cc_en.32000/sentencepiece.model
    CKPT=gs://big_vision/siglip/webli_en_b16_224_63724782.npz
    python -m jest_jax.main --workdir runs/siglip_ft --config configs/siglip.py:\
variant=B/16,checkpoint=$CKPT,tokenizer=$C4,data=my_pairs,data_dir=gs://bucket/tfds

    JEST=configs/siglip.py:role=jest,variant=B/16,checkpoint=$CKPT,tokenizer=$C4,\
data=my_pairs,data_dir=gs://bucket/tfds,cache=runs/siglip_ref_cache
    python -m jest_jax.main --config $JEST --mode cache      # reference embeddings, once
    python -m jest_jax.main --config $JEST --workdir runs/jest_b16

Args: variant (B/16, L/16, So400m/14, So400m/16), checkpoint (.npz path or gs:// URL),
tokenizer (SentencePiece .model), style (siglip: SigLIP's c4-en; siglip2: SigLIP 2's
Gemma), image_size (the checkpoint's; another one resizes its position embeddings),
text_len (64; 16 for SigLIP So400m/14 at 224 px), data / data_dir (a TFDS image–text
dataset: `train` is trained on, `validation` evaluated by retrieval), role, learner (the
JEST learner's variant; default the reference's), cache (JEST: the reference cache; ""
runs the reference every step), steps, batch, lr.
"""

import ml_collections

from jest_jax import config as jj
from jest_jax.models import big_vision


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = jj.parse_arg(arg, variant="B/16", checkpoint="", tokenizer="", style="siglip",
                       image_size=224, text_len=64, data="image_text_pairs",
                       data_dir=jj.DATA_DIR, role="finetune", learner="", cache="",
                       steps=10_000, batch=1024, lr=0.0)
    if arg.role not in ("finetune", "jest"):
        raise ValueError(f"configs/siglip.py: role={arg.role!r}; use finetune or jest")
    c = jj.defaults()
    c.batch_size = arg.batch
    c.total_steps = arg.steps
    c.data.train = jj.pool(arg.data, "train", arg.data_dir)
    c.data.image_size = arg.image_size
    c.data.text_len = arg.text_len
    c.data.tokenizer = arg.tokenizer
    c.data.text_style = arg.style
    c.data.num_threads = 32
    c.model.update(big_vision.variant_fields(arg.learner or arg.variant
                                             if arg.role == "jest" else arg.variant))
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.optimizer.warmup_fraction = 0.05
    c.optimizer.b2 = 0.95
    c.optimizer.clip_norm = 1.0
    if arg.role == "finetune":
        c.model.init_from = arg.checkpoint
        c.model.init_resize_posemb = True  # a no-op at the checkpoint's own size
        c.optimizer.learning_rate = arg.lr or 1e-5  # small: keep what was learned
        c.optimizer.weight_decay = 1e-4
    else:
        c.optimizer.learning_rate = arg.lr or 1e-3  # SigLIP from scratch
        c.optimizer.weight_decay = 1e-4
        c.selection.method = "joint"
        c.selection.criterion = "learnability"
        c.selection.filter_ratio = 0.8
        c.selection.num_chunks = 16
        c.selection.reference.checkpoint = arg.checkpoint
        c.selection.reference.variant = arg.variant
        c.selection.reference.resize_posemb = True
        c.selection.reference.cache_dir = arg.cache
    c.evals.every_steps = 1000
    c.evals.batch_size = 1024
    c.evals.max_examples = 10_000
    del c.evals.zero_shot  # needs class names: add a task for a dataset that has them
    c.evals.retrieval.data = jj.pool(arg.data, "validation", arg.data_dir)
    c.checkpoint.every_steps = 500
    c.logging.every_steps = 50
    return c
