"""Test-only launcher: `python tests/kill_in_cache.py PROCESS:K <jest_jax.main flags>`.

Runs the CLI, and SIGKILLs process PROCESS of a multi-process `--mode cache` right after
it has committed its K-th shard (data, then marker): a preemption at a known point,
whatever the machine's load, so the test knows which shards a resume must not redo.
Nothing of this lives in jest_jax.
"""

from __future__ import annotations

import os
import signal
import sys

from jest_jax import cache_store


def _kill_after_commit(when: str) -> None:
    process, count = (int(x) for x in when.split(":"))
    write_shard = cache_store.CacheStore.write_shard
    written = []

    def patched(self, shard, *args, **kwargs):
        import jax

        write_shard(self, shard, *args, **kwargs)
        written.append(shard)
        if jax.process_index() == process and len(written) == count:
            print(f"kill_in_cache: killing process {process} after shard {shard}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    cache_store.CacheStore.write_shard = patched


if __name__ == "__main__":
    _kill_after_commit(sys.argv.pop(1))
    from jest_jax import main

    main.run()
