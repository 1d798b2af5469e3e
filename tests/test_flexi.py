"""Flexi-JEST multi-resolution training (docs/design.md §1): the loss on the concatenated
embeddings, the plain path kept bitwise, gradients from both resolutions to the shared
embeddings, start-up errors, 1 vs 8 devices, and kill -9 + resume of a Flexi run."""

from __future__ import annotations

import os
import pathlib
import sys

import eight_devices as eight_devices_lib
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from jest_jax import build, sharding
from jest_jax import config as config_lib
from jest_jax import step as step_lib
from jest_jax.reference import NoReference

B, LOW = 32, 16  # smoke-sized batch; λ = 0.5 of it at patch 8 (16 px images, patch 4)


def _flexi(config, low_patch: int = 8, fraction: float = 0.5):
    config.batch_size = B
    config.model.low_res_patch_size = low_patch
    config.model.low_res_fraction = fraction
    return config


def _batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (rows, 16, 16, 3), dtype=np.uint8),
            "tokens": rng.integers(1, 258, (rows, 24), dtype=np.int32)}


def _wired(config, selection: bool = True) -> tuple[config_lib.Spec, build.Wired]:
    spec = config_lib.validate(config, num_devices=1, check_files=False)
    return spec, build.wire(spec, spec.mesh.build(), 258, NoReference(), selection)


def _np_sigmoid_loss(img, txt, t, bias) -> float:
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = np.exp(float(t)) * img @ txt.T + float(bias)
    z = 2 * np.eye(len(img)) - 1
    return float(np.sum(np.logaddexp(0.0, -z * logits)) / len(img))


def test_multi_resolution_loss_is_the_loss_of_the_concatenated_embeddings():
    spec, wired = _wired(_flexi(load_config("smoke.py")), selection=False)
    model, mesh = wired.model, wired.state.mesh
    params = model.init(jax.random.key(1))
    batch = jax.tree.map(jnp.asarray, _batch(B))
    value = jax.jit(lambda p: step_lib.batch_loss(model, spec.loss, mesh, p, batch))(params)
    # Independently: the first λ·b images at patch 8, the rest at patch 4, one loss.
    images = batch["image"]
    low, high, full, text = jax.jit(lambda p: (
        model.embed_images(p, images[:LOW], 8), model.embed_images(p, images[LOW:]),
        model.embed_images(p, images), model.embed_texts(p, batch["tokens"])))(params)
    expected = _np_sigmoid_loss(np.concatenate([low, high]), text,
                                params["log_temperature"], params["bias"])
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    # The low-resolution part really is another resolution, so the check can tell.
    assert np.abs(np.asarray(full[:LOW]) - np.asarray(low)).max() > 1e-2
    plain = _np_sigmoid_loss(full, text, params["log_temperature"], params["bias"])
    assert abs(plain - expected) > 1e-3


def test_gradients_from_both_resolutions_reach_the_shared_embeddings():
    spec, wired = _wired(_flexi(load_config("smoke.py")), selection=False)
    model, mesh = wired.model, wired.state.mesh
    params = model.init(jax.random.key(2))
    batch = jax.tree.map(jnp.asarray, _batch(B, seed=1))
    shared = ("patch_kernel", "pos_embedding")

    @jax.jit
    def loss(p):
        return step_lib.batch_loss(model, spec.loss, mesh, p, batch)

    def split_loss(low_copy, high_copy, p):
        """The same loss with the low- and the high-resolution path each reading its own
        copy of the shared image embeddings."""
        with_low = {**p, "image": {**p["image"], **low_copy}}
        with_high = {**p, "image": {**p["image"], **high_copy}}
        image = jnp.concatenate([model.embed_images(with_low, batch["image"][:LOW], 8),
                                 model.embed_images(with_high, batch["image"][LOW:])])
        e = model.embeddings(p, batch)._replace(image=image)
        return spec.loss(e, mesh)

    grads = jax.jit(jax.grad(loss))(params)["image"]
    copy = {k: params["image"][k] for k in shared}
    g_low, g_high = jax.jit(jax.grad(split_loss, argnums=(0, 1)))(copy, copy, params)
    for k in shared:
        # Each resolution contributes, and the shared parameter gets their sum.
        assert np.abs(g_low[k]).max() > 1e-4 and np.abs(g_high[k]).max() > 1e-4, k
        np.testing.assert_allclose(grads[k], g_low[k] + g_high[k], rtol=1e-4,
                                   atol=1e-6 * np.abs(grads[k]).max())
        # Central finite difference of the loss along the gradient's own direction.
        direction = grads[k] / jnp.linalg.norm(grads[k])
        eps = 1e-2
        moved = [loss({**params, "image": {**params["image"], k: params["image"][k] + s * eps
                                            * direction}}) for s in (1, -1)]
        finite_difference = (float(moved[0]) - float(moved[1])) / (2 * eps)
        np.testing.assert_allclose(finite_difference, float(jnp.linalg.norm(grads[k])),
                                   rtol=2e-2)


