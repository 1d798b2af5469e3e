"""One process with 8 simulated CPU devices for every check that needs them
(tests/test_sharding.py, tests/test_flexi.py): one start, one jax import and one
8-device backend instead of one per check. Each check is a part of SCRIPT; a part
that fails records its traceback and the others still run, so each test names what
broke. `results` runs the script once per session, shared by the xdist workers.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, re, sys, traceback
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jest_jax import build, config as config_lib, criteria, methods, scoring, sharding
from jest_jax import step as step_lib
from jest_jax.data.pipeline import Preprocess, train_dataset
from jest_jax.data.sources import open_pool
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.reference import NoReference
from jest_jax.selection import Embeddings

data_dir, ref_workdir, out_dir, smoke = sys.argv[1:5]
assert jax.device_count() == 8


def mesh_of(axes, shape):
    return Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), axes)


def save_params(path, params):
    np.savez(path, **{sharding.path_name(p): np.asarray(v)
                      for p, v in jax.tree_util.tree_leaves_with_path(params)})


def meshes():
    """tests/test_sharding.py: the same two JEST steps from the same init on the same
    super-batch, on 1 device and on (8,), (4, 2) and (2, 4) meshes, with and without
    FSDP; and the gradient of the selected batch before the optimizer."""
    runs = {  # name: (mesh axes, shape, rules, loss implementation, selection implementation)
        "one": (("data",), (1,), ((".*", "replicate"),), "dense", "dense"),
        "one_mf": (("data",), (1,), ((".*", "replicate"),), "dense", "matrix_free"),
        "data8": (("data",), (8,), ((".*", "replicate"),), "dense", "dense"),
        "fsdp4x2": (("data", "fsdp"), (4, 2), ((".*", "fsdp"),), "dense", "matrix_free"),
        "fsdp2x4": (("data", "fsdp"), (2, 4), ((".*", "fsdp"),), "chunked", "dense"),
    }

    def make_config(axes, shape, rules, loss, implementation):
        c = config_lib.load(f"{smoke}:steps=10")
        for pool in (c.data.train, c.evals.zero_shot.data, c.evals.retrieval.data):
            pool.data_dir = data_dir
        c.data.train.split = "raw"
        c.batch_size = 32
        c.optimizer.warmup_fraction = 0.0  # the first update is not zero
        c.selection.update(method="joint", criterion="learnability", filter_ratio=0.5,
                           num_chunks=4, implementation=implementation)
        c.selection.reference.workdir = ref_workdir
        c.mesh.axes, c.mesh.shape, c.mesh.rules = axes, shape, rules
        c.loss.implementation = loss
        return c

    config = make_config(*runs["one"])
    tokenizer = make_tokenizer(config.data.tokenizer)
    preprocess = Preprocess(config.data.image_size, tokenizer, config.data.text_len)
    host_batch = next(iter(train_dataset(open_pool(config, "data.train"), preprocess,
                                         batch_size=64, seed=0)))
    key = jax.random.key(7)
    report = {}
    for name, run in runs.items():
        config = make_config(*run)
        mesh = mesh_of(run[0], run[1])
        spec = config_lib.validate(config)
        source = spec.reference.open(spec.data, mesh, spec.mesh)
        wired = build.wire(spec, mesh, tokenizer.vocab_size, source)
        reference = source.step_input
        state = wired.state.init(config.seed)
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh))
                 for k, v in host_batch.items()}
        idx, _, _ = jax.jit(wired.scorer)(key, state["params"], reference, batch)
        selected = {k: v[idx] for k, v in batch.items()}
        grads = jax.jit(jax.grad(lambda p: step_lib.batch_loss(
            wired.model, spec.loss, mesh, p, selected)))(state["params"])
        save_params(f"{out_dir}/meshes/{name}_grads.npz", grads)
        losses, scores = [], []
        for _ in range(2):
            state, metrics, _ = wired.step(state, batch, reference)
            losses.append(float(metrics["loss"]))
            scores.append(float(metrics["selection/score_selected"]))

        def spec_of(x):
            return [None if e is None else str(e) for e in x.sharding.spec]

        def leaf(tree, suffix):
            return next(v for p, v in jax.tree_util.tree_leaves_with_path(tree)
                        if sharding.path_name(p).endswith(suffix))

        kernel = leaf(state["params"], "image/encoder/blocks/0/mlp_in/kernel")
        mu = leaf(state["opt_state"], "mu/image/encoder/blocks/0/mlp_in/kernel")
        ref_kernel = leaf(reference, "image/encoder/blocks/0/mlp_in/kernel")
        report[name] = {
            "idx": np.asarray(idx).tolist(), "losses": losses, "scores": scores,
            "shape": list(kernel.shape),
            "spec": spec_of(kernel), "mu_spec": spec_of(mu), "ref_spec": spec_of(ref_kernel),
            "shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
            "num_shards": len({str(s.index) for s in kernel.addressable_shards}),
        }
        save_params(f"{out_dir}/meshes/{name}.npz", state["params"])
    return report


def flexi():
    """tests/test_flexi.py: the same Flexi-JEST steps on a 1-device mesh, on 8 devices,
    and on a 4x2 FSDP mesh with the chunked loss (the ring over concatenated parts)."""
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
            "tokens": rng.integers(1, 258, (64, 24), dtype=np.int32)}
    report = {}
    for name, axes, shape, rules, loss in (
            ("one", ("data",), (1,), ((".*", "replicate"),), "dense"),
            ("data8", ("data",), (8,), ((".*", "replicate"),), "dense"),
            ("fsdp4x2", ("data", "fsdp"), (4, 2), ((".*", "fsdp"),), "chunked")):
        c = config_lib.load(smoke)
        c.batch_size = 32
        c.optimizer.warmup_fraction = 0.0
        c.model.update(low_res_patch_size=8, low_res_fraction=0.5)
        c.selection.update(method="joint", criterion="hard_learner", filter_ratio=0.5,
                           num_chunks=4, score_patch_size=8)
        c.mesh.axes, c.mesh.shape, c.mesh.rules = axes, shape, rules
        c.loss.implementation = loss
        mesh = mesh_of(axes, shape)
        spec = config_lib.validate(c, num_devices=mesh.size, check_files=False)
        wired = build.wire(spec, mesh, 258, NoReference())
        state, batch = wired.state.init(0), sharding.to_global(host, mesh)
        losses = []
        for _ in range(2):
            state, metrics, _ = wired.step(state, batch, {})
            losses.append(float(metrics["loss"]))
        report[name] = {"losses": losses, "score": float(metrics["selection/score_selected"])}
        save_params(f"{out_dir}/flexi/{name}.npz", state["params"])
    return report


def rows():
    """tests/test_sharding.py: the array shapes of the compiled selection (scores and
    joint sampling) of N = 256 candidates sharded by rows over the 8 devices."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    N, b, D = 256, 64, 16
    x = jax.ShapeDtypeStruct((N, D), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    out = {}
    for implementation in ("dense", "matrix_free"):
        spec = scoring.SelectionSpec(method=methods.Joint(b, 4, 1.0),
                                     criterion=criteria.bind("learnability"), num_select=b,
                                     num_candidates=N, implementation=implementation)
        scorer = scoring.Scorer(spec, 0, None, None, sharding.rows_sharding(mesh))

        def f(key, li, lt, ri, rt):
            e, r = (Embeddings(i, t, jnp.float32(2.3), jnp.float32(-10.0))
                    for i, t in ((li, lt), (ri, rt)))
            return spec.method(key, scorer.scores(e, r, criteria.Context()))

        text = jax.jit(f).lower(jax.random.key(0), x, x, x, x).compile().as_text()
        out[implementation] = sorted(set(re.findall(r"f32\[[0-9,]+\]", text)))
    return out


results = {}
for part in (meshes, flexi, rows):
    try:
        results[part.__name__] = {"result": part()}
    except Exception:
        results[part.__name__] = {"error": traceback.format_exc()}
print("RESULT" + json.dumps(results))
'''


def _run(data_dir: str, reference_workdir: str, out_dir: str) -> dict:
    os.makedirs(os.path.join(out_dir, "meshes"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "flexi"), exist_ok=True)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, data_dir, reference_workdir, out_dir,
                          os.path.join(ROOT, "configs", "smoke.py")], env=env,
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    if out.returncode or not lines:
        error = f"the 8-device process exited {out.returncode}:\n{out.stderr[-4000:]}"
        return {part: {"error": error} for part in ("meshes", "flexi", "rows")}
    return json.loads(lines[0][len("RESULT"):])


def results(request, tmp_path_factory) -> tuple[dict, str]:
    """Every part's {"result": ...} or {"error": traceback}, and the directory of the
    saved arrays (`meshes/<run>[_grads].npz`, `flexi/<run>.npz`).

    Computed once per session: under xdist, in a directory all workers share, by the
    first worker that asks while the others wait on a lock (the data and reference run
    it needs are only built by that worker)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-N, shared by the workers
    out_dir = os.path.join(str(base), "eight_devices")
    os.makedirs(out_dir, exist_ok=True)
    done = os.path.join(out_dir, "results.json")
    with open(os.path.join(out_dir, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(done):
                found = _run(request.getfixturevalue("data_dir"),
                             request.getfixturevalue("reference_workdir"), out_dir)
                with open(done + ".tmp", "w") as f:
                    json.dump(found, f)
                os.replace(done + ".tmp", done)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with open(done) as f:
        return json.load(f), out_dir


def part(found: dict, name: str):
    """The result of part `name`; fails the calling test with the part's error."""
    entry = found[name]
    if "error" in entry:
        raise AssertionError(f"the 8-device part {name!r} failed:\n{entry['error']}")
    return entry["result"]
