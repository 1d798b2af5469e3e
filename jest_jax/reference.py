"""The frozen reference model behind a learner run: where it comes from (docs/design.md
§4, "Reference source"), and its embedding cache (paper §A.5).

A `ReferenceSource` gives the train step three things: its `step_input` (the pytree the
jitted step is handed each call), `embed(step_input, batch)` (the reference's
`Embeddings` of the candidates, inside the step) and `attach` (per-example fields the
input pipeline adds to each record, or None). Three are built in:

* `NoReference`: criteria that read no reference, and plain SigLIP;
* `OnlineReference`: a trained jest_jax run (`selection.reference.workdir`), rebuilt
  from its `config.json` and restored params only (no optimizer, no Adam moments);
* `CachedReference`: the reference's embeddings of every example of the learner's pool,
  computed once by `--mode cache` into `selection.reference.cache_dir`, attached to
  each candidate by the pipeline, so no reference forward pass runs while training.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jest_jax import log, sharding
from jest_jax.checkpoint import Checkpointer, CheckpointError, brief, latest_step
from jest_jax.data import sources
from jest_jax.data.pipeline import DataSpec, eval_batches
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.fields import ConfigError, Section
from jest_jax.files import read_json, write_json
from jest_jax.losses import Embeddings
from jest_jax.metrics import compiled_flops
from jest_jax.models import Model, ModelSpec

_WORKDIR = "selection.reference.workdir"
_CACHE = "selection.reference.cache_dir"
# Preprocessing the reference must share with the learner: both see the same batch.
_SHARED_DATA_FIELDS = ("image_size", "text_len", "tokenizer")
CACHE_FORMAT = 1


class ReferenceSource(Protocol):
    """What the train step needs of a reference model."""

    step_input: Any  # handed to the jitted step every call: frozen params, t'/β, or {}
    attach: Callable[[int], dict[str, np.ndarray]] | None  # record index → extra fields
    batch_fields: ClassVar[tuple[str, ...]]  # the per-example fields `attach` adds

    def embed(self, step_input: Any, batch: dict[str, jax.Array],
              norms: bool = False) -> Embeddings | None:
        """The reference's embeddings of the candidates in `batch` (inside the step)."""


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """`config.selection.reference`: which reference, if the selection needs one."""

    workdir: str
    cache_dir: str
    needed: bool

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.workdir = ""    # a reference run's workdir; its latest checkpoint is loaded frozen.
        #                   Needed by criteria using a reference
        c.cache_dir = ""  # reference embeddings of data.train, made by `--mode cache`; ""
        #                   runs the reference every step
        return c

    @classmethod
    def from_config(cls, section: Section, needed: bool, criterion: str,
                    check_files: bool = True) -> ReferenceSpec:
        """`needed`: the selection reads a reference (by `criterion`); `check_files=False`
        (abstract compiles) does not require the run to exist."""
        workdir, cache_dir = section.string("workdir"), section.string("cache_dir")
        if needed and check_files:
            section.check(workdir != "", "workdir", workdir,
                          f"criterion {criterion!r} needs a reference model: give the "
                          "workdir of a run trained on curated data")
            section.check(latest_step(workdir) is not None, "workdir", workdir,
                          "has no checkpoint; train the reference there first")
        return cls(workdir, cache_dir, needed)

    def open(self, data: DataSpec, mesh: jax.sharding.Mesh,
             mesh_spec: sharding.MeshSpec) -> ReferenceSource:
        """The source this section names: the cache if given, else the run, else none."""
        if self.cache_dir and not self.needed:
            log.info(f"note: config.{_CACHE} is set but this selection uses no reference; "
                     "the cache is not read")
        if not self.needed:
            return NoReference()
        if self.cache_dir:
            return CachedReference.open(self, data)
        return OnlineReference.load(self.workdir, data, mesh, mesh_spec)

    def abstract(self, model: Model, mesh: jax.sharding.Mesh,
                 mesh_spec: sharding.MeshSpec) -> ReferenceSource:
        """The source `open` would give, as shapes only and without reading a file (to
        compile the step ahead of time): `model`'s architecture stands in for the run."""
        if not self.needed:
            return NoReference()
        if self.cache_dir:
            return CachedReference.abstract(mesh)
        return OnlineReference(model, placed_params(model, mesh, mesh_spec))


