"""Building img2dataset-style webdataset tars for the converter's tests and benchmark."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


def encode(image: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def uid(index: int) -> str:
    """A DataComp-like uid: 32 hex digits."""
    return f"{(index * 0x9E3779B97F4A7C15) % 2**64:016x}{index:016x}"


def write_tar(path: str, members: list[tuple[str, bytes]], truncate_to: int | None = None) -> None:
    """A tar of `members` ((name, bytes)); cut to `truncate_to` bytes when given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = out.getvalue()
    with open(path, "wb") as f:
        f.write(raw if truncate_to is None else raw[:truncate_to])


def record_members(key: str, image: bytes | None, ext: str, caption: str | None,
                   meta: dict | None) -> list[tuple[str, bytes]]:
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members
