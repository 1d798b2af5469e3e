"""The ring-chunked SigLIP loss equals the dense one, in value and gradients, and is chunked.

Multi-device cases run in one subprocess on 8 simulated CPU devices in float64;
the reference is NumPy float64 with an analytic gradient.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jest_jax import losses

B, D = 64, 16
# (mesh shape, mesh axis names, axes passed to the loss; None = all, in mesh order)
CASES = {
    "8": ((8,), ("data",), None),
    "4x2": ((4, 2), ("data", "fsdp"), None),
    "2x4": ((2, 4), ("data", "fsdp"), None),
    "4x2-reversed": ((4, 2), ("data", "fsdp"), ("fsdp", "data")),
    "4x2-data-only": ((4, 2), ("data", "fsdp"), ("data",)),  # replicated over fsdp
}
HLO_CASES = ("8", "4x2")

SCRIPT = """
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jest_jax import losses

inputs, cases, hlo_cases, out_dir = np.load(sys.argv[1]), json.loads(sys.argv[2]), \\
    json.loads(sys.argv[3]), sys.argv[4]
shapes = lambda text: sorted(set(re.findall(r"f64\\[[0-9,]*\\]", text)))
results, hlo = {}, {}
for name, (shape, names, axes) in cases.items():
    mesh = Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), tuple(names))
    axes = None if axes is None else tuple(axes)
    rows = NamedSharding(mesh, P(tuple(names) if axes is None else axes))
    img, txt = (jax.device_put(inputs[f"{name}/{k}"], rows) for k in ("img", "txt"))
    t, b = (jnp.float64(inputs[f"{name}/{k}"]) for k in ("t", "b"))
    chunked = lambda *a: losses.sigmoid_loss_chunked(*a, mesh=mesh, axes=axes)
    for label, fn in (("chunked", chunked), ("plain", losses.sigmoid_loss)):
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(img, txt, t, b)
        results[f"{name}/{label}/loss"] = np.asarray(value)
        for k, g in zip(("img", "txt", "t", "b"), grads):
            results[f"{name}/{label}/d_{k}"] = np.asarray(g)
    if name in hlo_cases:
        lowered = jax.jit(chunked).lower(img, txt, t, b)
        grad_fn = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))
        plain = jax.jit(jax.grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3)))
        hlo[name] = {
            "lowered": sorted(set(re.findall(r"tensor<[0-9x]+xf64>", lowered.as_text()))),
            "dots": lowered.as_text().count("dot_general"),
            "forward": shapes(lowered.compile().as_text()),
            "grad": shapes(grad_fn.lower(img, txt, t, b).compile().as_text()),
            "plain_grad": shapes(plain.lower(img, txt, t, b).compile().as_text()),
        }
np.savez(out_dir + "/results.npz", **results)
with open(out_dir + "/hlo.json", "w") as f:
    json.dump(hlo, f)