class NoReference:
    """No reference model: nothing is loaded, nothing reaches the step."""

    step_input: dict = {}
    attach = None
    batch_fields: ClassVar[tuple[str, ...]] = ()

    def embed(self, step_input: Any, batch: dict, norms: bool = False) -> None:
        return None


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: hashed by identity
class OnlineReference:
    """A trained jest_jax run, frozen: its model and params, run on every super-batch."""

    model: Model
    params: Any  # placed by the learner's sharding rules (or abstract, for compiles)
    step: int = 0
    workdir: str = ""
    attach: ClassVar[None] = None
    batch_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def step_input(self) -> Any:
        return self.params

    def embed(self, step_input: Any, batch: dict[str, jax.Array],
              norms: bool = False) -> Embeddings:
        return self.model.embeddings(step_input, batch, norms=norms)

    @classmethod
    def load(cls, workdir: str, data: DataSpec, mesh: jax.sharding.Mesh,
             mesh_spec: sharding.MeshSpec) -> OnlineReference:
        """Rebuild the run in `workdir` from its config.json; restore its latest params,
        placed on `mesh` by the learner's rules whatever the reference ran on."""
        model = reference_model(workdir, data)
        step = latest_step(workdir)
        if step is None:
            raise ConfigError(f"config.{_WORKDIR}={workdir!r} has no checkpoint: train the "
                              "reference there first")
        abstract = placed_params(model, mesh, mesh_spec)
        checkpointer = Checkpointer(workdir)  # read-only use: nothing there is moved or removed
        try:
            params = checkpointer.restore_params(abstract, step)
        except Exception as e:  # tensorstore/orbax raise many types for damaged files
            raise CheckpointError(
                f"config.{_WORKDIR}={workdir!r}: its checkpoint at step {step} cannot be "
                f"restored ({brief(e)}). Training in that workdir again moves a damaged "
                "checkpoint aside and resumes from the previous one; or point to another "
                "reference run") from None
        finally:
            checkpointer.close()
        return cls(model, params, step, os.path.realpath(workdir))


def reference_model(workdir: str, data: DataSpec) -> Model:
    """The model of the run in `workdir`, checked to see inputs as the learner does."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"config.{_WORKDIR}={workdir!r} is not a run's workdir "
                          "(no config.json)")
    saved = ml_collections.ConfigDict(read_json(path))
    # A field added since the reference was trained takes its default: each default is
    # what the code did before the field existed (docs/design.md §4, "Config").
    model_fields = ModelSpec.defaults()
    model_fields.update(saved.get("model", {}))
    for key in _SHARED_DATA_FIELDS:
        if saved.data[key] != getattr(data, key):
            raise ConfigError(
                f"config.{_WORKDIR}: the reference was trained with data.{key}="
                f"{saved.data[key]!r} but this run uses {getattr(data, key)!r}; the "
                "learner and reference score the same inputs, so they must match")
    try:
        spec = ModelSpec.from_config(Section(model_fields, "model"), data.image_size,
                                     data.text_len)
    except (ConfigError, AttributeError) as e:
        raise ConfigError(f"config.{_WORKDIR}={workdir!r}: its config.json does not describe "
                          f"a model this version can build ({e}); it was written by an older "
                          "jest_jax, so retrain the reference") from None
    return Model(spec, make_tokenizer(data.tokenizer).vocab_size)


def placed_params(model: Model, mesh: jax.sharding.Mesh, mesh_spec: sharding.MeshSpec) -> Any:
    """`model`'s abstract params, placed by `mesh_spec`'s rules as a learner's would be."""
    abstract = {"params": model.abstract_params()}  # rules match "params/..." paths
    shardings = mesh_spec.shardings(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)["params"]


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: hashed by identity
class CachedReference:
    """The reference cache: embeddings looked up per record, t' and β handed to the step."""

    scalars: dict[str, Any]  # {"log_temperature", "bias"}: NumPy scalars, or abstract
    attach: Callable[[int], dict[str, np.ndarray]] | None = None
    batch_fields: ClassVar[tuple[str, ...]] = ("ref_image", "ref_text")

    @property
    def step_input(self) -> dict[str, Any]:
        return self.scalars

    def embed(self, step_input: dict[str, jax.Array], batch: dict[str, jax.Array],
              norms: bool = False) -> Embeddings:
        # The cache holds unit embeddings only: no norms to offer a criterion.
        return Embeddings(batch["ref_image"], batch["ref_text"], step_input["log_temperature"],
                          step_input["bias"])

    @classmethod
    def open(cls, spec: ReferenceSpec, data: DataSpec) -> CachedReference:
        cache = ReferenceCache(spec, data)
        return cls(cache.scalars, cache)

    @classmethod
    def abstract(cls, mesh: jax.sharding.Mesh) -> CachedReference:
        """Shapes only, for compiling a step that reads a cache (no files)."""
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
        return cls({"log_temperature": scalar, "bias": scalar})


