"""Public SigLIP and SigLIP 2 checkpoints: big_vision's two-tower `.npz` files as jest_jax
params (docs/pretrained.md).

A published file is a NumPy `.npz` of the flattened parameter tree, each key the
'/'-joined path (`params/img/...`, `params/txt/...`, `params/t`, `params/b`; some files
lack the `params/` prefix). The towers are big_vision's ViT with a MAP head and no image
head, and its text transformer pooled at the last position with a linear head, so
`variant_fields` gives the model fields that build the same architecture here; encoder
blocks are stored either one group per block (`encoderblock_<i>`) or stacked along a
leading depth axis (`encoderblock`, big_vision's `scan=True`), and both are read.

Every parameter is checked before any array is read: its key must be in the file and its
shape must be the one the model needs, and the error names the first that is not (the
vocabulary, the image size and the text length get messages of their own). Arrays are
read only by `NpzCheckpoint.params`, so a start-up check costs the zip directory and the
array headers.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jest_jax import files, log
from jest_jax.fields import ConfigError
from jest_jax.models.layers import VARIANTS
from jest_jax.models.layers import variant as resolve_variant
from jest_jax.models.model import Model

# The published variants (docs/pretrained.md lists their files); any "<size>/<patch>"
# with a size of models.VARIANTS is accepted, as tests use "tiny/4". So400m/16 is SigLIP
# 2's only: SigLIP's multilingual So400m/16 file has no text head and is refused.
PUBLISHED = ("B/16", "L/16", "So400m/14", "So400m/16")

_TOWERS = {"image": ("img", "Transformer"), "text": ("txt", "Encoder_0")}
_BLOCK = {"ln_attn": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0",
          "ln_mlp": "LayerNorm_1", "mlp_in": "MlpBlock_0/Dense_0",
          "mlp_out": "MlpBlock_0/Dense_1"}
_MAP_HEAD = {"attn": "MultiHeadDotProductAttention_0", "ln": "LayerNorm_0",
             "mlp_in": "MlpBlock_0/Dense_0", "mlp_out": "MlpBlock_0/Dense_1"}


def variant_fields(variant: str) -> dict[str, Any]:
    """The `config.model` fields of big_vision's SigLIP two-tower of `variant` ("B/16"):
    both towers of that size, a MAP-pooled image tower without a head, a text tower pooled
    at the last position, embeddings as wide as the towers. ValueError if malformed."""
    size, sep, patch = variant.partition("/")
    if not sep or size not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"must be '<size>/<patch size>' with a size of {sorted(VARIANTS)} "
                         f"(published: {list(PUBLISHED)})")
    return dict(image_variant=size, text_variant=size, patch_size=int(patch),
                image_pool="map", image_head=False, text_pool="last",
                embed_dim=VARIANTS[size]["width"])


@dataclasses.dataclass(frozen=True)
class Fields:
    """The config fields an import is named by in its messages."""

    checkpoint: str      # "selection.reference.checkpoint" / "model.init_from"
    resize: str          # the field asking for position-embedding resizing
    architecture: str    # what chose the architecture, e.g. "selection.reference.variant='B/16'"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One jest_jax param and where it is in the file."""

    path: tuple[Any, ...]        # in the params tree
    key: str                     # in the file, without the "params/" prefix
    shape: tuple[int, ...]       # in the file (with the depth axis if stacked)
    layer: int | None            # the block index into a stacked array
    convert: Callable[[np.ndarray], np.ndarray]