"""


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sigmoid_np(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _siglip_np(img, txt, t, b):
    """Loss and analytic gradients (d img, d txt, d t', d β), float64.

    With ``l = e^t' x·y + β`` and ``pair = -log σ(z l)``:
    ``d pair / d l = -z σ(-z l)``; the chain rule through ``l`` gives the rest.
    """
    n = len(img)
    scale = np.exp(t)
    dots = img @ txt.T
    logits = scale * dots + b
    z = 2.0 * np.eye(n) - 1.0
    loss = np.logaddexp(0.0, -z * logits).sum() / n
    g = -z * _sigmoid_np(-z * logits) / n  # d loss / d logits
    return loss, scale * g @ txt, scale * g.T @ img, (g * scale * dots).sum(), g.sum()


def _case_inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sorted(CASES).index(name))
    return {"img": _unit_rows(rng, B, D), "txt": _unit_rows(rng, B, D),
            # log temperature in [0, log 30], bias in [-12, 2]: around SigLIP's init.
            "t": np.float64(rng.uniform(0.0, np.log(30.0))), "b": np.float64(rng.uniform(-12, 2))}


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("chunked")
    np.savez(out_dir / "inputs.npz", **{f"{name}/{k}": v for name in CASES
                                        for k, v in _case_inputs(name).items()})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out_dir / "inputs.npz"), json.dumps(CASES),
         json.dumps(HLO_CASES), str(out_dir)],
        env=env, capture_output=True, text=True, timeout=1800,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(out_dir / "hlo.json") as f:
        hlo = json.load(f)
    return dict(np.load(out_dir / "results.npz")), hlo


def test_numpy_reference_gradient_matches_finite_differences():
    x = _case_inputs("8")
    img, txt, t, b = x["img"][:6], x["txt"][:6], x["t"], x["b"]
    _, d_img, d_txt, d_t, d_b = _siglip_np(img, txt, t, b)
    eps = 1e-6
    central = lambda f: (f(eps) - f(-eps)) / (2 * eps)
    bump = lambda a, i, e: a + e * (np.arange(a.size) == i).reshape(a.shape)
    checks = [
        (d_t, central(lambda e: _siglip_np(img, txt, t + e, b)[0])),
        (d_b, central(lambda e: _siglip_np(img, txt, t, b + e)[0])),
        (d_img.flat[7], central(lambda e: _siglip_np(bump(img, 7, e), txt, t, b)[0])),
        (d_txt.flat[20], central(lambda e: _siglip_np(img, bump(txt, 20, e), t, b)[0])),
    ]
    for analytic, numeric in checks:
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


# float64 end to end: only the summation order differs (blocks, devices), so
# agreement is to ~1e-15 relative; 1e-10 leaves room without hiding a wrong
# block, which would change the loss at the 1e-3 level or more.
@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_matches_numpy_reference(multidevice, name):
    got, _ = multidevice
    x = _case_inputs(name)
    want = _siglip_np(x["img"], x["txt"], x["t"], x["b"])
    for key, value in zip(("loss", "d_img", "d_txt", "d_t", "d_b"), want, strict=True):
        np.testing.assert_allclose(got[f"{name}/chunked/{key}"], value, rtol=1e-10,
                                   atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_matches_plain_sigmoid_loss(multidevice, name):
    got, _ = multidevice
    for key in ("loss", "d_img", "d_txt", "d_t", "d_b"):
        np.testing.assert_allclose(got[f"{name}/chunked/{key}"], got[f"{name}/plain/{key}"],
                                   rtol=1e-10, atol=1e-12, err_msg=key)


def _logit_shapes(shapes: list[str]) -> set[str]:
    """Shapes that could hold logits: at least 2-D, trailing dims not the embedding width."""
    dims = (tuple(int(d) for d in re.findall(r"\d+", s.partition("[")[2])) for s in shapes)
    return {d for d in dims if len(d) >= 2 and D not in d[-2:]}


@pytest.mark.parametrize("name", HLO_CASES)
def test_never_materialises_global_logits(multidevice, name):
    _, hlo = multidevice
    h = hlo[name]
    assert "tensor<64x64xf64>" not in h["lowered"] and "tensor<8x8xf64>" in h["lowered"]
    # The compiled per-device programs (loss and its gradient) hold only the
    # (B/d)×(B/d) block: not the B×B logits, nor a (B/d)×B row block.
    assert _logit_shapes(h["forward"]) == {(8, 8)}, h["forward"]
    assert _logit_shapes(h["grad"]) == {(8, 8)}, h["grad"]
    # Not unrolled: one matmul for the own block, one in the loop body.
    assert h["dots"] <= 2
    # Control: the dense loss on the same sharded inputs does show a wider block,
    # so the check above can fail.
    assert _logit_shapes(h["plain_grad"]) - {(8, 8)}, h["plain_grad"]


def _one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("data",))


def test_one_device_mesh_equals_plain_loss():
    x = _case_inputs("8")
    args = [jnp.asarray(x[k], jnp.float32) for k in ("img", "txt", "t", "b")]
    mesh = _one_device_mesh()
    chunked = lambda *a: losses.sigmoid_loss_chunked(*a, mesh=mesh)
    got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(*args)
    want = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(*args)
    # float32, same blocks and order; only XLA fusion differs.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_rejects_unknown_axis_and_mismatched_batch():
    mesh = _one_device_mesh()
    img = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="not in mesh axes"):
        losses.sigmoid_loss_chunked(img, img, 0.0, 0.0, mesh, axes=("model",))
    with pytest.raises(ValueError, match="must be equal"):
        losses.sigmoid_loss_chunked(img, img[:3], 0.0, 0.0, mesh)
