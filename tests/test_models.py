"""Model towers: shapes, dtypes, padding invariance, FlexiViT resize, NNX usage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jest_jax import losses
from jest_jax.models import (
    VARIANTS,
    TextTransformer,
    TwoTower,
    ViT,
    resize_patch_embedding,
    variant,
)

IMAGE, PATCH, TEXT_LEN, VOCAB, DIM = 16, 4, 8, 50, 32


def _model(dtype="float32") -> TwoTower:
    return TwoTower(
        image_size=IMAGE,
        patch_size=PATCH,
        image_variant="tiny",
        text_variant="tiny",
        vocab_size=VOCAB,
        text_len=TEXT_LEN,
        embed_dim=DIM,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )


# Jitted calls: eager op-by-op dispatch of a whole tower is several times
# slower to warm up on CPU than one compile.
_forward = nnx.jit(lambda m, images, tokens: m(images, tokens))
_embed_images = nnx.jit(lambda m, images, p: m.embed_images(images, p), static_argnums=2)
_embed_texts = nnx.jit(lambda m, tokens: m.embed_texts(tokens))
_text = nnx.jit(lambda m, tokens: m(tokens))


def _batch(b: int = 4):
    images = jax.random.uniform(jax.random.key(1), (b, IMAGE, IMAGE, 3))
    tokens = jax.random.randint(jax.random.key(2), (b, TEXT_LEN), 1, VOCAB)
    tokens = tokens.at[:, 5:].set(0)
    return images, tokens


@pytest.fixture(scope="module")
def model() -> TwoTower:
    return _model()


def test_shapes_and_unit_norm(model):
    images, tokens = _batch()
    img, txt = _forward(model, images, tokens)
    assert img.shape == txt.shape == (4, DIM)
    assert img.dtype == txt.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)


def test_temperature_and_bias_init(model):
    np.testing.assert_allclose(jnp.exp(model.log_temperature[...]), 10.0, rtol=1e-6)
    assert float(model.bias[...]) == -10.0
    assert model.log_temperature[...].shape == () == model.bias[...].shape


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = _model("bfloat16")
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    img, txt = _forward(model, *_batch())
    assert img.dtype == txt.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)


def test_only_param_state(model):
    _, _, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []


def test_text_pooling_ignores_padding():
    text = TextTransformer(vocab_size=VOCAB, max_len=5, variant="tiny", out_dim=DIM,
                           rngs=nnx.Rngs(3))
    tokens = jnp.array([[7, 8, 9, 0, 0], [1, 2, 3, 4, 0]])
    before = _text(text, tokens)
    # Rows 3 and 4 of the position table only ever touch padded positions of
    # the first sequence, which must be invisible to it.
    text.pos_embedding[...] = text.pos_embedding[...].at[3:].add(5.0)
    after = _text(text, tokens)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[1], before[1])


def test_all_padding_row_is_finite(model):
    tokens = jnp.zeros((2, TEXT_LEN), jnp.int32)
    assert bool(jnp.all(jnp.isfinite(_embed_texts(model, tokens))))


def test_text_too_long_raises(model):
    with pytest.raises(ValueError, match="max_len"):
        model.embed_texts(jnp.ones((1, TEXT_LEN + 1), jnp.int32))


@pytest.mark.parametrize("patch_size", [2, 8, 16])
def test_vit_other_patch_sizes(model, patch_size):
    images, _ = _batch()
    out = _embed_images(model, images, patch_size)
    assert out.shape == (4, DIM) and bool(jnp.all(jnp.isfinite(out)))


def test_vit_bad_patch_size_raises(model):
    images, _ = _batch()
    with pytest.raises(ValueError, match="does not divide"):
        model.embed_images(images, patch_size=5)


def test_vit_base_patch_size_is_default(model):
    images, _ = _batch()
    np.testing.assert_array_equal(
        _embed_images(model, images, None), _embed_images(model, images, PATCH)
    )


@pytest.mark.parametrize("p,new_p", [(4, 8), (3, 7), (2, 5)])
def test_pi_resize_preserves_inner_products_when_upsampling(p, new_p):
    rng = np.random.default_rng(p * 10 + new_p)
    channels, width, n = 3, 5, 6
    kernel = rng.standard_normal((p, p, channels, width)).astype(np.float32)
    patches = rng.standard_normal((n, p, p, channels)).astype(np.float32)
    new_kernel = resize_patch_embedding(jnp.asarray(kernel), new_p)
    assert new_kernel.shape == (new_p, new_p, channels, width)
    resized = jax.image.resize(patches, (n, new_p, new_p, channels), "bilinear")
    got = np.einsum(
        "nhwc,hwcd->nd", np.asarray(resized, np.float64), np.asarray(new_kernel, np.float64)
    )
    want = np.einsum("nhwc,hwcd->nd", patches.astype(np.float64), kernel.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pi_resize_identity_at_same_size():
    kernel = jnp.ones((4, 4, 3, 2))
    assert resize_patch_embedding(kernel, 4) is kernel


def test_variant_lookup():
    assert variant("B") == VARIANTS["B"]
    assert variant({"name": "tiny", "depth": 1})["depth"] == 1
    with pytest.raises(ValueError, match="'XL'.*valid names"):
        variant("XL")
    with pytest.raises(ValueError, match="missing"):
        variant({"width": 64})


def test_vit_b16_param_count_without_allocation():
    def count(pool):
        vit = nnx.eval_shape(lambda: ViT(image_size=224, patch_size=16, variant="B",
                                         out_dim=768, pool=pool, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(vit, nnx.Param)))

    assert 85e6 < count("gap") < 88e6  # ViT-B/16: ~86M
    d, mlp = 768, 3072  # MAP head: probe, attention (4 dense), LayerNorm, MLP
    head = d + 4 * (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
    assert count("map") - count("gap") == head


def test_functional_split_merge_under_jit_and_grad(model):
    graphdef, params = nnx.split(model, nnx.Param)
    images, tokens = _batch(4)

    @jax.jit
    def loss_fn(params):
        m = nnx.merge(graphdef, params)
        img = m.embed_images(images, patch_size=8)
        txt = m.embed_texts(tokens)
        return losses.sigmoid_loss(img, txt, m.log_temperature[...], m.bias[...])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert bool(jnp.isfinite(loss))
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["bias"][...])) > 0
    # The functional path computes the same thing as calling the module.
    direct = losses.sigmoid_loss(
        _embed_images(model, images, 8),
        _embed_texts(model, tokens),
        model.log_temperature[...],
        model.bias[...],
    )
    np.testing.assert_allclose(loss, direct, rtol=1e-5)


def test_map_head_pools_over_tokens_order_free():
    from jest_jax.models.layers import MAPHead

    head = MAPHead(16, 2, 32, jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 10, 16))
    perm = jax.random.permutation(jax.random.key(2), 10)
    out = head(x)
    assert out.shape == (3, 16)
    np.testing.assert_allclose(head(x[:, perm]), out, rtol=1e-5, atol=1e-6)
    # A single-token input attends to that token only: the pooled value depends on it.
    assert not np.allclose(head(x[:, :1]), head(x[:, 1:2]))


def test_vit_gap_pooling_option():
    vit = ViT(image_size=16, patch_size=4, variant="tiny", out_dim=8, pool="gap",
              rngs=nnx.Rngs(0))
    assert vit.map_head is None
    assert vit(jnp.zeros((2, 16, 16, 3))).shape == (2, 8)
    with pytest.raises(ValueError, match=r"pool must be one of \['gap', 'map'\]"):
        ViT(image_size=16, patch_size=4, variant="tiny", out_dim=8, pool="cls",
            rngs=nnx.Rngs(0))


def test_remat_changes_memory_not_results():
    """Rematerialised blocks give the same loss and gradients (they only recompute)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (4, IMAGE, IMAGE, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, VOCAB, (4, TEXT_LEN)), jnp.int32)

    def loss_and_grads(remat: bool):
        model = TwoTower(image_size=IMAGE, patch_size=PATCH, image_variant="tiny",
                         text_variant="tiny", vocab_size=VOCAB, text_len=TEXT_LEN,
                         embed_dim=DIM, remat=remat, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            m = nnx.merge(graphdef, p)
            return losses.sigmoid_loss(m.embed_images(images), m.embed_texts(tokens),
                                       m.log_temperature[...], m.bias[...])

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        text = jax.jit(jax.grad(loss)).lower(params).as_text()
        return value, nnx.to_pure_dict(grads), text

    plain, plain_grads, plain_text = loss_and_grads(False)
    remat, remat_grads, remat_text = loss_and_grads(True)
    assert remat == pytest.approx(float(plain), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 remat_grads, plain_grads)
    # The recomputation is really in the program: jax fences each recomputed block with an
    # optimization barrier so XLA cannot merge it back into the forward pass.
    assert "optimization_barrier" in remat_text and "optimization_barrier" not in plain_text