class NpzCheckpoint:
    """A big_vision `.npz` (a local path or a gs:// URL, read through `files`): its keys and
    shapes read from the array headers; ConfigError naming `field` if it is not one."""

    def __init__(self, path: str, field: str):
        self.path, self.field = path, field
        try:
            self._file = files.open_file(path)
        except FileNotFoundError:
            raise ConfigError(f"config.{field}={path!r}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"config.{field}={path!r} is a directory, not a .npz "
                              "checkpoint file") from None
        except Exception as e:  # noqa: BLE001 - remote file systems raise many types
            raise ConfigError(f"config.{field}={path!r} cannot be read: {e}") from None
        try:
            self._zip = zipfile.ZipFile(self._file)
            self.shapes, self._prefix = self._headers()
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
            self._file.close()
            raise ConfigError(f"config.{field}={path!r} is not a readable .npz checkpoint "
                              f"(truncated, or not written by numpy.savez: {e})") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> NpzCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> tuple[dict[str, tuple[int, ...]], str]:
        shapes = {}
        for name in self._zip.namelist():
            if not name.endswith(".npy"):
                raise ValueError(f"member {name!r} is not a .npy array")
            with self._zip.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shapes[name[:-len(".npy")]] = tuple(read(f)[0])
        if not shapes:
            raise ValueError("it holds no arrays")
        prefix = "params/" if any(k.startswith("params/") for k in shapes) else ""
        return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}, prefix

    def read(self, key: str) -> np.ndarray:
        """The array at `key` (no prefix) as float32 (bfloat16 files included)."""
        try:
            with self._zip.open(f"{self._prefix}{key}.npy") as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
            raise ConfigError(f"config.{self.field}={self.path!r}: its array {key!r} cannot "
                              f"be read ({e}); the file is damaged") from None
        if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # how numpy saves bfloat16
            array = array.view(ml_dtypes.bfloat16)
        return np.asarray(array, np.float32)

    def check(self, model: Model, fields: Fields, resize: bool) -> list[_Entry]:
        """The plan that fills `model`'s params from this file, every key and shape
        checked (ConfigError naming the first problem)."""
        entries = _plan(self, model, fields, resize)
        used = {e.key for e in entries}
        extra = sorted(k for k in self.shapes if k not in used
                       and k.split("/")[0] in ("img", "txt"))
        if extra:
            raise ConfigError(
                f"config.{fields.checkpoint}={self.path!r} has parameters the model of "
                f"{fields.architecture} lacks ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}): it is a checkpoint of another variant")
        return entries

    def params(self, model: Model, fields: Fields, resize: bool) -> dict:
        """`model`'s params (a pure dict of float32 NumPy arrays) from this file."""
        entries = self.check(model, fields, resize)
        out: dict = {}
        cached: tuple[str, np.ndarray] | None = None  # a stacked array serves every block
        for entry in sorted(entries, key=lambda e: e.key):  # each array read once
            if cached is None or cached[0] != entry.key:
                cached = (entry.key, self.read(entry.key))
            value = cached[1] if entry.layer is None else cached[1][entry.layer]
            node = out
            for part in entry.path[:-1]:
                node = node.setdefault(part, {})
            node[entry.path[-1]] = np.array(entry.convert(value), np.float32, order="C")
        return out


def _plan(ckpt: NpzCheckpoint, model: Model, fields: Fields, resize: bool) -> list[_Entry]:
    spec = model.spec
    where = f"config.{fields.checkpoint}={ckpt.path!r}"
    flat = jax.tree_util.tree_flatten_with_path(model.abstract_params())[0]
    heads = {"image": resolve_variant(spec.image_variant)["num_heads"],
             "text": resolve_variant(spec.text_variant)["num_heads"]}
    stacked = {tower: any(k.startswith(f"{bv}/{enc}/encoderblock/") for k in ckpt.shapes)
               for tower, (bv, enc) in _TOWERS.items()}
    depth = {"image": resolve_variant(spec.image_variant)["depth"],
             "text": resolve_variant(spec.text_variant)["depth"]}
    entries = []
    for keypath, leaf in flat:
        path = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keypath)
        shape = tuple(leaf.shape)
        key, bv_shape, layer, convert = _locate(path, shape, heads, stacked, depth)
        entries.append(_Entry(path, key, bv_shape, layer, convert))
    entries.sort(key=_file_order)  # so "the first" mismatch is the first in the network
    for i, entry in enumerate(entries):
        if entry.key not in ckpt.shapes and entry.key.startswith("txt/head/"):
            raise ConfigError(
                f"{where}: checkpoint has no text head ({entry.key!r}), which the model of "
                f"{fields.architecture} needs: SigLIP's multilingual So400m/16 file has "
                "none and is not supported (So400m/16 is read from SigLIP 2's files, see "
                "docs/pretrained.md)")
        if entry.key not in ckpt.shapes:
            raise ConfigError(f"{where} has no parameter {entry.key!r}, which the model of "
                              f"{fields.architecture} needs: it is not a big_vision SigLIP "
                              "checkpoint of that variant")
        found = ckpt.shapes[entry.key]
        if found != entry.shape:
            entries[i] = _mismatch(entry, found, ckpt, model, fields, resize)
    return entries


