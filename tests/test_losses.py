"""Loss functions against an independent NumPy float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jest_jax import losses


def _log_sigmoid_np(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pair_losses_np(img, txt, t, b):
    logits = np.exp(t) * img @ txt.T + b
    z = 2.0 * np.eye(len(img)) - 1.0
    return -_log_sigmoid_np(z * logits)


def _softmax_loss_np(img, txt, t):
    logits = np.exp(t) * img @ txt.T
    diag = np.diag(logits)
    i2t = np.logaddexp.reduce(logits, axis=1) - diag
    t2i = np.logaddexp.reduce(logits, axis=0) - diag
    return 0.5 * (i2t.mean() + t2i.mean())


def _case(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    img, txt = _unit_rows(rng, n, d), _unit_rows(rng, n, d)
    t = rng.uniform(0.0, np.log(30.0))
    b = rng.uniform(-12.0, 2.0)
    return img, txt, t, b


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


CASES = [(1, 8), (5, 16), (33, 8), (33, 16)]


@pytest.mark.parametrize("n,d", CASES)
def test_sigmoid_pair_losses_match_numpy(n, d):
    img, txt, t, b = _case(n, d, seed=n * 100 + d)
    got = losses.sigmoid_pair_losses(*_f32(img, txt, t, b))
    assert got.shape == (n, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _pair_losses_np(img, txt, t, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d", CASES)
def test_sigmoid_loss_matches_numpy(n, d):
    img, txt, t, b = _case(n, d, seed=n * 100 + d + 1)
    got = losses.sigmoid_loss(*_f32(img, txt, t, b))
    want = _pair_losses_np(img, txt, t, b).sum() / n
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d", CASES)
def test_softmax_loss_matches_numpy(n, d):
    img, txt, t, _ = _case(n, d, seed=n * 100 + d + 2)
    got = losses.softmax_loss(*_f32(img, txt, t))
    np.testing.assert_allclose(got, _softmax_loss_np(img, txt, t), rtol=1e-5, atol=1e-6)


def test_diagonal_is_positive():
    # Identical unit embeddings: the diagonal logit is large and positive, so
    # its pair loss must be near 0; off-diagonal pairs are orthogonal (logit =
    # bias < 0), so their loss is near 0 too, and flipping either sign is large.
    img = jnp.eye(4, dtype=jnp.float32)
    pair = losses.sigmoid_pair_losses(img, img, jnp.log(100.0), jnp.float32(-10.0))
    assert float(jnp.diagonal(pair).max()) < 1e-3
    off = pair[~np.eye(4, dtype=bool)]
    assert float(off.max()) < 1e-3
    # With z = -1 on the diagonal the loss would be ~90.
    flipped = losses.pair_losses_block(img, img, jnp.log(100.0), -10.0, jnp.zeros((4, 4), bool))
    assert float(jnp.diagonal(flipped).min()) > 80.0


def test_block_matches_dense_rows_and_columns():
    img, txt, t, b = _f32(*_case(12, 8, seed=7))
    dense = losses.sigmoid_pair_losses(img, txt, t, b)
    all_ids = jnp.arange(12)
    sel = jnp.array([3, 0, 9])
    rows = losses.pair_losses_block(img[sel], txt, t, b, losses.positive_mask(sel, all_ids))
    cols = losses.pair_losses_block(img, txt[sel], t, b, losses.positive_mask(all_ids, sel))
    np.testing.assert_allclose(rows, dense[sel, :], rtol=1e-6)
    np.testing.assert_allclose(cols, dense[:, sel], rtol=1e-6)


def test_bfloat16_inputs_compute_in_float32():
    img, txt, t, b = _f32(*_case(5, 8, seed=3))
    got = losses.sigmoid_pair_losses(img.astype(jnp.bfloat16), txt, t, b)
    assert got.dtype == jnp.float32


def test_gradients_finite():
    img, txt, t, b = _f32(*_case(9, 16, seed=11))
    for fn, args in [
        (losses.sigmoid_loss, (img, txt, t, b)),
        (losses.softmax_loss, (img, txt, t)),
    ]:
        grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
        for g in grads:
            assert bool(jnp.all(jnp.isfinite(g)))
        # t' and β must receive signal.
        assert float(jnp.abs(grads[2])) > 0


def test_extreme_logits_are_stable():
    img = jnp.eye(3, dtype=jnp.float32)
    pair = losses.sigmoid_pair_losses(img, -img, jnp.float32(10.0), jnp.float32(0.0))
    assert bool(jnp.all(jnp.isfinite(pair)))
    np.testing.assert_allclose(jnp.diagonal(pair), np.exp(10.0), rtol=1e-5)


class LossKernelVariants(chex.TestCase):
    """The loss kernels give the float64 reference's numbers jitted and not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_pair_losses_block_matches_numpy(self):
        img, txt, t, b = _case(12, 8, seed=3)
        rows, cols = np.array([0, 5, 7]), np.arange(12)
        block = self.variant(losses.pair_losses_block)
        got = block(*_f32(img[rows], txt, t, b), losses.positive_mask(jnp.asarray(rows),
                                                                      jnp.asarray(cols)))
        np.testing.assert_allclose(got, _pair_losses_np(img, txt, t, b)[rows], rtol=1e-5,
                                   atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_losses_match_numpy(self):
        img, txt, t, b = _case(16, 8, seed=4)
        e = losses.Embeddings(*_f32(img, txt, t, b))
        sigmoid = self.variant(lambda e: losses.Loss("sigmoid", "dense")(e, None))
        softmax = self.variant(lambda e: losses.Loss("softmax", "dense")(e, None))
        np.testing.assert_allclose(sigmoid(e), _pair_losses_np(img, txt, t, b).sum() / 16,
                                   rtol=1e-5)
        np.testing.assert_allclose(softmax(e), _softmax_loss_np(img, txt, t), rtol=1e-5)


def test_kernel_boundaries_check_shapes_and_dtypes():
    """chex assertions at the loss kernels' boundary name the mismatch, jitted or not."""
    img, txt, t, b = _f32(*_case(4, 8, seed=5))
    with pytest.raises(AssertionError, match="rank"):
        losses.pair_losses_block(img[0], txt, t, b, jnp.ones((4, 4), bool))
    with pytest.raises(AssertionError):
        losses.pair_losses_block(img, txt[:, :4], t, b, jnp.ones((4, 4), bool))
    with pytest.raises(AssertionError):
        losses.pair_losses_block(img, txt, t, b, jnp.ones((4, 3), bool))
    with pytest.raises(AssertionError):
        jax.jit(losses.pair_losses_block)(img, txt, t, b, jnp.ones((4, 4), jnp.float32))
    with pytest.raises(AssertionError):
        losses.sigmoid_pair_losses(img, txt[:3], t, b)
