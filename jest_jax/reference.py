"""The frozen reference model behind a learner run: where it comes from (docs/design.md
§4, "Reference source"), and its embedding cache (paper §A.5).

A `ReferenceSource` gives the train step three things: its `step_input` (the pytree the
jitted step is handed each call), `embed(step_input, batch)` (the reference's
`Embeddings` of the candidates, inside the step) and `attach` (per-example fields the
input pipeline adds to each batch, by record index, or None). Three are built in:

* `NoReference`: criteria that read no reference, and plain SigLIP;
* `OnlineReference`: a trained jest_jax run (`selection.reference.workdir`), rebuilt
  from its `config.json` and restored params only (no optimizer, no Adam moments), or a
  public SigLIP checkpoint (`selection.reference.checkpoint`, a big_vision `.npz`, with
  its `variant`; docs/pretrained.md), needing no jest_jax workdir;
* `CachedReference`: the reference's embeddings of every example of the learner's pool,
  computed once by `--mode cache` into `selection.reference.cache_dir` (a sharded
  tensorstore array, `cache_store`, written by every process in parallel and resumable),
  attached to each candidate by the pipeline, so no reference forward pass runs while
  training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jest_jax import cache_store, files, log, sharding
from jest_jax.checkpoint import Checkpointer, CheckpointError, brief, latest_step
from jest_jax.data import sources
from jest_jax.data.pipeline import DataSpec
from jest_jax.embed import write_cache as write_cache_shards
from jest_jax.fields import ConfigError, Section
from jest_jax.losses import Embeddings
from jest_jax.models import Model, ModelSpec, big_vision

_WORKDIR = "selection.reference.workdir"
_CACHE = "selection.reference.cache_dir"
_CHECKPOINT = "selection.reference.checkpoint"
_VARIANT = "selection.reference.variant"
_RESIZE = "selection.reference.resize_posemb"
# Preprocessing the reference must share with the learner: both see the same batch.
_SHARED_DATA_FIELDS = ("image_size", "text_len", "tokenizer", "text_style")
CACHE_FORMAT = cache_store.FORMAT


class ReferenceSource(Protocol):
    """What the train step needs of a reference model."""

    step_input: Any  # handed to the jitted step every call: frozen params, t'/β, or {}
    attach: Callable[[np.ndarray], dict[str, np.ndarray]] | None  # record indices → fields
    batch_fields: ClassVar[tuple[str, ...]]  # the per-example fields `attach` adds

    def embed(self, step_input: Any, batch: dict[str, jax.Array],
              norms: bool = False) -> Embeddings | None:
        """The reference's embeddings of the candidates in `batch` (inside the step)."""


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """`config.selection.reference`: which reference, if the selection needs one."""

    workdir: str
    cache_dir: str
    checkpoint: str
    variant: str
    resize_posemb: bool
    needed: bool
    cache_dtype: str = "float32"
    cache_shard_rows: int = 65536

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.workdir = ""    # a reference run's workdir; its latest checkpoint is loaded frozen.
        #                   Criteria using a reference need it or `checkpoint`
        c.cache_dir = ""  # reference embeddings of data.train, made by `--mode cache`; ""
        #                   runs the reference every step
        c.checkpoint = ""  # instead of a workdir: a public SigLIP / SigLIP 2 big_vision .npz
        #                    (local or gs://), docs/pretrained.md
        c.variant = ""     # the checkpoint's variant: B/16, L/16, So400m/14, So400m/16
        c.resize_posemb = False  # resize the checkpoint's image position embeddings to
        #                          data.image_size (else another size is an error)
        c.cache_dtype = "float32"  # float32 | bfloat16: the cache's rows (bfloat16 halves it;
        #                            its selections then match the online reference's
        #                            approximately, not exactly)
        c.cache_shard_rows = 65536  # rows per cache shard: one object, written whole by one
        #                             process; the unit a preempted --mode cache redoes
        return c

    @classmethod
    def from_config(cls, section: Section, needed: bool, criterion: str,
                    check_files: bool = True) -> ReferenceSpec:
        """`needed`: the selection reads a reference (by `criterion`); `check_files=False`
        (abstract compiles) does not require the run to exist."""
        workdir, cache_dir = section.string("workdir"), section.string("cache_dir")
        checkpoint, variant = section.string("checkpoint"), section.string("variant")
        resize = section.boolean("resize_posemb")
        cache_dtype = section.choice("cache_dtype", cache_store.DTYPES)
        shard_rows = section.integer("cache_shard_rows", 1)
        section.check(not (workdir and checkpoint), "checkpoint", checkpoint,
                      "cannot be given with selection.reference.workdir: the reference is "
                      "a jest_jax run or a published checkpoint, not both")
        if checkpoint:
            try:
                big_vision.variant_fields(variant)
            except ValueError as e:
                raise section.error("variant", variant, str(e)) from None
        if needed and check_files:
            section.check(workdir != "" or checkpoint != "", "workdir", workdir,
                          f"criterion {criterion!r} needs a reference model: give the "
                          "workdir of a run trained on curated data, or a published "
                          "checkpoint as selection.reference.checkpoint")
            if workdir:
                section.check(latest_step(workdir) is not None, "workdir", workdir,
                              "has no checkpoint; train the reference there first")
            elif "://" not in checkpoint:
                section.check(os.path.isfile(checkpoint), "checkpoint", checkpoint,
                              "is not a file")
        return cls(workdir, cache_dir, checkpoint, variant, resize, needed, cache_dtype,
                   shard_rows)

    def online(self, data: DataSpec, mesh: jax.sharding.Mesh,
               mesh_spec: sharding.MeshSpec) -> OnlineReference:
        """The reference model itself: the published checkpoint, or the run's latest."""
        if self.checkpoint:
            return OnlineReference.pretrained(self, data, mesh, mesh_spec)
        return OnlineReference.load(self.workdir, data, mesh, mesh_spec)

    def checkpoint_identity(self) -> dict[str, Any]:
        """What names a published reference (its embedding cache records it): the file,
        its size and modification time (so a file replaced at the same path is another
        reference), the variant and the resizing."""
        path = files.absolute(self.checkpoint, resolve_links=True)
        identity = {"path": path, "variant": self.variant, "resize_posemb": self.resize_posemb}
        try:
            if files.is_url(path):
                size, mtime = files.stat(path)
                identity.update(size=size, mtime=mtime)
            else:  # nanoseconds: a file replaced within the same second is another one
                stat = os.stat(path)
                identity.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        except Exception as e:  # noqa: BLE001 - remote file systems raise many types
            log.info(f"note: cannot stat {path} ({e}); its cache is named by path only")
        return identity

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
        return self.online(data, mesh, mesh_spec)

    def abstract(self, model: Model, mesh: jax.sharding.Mesh,
                 mesh_spec: sharding.MeshSpec) -> ReferenceSource:
        """The source `open` would give, as shapes only and without reading a file (to
        compile the step ahead of time): `model`'s architecture stands in for the run."""
        if not self.needed:
            return NoReference()
        if self.cache_dir:
            return CachedReference.abstract(mesh)
        if self.checkpoint:
            model = pretrained_model(self.variant, model.spec.image_size, model.spec.text_len,
                                     model.vocab_size)
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
    workdir: str = ""   # the run it was trained in, or
    checkpoint: str = ""  # the published file it was read from
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
        return cls(model, params, step, files.absolute(workdir, resolve_links=True))

    @classmethod
    def pretrained(cls, spec: ReferenceSpec, data: DataSpec, mesh: jax.sharding.Mesh,
                   mesh_spec: sharding.MeshSpec) -> OnlineReference:
        """A published big_vision checkpoint of `spec.variant`, every shape checked,
        placed on `mesh` by the learner's rules."""
        model = pretrained_model(spec.variant, data.image_size, data.text_len,
                                 data.make_tokenizer().vocab_size)
        fields = big_vision.Fields(_CHECKPOINT, _RESIZE, f"{_VARIANT}={spec.variant!r}")
        log.info(f"loading the reference {spec.variant} from {spec.checkpoint}")
        with big_vision.NpzCheckpoint(spec.checkpoint, _CHECKPOINT) as file:
            params = file.params(model, fields, spec.resize_posemb)
        return cls(model, sharding.from_host(params, placed_params(model, mesh, mesh_spec)),
                   checkpoint=spec.checkpoint)

    @property
    def description(self) -> str:
        return (f"{self.checkpoint}" if self.checkpoint
                else f"step {self.step} of {self.workdir}")


