"""The model component: `config.model` resolved (`ModelSpec`), and the two-tower model as
pure functions of a params tree (`Model`), which is how the train step, the scorer, the
evaluators and the reference use it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jest_jax.fields import Section
from jest_jax.losses import Embeddings
from jest_jax.models.layers import DTYPES, VARIANTS
from jest_jax.models.text import TEXT_POOLS
from jest_jax.models.two_tower import TwoTower
from jest_jax.models.vit import POOLS


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] → float32 [-1, 1], on device so hosts ship bytes, not floats."""
    return images.astype(jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture: `config.model`, plus the input sizes it is built for."""

    image_size: int
    text_len: int
    image_variant: str
    text_variant: str
    patch_size: int
    image_pool: str
    image_head: bool
    text_pool: str
    embed_dim: int
    dtype: str
    remat: bool
    temperature_init: float
    bias_init: float
    init_from: str
    init_resize_posemb: bool
    low_res_patch_size: int
    low_res_fraction: float

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.image_variant = "tiny"     # nano, tiny (CPU-sized), Ti, S, M, B, L, So400m
        c.text_variant = "tiny"
        c.patch_size = 4             # must divide data.image_size
        c.image_pool = "gap"         # gap (token mean) | map (attention pooling, as SigLIP;
        #                              slower to learn for the tiny CPU model on jest_shapes)
        c.image_head = True          # a linear map to embed_dim after the pooling; SigLIP's
        #                              image tower has none (embed_dim = the image width)
        c.text_pool = "mean"         # mean (over non-padding tokens) | last (the last
        #                              position, no padding mask: SigLIP's text tower)
        c.embed_dim = 128            # shared embedding space
        c.dtype = "float32"          # compute dtype: float32 | bfloat16 (params stay float32)
        c.remat = False              # recompute each transformer block in the backward pass:
        #                              ~1/3 more compute, activations of one block kept
        c.temperature_init = 10.0    # SigLIP: t' = log 10
        c.bias_init = -10.0          # SigLIP: beta = -10
        c.init_from = ""             # a big_vision SigLIP .npz (local or gs://) the learner
        #                              starts from instead of a random init (docs/pretrained.md);
        #                              the model fields must describe its architecture
        c.init_resize_posemb = False  # resize init_from's image position embeddings to
        #                              data.image_size (else a different size is an error)
        c.low_res_patch_size = 0     # Flexi-JEST multi-resolution training (paper §3.3): a
        #                              fraction of each batch runs the image tower at this
        #                              larger patch size (fewer tokens); 0: off. Must divide
        #                              data.image_size and be >= patch_size
        c.low_res_fraction = 0.5     # λ: that fraction of the batch, in [0, 1]; λ·batch_size
        #                              must be a whole number of examples per device
        return c

    @classmethod
    def from_config(cls, section: Section, image_size: int, text_len: int) -> ModelSpec:
        """`section` is `config.model`; the sizes are `data.image_size` and `data.text_len`."""
        variants = tuple(VARIANTS)
        image_variant = section.choice("image_variant", variants)
        text_variant = section.choice("text_variant", variants)
        patch = section.integer("patch_size", 1)
        section.check(image_size % patch == 0, "patch_size", patch,
                      f"must divide data.image_size={image_size}")
        image_head = section.boolean("image_head")
        embed_dim = section.integer("embed_dim", 1)
        width = VARIANTS[image_variant]["width"]
        section.check(image_head or embed_dim == width, "embed_dim", embed_dim,
                      f"must be the image width {width} of image_variant={image_variant!r} "
                      "when model.image_head=False (the pooled token is the embedding)")
        return cls(
            image_size=image_size, text_len=text_len, image_variant=image_variant,
            text_variant=text_variant, patch_size=patch,
            embed_dim=embed_dim,
            dtype=section.choice("dtype", DTYPES),
            image_pool=section.choice("image_pool", POOLS),
            image_head=image_head, text_pool=section.choice("text_pool", TEXT_POOLS),
            remat=section.boolean("remat"),
            temperature_init=section.number("temperature_init", lambda v: v > 0, "must be > 0"),
            bias_init=section.number("bias_init"),
            init_from=section.string("init_from"),
            init_resize_posemb=section.boolean("init_resize_posemb"),
            low_res_patch_size=cls._low_res_patch(section, image_size, patch),
            low_res_fraction=section.number("low_res_fraction", lambda v: 0 <= v <= 1,
                                            "must be in [0, 1]"))

    @staticmethod
    def _low_res_patch(section: Section, image_size: int, patch: int) -> int:
        low = section.integer("low_res_patch_size", 0)
        section.check(low == 0 or image_size % low == 0, "low_res_patch_size", low,
                      f"must be 0 (off) or divide data.image_size={image_size}")
        section.check(low == 0 or low >= patch, "low_res_patch_size", low,
                      f"must be 0 (off) or >= model.patch_size={patch}: the low-resolution "
                      "part runs with larger patches (fewer tokens)")
        return low

    def low_res_examples(self, batch_size: int) -> int:
        """How many of a batch of `batch_size` train at the low resolution: λ·b, or 0 when
        multi-resolution training is off (no low patch size, or the full one: the plain
        path, bitwise)."""
        if self.low_res_patch_size in (0, self.patch_size):
            return 0
        return round(self.low_res_fraction * batch_size)

    def create(self, vocab_size: int, rngs: nnx.Rngs) -> TwoTower:
        return TwoTower(
            image_size=self.image_size, patch_size=self.patch_size,
            image_variant=self.image_variant, text_variant=self.text_variant,
            vocab_size=vocab_size, text_len=self.text_len, embed_dim=self.embed_dim,
            dtype=self.dtype, image_pool=self.image_pool, image_head=self.image_head,
            text_pool=self.text_pool,
            temperature_init=self.temperature_init, bias_init=self.bias_init,
            remat=self.remat, rngs=rngs)


class Model:
    """The two-tower model of `spec` as pure functions of a params tree.

    The nnx graph is split off once; every call merges it with the params it is given,
    so one `Model` serves the learner, a frozen reference and abstract compiles alike.
    """

    def __init__(self, spec: ModelSpec, vocab_size: int):
        self.spec, self.vocab_size = spec, vocab_size
        abstract = nnx.eval_shape(lambda: spec.create(vocab_size, nnx.Rngs(0)))
        self.graphdef, params = nnx.split(abstract, nnx.Param)
        self._abstract_params = params.to_pure_dict()

    def init(self, key: jax.Array) -> dict:
        """Fresh params (a pure dict) from `key`."""
        return nnx.state(self.spec.create(self.vocab_size, nnx.Rngs(key)),
                         nnx.Param).to_pure_dict()

    def abstract_params(self) -> dict:
        """ShapeDtypeStructs of the params (no array is made)."""
        return self._abstract_params

    def embed_images(self, params: dict, images: jax.Array, patch_size: int | None = None,
                     norms: bool = False):
        """uint8 images → L2-normalised float32 embeddings (at another patch size if given);
        with `norms`, also their norms before normalisation."""
        model = nnx.merge(self.graphdef, params)
        return model.embed_images(normalize_images(images), patch_size, with_norm=norms)

    def embed_texts(self, params: dict, tokens: jax.Array, norms: bool = False):
        """int32 tokens (0 = pad) → L2-normalised float32 embeddings (and norms)."""
        return nnx.merge(self.graphdef, params).embed_texts(tokens, with_norm=norms)

    def embeddings(self, params: dict, batch: dict[str, jax.Array],
                   patch_size: int | None = None, norms: bool = False) -> Embeddings:
        """The model's view of a batch: embeddings, t' and β (and norms if asked)."""
        image = self.embed_images(params, batch["image"], patch_size, norms)
        text = self.embed_texts(params, batch["tokens"], norms)
        if not norms:
            return Embeddings(image, text, params["log_temperature"], params["bias"])
        return Embeddings(image[0], text[0], params["log_temperature"], params["bias"],
                          image[1], text[1])
