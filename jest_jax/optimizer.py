"""The optimizer component: `config.optimizer` → AdamW with warm-up then cosine decay."""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import optax

from jest_jax.fields import Section


def decay_mask(params: dict) -> dict:
    """Projection kernels decay; embeddings, norms, biases, t' and beta do not."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(path[-1].key).endswith("kernel"), params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """AdamW with linear warm-up then cosine decay to 0, and global-norm clipping.

    Weight decay follows big_vision: `p -= weight_decay * (lr(t) / lr_peak) * p` per step,
    i.e. it follows the schedule's shape but not the learning rate's size (optax's adamw
    multiplies by lr(t), hence the division by the peak).
    """

    total_steps: int
    learning_rate: float
    warmup_fraction: float
    b1: float
    b2: float
    weight_decay: float
    clip_norm: float

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.learning_rate = 1e-3
        c.warmup_fraction = 0.05     # linear warm-up share of total_steps, then cosine to 0
        c.b1 = 0.9
        c.b2 = 0.95
        c.weight_decay = 1e-4        # p -= wd * (lr(t)/lr_peak) * p, on projection kernels only
        c.clip_norm = 1.0            # global gradient-norm clipping
        return c

    @classmethod
    def from_config(cls, section: Section, total_steps: int) -> Optimizer:
        unit = lambda v: 0 <= v < 1  # noqa: E731
        return cls(
            total_steps=total_steps,
            learning_rate=section.number("learning_rate", lambda v: v > 0, "must be > 0"),
            warmup_fraction=section.number("warmup_fraction", unit, "must be in [0, 1)"),
            b1=section.number("b1", unit, "must be in [0, 1)"),
            b2=section.number("b2", unit, "must be in [0, 1)"),
            weight_decay=section.number("weight_decay", lambda v: v >= 0, "must be >= 0"),
            clip_norm=section.number("clip_norm", lambda v: v > 0, "must be > 0"))

    @functools.cached_property
    def schedule(self) -> optax.Schedule:
        warmup = int(round(self.warmup_fraction * self.total_steps))
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warmup_steps=warmup,
            decay_steps=max(self.total_steps, warmup + 1))

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(self.schedule, b1=self.b1, b2=self.b2,
                        weight_decay=self.weight_decay / self.learning_rate, mask=decay_mask))
