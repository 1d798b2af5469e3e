"""The composition root: every component of a run, built once from one validated config.

`wire` is the one place where model, optimizer, loss, selection and reference source
become the jitted train step; `build` adds what a real run reads (tokenizer, reference
files, eval splits, the checkpoint `model.init_from` names). Training, `--mode eval`,
`experiments/compile_paper.py` (with an abstract reference) and the benchmarks all go
through `wire`, so there is no second wiring path (docs/design.md §4, "Train step").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import ml_collections

from jest_jax import config as config_lib
from jest_jax import log, sharding
from jest_jax.data.pipeline import Preprocess
from jest_jax.evaluate import EvalRunner
from jest_jax.metrics import compiled_flops
from jest_jax.models import Model, big_vision
from jest_jax.reference import NoReference, ReferenceSource
from jest_jax.scoring import Scorer
from jest_jax.step import TrainState, jit_train_step, make_train_step

# What the update reads of a selected batch (the rest, such as cached reference
# embeddings, is only read by scoring).
UPDATE_FIELDS = ("image", "tokens", "is_clean")


@dataclasses.dataclass(frozen=True)
class Wired:
    """The model and its jitted train step, with what they need around them."""

    model: Model
    state: TrainState
    scorer: Scorer | None
    reference: ReferenceSource
    step: Callable  # jitted: (state, batch, reference.step_input) -> (state, metrics, health)
    update: Callable | None = None  # with selection: the same step without it, on b examples

    def flops(self, batch: dict[str, jax.Array], reference_input) -> dict[str, float]:
        """XLA's FLOPs of one step over all devices (XLA reports one device's program):
        `flops`, the whole compiled step; `flops/update`, the learner's update alone on the
        b selected examples; `flops/scoring`, the difference, everything selection adds
        (learner and reference forward passes on the candidates, the selection kernel, the
        gather). The update is counted on its lowered program, before XLA's optimisation:
        compiling it only to count would cost every run a second compile of about half the
        step's time, and the two counts differ by about 0.5% on configs/shapes.py
        (docs/benchmarks.md, "FLOPs accounting")."""
        devices = self.state.mesh.size
        state = self.state.abstract_sharded()
        total = compiled_flops(self.step.lower(state, batch, reference_input).compile())
        total *= devices
        if self.update is None:
            return {"flops": total, "flops/update": total, "flops/scoring": 0.0}
        rows, placement = self.scorer.spec.num_select, sharding.batch_sharding(self.state.mesh)
        selected = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=placement)
                    for k, v in batch.items() if k in UPDATE_FIELDS}
        update = compiled_flops(self.update.lower(state, selected, {})) * devices
        return {"flops": total, "flops/update": update, "flops/scoring": total - update}


def wire(spec: config_lib.Spec, mesh: jax.sharding.Mesh, vocab_size: int,
         reference: ReferenceSource, selection: bool = True) -> Wired:
    """Model, sharded state layout, scorer and jitted step for `spec` on `mesh`.

    `reference` is the source the step reads (a real one, or abstract for compiles);
    `selection=False` builds the plain step (evaluation needs no scorer).
    """
    model = Model(spec.model, vocab_size)
    state = TrainState(model, spec.optimizer, mesh, spec.mesh)
    scorer = None
    if selection and spec.selection.active:
        scorer = Scorer(spec.selection, spec.seed,
                        functools.partial(model.embeddings,
                                          patch_size=spec.selection.score_patch_size),
                        reference, sharding.rows_sharding(mesh))
    step = make_train_step(model, spec.optimizer, spec.loss, mesh, scorer, spec.faults)
    jitted = jit_train_step(step, state, sharding.placed(reference.step_input, mesh))
    update = None
    if scorer is not None:  # lowered (never run) to count the update's FLOPs apart from scoring
        update = jit_train_step(make_train_step(model, spec.optimizer, spec.loss, mesh,
                                                guard=spec.faults), state)
    return Wired(model, state, scorer, reference, jitted, update)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training run or an evaluation uses, built from one config."""

    spec: config_lib.Spec
    mesh: jax.sharding.Mesh
    preprocess: Preprocess
    wired: Wired
    evaluator: EvalRunner

    @property
    def model(self) -> Model:
        return self.wired.model

    @property
    def state(self) -> TrainState:
        return self.wired.state

    def initial_state(self) -> dict:
        """The train state a new run starts from: `model.init_from`'s params if given
        (read only now, not when a run resumes), else a random init from the seed."""
        return self.state.init(self.spec.seed, self.initial_params())

    def initial_params(self) -> dict | None:
        """`model.init_from`'s params as host arrays; None without one."""
        if not self.spec.model.init_from:
            return None
        with init_checkpoint(self.spec, self.model) as (file, fields):
            log.info(f"initialising the model from {self.spec.model.init_from}")
            return file.params(self.model, fields, self.spec.model.init_resize_posemb)


def build(config: ml_collections.ConfigDict, selection: bool = True) -> Run:
    """Validate `config` for this process's devices and build its run.

    Every eval split is opened (and checked) and, with `selection`, the reference is
    loaded, all before anything is compiled: a bad field fails in seconds.
    """
    spec = config_lib.validate(config, num_devices=jax.device_count())
    mesh = spec.mesh.build()
    preprocess = spec.data.preprocess()
    reference = spec.reference.open(spec.data, mesh, spec.mesh) if selection else NoReference()
    wired = wire(spec, mesh, preprocess.tokenizer.vocab_size, reference, selection)
    if spec.model.init_from:  # every key and shape, before anything is compiled
        with init_checkpoint(spec, wired.model) as (file, fields):
            file.check(wired.model, fields, spec.model.init_resize_posemb)
    evaluator = EvalRunner(spec.evals, wired.model, mesh, wired.state.sharding["params"],
                           preprocess)
    return Run(spec, mesh, preprocess, wired, evaluator)


@contextlib.contextmanager
def init_checkpoint(spec: config_lib.Spec, model: Model
                    ) -> Iterator[tuple[big_vision.NpzCheckpoint, big_vision.Fields]]:
    """The file `model.init_from` names, and the fields its messages name."""
    m = spec.model
    fields = big_vision.Fields(
        "model.init_from", "model.init_resize_posemb",
        f"config.model (image_variant={m.image_variant!r}, text_variant={m.text_variant!r}, "
        f"patch_size={m.patch_size}, image_pool={m.image_pool!r}, "
        f"image_head={m.image_head}, embed_dim={m.embed_dim})")
    with big_vision.NpzCheckpoint(m.init_from, "model.init_from") as file:
        yield file, fields
