"""The one training loop. Every method runs here; selection is a stage of the step."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jest_jax import config as config_lib
from jest_jax import losses, sharding
from jest_jax.checkpoint import Checkpointer
from jest_jax.data.datasets import load_split
from jest_jax.data.pipeline import Preprocess, train_dataset
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.evaluate import Evaluator
from jest_jax.metrics import MetricWriter, Progress, compiled_flops
from jest_jax.models import TwoTower

State = dict[str, Any]  # {"params": pure dict, "opt_state": optax state, "step": int32[]}


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step and the last good checkpoint."""


def create_model(config: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> TwoTower:
    m = config.model
    return TwoTower(
        image_size=config.data.image_size, patch_size=m.patch_size,
        image_variant=m.image_variant, text_variant=m.text_variant,
        vocab_size=vocab_size, text_len=config.data.text_len, embed_dim=m.embed_dim,
        dtype=m.dtype, image_pool=m.image_pool, temperature_init=m.temperature_init,
        bias_init=m.bias_init, rngs=rngs)


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

    def __post_init__(self):
        self.tx, self.schedule = make_optimizer(self.config)
        abstract_model = nnx.eval_shape(
            lambda: create_model(self.config, self.vocab_size, nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract_model, nnx.Param)
        self.abstract_state = jax.eval_shape(self._init, jax.random.key(0))
        # Replicated everywhere for now; FSDP rules plug in here.
        self.state_sharding = jax.tree.map(lambda _: sharding.replicated(self.mesh),
                                           self.abstract_state)

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

    def embed_images(self, params: dict, images: jax.Array) -> jax.Array:
        """uint8 images → L2-normalised float32 embeddings."""
        return nnx.merge(self.graphdef, params).embed_images(normalize_images(images))

    def embed_texts(self, params: dict, tokens: jax.Array) -> jax.Array:
        """int32 tokens (0 = pad) → L2-normalised float32 embeddings."""
        return nnx.merge(self.graphdef, params).embed_texts(tokens)

    def loss(self, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """The configured contrastive loss of a batch."""
        img = self.embed_images(params, batch["image"])
        txt = self.embed_texts(params, batch["tokens"])
        if self.config.loss.name == "softmax":
            return losses.softmax_loss(img, txt, params["log_temperature"])
        return losses.sigmoid_loss(img, txt, params["log_temperature"], params["bias"])

    def train_step(self, state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
        """One AdamW update on `batch`; returns the new state and scalar metrics."""
        loss, grads = jax.value_and_grad(self.loss)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": self.schedule(state["step"]),
            "temperature": jnp.exp(params["log_temperature"]),
            "bias": params["bias"],
        }
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def jit_train_step(self) -> Callable:
        """`train_step` compiled with explicit shardings; the input state is donated."""
        batch_sharding = sharding.batch_sharding(self.mesh)
        return jax.jit(self.train_step,
                       in_shardings=(self.state_sharding, batch_sharding),
                       out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                       donate_argnums=0)


def log(message: str) -> None:
    """Print on process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def open_pool(config: ml_collections.ConfigDict, field: str) -> tuple[Any, Any]:
    """Open the dataset split at config `field`; failures name the field."""
    pool = config_lib.get_field(config, field)
    try:
        return load_split(pool.name, pool.split, pool.data_dir)
    except (ValueError, FileNotFoundError) as e:
        raise config_lib.ConfigError(f"config.{field}: {e}") from None


@dataclasses.dataclass
class Setup:
    """What both training and standalone evaluation need, built from one config."""

    trainer: Trainer
    preprocess: Preprocess
    evaluator: Evaluator
    checkpointer: Checkpointer


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Validate, build mesh/model/optimizer and open every eval split, before compiling."""
    config_lib.validate(config, num_devices=jax.device_count())
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
    tokenizer = make_tokenizer(config.data.tokenizer)
    preprocess = Preprocess(config.data.image_size, tokenizer, config.data.text_len)
    trainer = Trainer(config, mesh, tokenizer.vocab_size)
    evaluator = Evaluator(config, trainer, preprocess, open_pool)
    return Setup(trainer, preprocess, evaluator,
                 Checkpointer(workdir, config.checkpoint.max_to_keep))


def _check_finite(step: int, metrics: dict[str, float], last_good: int | None,
                  ckpt_dir: str) -> None:
    for name in ("loss", "grad_norm"):
        if not np.isfinite(metrics[name]):
            kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_dir}"
                    if last_good is not None else "no checkpoint was written")
            raise NonFiniteLossError(
                f"non-finite {name}={metrics[name]} at step {step}; stopping: {kept}")


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at_step: int | None = None) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`; returns the final evaluation metrics.

    `stop_at_step` checkpoints and returns early at that step (the schedule still
    spans `total_steps`), e.g. for time-sliced jobs; re-running resumes from there.
    """
    s = setup(config, workdir)
    trainer, ckpt, mesh = s.trainer, s.checkpointer, s.trainer.mesh
    source, _ = open_pool(config, "data.train")
    try:
        data = train_dataset(source, s.preprocess, batch_size=config.batch_size,
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             num_threads=config.data.num_threads)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.data.train: {e}") from None
    data_iter = iter(data)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    last_good = ckpt.latest_step()
    if last_good is not None:
        state = ckpt.restore(trainer.abstract_sharded_state(), data_iter)
        log(f"resuming from the checkpoint at step {last_good} in {ckpt.directory}")
    else:
        state = trainer.init_state(config.seed)
    start = int(state["step"])
    writer = MetricWriter(workdir, config.logging.tensorboard)
    writer.truncate_after(start)  # drop rows a crashed run logged after its last checkpoint

    step_fn = trainer.jit_train_step()
    batch = sharding.to_global(next(data_iter), mesh) if start < config.total_steps else None
    # XLA reports the per-device program; the run executes it on every device.
    flops_per_step = (compiled_flops(step_fn.lower(state, batch).compile()) * mesh.size
                      if batch is not None else float("nan"))
    progress = Progress(config.total_steps, start)
    results: dict[str, float] = {}
    pending: tuple[int, dict] | None = None

    def report(step: int, metrics: dict) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, host, last_good, ckpt.directory)
        if step % config.logging.every_steps == 0 or step == config.total_steps:
            progress.update(step, {"loss": host["loss"]})
            writer.write(step, {**host, "steps_per_sec": progress.steps_per_sec,
                                "flops": flops_per_step * step})

    def evaluate(step: int) -> dict[str, float]:
        out = s.evaluator.run(state["params"])
        writer.write(step, out)
        log(f"[{step:>6}/{config.total_steps}] eval " +
            " ".join(f"{k}={v:.3f}" for k, v in out.items()))
        progress.restart_clock(step)
        return out

    try:
        for step in range(start + 1, config.total_steps + 1):
            state, metrics = step_fn(state, batch)
            if pending is not None:  # fetched a step late: the device is already busy
                report(*pending)
            pending = (step, metrics)
            final, stopping = step == config.total_steps, step == stop_at_step
            if step % config.checkpoint.every_steps == 0 or final or stopping:
                report(*pending)  # never checkpoint a step whose loss was not checked
                pending = None
                # Saved before the next batch is drawn, so a resume redraws it.
                ckpt.save(step, state, data_iter)
                last_good = step
                progress.restart_clock(step)
            if (config.evals.every_steps and step % config.evals.every_steps == 0) or final:
                results = evaluate(step)
            if stopping and not final:
                log(f"stopping at step {step} (stop_at_step); re-run to resume")
                break
            if not final:
                batch = sharding.to_global(next(data_iter), mesh)
        if start >= config.total_steps:
            log(f"already trained to step {start}; evaluating the final checkpoint")
            results = s.evaluator.run(state["params"])
    finally:
        ckpt.close()
        writer.close()
    if results and jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": int(state["step"]), **results}, f, indent=2)
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, float]:
    """Standalone evaluation of a checkpoint in `workdir` (latest unless `step` is given)."""
    s = setup(config, workdir)
    step = s.checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to evaluate in {s.checkpointer.directory}")
    state = s.checkpointer.restore(s.trainer.abstract_sharded_state(), step=step)
    s.checkpointer.close()
    results = s.evaluator.run(state["params"])
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_step{step}.json"), "w") as f:
            json.dump({"step": step, **results}, f, indent=2)
    return results