def pretrained_model(variant: str, image_size: int, text_len: int, vocab_size: int) -> Model:
    """The model of a published `variant` for inputs of these sizes."""
    fields = ModelSpec.defaults()
    fields.update(big_vision.variant_fields(variant))
    try:
        spec = ModelSpec.from_config(Section(fields, "model"), image_size, text_len)
    except ConfigError as e:
        raise ConfigError(f"config.{_VARIANT}={variant!r} does not fit this data: {e}") from None
    return Model(spec, vocab_size)


def reference_model(workdir: str, data: DataSpec) -> Model:
    """The model of the run in `workdir`, checked to see inputs as the learner does."""
    path = files.join(workdir, "config.json")
    if not files.is_file(path):
        raise ConfigError(f"config.{_WORKDIR}={workdir!r} is not a run's workdir "
                          "(no config.json)")
    saved = ml_collections.ConfigDict(files.read_json(path))
    # A field added since the reference was trained takes its default: each default is
    # what the code did before the field existed (docs/design.md §4, "Config").
    model_fields = ModelSpec.defaults()
    model_fields.update(saved.get("model", {}))
    data_defaults = DataSpec.defaults()
    data_fields = {k: saved.data.get(k, data_defaults[k]) for k in _SHARED_DATA_FIELDS}
    for key in _SHARED_DATA_FIELDS:
        if data_fields[key] != getattr(data, key):
            raise ConfigError(
                f"config.{_WORKDIR}: the reference was trained with data.{key}="
                f"{data_fields[key]!r} but this run uses {getattr(data, key)!r}; the "
                "learner and reference score the same inputs, so they must match")
    try:
        spec = ModelSpec.from_config(Section(model_fields, "model"), data.image_size,
                                     data.text_len)
    except (ConfigError, AttributeError) as e:
        raise ConfigError(f"config.{_WORKDIR}={workdir!r}: its config.json does not describe "
                          f"a model this version can build ({e}); it was written by an older "
                          "jest_jax, so retrain the reference") from None
    return Model(spec, data.make_tokenizer().vocab_size)


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
    attach: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
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
    """Embed every example of `data.train` with the reference into `spec.cache_dir`,
    every process its own shards; returns the directory. Run again after a failure, it
    continues from the committed shards; an existing cache of another pool or reference
    is replaced."""
    directory = spec.cache_dir
    if not directory:
        raise ConfigError(f"config.{_CACHE} is empty: set where the cache should go")
    if not spec.workdir and not spec.checkpoint:
        raise ConfigError(f"config.{_WORKDIR} and config.{_CHECKPOINT} are empty: name the "
                          "reference run or checkpoint to cache")
    if batch_size % jax.process_count():
        raise ConfigError(f"config.evals.batch_size={batch_size} (the cache's batch) is not "
                          f"divisible by {jax.process_count()} processes")
    ref = spec.online(data, mesh, mesh_spec)
    pool = sources.open_source(data.train, "data.train")
    log.info(f"caching reference embeddings ({ref.description}) of "
             f"{pool.description}, {len(pool)} examples -> {directory} ({spec.cache_dtype})")
    layout = {"format": CACHE_FORMAT, "num_examples": len(pool),
              "dtype": spec.cache_dtype,
              "shard_rows": spec.cache_shard_rows, **_identity(spec, ref.workdir, ref.step),
              "pool": data.identity(),
              "log_temperature": float(ref.params["log_temperature"]),
              "bias": float(ref.params["bias"])}
    write_cache_shards(cache_store.CacheStore(directory), lambda p, b: ref.embed(p, b)[:2],
                       ref.params, pool, data.preprocess(check_captions=False), mesh,
                       batch_size, layout, {"created": time.strftime("%Y-%m-%d %H:%M")})
    return directory