def _file_order(entry: _Entry) -> tuple:
    """Input to output: each tower's stem, blocks in order, pooling, head; then t and b."""
    parts = entry.key.split("/")
    block = next((p for p in parts if p.startswith("encoderblock")), None)
    rank = ("embedding", "Embed_0", "pos_embedding", "Transformer", "Encoder_0", "MAPHead_0",
            "head")
    index = int(block.split("_")[1]) if block and "_" in block else (
        entry.layer if entry.layer is not None else -1)
    return (["img", "txt", "t", "b"].index(parts[0]),
            rank.index(parts[1]) if len(parts) > 1 else 0,
            "encoder_norm" in parts, index, parts[:-1], parts[-1] == "bias")


def _mismatch(entry: _Entry, found: tuple[int, ...], ckpt: NpzCheckpoint, model: Model,
              fields: Fields, resize: bool) -> _Entry:
    """A param whose shape differs: the entry that reads it anyway (resized image
    position embeddings), else the ConfigError that says why not."""
    spec, where = model.spec, f"config.{fields.checkpoint}={ckpt.path!r}"
    if entry.path == ("image", "pos_embedding"):
        return _image_posemb(entry, found, ckpt, spec, fields, resize)
    if (entry.path == ("text", "pos_embedding") and len(found) == 3 and found[0] == 1
            and found[2] == entry.shape[2]):
        # Not even a shorter text is read: the text tower is pooled at the last position,
        # so a shorter one would be read at another position than the published model's.
        raise ConfigError(
            f"config.data.text_len={spec.text_len} is invalid: {where} has text position "
            f"embeddings for {found[1]} tokens, and its text tower needs exactly that "
            f"length; set data.text_len={found[1]} (the published SigLIP checkpoints take "
            "64; SigLIP So400m/14 at 224 px, 16)")
    if entry.path == ("text", "embedding", "embedding") and found[1:] == entry.shape[1:]:
        raise ConfigError(
            f"config.data.tokenizer is invalid: it has a vocabulary of {model.vocab_size} "
            f"ids but {where} embeds {found[0]} (SigLIP: the c4-en SentencePiece model, "
            "32,000; SigLIP 2: Gemma's, 256,000; both with data.text_style='siglip' or "
            "'siglip2', see docs/pretrained.md)")
    raise ConfigError(
        f"{where}: parameter {entry.key!r} has shape {list(found)} but the model of "
        f"{fields.architecture} needs {list(entry.shape)}: the checkpoint is of another "
        "variant")


def _image_posemb(entry: _Entry, found: tuple[int, ...], ckpt: NpzCheckpoint, spec: Any,
                  fields: Fields, resize: bool) -> _Entry:
    """The image position embeddings of a checkpoint trained at another image size:
    resized (`resample_grid`) when asked for, else an error naming both sizes."""
    grid, width = spec.image_size // spec.patch_size, entry.shape[2]
    old = int(round(np.sqrt(found[1]))) if len(found) == 3 else 0
    if len(found) != 3 or found[0] != 1 or found[2] != width or old * old != found[1]:
        raise ConfigError(
            f"config.{fields.checkpoint}={ckpt.path!r}: parameter {entry.key!r} has shape "
            f"{list(found)} but the model of {fields.architecture} needs "
            f"{list(entry.shape)}: the checkpoint is of another variant")
    if not resize:
        raise ConfigError(
            f"config.data.image_size={spec.image_size} is invalid: "
            f"config.{fields.checkpoint}={ckpt.path!r} was trained at {old * spec.patch_size}"
            f" px ({old}x{old} patches of {spec.patch_size}), this model needs "
            f"{grid}x{grid}; set data.image_size={old * spec.patch_size}, or "
            f"config.{fields.resize}=True to resize its position embeddings")
    log.info(f"resizing the image position embeddings of {ckpt.path} from {old}x{old} to "
             f"{grid}x{grid}")

    def convert(array: np.ndarray) -> np.ndarray:
        return resample_grid(array.reshape(old, old, width), grid)

    return dataclasses.replace(entry, shape=found, convert=convert)


