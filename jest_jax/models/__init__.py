"""Image tower, text tower and the two-tower contrastive model."""

from jest_jax.models.layers import VARIANTS, Encoder, variant
from jest_jax.models.text import TextTransformer
from jest_jax.models.two_tower import TwoTower, l2_normalize
from jest_jax.models.vit import ViT, resize_patch_embedding

__all__ = [
    "VARIANTS",
    "Encoder",
    "TextTransformer",
    "TwoTower",
    "ViT",
    "l2_normalize",
    "resize_patch_embedding",
    "variant",
]
