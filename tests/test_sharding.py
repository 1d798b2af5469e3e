"""Sharding rules, and the same JEST training step on 1 device and on 8 simulated devices
laid out as (8,), (4, 2) and (2, 4) meshes, with and without FSDP."""

from __future__ import annotations

import pathlib

import eight_devices as eight_devices_lib
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jest_jax import config as config_lib
from jest_jax import sharding


def test_fsdp_splits_the_largest_divisible_dimension():
    assert sharding._fsdp_spec((6, 16), "fsdp", 4) == P(None, "fsdp")
    assert sharding._fsdp_spec((32, 16), "fsdp", 4) == P("fsdp", None)
    assert sharding._fsdp_spec((6, 10), "fsdp", 4) == P()  # nothing divisible: replicated
    assert sharding._fsdp_spec((), "fsdp", 4) == P()
    assert sharding._fsdp_spec((2,), "fsdp", 4) == P()  # smaller than the axis


def test_rules_match_paths_in_order():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    tree = {"params": {"img": {"kernel": np.zeros((4, 8))}, "bias": np.zeros(())},
            "opt_state": ({"mu": {"img": {"kernel": np.zeros((4, 8))}}},)}
    rules = (("opt_state/.*img/kernel", (None, "fsdp")), ("img/kernel", "fsdp"),
             (".*", "replicate"))
    out = sharding.tree_shardings(tree, mesh, rules)
    assert out["opt_state"][0]["mu"]["img"]["kernel"].spec == P(None, "fsdp")
    assert out["params"]["img"]["kernel"].spec == P(None, "fsdp")  # 8 > 4: the larger dim
    assert out["params"]["bias"].spec == P()
    assert sharding.path_name(jax.tree_util.tree_flatten_with_path(tree)[0][0][0]) == \
        "opt_state/0/mu/img/kernel"


@pytest.mark.parametrize("rule, message", [
    (("(", "fsdp"), "bad regex"),
    ((".*", "fsdp:model"), "mesh axis 'model'"),
    ((".*", ("data", "model")), "'model' is not None or an axis"),
    ((".*", "shard"), "spec must be"),
    (".*", "must be a (regex, spec) pair"),
])
def test_bad_rules_name_the_problem(tiny_config, rule, message):
    tiny_config.mesh.axes, tiny_config.mesh.shape = ("data", "fsdp"), (-1, 1)
    tiny_config.mesh.rules = (rule,)
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.rules\[0\]") as e:
        config_lib.validate(tiny_config)
    assert message in str(e.value)


def test_chunked_loss_needs_sigmoid(tiny_config):
    tiny_config.loss.name, tiny_config.loss.implementation = "softmax", "chunked"
    with pytest.raises(config_lib.ConfigError, match="loss.implementation.*sigmoid loss only"):
        config_lib.validate(tiny_config)


def test_explicit_spec_must_divide_the_array():
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    tree = {"w": jax.ShapeDtypeStruct((3, 5), np.float32)}
    with pytest.raises(ValueError, match="more entries than w has dimensions"):
        sharding.tree_shardings(tree, mesh, (("w", (None, None, "data")),))


# The 8-device checks run in one shared process (tests/eight_devices.py): every mesh
# (and a 1-device one) runs the same two JEST steps from the same init on the same
# super-batch.
@pytest.mark.slow
def test_meshes_agree_with_one_device(eight_devices):
    found, out_dir = eight_devices
    runs = eight_devices_lib.part(found, "meshes")
    tmp_path = pathlib.Path(out_dir) / "meshes"
    one = np.load(tmp_path / "one.npz")
    for name, base in (("data8", "one"), ("fsdp4x2", "one_mf"), ("fsdp2x4", "one")):
        run = runs[name]
        # JEST picks the same examples from the same scores, on any layout.
        assert run["idx"] == runs[base]["idx"], name
        # Only reduction order differs (sharded matmuls, psums, the ring of the chunked
        # loss): float32 round-off, far below the step-to-step change of the loss.
        np.testing.assert_allclose(run["losses"], runs[base]["losses"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(run["scores"], runs[base]["scores"], rtol=1e-5, err_msg=name)
        grads, base_grads = (np.load(tmp_path / f"{n}_grads.npz") for n in (name, base))
        scale = max(np.abs(base_grads[k]).max() for k in one.files)
        for key in one.files:  # the gradient of the selected batch, before the optimizer
            np.testing.assert_allclose(grads[key], base_grads[key], rtol=1e-4,
                                       atol=1e-5 * scale, err_msg=f"{name}: grad {key}")
        params, base_params = (np.load(tmp_path / f"{n}.npz") for n in (name, base))
        for key in one.files:
            # Adam divides each gradient entry by its own size, so entries that are 0 up
            # to round-off (attention key biases: softmax ignores them) take round-off-
            # driven steps of up to lr = 1e-3. After two steps the layouts agree to
            # lr/10 everywhere (measured: at most 6e-5 on key biases, 1.5e-5 elsewhere).
            np.testing.assert_allclose(params[key], base_params[key], atol=1e-4, rtol=0,
                                       err_msg=f"{name}: {key}")
    # Under FSDP the kernel [64, 256] is really split over the fsdp axis (and its Adam
    # moment and the frozen reference's copy too), replicated over data; else replicated.
    d, h = runs["data8"]["shape"]
    assert runs["data8"]["spec"] == [] and runs["data8"]["num_shards"] == 1
    for name, fsdp in (("fsdp4x2", 2), ("fsdp2x4", 4)):
        run = runs[name]
        assert run["spec"] == run["mu_spec"] == run["ref_spec"] == [None, "fsdp"]
        assert run["shard_shapes"] == [[d, h // fsdp]] and run["num_shards"] == fsdp


@pytest.mark.slow
def test_selection_never_holds_the_whole_score_matrix_on_one_device(eight_devices):
    # Slow only because it shares the 8-device process of the test above.
    shapes = eight_devices_lib.part(eight_devices[0], "rows")
    # N = 256 candidates on 8 devices: the dense S lives as row blocks [32, 256] per device;
    # the matrix-free path has no N-by-N or N/8-by-N array at all.
    assert "f32[32,256]" in shapes["dense"]
    for implementation, found in shapes.items():
        assert "f32[256,256]" not in found, implementation
    assert "f32[32,256]" not in shapes["matrix_free"]


def test_distributed_flags_come_together(monkeypatch):
    with pytest.raises(ValueError, match="need all of coordinator_address"):
        sharding.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
        sharding.initialize_distributed("localhost:1234", 2, 2)
    for key in sharding._TPU_VM_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sharding, "_TPU_DEVICE_FILES", ())
    assert not sharding.on_tpu_vm()
    assert not sharding.initialize_distributed()  # plain single-process run: nothing to join
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-256")
    assert sharding.on_tpu_vm()


def test_a_rule_that_does_not_fit_the_model_is_a_config_error(tiny_config, tmp_path):
    from jest_jax import train

    tiny_config.mesh.rules = (("mlp_in/kernel", (None, None, "data")),)
    config_lib.validate(tiny_config)  # the rule itself is well-formed; the model shows it
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config.mesh.rules: sharding rule 'mlp_in/kernel': spec .* has "
                             r"more entries than .*mlp_in/kernel has dimensions"):
        train.train(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
