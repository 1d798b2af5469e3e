"""Time the import of a published-size SigLIP checkpoint (docs/pretrained.md): a random
big_vision `.npz` of SigLIP B/16 at 224 px with the c4-en vocabulary, written once per
block layout to a temporary directory, then checked (keys and shapes from the array
headers: what `build` does before compiling) and read into jest_jax params.

    python experiments/bench_import.py [--variant B/16] [--dir /tmp]

Prints one JSON line per layout: file size, check seconds, read seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from bigvision_files import save_npz, siglip_tree  # noqa: E402

from jest_jax.models import VARIANTS, big_vision  # noqa: E402
from jest_jax.reference import pretrained_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    size, patch = args.variant.split("/")
    model = pretrained_model(args.variant, 224, 64, 32_000)
    fields = big_vision.Fields("model.init_from", "model.init_resize_posemb", args.variant)
    for stacked in (False, True):
        tree = siglip_tree(0, image_size=224, patch=int(patch), text_len=64, vocab=32_000,
                           size=VARIANTS[size], stacked=stacked, scale=0.02)
        path = save_npz(os.path.join(args.dir, f"bench_import_{stacked}.npz"), tree)
        del tree
        try:
            start = time.perf_counter()
            with big_vision.NpzCheckpoint(path, "model.init_from") as file:
                file.check(model, fields, False)
            check = time.perf_counter() - start
            start = time.perf_counter()
            with big_vision.NpzCheckpoint(path, "model.init_from") as file:
                params = file.params(model, fields, False)
            read = time.perf_counter() - start
            count = sum(a.size for a in _leaves(params))
            print(json.dumps({"variant": args.variant, "layout": "stacked" if stacked
                              else "per-block", "params_M": round(count / 1e6, 1),
                              "file_MB": round(os.path.getsize(path) / 2**20),
                              "check_s": round(check, 3), "read_s": round(read, 2)}))
        finally:
            os.remove(path)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield np.asarray(tree)


if __name__ == "__main__":
    main()
