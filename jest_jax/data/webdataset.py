"""Reading img2dataset/webdataset shards and writing them as ArrayRecord shards.

The pieces of the converter (`python -m jest_jax.data.convert`, docs/data.md,
"Converting webdataset shards") that run without Apache Beam: expanding the input
pattern, reading uid files, and converting one tar into one ArrayRecord shard of
serialized TFDS examples. The Beam pipeline calls `convert_shard` once per tar.

A webdataset tar holds members `KEY.EXT` that form one record per `KEY`, stored next to
each other: an image (`.jpg`, `.jpeg`, `.png`, `.webp`), a caption (`.txt`) and a
`.json` of metadata (img2dataset writes `uid`, `url`, `width`, `height`, ...).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from jest_jax.data.records import BadRecordError, decode_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Stored features every converted record has; json fields of these names are not copied.
RESERVED = ("image", "caption", "uid")
# The TFDS scalar type a json value is stored as (see `features_for`).
JSON_TYPES = {bool: "bool", int: "int64", float: "float32", str: "string"}
# A decode at this size (a JPEG DCT-scaled down to it) is enough to know the bytes decode.
_CHECK_SIZE = 32

# Why a member is skipped (the summary counts each).
UNDECODABLE_IMAGE = "undecodable image"
MISSING_IMAGE = "missing image"
MISSING_CAPTION = "missing caption"
BROKEN_JSON = "broken json"
MISSING_JSON_FIELD = "missing json field"
BROKEN_ENTRY = "broken tar entry"
TRUNCATED = "truncated tar"
NOT_IN_UIDS = "uid not in --uids"  # filtered out, not bad: counted apart


class InputError(ValueError):
    """Bad converter input found before any work: the message says what and where."""


def expand_braces(pattern: str) -> list[str]:
    """``"d/{000..002}.tar"`` -> ``["d/000.tar", "d/001.tar", "d/002.tar"]``.

    Numeric ranges keep the width of their first bound (zero padding, as webdataset and
    img2dataset name shards); ``{a,b}`` lists alternatives; several groups multiply.
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first)
        options = [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


def list_shards(pattern: str) -> list[str]:
    """The tars `pattern` names, in order: brace ranges/lists, glob wildcards, or
    ``@FILE`` (one path per line). Local paths or URLs (gs://). Raises InputError when
    the list is empty or names files that do not exist."""
    if pattern.startswith("@"):
        listing = epath.Path(pattern[1:])
        try:
            names = [line.strip() for line in listing.read_text().splitlines()]
        except OSError as e:
            raise InputError(f"--input {pattern}: cannot read the shard list: {e}") from None
        names = [n for n in names if n and not n.startswith("#")]
        if not names:
            raise InputError(f"--input {pattern}: the shard list {listing} is empty")
    else:
        names = []
        for name in expand_braces(pattern):
            if any(c in name for c in "*?["):
                parent, glob = _split_glob(name)
                names.extend(sorted(str(p) for p in epath.Path(parent).glob(glob)))
            else:
                names.append(name)
        if not names:
            raise InputError(f"--input {pattern!r} matches nothing: no tar files")
    missing = [n for n in names if not epath.Path(n).is_file()]
    if len(missing) == len(names):
        raise InputError(f"--input {pattern!r} matches nothing: none of its {len(names)} "
                         f"file(s) exist (first: {names[0]})")
    if missing:
        raise InputError(f"--input {pattern!r}: {len(missing)} of {len(names)} files do not "
                         f"exist, e.g. {missing[:3]}")
    if len(set(names)) != len(names):
        raise InputError(f"--input {pattern!r} names some tar files twice")
    return names


def _split_glob(name: str) -> tuple[str, str]:
    """``"gs://b/d/*.tar"`` -> ``("gs://b/d", "*.tar")``: the folder before any wildcard."""
    parts = name.split("/")
    first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    return "/".join(parts[:first]) or ".", "/".join(parts[first:])


def read_uids(path: str) -> frozenset[str]:
    """The uids in a `--uids` file, as strings (DataComp uids as 32 hex digits).

    Accepted: a text file with one uid per line; a .npy of strings; a DataComp subset
    file: a .npy (or raw memory-mapped) array of dtype ``("u8,u8")``, each pair the high
    and low 64 bits of a 128-bit uid (DataComp's README, "subset file").
    """
    file = epath.Path(path)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise InputError(f"--uids {path}: cannot read the uid file: {e}") from None
    if raw.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise InputError(f"--uids {path}: not a readable .npy file: {e}") from None
        uids = _from_array(array, path)
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if len(raw) % 16:
                raise InputError(
                    f"--uids {path}: neither text (one uid per line), a .npy file, nor a "
                    "DataComp memory-mapped subset (a multiple of 16 bytes)") from None
            uids = _from_array(np.frombuffer(raw, dtype=np.dtype("u8,u8")), path)
        else:
            uids = [line.strip() for line in text.splitlines() if line.strip()]
    if not uids:
        raise InputError(f"--uids {path}: the uid file holds no uids")
    return frozenset(uids)


def _from_array(array: np.ndarray, path: str) -> list[str]:
    if array.dtype.names is not None and len(array.dtype.names) == 2 and all(
            array.dtype[n] == np.uint64 for n in array.dtype.names):
        high, low = (array[n] for n in array.dtype.names)
        return [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(high, low, strict=True)]
    if array.dtype.kind in "US" and array.ndim == 1:
        return [u.decode() if isinstance(u, bytes) else str(u) for u in array.tolist()]
    raise InputError(f"--uids {path}: a .npy of dtype {array.dtype} and shape {array.shape}; "
                     "expected uid strings or DataComp's ('u8,u8') uid pairs")


@dataclasses.dataclass
class ShardStats:
    """What converting one tar did; the converter merges these into its summary."""

    tar: str
    shard: str
    records: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason -> count
    filtered: int = 0  # records not in --uids
    truncated: str | None = None  # the error, when the tar ended early
    fields: dict = dataclasses.field(default_factory=dict)  # json field -> {type: count}
    num_bytes: int = 0
    seconds: float = 0.0
    pid: int = 0

    def to_json(self) -> dict:
        # Not dataclasses.asdict: it rebuilds the Counter from (key, value) pairs.
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "skipped": dict(self.skipped)}

    @classmethod
    def from_json(cls, obj: dict) -> ShardStats:
        return cls(**{**obj, "skipped": Counter(obj["skipped"])})


