"""How runs count the update's FLOPs: its lowered program against its compiled one.

A selection run logs `flops/update`, the learner's update alone on the b selected
examples (jest_jax.build.Wired.flops). It is counted on the update's lowered program, which
costs a trace; compiling it as well would cost a second compile that is never run. This
prints both counts and the time each takes, side by side, for the configs given:

    python experiments/flops_count.py                      # the demo's JEST and Flexi-JEST
    python experiments/flops_count.py --config configs/shapes.py:stage=learner,method=joint,cache=x
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_paper import abstract_batch  # noqa: E402

from jest_jax import build  # noqa: E402
from jest_jax import config as config_lib  # noqa: E402
from jest_jax.metrics import compiled_flops  # noqa: E402
from jest_jax.models import Model  # noqa: E402

DEMO = "configs/shapes.py:stage=learner,method=joint,cache=(compiled without files)"
VOCAB = 1000  # the demo tokenizer's size does not change the towers' FLOPs much


def count(path: str) -> dict[str, float]:
    spec = config_lib.validate(config_lib.load(path), num_devices=jax.device_count(),
                               check_files=False)
    mesh = spec.mesh.build()
    reference = spec.reference.abstract(Model(spec.model, VOCAB), mesh, spec.mesh)
    wired = build.wire(spec, mesh, VOCAB, reference)
    if wired.update is None:
        raise SystemExit(f"{path}: no selection, so no separate update to count")
    state = wired.state.abstract_sharded()
    selected = {k: v for k, v in abstract_batch(spec, mesh, wired.scorer.spec.num_select,
                                                 ()).items() if k in build.UPDATE_FIELDS}
    start = time.perf_counter()
    lowered = wired.update.lower(state, selected, {})
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return {"lowered": compiled_flops(lowered), "compiled": compiled_flops(compiled),
            "lower_s": lower_s, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="config file[:args] with selection (repeat to compare)")
    paths = parser.parse_args().config or [DEMO, DEMO + ",flexi=True"]
    print(f"device: {jax.device_count()}x {jax.devices()[0].device_kind}\n")
    print("| config | update GFLOPs, lowered | compiled | lowered ÷ compiled | "
          "compile time ÷ lowering time |")
    print("|---|---:|---:|---:|---:|")
    for path in paths:
        r = count(path)
        print(f"| {path} | {r['lowered'] / 1e9:.4f} | {r['compiled'] / 1e9:.4f} | "
              f"{r['lowered'] / r['compiled']:.4f} | {r['compile_s'] / r['lower_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