def _identity(spec: ReferenceSpec, workdir: str, step: int | None) -> dict[str, Any]:
    """What names the reference a cache holds: a run's workdir and step, or a file."""
    if spec.checkpoint:
        return {"reference_workdir": "", "reference_step": 0,
                "reference_checkpoint": spec.checkpoint_identity()}
    return {"reference_workdir": workdir, "reference_step": step}


def resume_command(directory: str) -> str:
    return (f"`python -m jest_jax.main --mode cache` with the same config (and "
            f"{_CACHE}={directory!r}) on every process")


class ReferenceCache:
    """Read side of the cache: `cache(indices)` → those examples' reference embeddings,
    read from the sharded array in one read of just those rows (the handle is opened
    once per process and per grain worker)."""

    def __init__(self, spec: ReferenceSpec, data: DataSpec):
        self.directory = directory = spec.cache_dir
        store = cache_store.CacheStore(directory)
        self.meta = store.read_json("meta.json")
        if self.meta is None:
            layout = store.read_json("layout.json")
            if layout is None:
                raise ConfigError(f"config.{_CACHE}={directory!r} holds no reference cache: "
                                  "create it with `python -m jest_jax.main --mode cache` and "
                                  "the same config")
            if layout.get("format") == CACHE_FORMAT:
                shards = -(-layout["num_examples"] // layout["shard_rows"])
                missing = sorted(set(range(shards)) - set(store.committed()))
                what = (f"shards {_ranges(missing)} ({len(missing)} of {shards}) are not "
                        "written" if missing else f"all {shards} shards are written but "
                        "not the final commit (meta.json)")
                raise ConfigError(f"config.{_CACHE}={directory!r} is an incomplete cache: "
                                  f"{what}; finish it by running {resume_command(directory)}")
            self.meta = layout
        if self.meta.get("format") != CACHE_FORMAT:
            raise ConfigError(f"config.{_CACHE}={directory!r}: cache format "
                              f"{self.meta.get('format')} is not {CACHE_FORMAT} (written by "
                              "an older jest_jax); re-create it with --mode cache")
        if self.meta["pool"] != json.loads(json.dumps(data.identity())):
            raise ConfigError(f"config.{_CACHE}={directory!r} was made for {self.meta['pool']}, "
                              f"but this run trains on {data.identity()}; re-create it")
        made = self.meta.get("reference_checkpoint")
        workdir = files.absolute(spec.workdir, resolve_links=True) if spec.workdir else ""
        if spec.checkpoint or made:
            if made != (spec.checkpoint_identity() if spec.checkpoint else None):
                raise ConfigError(
                    f"config.{_CACHE}={directory!r} was made with the reference "
                    f"{made or self.meta['reference_workdir']}, not "
                    f"{spec.checkpoint_identity() if spec.checkpoint else workdir}; "
                    "re-create it")
        elif (self.meta["reference_workdir"], self.meta["reference_step"]) != (
                workdir, latest_step(workdir)):
            raise ConfigError(
                f"config.{_CACHE}={directory!r} holds step {self.meta['reference_step']} of "
                f"{self.meta['reference_workdir']}, not the latest checkpoint of "
                f"config.{_WORKDIR}={workdir!r}; re-create it")
        pool_size = len(sources.open_source(data.train, "data.train"))
        if self.meta["num_examples"] != pool_size:
            raise ConfigError(f"config.{_CACHE}={directory!r} holds {self.meta['num_examples']} "
                              f"rows but the pool has {pool_size} examples (rebuilt?); "
                              "re-create it")
        self._store = store

    def __getstate__(self) -> dict[str, Any]:
        # Sent to grain's worker processes (data.num_workers) as its directory; each
        # worker opens its own tensorstore handle.
        return {k: v for k, v in self.__dict__.items() if k != "_store"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._store = cache_store.CacheStore(self.directory)

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """The reference's t' and β, passed to the train step as its input."""
        return {k: np.float32(self.meta[k]) for k in ("log_temperature", "bias")}

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = self._store.read_rows(np.asarray(indices))  # (len(indices), 2, width)
        return {"ref_image": rows[:, 0], "ref_text": rows[:, 1]}


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2, 5" (at most 10 ranges shown)."""
    spans: list[list[int]] = []
    for x in numbers:
        if spans and x == spans[-1][1] + 1:
            spans[-1][1] = x
        else:
            spans.append([x, x])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in spans]
    return ", ".join(text[:10]) + (f", … ({len(spans) - 10} more ranges)" if len(spans) > 10
                                   else "")
