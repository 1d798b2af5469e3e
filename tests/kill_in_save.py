"""Test-only launcher: `python tests/kill_in_save.py STEP <jest_jax.main flags>`.

Runs the CLI, and SIGKILLs the process while the checkpoint of STEP is being written:
after orbax has written every file into its temporary directory and just before the
rename that commits it. Patched at that exact point (orbax's commit of a local path),
so the kill lands mid-save whatever the machine's load, and the test can assert that a
half-written checkpoint is never resumed from. Nothing of this lives in jest_jax.
"""

from __future__ import annotations

import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity


def _kill_before_commit(step: str):
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self._final_path)) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


if __name__ == "__main__":
    _kill_before_commit(sys.argv.pop(1))
    from jest_jax import main

    main.run()
