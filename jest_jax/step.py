"""The train state and the one train step every method, mode and benchmark compiles.

Selection is a stage of the step, not a fork of the loop: with a `Scorer`, the step
scores the super-batch it is given, gathers the selected sub-batch and updates on it;
without one it updates on the batch as drawn (plain SigLIP). The step returns the new
state, its metrics and its `faults.Health`, which is kept apart from the metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jest_jax import faults, sharding
from jest_jax.faults import FaultPolicy
from jest_jax.losses import Embeddings, Loss
from jest_jax.models import Model
from jest_jax.optimizer import Optimizer
from jest_jax.scoring import Scorer

State = dict[str, Any]  # {"params": pure dict, "opt_state": optax state, "step": int32[]}
Step = Callable[[State, dict[str, jax.Array], Any], tuple[State, dict, faults.Health]]


class TrainState:
    """Shapes, dtypes and placement of the train state of `model` under `optimizer`.

    Parameters and optimizer moments are placed by the mesh's regex rules (replicated by
    default; FSDP shards each over a mesh axis); the state is created already sharded.
    """

    def __init__(self, model: Model, optimizer: Optimizer, mesh: jax.sharding.Mesh,
                 mesh_spec: sharding.MeshSpec):
        self.model, self.optimizer, self.mesh = model, optimizer, mesh
        self.abstract = jax.eval_shape(self._init, jax.random.key(0))
        self.sharding = mesh_spec.shardings(self.abstract, mesh)

    def _init(self, key: jax.Array) -> State:
        params = self.model.init(key)
        return {"params": params, "opt_state": self.optimizer.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    def init(self, seed: int, params: dict | None = None) -> State:
        """Fresh state, created directly with its final sharding; with `params` (host
        arrays of the params' shapes, e.g. a pretrained checkpoint), those instead of a
        random init, and a fresh optimizer state for them."""
        if params is None:
            return jax.jit(self._init, out_shardings=self.sharding)(jax.random.key(seed))
        placed = sharding.from_host(params, self.abstract_params())
        return jax.jit(self._from_params, out_shardings=self.sharding)(placed)

    def _from_params(self, params: dict) -> State:
        return {"params": params, "opt_state": self.optimizer.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    def abstract_sharded(self) -> State:
        """Shapes, dtypes and shardings of the state: the restore target for orbax."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.sharding)

    def abstract_params(self) -> dict:
        return self.abstract_sharded()["params"]


def batch_loss(model: Model, loss: Loss, mesh: jax.sharding.Mesh, params: dict,
               batch: dict[str, jax.Array]) -> jax.Array:
    """The configured contrastive loss of `batch` under `params`.

    With multi-resolution training (`model.low_res_patch_size`, Flexi-JEST), the first
    λ·b examples of the batch run the image tower at the low-resolution patch size and the
    rest at the full one; one loss covers all b×b pairs of the concatenated embeddings
    (docs/design.md §1).
    """
    low = model.spec.low_res_examples(batch["image"].shape[0])
    if not low:
        return loss(model.embeddings(params, batch), mesh)
    return loss(mixed_embeddings(model, mesh, params, batch, low), mesh)


def mixed_embeddings(model: Model, mesh: jax.sharding.Mesh, params: dict,
                     batch: dict[str, jax.Array], low: int) -> Embeddings:
    """The batch's embeddings with its first `low` images at the low-resolution patch size.

    Each part is laid out over all the devices (`low` is a multiple of their number,
    checked at start-up), so every device embeds its share of both resolutions and the
    assignment of examples to resolutions is the same on any number of devices.
    """
    spread = functools.partial(jax.lax.with_sharding_constraint,
                               shardings=sharding.batch_sharding(mesh))
    images = batch["image"]
    parts = [model.embed_images(params, spread(images[:low]), model.spec.low_res_patch_size)]
    if low < images.shape[0]:
        parts.append(model.embed_images(params, spread(images[low:])))
    image = spread(jnp.concatenate(parts)) if len(parts) > 1 else parts[0]
    return Embeddings(image, model.embed_texts(params, batch["tokens"]),
                      params["log_temperature"], params["bias"])


def make_train_step(model: Model, optimizer: Optimizer, loss: Loss, mesh: jax.sharding.Mesh,
                    scorer: Scorer | None = None, guard: FaultPolicy | None = None) -> Step:
    """The pure train step `(state, batch, reference) -> (state, metrics, health)`.

    With `scorer`, `batch` is the super-batch: the step selects from it (with the key of
    its step, so a resumed run selects the same) and updates on the selection;
    `reference` is the reference source's step input. `guard` says what a non-finite step
    does (`faults.apply_policy`); without one the new state is kept and the loop decides.
    """
    batch_sharding = sharding.batch_sharding(mesh)

    def step(state: State, batch: dict[str, jax.Array], reference: Any
             ) -> tuple[State, dict, faults.Health]:
        metrics: dict[str, jax.Array] = {}
        scores_ok = jnp.array(True)
        if scorer is not None:
            idx, metrics, scores_ok = scorer(scorer.key(state["step"]), state["params"],
                                             reference, batch, state["step"])
            # The update stays data-parallel: the gathered batch is split like any batch.
            batch = jax.lax.with_sharding_constraint({k: v[idx] for k, v in batch.items()},
                                                     batch_sharding)
        if "is_clean" in batch:
            metrics["selection/clean_selected"] = jnp.mean(batch["is_clean"].astype(jnp.float32))
        value, grads = jax.value_and_grad(
            lambda p: batch_loss(model, loss, mesh, p, batch))(state["params"])
        updates, opt_state = optimizer.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        metrics.update({
            "loss": value,
            "grad_norm": grad_norm,
            "learning_rate": optimizer.schedule(state["step"]),
            "temperature": jnp.exp(params["log_temperature"]),
            "bias": params["bias"],
        })
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        health = faults.check(scores_ok, value, grad_norm, new)
        if guard is not None:
            new = faults.apply_policy(guard, health, new, state)
        return new, metrics, health

    return step


def jit_train_step(step: Step, state: TrainState, reference_sharding: Any = None) -> Callable:
    """`step` compiled with explicit shardings; the input state is donated.

    Call as `step(state, batch, reference)`. The reference input (frozen params placed by
    the learner's rules, or cached t'/β; `{}` when unused) keeps `reference_sharding`
    (default: replicated).
    """
    replicated = sharding.replicated(state.mesh)
    return jax.jit(step,
                   in_shardings=(state.sharding, sharding.batch_sharding(state.mesh),
                                 reference_sharding or replicated),
                   out_shardings=(state.sharding, replicated, replicated),
                   donate_argnums=0)