def write_cache(spec: ReferenceSpec, data: DataSpec, mesh: jax.sharding.Mesh,
                mesh_spec: sharding.MeshSpec, batch_size: int) -> str:
    """Embed every example of `data.train` with the reference into `spec.cache_dir`;
    returns the directory. An existing cache is replaced only once the new one is
    complete."""
    directory = spec.cache_dir
    if not directory:
        raise ConfigError(f"config.{_CACHE} is empty: set where the cache should go")
    if not spec.workdir:
        raise ConfigError(f"config.{_WORKDIR} is empty: name the reference run to cache")
    ref = OnlineReference.load(spec.workdir, data, mesh, mesh_spec)
    pool = sources.open_source(data.train, "data.train")
    n = len(pool)
    embed = jax.jit(lambda p, b: ref.embed(p, b)[:2],  # (image, text)
                    out_shardings=sharding.replicated(mesh))
    write = jax.process_index() == 0
    tmp = f"{directory.rstrip('/')}.partial"
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    arrays: dict[str, np.ndarray] = {}
    progress = log.Progress(-(-n // batch_size), 0)  # counts batches
    log.info(f"caching reference embeddings (step {ref.step} of {ref.workdir}) of "
             f"{pool.description}, {n} examples -> {directory}")
    flops = 0.0  # the pass's cost, for comparisons that account for it (XLA, all devices)
    batches = 0
    for i, local in enumerate(eval_batches(pool, data.preprocess(check_captions=False),
                                           batch_size=batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())):
        batch = sharding.to_global({k: local[k] for k in ("image", "tokens")}, mesh)
        if i == 0:
            flops = compiled_flops(embed.lower(ref.params, batch).compile()) * mesh.size
        batches = i + 1
        image, text = sharding.to_host(embed(ref.params, batch))
        index = sharding.to_host(sharding.to_global({"i": local["index"],
                                                     "m": local["mask"]}, mesh))
        rows = index["i"][index["m"]]
        if write:
            for name, value in (("image", image), ("text", text)):
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        os.path.join(tmp, f"{name}.npy"), "w+", np.float32, (n, value.shape[1]))
                arrays[name][rows] = np.asarray(value, np.float32)[index["m"]]
        if (i + 1) % 20 == 0:
            progress.update(i + 1, {})
    if write:
        for array in arrays.values():
            array.flush()
        write_json(os.path.join(tmp, "meta.json"), {
            "format": CACHE_FORMAT, "reference_workdir": ref.workdir,
            "reference_step": ref.step, "num_examples": n, "pool": data.identity(),
            "log_temperature": float(ref.params["log_temperature"]),
            "bias": float(ref.params["bias"]), "created": time.strftime("%Y-%m-%d %H:%M"),
            "flops": flops * batches})
        # Swap by renames so that a crash leaves the old cache or the new one, never none.
        old = f"{directory.rstrip('/')}.old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    log.info(f"wrote {directory}")
    return directory


class ReferenceCache:
    """Read side of the cache: `cache(index)` → that example's reference embeddings."""

    def __init__(self, spec: ReferenceSpec, data: DataSpec):
        self.directory = directory = spec.cache_dir
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"config.{_CACHE}={directory!r} holds no reference cache: "
                              "create it with `python -m jest_jax.main --mode cache` and the "
                              "same config")
        self.meta = read_json(meta_path)
        if self.meta.get("format") != CACHE_FORMAT:
            raise ConfigError(f"config.{_CACHE}={directory!r}: cache format "
                              f"{self.meta.get('format')} is not {CACHE_FORMAT}; re-create it")
        if self.meta["pool"] != data.identity():
            raise ConfigError(f"config.{_CACHE}={directory!r} was made for {self.meta['pool']}, "
                              f"but this run trains on {data.identity()}; re-create it")
        workdir = os.path.realpath(spec.workdir)
        if (self.meta["reference_workdir"], self.meta["reference_step"]) != (
                workdir, latest_step(workdir)):
            raise ConfigError(
                f"config.{_CACHE}={directory!r} holds step {self.meta['reference_step']} of "
                f"{self.meta['reference_workdir']}, not the latest checkpoint of "
                f"config.{_WORKDIR}={workdir!r}; re-create it")
        self.image = np.load(os.path.join(directory, "image.npy"), mmap_mode="r")
        self.text = np.load(os.path.join(directory, "text.npy"), mmap_mode="r")
        pool_size = len(sources.open_source(data.train, "data.train"))
        if not self.meta["num_examples"] == len(self.image) == len(self.text) == pool_size:
            raise ConfigError(f"config.{_CACHE}={directory!r} holds {len(self.image)} rows but "
                              f"the pool has {pool_size} examples (rebuilt?); re-create it")

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """The reference's t' and β, passed to the train step as its input."""
        return {k: np.float32(self.meta[k]) for k in ("log_temperature", "bias")}

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return {"ref_image": np.array(self.image[index]), "ref_text": np.array(self.text[index])}