def _members(fileobj: Any, stats: ShardStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per record, members grouped while their key repeats.

    A tar cut short (in a member, or before its end-of-archive blocks) sets
    `stats.truncated`; a member header that does not parse (Python's tarfile then just
    stops) is a broken entry, and the rest of the tar is unreadable.
    """
    key, group = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                this_key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if this_key != key:
                    if key is not None:
                        yield key, group
                    key, group = this_key, {}
                data = tar.extractfile(member)
                group[ext] = data.read() if data is not None else b""
            fileobj.seek(tar.offset)
            tail = fileobj.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.ReadError, EOFError) as e:
        stats.truncated = str(e) or "unexpected end of data"
        stats.skipped[TRUNCATED] += key is not None  # the record it was reading
        return
    if not tail:
        stats.truncated = f"no end-of-archive blocks after byte {tar.offset}"
        if key is not None:  # its last members may be the ones cut off
            stats.skipped[TRUNCATED] += 1
            return
    elif tail[:tarfile.BLOCKSIZE].strip(b"\0"):
        stats.skipped[BROKEN_ENTRY] += 1
        stats.truncated = (f"a member header at byte {tar.offset} does not parse; the rest "
                           "of the tar is unreadable")
    if key is not None:
        yield key, group


def _record(key: str, group: dict[str, bytes], uids: frozenset[str] | None,
            json_fields: tuple[str, ...] | None) -> dict[str, Any] | str:
    """The stored record of one key, or why it is skipped (NOT_IN_UIDS: filtered out
    before its image is decoded, so a subset costs reading the tars, not decoding them)."""
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError:
            meta = None
    uid = str(meta["uid"]) if isinstance(meta, dict) and meta.get("uid") is not None else key
    if uids is not None and uid not in uids:
        return NOT_IN_UIDS
    if not isinstance(meta, dict):
        return BROKEN_JSON
    image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
    if image is None:
        return MISSING_IMAGE
    caption = group.get("txt")
    try:
        caption = caption.decode("utf-8").strip() if caption is not None else ""
    except UnicodeDecodeError:
        caption = ""
    if not caption:
        return MISSING_CAPTION
    try:
        decode_image(image, min_size=_CHECK_SIZE)
    except BadRecordError:
        return UNDECODABLE_IMAGE
    record: dict[str, Any] = {"image": image, "caption": caption, "uid": uid}
    for name, value in meta.items():
        if name in RESERVED or type(value) not in JSON_TYPES:  # nulls, lists, dicts
            continue
        if json_fields is None or name in json_fields:
            record[name] = value
    if json_fields is not None and any(f not in record for f in json_fields):
        return MISSING_JSON_FIELD
    return record


def features_for(fields: dict[str, str]) -> Any:
    """The TFDS features of converted records with json `fields` ({name: JSON_TYPES value})."""
    import tensorflow_datasets as tfds

    scalar = {"bool": np.bool_, "int64": np.int64, "float32": np.float32}
    spec: dict[str, Any] = {
        # The original encoded bytes; the input pipeline decodes them (records.decode_image).
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "caption": tfds.features.Text(),
        "uid": tfds.features.Text(),
    }
    for name, kind in sorted(fields.items()):
        spec[name] = (tfds.features.Text() if kind == "string"
                      else tfds.features.Scalar(dtype=scalar[kind]))
    return tfds.features.FeaturesDict(spec)


def convert_shard(tar_path: str, shard_path: str, uids: frozenset[str] | None,
                  json_fields: tuple[str, ...] | None) -> ShardStats:
    """Writes the good records of `tar_path`, in tar order, as the ArrayRecord file
    `shard_path` (local or URL); every record is serialized with all its scalar json
    fields (readers parse the fields the dataset declares and ignore the others)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    start = time.perf_counter()
    stats = ShardStats(tar=tar_path, shard=shard_path, pid=os.getpid())
    serializers: dict[tuple, Any] = {}  # one FeaturesDict per set of (field, type)
    out = epath.Path(shard_path)
    local = "://" not in shard_path
    tmp_dir = None if local else tempfile.mkdtemp(prefix="jest_convert_")
    tmp = f"{shard_path}.tmp" if local else os.path.join(tmp_dir, out.name)
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group_size 1: fast random access
    try:
        with epath.Path(tar_path).open("rb") as f:
            for key, group in _members(f, stats):
                record = _record(key, group, uids, json_fields)
                if record == NOT_IN_UIDS:
                    stats.filtered += 1
                    continue
                if isinstance(record, str):
                    stats.skipped[record] += 1
                    continue
                kinds = {n: JSON_TYPES[type(v)] for n, v in record.items() if n not in RESERVED}
                signature = tuple(sorted(kinds.items()))
                if signature not in serializers:
                    serializers[signature] = features_for(kinds)
                writer.write(serializers[signature].serialize_example(record))
                stats.records += 1
                for name, kind in kinds.items():
                    counts = stats.fields.setdefault(name, {})
                    counts[kind] = counts.get(kind, 0) + 1
        writer.close()
        if local:
            os.replace(tmp, shard_path)
        else:
            out.write_bytes(epath.Path(tmp).read_bytes())
        stats.num_bytes = out.stat().length
    finally:
        if tmp_dir is not None:
            epath.Path(tmp_dir).rmtree(missing_ok=True)
    stats.seconds = time.perf_counter() - start
    return stats