def _linear_axis(values: np.ndarray, new: int, axis: int) -> np.ndarray:
    """`values` resampled to `new` points along `axis` by linear interpolation with the
    end points aligned: output i reads input position i * (old - 1) / (new - 1)."""
    old = values.shape[axis]
    src = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
    lo = np.clip(np.floor(src).astype(np.int64), 0, old - 1)
    hi = np.minimum(lo + 1, old - 1)
    frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    return (np.take(values, lo, axis) * (1 - frac) + np.take(values, hi, axis) * frac)


def resample_grid(grid: np.ndarray, new: int) -> np.ndarray:
    """A [g, g, width] grid of position embeddings resized to [new, new, width] as
    big_vision resizes them when fine-tuning at another resolution: separable linear
    interpolation, corner-aligned (the first and last rows and columns are kept), no
    antialiasing when shrinking -- what scipy.ndimage.zoom(order=1) computes. float64
    inside, float32 out."""
    out = _linear_axis(np.asarray(grid, np.float64), new, 0)
    return _linear_axis(out, new, 1).astype(np.float32)


def _locate(path: tuple[Any, ...], shape: tuple[int, ...], heads: dict[str, int],
            stacked: dict[str, bool], depth: dict[str, int]
            ) -> tuple[str, tuple[int, ...], int | None, Callable[[np.ndarray], np.ndarray]]:
    """File key, file shape, block index (stacked files) and converter of a param."""
    same = lambda a: a  # noqa: E731
    reshape = lambda a, s=shape: a.reshape(s)  # noqa: E731
    if path == ("log_temperature",):
        return "t", (1,), None, lambda a: a.reshape(())
    if path == ("bias",):
        return "b", (1,), None, lambda a: a.reshape(())
    tower, rest = path[0], path[1:]
    bv, enc = _TOWERS[tower]
    if rest == ("patch_kernel",):
        return f"{bv}/embedding/kernel", shape, None, same
    if rest == ("patch_bias",):
        return f"{bv}/embedding/bias", shape, None, same
    if rest == ("pos_embedding",):  # [grid, grid, w] or [len, w] here, [1, n, w] there
        return f"{bv}/pos_embedding", (1, int(np.prod(shape[:-1])), shape[-1]), None, \
            lambda a, s=shape: a.reshape(s)
    if rest == ("embedding", "embedding"):
        return f"{bv}/Embed_0/embedding", shape, None, same
    if rest[0] == "head":
        return f"{bv}/head/{rest[1]}", shape, None, same
    if rest == ("map_head", "probe"):  # [1, w] here, [1, 1, w] there
        return f"{bv}/MAPHead_0/probe", (1, 1, shape[-1]), None, reshape
    if rest[:2] == ("encoder", "ln_final"):
        return f"{bv}/{enc}/encoder_norm/{rest[2]}", shape, None, same
    if rest[0] == "map_head":
        key, bv_shape = _layer_param(rest[1:], shape, heads[tower], _MAP_HEAD)
        return f"{bv}/MAPHead_0/{key}", bv_shape, None, reshape
    if rest[:2] == ("encoder", "blocks"):
        key, bv_shape = _layer_param(rest[3:], shape, heads[tower], _BLOCK)
        if stacked[tower]:
            return (f"{bv}/{enc}/encoderblock/{key}", (depth[tower], *bv_shape), rest[2],
                    reshape)
        return f"{bv}/{enc}/encoderblock_{rest[2]}/{key}", bv_shape, None, reshape
    raise AssertionError(f"no big_vision name for param {'/'.join(map(str, path))}")


def _layer_param(rest: tuple[Any, ...], shape: tuple[int, ...], heads: int,
                 names: dict[str, str]) -> tuple[str, tuple[int, ...]]:
    """A block's (or MAP head's) param: its big_vision key below the block, and shape.
    Attention projections are [width, heads, head_dim] kernels there ([heads, head_dim,
    width] for the output), [width, width] here."""
    module, leaf = rest[0], rest[-1]
    if module != "attn":
        return f"{names[module]}/{leaf}", shape
    proj, width = rest[1], shape[-1]  # every projection is width -> width
    split = (heads, width // heads)
    if proj == "out":
        bv_shape = (*split, width) if leaf == "kernel" else shape
    else:
        bv_shape = (shape[0], *split) if leaf == "kernel" else split
    return f"{names[module]}/{proj}/{leaf}", bv_shape

