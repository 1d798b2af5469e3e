"""Image tower, text tower, the two-tower contrastive model, and the model component."""

from jest_jax.models.layers import VARIANTS, Encoder, variant
from jest_jax.models.model import Model, ModelSpec, normalize_images
from jest_jax.models.text import TextTransformer
from jest_jax.models.two_tower import TwoTower, l2_normalize
from jest_jax.models.vit import ViT, resize_patch_embedding

__all__ = [
    "VARIANTS",
    "Encoder",
    "Model",
    "ModelSpec",
    "TextTransformer",
    "TwoTower",
    "ViT",
    "l2_normalize",
    "normalize_images",
    "resize_patch_embedding",
    "variant",
]
