"""The reference cache's storage: one tensorstore zarr3 array, sharded, on local disk or
gs:// (docs/design.md §4, "Reference source"; docs/selection.md, "The reference cache").

Layout of a cache directory (every name is written once per cache):

* `layout.json`: what the cache holds (pool, reference, dtype, width, rows per shard),
  written by process 0 before any row;
* `embeddings/`: a zarr3 array of shape (rows, 2, width), row i being record i of the
  pool ([i, 0] its image embedding, [i, 1] its text embedding). One zarr shard (one
  object, `embeddings/c/<k>/0/0`) holds `shard_rows` rows; inside it each row is its own
  inner chunk, so a reader fetches the shard's index once and then only the rows it asks
  for, by byte range;
* `committed/<k>.json`: the marker of shard k, written only after shard k's data is
  durable (the data object is written whole by one process; a kill before the marker
  leaves the shard to be redone);
* `meta.json`: the final commit, written by process 0 once every shard is committed.
  Without it the cache is incomplete and training refuses it.

Every file goes through a tensorstore key-value store, so a `gs://` directory works like
a local one (with `TENSORSTORE_GCS_HTTP_URL`, against an emulator too); object stores
have no rename, and none is needed: each object is written whole, and the markers order
the commits.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT = 2
DTYPES = ("float32", "bfloat16")
_ARRAY = "embeddings/"
INDEX_BYTES_PER_ROW = 16  # the zarr3 shard index: offset and length (2 × uint64) per row
INDEX_BYTES_PER_SHARD = 4  # the index's crc32c


def cache_bytes(rows: int, width: int, dtype: str, shard_rows: int) -> int:
    """The size of a cache's array on disk (the JSON files add a few KB): the rows'
    image and text embeddings, and per shard an index of `shard_rows` entries (the last
    shard's too, however few rows it holds) and its checksum."""
    shards = -(-rows // shard_rows)
    return (rows * 2 * width * np.dtype(_numpy_dtype(dtype)).itemsize
            + shards * (shard_rows * INDEX_BYTES_PER_ROW + INDEX_BYTES_PER_SHARD))


def _numpy_dtype(dtype: str) -> Any:
    return ts.bfloat16.numpy_dtype if dtype == "bfloat16" else np.float32


def kvstore_spec(directory: str) -> dict[str, Any]:
    """The tensorstore key-value store of a local directory or a gs://bucket/path."""
    if directory.startswith("gs://"):
        bucket, _, path = directory[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/"}
    if "://" in directory:
        raise ValueError(f"{directory!r}: a reference cache lives on local disk or gs://")
    return {"driver": "file", "path": directory.rstrip("/") + "/"}


class CacheStore:
    """One cache directory: its JSON files, shard markers and zarr array."""

    def __init__(self, directory: str):
        self.directory = directory
        self._kv = ts.KvStore.open(kvstore_spec(directory)).result()
        self._array: ts.TensorStore | None = None

    def read_json(self, key: str) -> Any | None:
        """The JSON object at `key`, or None if there is none."""
        result = self._kv.read(key).result()
        return json.loads(result.value) if result.state == "value" else None

    def write_json(self, key: str, obj: Any) -> None:
        # One object written whole (file kvstore: temporary file and rename).
        self._kv.write(key, json.dumps(obj, indent=2) + "\n").result()

    def is_cache(self) -> bool:
        """Whether the directory holds a cache of any format (so replacing it is safe)."""
        return any(self._kv.read(k).result().state == "value"
                   for k in ("layout.json", "meta.json"))

    def clear(self) -> None:
        """Delete the cache (every key under the directory)."""
        self._kv.delete_range(ts.KvStore.KeyRange()).result()
        self._array = None

    def create(self, layout: dict[str, Any]) -> None:
        """Write `layout.json` and create the (empty) array it describes."""
        self.write_json("layout.json", layout)
        rows, width, shard = layout["num_examples"], layout["width"], layout["shard_rows"]
        inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
        self._array = ts.open({
            "driver": "zarr3", "kvstore": {**kvstore_spec(self.directory),
                                           "path": self._array_path()},
            "metadata": {
                "shape": [rows, 2, width], "data_type": layout["dtype"],
                "chunk_grid": {"name": "regular",
                               "configuration": {"chunk_shape": [shard, 2, width]}},
                "codecs": [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [1, 2, width], "codecs": inner,
                    "index_codecs": [*inner, {"name": "crc32c"}]}}]},
            "create": True, "delete_existing": True}).result()

    def _array_path(self) -> str:
        return kvstore_spec(self.directory)["path"] + _ARRAY

    def array(self) -> ts.TensorStore:
        """The embeddings array, opened once per process (and per grain worker)."""
        if self._array is None:
            self._array = ts.open({
                "driver": "zarr3", "open": True,
                "kvstore": {**kvstore_spec(self.directory), "path": self._array_path()},
                # Shard indices read once stay in memory (16 B per row of a touched shard).
                "context": {"cache_pool": {"total_bytes_limit": 64 << 20}},
                "recheck_cached_metadata": False, "recheck_cached_data": False}).result()
        return self._array

    def committed(self) -> dict[int, dict[str, Any]]:
        """Shard index → its marker, for every committed shard."""
        keys = self._kv.list(ts.KvStore.KeyRange("committed/", "committed0")).result()
        out = {}
        for key in keys:
            name = key.decode()[len("committed/"):]
            if name.endswith(".json") and name[:-5].isdigit():
                marker = self.read_json(key.decode())
                if marker is not None:
                    out[int(name[:-5])] = marker
        return out

    def write_shard(self, shard: int, start: int, image: np.ndarray, text: np.ndarray,
                    info: dict[str, Any]) -> None:
        """Rows start.. of shard `shard` (a whole shard, one object), then its marker."""
        array = self.array()
        rows = np.stack([image, text], axis=1).astype(array.dtype.numpy_dtype)
        array[start:start + len(rows)].write(rows).result()  # durable before the marker
        self.write_json(f"committed/{shard}.json", info)

    def read_rows(self, index: np.ndarray | int) -> np.ndarray:
        """Rows of the array as float32: (2, width) for one index, (n, 2, width) for many."""
        return np.asarray(self.array()[index].read().result(), np.float32)