def test_lambda_zero_or_full_patch_is_plain_jest_bitwise():
    def jest(config):  # joint selection by hard_learner: the JEST machinery, no reference
        config.selection.update(method="joint", criterion="hard_learner", filter_ratio=0.5,
                                num_chunks=4, score_patch_size=8)
        config.optimizer.warmup_fraction = 0.0
        return config

    batch = _batch(2 * B)
    states = []
    for config in (jest(_flexi(load_config("smoke.py"), 0)),  # plain JEST
                   jest(_flexi(load_config("smoke.py"), 8, 0.0)),  # λ = 0
                   jest(_flexi(load_config("smoke.py"), 4, 0.5))):  # low patch = full
        spec, wired = _wired(config)
        assert spec.model.low_res_examples(B) == 0
        state, placed = wired.state.init(0), sharding.to_global(batch, wired.state.mesh)
        for _ in range(2):
            state, _, _ = wired.step(state, placed, {})
        states.append(jax.tree.map(np.asarray, state))
    for other in states[1:]:
        for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(other), strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("field, value, devices, message", [
    ("low_res_fraction", 1.5, 1, r"config\.model\.low_res_fraction=1\.5 is invalid: must be "
                                 r"in \[0, 1\]"),
    ("low_res_fraction", -0.25, 1, r"config\.model\.low_res_fraction=-0\.25 is invalid"),
    ("low_res_patch_size", 5, 1, r"config\.model\.low_res_patch_size=5 is invalid: must be 0 "
                                 r"\(off\) or divide data\.image_size=16"),
    ("low_res_patch_size", 2, 1, r"config\.model\.low_res_patch_size=2 is invalid: .*>= "
                                 r"model\.patch_size=4"),
    ("low_res_fraction", 0.3, 1, r"config\.model\.low_res_fraction=0\.3 is invalid: "
                                 r"low_res_fraction × batch_size = 9\.6 must be a whole"),
    ("low_res_fraction", 0.125, 8, r"config\.model\.low_res_fraction=0\.125 is invalid: gives "
                                   r"a low-resolution part of 4 examples .* divisible by the "
                                   r"8 devices"),
])
def test_bad_flexi_settings_fail_at_start_up_naming_the_field(field, value, devices, message):
    config = _flexi(load_config("smoke.py"))
    config.model[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=devices, check_files=False)
    config.model[field] = {"low_res_fraction": 0.25, "low_res_patch_size": 8}[field]
    config_lib.validate(config, num_devices=devices, check_files=False)  # a good value passes


# In the shared 8-device process (tests/eight_devices.py): the same Flexi-JEST steps on
# a 1-device mesh, on 8 devices, and on a 4×2 FSDP mesh with the chunked loss (the ring
# over concatenated parts).
@pytest.mark.slow
def test_one_and_eight_devices_agree(eight_devices):
    found, out_dir = eight_devices
    runs = eight_devices_lib.part(found, "flexi")
    tmp_path = pathlib.Path(out_dir) / "flexi"
    one = np.load(tmp_path / "one.npz")
    for name in ("data8", "fsdp4x2"):
        # The same examples at the same resolutions: only the reduction order differs.
        np.testing.assert_allclose(runs[name]["losses"], runs["one"]["losses"], rtol=1e-5)
        assert runs[name]["score"] == pytest.approx(runs["one"]["score"], rel=1e-5)
        params = np.load(tmp_path / f"{name}.npz")
        for key in one.files:  # Adam's round-off-driven steps: see tests/test_sharding.py
            np.testing.assert_allclose(params[key], one[key], atol=1e-4, rtol=0, err_msg=key)


# Kill -9 and resume of a Flexi-JEST run is bitwise: tests/test_reliability.py
# (test_flexi_jest_run_killed_twice_resumes_bitwise).


def test_flexi_configs_and_the_a4_formula():
    from jest_jax.metrics import a4_step_ratio

    shapes = config_lib.validate(load_config("shapes.py", "stage=learner,method=joint,flexi=True"),
                                 num_devices=1, check_files=False)
    assert (shapes.selection.score_patch_size, shapes.model.low_res_patch_size) == (8, 8)
    assert shapes.model.low_res_examples(shapes.batch_size) == 32
    assert (shapes.model.image_variant, shapes.model.text_variant) == ("tiny", "nano")
    (low_res_zero_shot,) = [t for t in shapes.evals.tasks if t.name == "zero_shot_low_res"]
    assert low_res_zero_shot.patch_size == 8
    # The demo's proportions keep Flexi-JEST within 1.25 uniform steps (issue target; the
    # paper: ~1.1): r, XLA's FLOPs of the patch-8 two-tower forward pass over the patch-4
    # one, in the §A.4 formula, as the benchmarks measure it (docs/benchmarks.md has the
    # whole compiled steps).
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from accounting import a4_prediction

    a4 = a4_prediction(shapes, vocab_size=258)
    r = a4["r_score"]
    assert 0.3 < r < 0.346 and a4["r_train"] == r
    assert a4["ratio"] == pytest.approx(a4_step_ratio(5.0, r, 0.5, r)) and a4["ratio"] <= 1.25
    paper = config_lib.validate(load_config("paper/jest.py", "model=B,flexi=True"),
                                num_devices=256, check_files=False)
    assert (paper.selection.score_patch_size, paper.model.patch_size,
            paper.model.low_res_patch_size) == (32, 16, 32)
    assert paper.model.low_res_examples(32768) == 16384  # 64 per device on 256
    # §A.4: JEST at f = 0.8 without reusing the scoring forward, and the paper's Flexi-JEST.
    assert a4_step_ratio(5.0) == pytest.approx(8 / 3)
    assert a4_step_ratio(5.0, 0.28, 0.5, 0.28) == pytest.approx((1.4 + 1.92) / 3)
    assert a4_step_ratio(0.0, 1.0, 0.5, 0.28) == pytest.approx(0.64)  # the paper's 64%
