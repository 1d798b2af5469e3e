"""The optimizer: schedule, weight-decay convention and mask, against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import load_config
from jest_jax import config as config_lib
from jest_jax.models import Model
from jest_jax.optimizer import decay_mask


def _spec(total=100, warmup=0.1, lr=2e-3, wd=1e-4):
    c = load_config("smoke.py")
    c.total_steps, c.optimizer.warmup_fraction = total, warmup
    c.optimizer.learning_rate, c.optimizer.weight_decay = lr, wd
    return config_lib.validate(c)


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    schedule = _spec().optimizer.schedule
    peak, warm, total = 2e-3, 10, 100
    for t in (0, 3, 10, 37, 99, 100):
        if t < warm:
            want = peak * t / warm
        else:
            want = 0.5 * peak * (1 + np.cos(np.pi * (t - warm) / (total - warm)))
        # atol: the schedule is float32
        np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5, atol=1e-9)


def test_decay_mask_selects_projection_kernels_only():
    params = Model(_spec().model, vocab_size=258).abstract_params()
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['image']['patch_kernel']"] and flat["['text']['head']['kernel']"]
    for name in ("['log_temperature']", "['bias']", "['image']['pos_embedding']",
                 "['text']['embedding']['embedding']", "['image']['head']['bias']"):
        assert not flat[name], name


def test_weight_decay_is_scaled_by_schedule_not_learning_rate():
    optimizer = _spec(warmup=0.0, lr=1e-3, wd=0.05).optimizer
    tx, schedule = optimizer.tx, optimizer.schedule
    params = {"a": {"kernel": jnp.full((2, 2), 3.0)}, "b": {"bias": jnp.full((2,), 3.0)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for step in range(3):
        updates, state = tx.update(zeros, state, params)
        new = optax.apply_updates(params, updates)
        factor = 1 - 0.05 * float(schedule(step)) / 1e-3  # zero grads: only decay acts
        np.testing.assert_allclose(new["a"]["kernel"], params["a"]["kernel"] * factor, rtol=1e-6)
        np.testing.assert_array_equal(new["b"]["bias"], params["b"]["bias"])
        params = new
