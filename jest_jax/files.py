"""Files a run writes into its workdir: each appears whole or not at all.

A reader, or a run killed mid-write, sees the old file or the new one, never half of
it (docs/design.md §4, "Files and logs"). `metrics.jsonl` is the one appended file: a torn last
line is never read as a row and is dropped by the next start (`metrics.MetricWriter`).
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` by a rename over it (atomic on POSIX file systems); the
    data is on disk before the rename, so not even a power cut leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON, atomically."""
    write_atomically(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)
