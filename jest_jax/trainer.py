"""The trainer: model, optimizer, sharded train state and the jitted train step.

Selection is a stage of the step, not a fork of the loop: with a `Scorer` attached,
the step scores the super-batch it is given, gathers the selected sub-batch and
updates on it; without one it updates on the batch as drawn (plain SigLIP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jest_jax import faults, losses, sharding
from jest_jax.models import TwoTower
from jest_jax.scoring import Scorer
from jest_jax.selection import Embeddings

State = dict[str, Any]  # {"params": pure dict, "opt_state": optax state, "step": int32[]}
# Folded into the seed's key so selection draws are independent of parameter init.
_SELECTION_STREAM = 0x5E1EC7
DEFAULT_RULES = ((".*", "replicate"),)


def create_model(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> TwoTower:
    m = config.model
    return TwoTower(
        image_size=config.data.image_size, patch_size=m.patch_size,
        image_variant=m.image_variant, text_variant=m.text_variant,
        vocab_size=vocab_size, text_len=config.data.text_len, embed_dim=m.embed_dim,
        dtype=m.dtype, image_pool=m.image_pool, temperature_init=m.temperature_init,
        bias_init=m.bias_init, remat=m.get("remat", False), rngs=rngs)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] → float32 [-1, 1], on device so hosts ship bytes, not floats."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
    """AdamW with linear warm-up then cosine decay to 0, global-norm clipping.

    Weight decay follows big_vision: `p -= weight_decay * (lr(t) / lr_peak) * p` per step,
    i.e. it follows the schedule's shape but not the learning rate's size (optax's adamw
    multiplies by lr(t), hence the division by the peak).
    """
    o = config.optimizer
    warmup = int(round(o.warmup_fraction * config.total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, warmup_steps=warmup, decay_steps=max(config.total_steps, warmup + 1))
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay / o.learning_rate,
                    mask=decay_mask))
    return tx, schedule


def decay_mask(params: dict) -> dict:
    """Projection kernels decay; embeddings, norms, biases, t' and beta do not."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(path[-1].key).endswith("kernel"), params)


@dataclasses.dataclass
class Trainer:
    """Model, optimizer and mesh for one config; builds sharded state and the jitted step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    vocab_size: int
    scorer: Scorer | None = None  # set: each step selects its batch from a super-batch

    def __post_init__(self):
        self.tx, self.schedule = make_optimizer(self.config)
        abstract_model = nnx.eval_shape(
            lambda: create_model(self.config, self.vocab_size, nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract_model, nnx.Param)
        self.abstract_state = jax.eval_shape(self._init, jax.random.key(0))
        # Parameters and optimizer moments are placed by the config's regex rules
        # (replicated by default; FSDP shards each over a mesh axis).
        self.state_sharding = sharding.tree_shardings(
            self.abstract_state, self.mesh, self.config.mesh.get("rules", DEFAULT_RULES))

    def _init(self, key: jax.Array) -> State:
        model = create_model(self.config, self.vocab_size, nnx.Rngs(key))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return {"params": params, "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    def init_state(self, seed: int) -> State:
        """Fresh state, created directly with its final sharding."""
        init = jax.jit(self._init, out_shardings=self.state_sharding)
        return init(jax.random.key(seed))

    def abstract_sharded_state(self) -> State:
        """Shapes, dtypes and shardings of the state: the restore target for orbax."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)

    def embed_images(self, params: dict, images: jax.Array,
                     patch_size: int | None = None) -> jax.Array:
        """uint8 images → L2-normalised float32 embeddings (at another patch size if given)."""
        model = nnx.merge(self.graphdef, params)
        return model.embed_images(normalize_images(images), patch_size)

    def embed_texts(self, params: dict, tokens: jax.Array) -> jax.Array:
        """int32 tokens (0 = pad) → L2-normalised float32 embeddings."""
        return nnx.merge(self.graphdef, params).embed_texts(tokens)

    def embeddings(self, params: dict, batch: dict[str, jax.Array],
                   patch_size: int | None = None) -> Embeddings:
        """The model's view of a batch for scoring: embeddings, t' and β."""
        return Embeddings(self.embed_images(params, batch["image"], patch_size),
                          self.embed_texts(params, batch["tokens"]),
                          params["log_temperature"], params["bias"])

    def loss(self, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """The configured contrastive loss of a batch."""
        e = self.embeddings(params, batch)
        if self.config.loss.name == "softmax":
            return losses.softmax_loss(e.image, e.text, e.log_temperature)
        if self.config.loss.get("implementation", "dense") == "chunked":
            # Texts travel round the devices; no device holds the global B×B logits.
            return losses.sigmoid_loss_chunked(e.image, e.text, e.log_temperature, e.bias,
                                               self.mesh)
        return losses.sigmoid_loss(e.image, e.text, e.log_temperature, e.bias)

    def train_step(self, state: State, batch: dict[str, jax.Array],
                   reference: Any = None) -> tuple[State, dict]:
        """One AdamW update; returns the new state and scalar metrics.

        With a scorer, `batch` is the super-batch: the step selects from it (with a key
        derived from the seed and the step, so a resumed run selects the same) and
        updates on the selection. `reference` is passed through to the scorer.
        """
        metrics = {}
        if self.scorer is not None:
            key = jax.random.fold_in(
                jax.random.fold_in(jax.random.key(self.config.seed), _SELECTION_STREAM),
                state["step"])
            idx, metrics = self.scorer(key, state["params"], reference, batch)
            # The update stays data-parallel: the gathered batch is split like any batch.
            batch = jax.lax.with_sharding_constraint(
                {k: v[idx] for k, v in batch.items()}, sharding.batch_sharding(self.mesh))
        if "is_clean" in batch:
            metrics["selection/clean_selected"] = jnp.mean(batch["is_clean"].astype(jnp.float32))
        loss, grads = jax.value_and_grad(self.loss)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics.update({
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": self.schedule(state["step"]),
            "temperature": jnp.exp(params["log_temperature"]),
            "bias": params["bias"],
        })
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def jit_train_step(self, reference_sharding: Any = None) -> Callable:
        """`train_step` compiled with explicit shardings; the input state is donated.

        Call as `step(state, batch, reference)`. The reference (frozen params placed by
        the same rules as the learner's, or cached t'/β; `{}` when unused) keeps
        `reference_sharding` (default: replicated). Non-finite values are flagged, and with
        `faults.nonfinite="skip"` their update is dropped (`faults.guard_step`).
        """
        batch_sharding = sharding.batch_sharding(self.mesh)
        replicated = sharding.replicated(self.mesh)
        step = faults.guard_step(self.train_step, self.config.faults.nonfinite)
        return jax.jit(step,
                       in_shardings=(self.state_sharding, batch_sharding,
                                     reference_sharding or replicated),
                       out_shardings=(self.state_sharding, replicated),
                       donate_argnums=0)
