"""The one file layer: every file a run reads or writes outside orbax goes through here,
on a local disk or in a bucket (`gs://...`, through etils epath and gcsfs).

Each file a run writes appears whole or not at all (docs/design.md §4, "Files and
logs"; docs/reliability.md §3a says how for each): locally by writing a temporary file
and renaming it over the target; in a bucket by one object upload, which GCS makes
visible only once complete (object storage has no rename to lean on, and needs none).
The appended files (`metrics.jsonl`, `log.txt`) are `TextLog`s: appended locally, and
rewritten whole at each flush in a bucket, where an object cannot be appended to.

The standard emulator variables are honoured: with `STORAGE_EMULATOR_HOST` set, gcsfs
talks to it with anonymous credentials (tensorstore reads `TENSORSTORE_GCS_HTTP_URL`
itself).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import IO, Any

from etils import epath

_gcs_configured = False


def _path(path: str) -> epath.Path:
    """`path` as an epath; before the first bucket path, gcsfs's settings (epath makes one
    gcsfs file system per process, at its first use)."""
    global _gcs_configured
    if not _gcs_configured and is_url(path):
        import fsspec

        for protocol in ("gs", "gcs"):
            conf = fsspec.config.conf.setdefault(protocol, {})
            # Several writers (the processes of a run, orbax through tensorstore) change a
            # bucket behind gcsfs's back: a cached listing would miss their objects.
            conf.setdefault("use_listings_cache", False)
            if os.environ.get("STORAGE_EMULATOR_HOST"):  # an emulator checks no credentials
                conf.setdefault("token", "anon")
        _gcs_configured = True
    return epath.Path(path)


def is_url(path: str) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return "://" in str(path)


def join(path: str, *parts: str) -> str:
    """`path/part/...` for a local path or a URL."""
    return os.path.join(str(path), *parts)


def absolute(path: str, resolve_links: bool = False) -> str:
    """A name for `path` that does not depend on the working directory: URLs as they are
    (`os.path` would make `gs://b/x` a local path), local paths made absolute, and with
    `resolve_links` symbolic links resolved too (`os.path.realpath`)."""
    if is_url(path):
        return str(path)
    return os.path.realpath(path) if resolve_links else os.path.abspath(path)


def exists(path: str) -> bool:
    return _path(path).exists()


def is_dir(path: str) -> bool:
    return _path(path).is_dir()


def is_file(path: str) -> bool:
    """A file (in a bucket: an object) at `path`."""
    return _path(path).is_file()


def listdir(path: str) -> list[str]:
    """The names in directory `path`; empty if there is none (buckets have no empty
    directories)."""
    p = _path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
    """Create directory `path` and its parents (in a bucket there is nothing to create:
    a directory exists once an object is under it)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "rb") -> IO:
    """`path` opened for reading (a bucket object is read in ranges as it is consumed)."""
    return _path(path).open(mode)


def stat(path: str) -> tuple[int, float]:
    """(size in bytes, modification time in seconds) of the file or object at `path`."""
    info = _path(path).stat()
    return int(info.length), float(info.mtime)


def read_text(path: str) -> str:
    return _path(path).read_text()


def read_bytes(path: str) -> bytes:
    return _path(path).read_bytes()


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_atomically(path: str, text: str | bytes) -> None:
    """Write `text` to `path`, whole or not at all.

    Locally: to `<path>.tmp`, flushed to disk, then renamed over `path` (atomic on POSIX
    file systems, and not even a power cut leaves half a file). In a bucket: one object
    upload, which readers see only once it is complete, replacing the old object at once.
    """
    data = text.encode() if isinstance(text, str) else text
    if is_url(path):
        _path(path).write_bytes(data)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON, atomically."""
    write_atomically(path, json.dumps(obj, indent=2) + "\n")


def remove(path: str) -> None:
    """Delete the file `path` if it exists."""
    _path(path).unlink(missing_ok=True)


def walk_files(path: str) -> list[str]:
    """Every file under the directory `path`, as paths relative to it (`a/b/c`).

    By listing each directory (epath's own walk drops the `gs://` of what it yields)."""
    out = []
    for child in _path(path).iterdir():
        if child.is_dir():
            out += [f"{child.name}/{name}" for name in walk_files(str(child))]
        else:
            out.append(child.name)
    return sorted(out)


def copy_tree(source: str, target: str) -> None:
    """Copy the directory `source` to `target` (either may be a URL), file by file."""
    for relative in walk_files(source):
        destination = _path(join(target, relative))
        if not is_url(target):
            destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(read_bytes(join(source, relative)))


def move_tree(source: str, target: str) -> None:
    """Move the directory `source` to `target` (same storage). Locally one atomic rename.
    A bucket has no rename: every object is copied, then the originals are deleted, so an
    interruption leaves the original whole, or a whole copy and part of the original."""
    if not is_url(source):
        os.rename(source, target)
        return
    copy_tree(source, target)
    _path(source).rmtree()


def remove_tree(path: str) -> None:
    """Delete the directory `path` and everything under it, if it exists."""
    if is_url(path):
        if _path(path).exists():
            _path(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


class TextLog:
    """A text file that grows by appends and survives restarts: `metrics.jsonl`, `log.txt`.

    Locally each `append` goes straight to the end of the file. A bucket object cannot be
    appended to, so there the whole text is kept in memory (read back at start, so a
    restarted run continues it) and `flush` uploads it as one object, replacing the old
    one whole: a kill loses what was appended since the last flush, never what was
    flushed. `rewrite` replaces the whole text, atomically in both cases.
    """

    def __init__(self, path: str):
        self.path = path
        self.remote = is_url(path)
        self._text: list[str] = []
        self._dirty = False
        if self.remote and exists(path):
            self._text.append(read_text(path))

    def read(self) -> str:
        """The whole text, including what was appended but not flushed yet."""
        if self.remote:
            return "".join(self._text)
        if not os.path.exists(self.path):
            return ""
        with open(self.path) as f:
            return f.read()

    def append(self, text: str) -> None:
        if self.remote:
            self._text.append(text)
            self._dirty = True
            return
        with open(self.path, "a") as f:
            f.write(text)

    def rewrite(self, text: str) -> None:
        if self.remote:
            self._text, self._dirty = [text], False
        write_atomically(self.path, text)

    def flush(self) -> None:
        """Make what was appended durable (in a bucket: upload the whole text)."""
        if self.remote and self._dirty:
            text = "".join(self._text)
            self._text = [text]
            write_atomically(self.path, text)
            self._dirty = False
