"""Selection against independent NumPy float64 references (docs/design.md §1, §4)."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jest_jax import criteria, selection
from jest_jax.selection import Embeddings


def np_pair_losses(img, txt, log_t, bias):
    """float64 NumPy SigLIP pair losses, written independently of jest_jax.losses."""
    logits = np.exp(log_t) * img @ txt.T + bias
    z = 2 * np.eye(len(img)) - 1
    return np.logaddexp(0.0, -z * logits)  # -log sigmoid(z * logit)


def np_pairs(e):
    """`np_pair_losses` of an `Embeddings`."""
    return np_pair_losses(np.asarray(e.image), np.asarray(e.text), float(e.log_temperature),
                          float(e.bias))


def np_conditionals(S, idx, num_chunks):
    """c_i before each chunk, given the chosen indices: S_ii + Σ_{j chosen}(S_ji + S_ij)."""
    m = len(idx) // num_chunks
    out = []
    for k in range(num_chunks):
        chosen = idx[:k * m]
        out.append(np.diag(S) + S[chosen, :].sum(0) + S[:, chosen].sum(1))
    return np.stack(out)


def random_embeddings(rng, n, d, log_t=2.302585, bias=-10.0, dtype=np.float64):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    shared = rng.normal(size=(n, d))  # images and texts correlate, as in a trained model
    img = unit(shared + 0.7 * rng.normal(size=(n, d)))
    txt = unit(shared + 0.7 * rng.normal(size=(n, d)))
    return Embeddings(jnp.asarray(img, dtype), jnp.asarray(txt, dtype),
                      jnp.asarray(log_t, dtype), jnp.asarray(bias, dtype))


def check_valid(idx, n, num_select):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and idx.shape == (num_select,)
    assert len(set(idx.tolist())) == num_select, "indices repeat"
    assert idx.min() >= 0 and idx.max() < n


@pytest.mark.parametrize("n,num_select,num_chunks,gain", [(64, 16, 4, 1.0), (50, 20, 5, 3.0),
                                                           (33, 33, 3, 0.5), (40, 8, 1, 1.0)])
def test_joint_conditionals_match_numpy(n, num_select, num_chunks, gain):
    rng = np.random.default_rng(n)
    S = rng.normal(size=(n, n))
    with jax.enable_x64(True):
        idx, conds = selection.joint_select(jax.random.key(1), jnp.asarray(S), num_select,
                                            num_chunks, gain, return_conditionals=True)
        idx, conds = np.asarray(idx), np.asarray(conds)
    check_valid(idx, n, num_select)
    np.testing.assert_allclose(conds, np_conditionals(S, idx, num_chunks), rtol=1e-12, atol=1e-12)


def test_each_chunk_is_the_gumbel_top_m_of_its_conditionals():
    """Chunk k is exactly top-m of g·c + Gumbel(key_k) among the not-yet-chosen."""
    n, num_select, num_chunks, gain = 48, 12, 3, 2.0
    S = np.random.default_rng(0).normal(size=(n, n))
    key = jax.random.key(7)
    with jax.enable_x64(True):
        idx = np.asarray(selection.joint_select(key, jnp.asarray(S), num_select, num_chunks,
                                                gain))
        keys = jax.random.split(key, num_chunks)
        noise = [np.asarray(jax.random.gumbel(k, (n,), jnp.float64)) for k in keys]
    conds = np_conditionals(S, idx, num_chunks)
    m = num_select // num_chunks
    for k in range(num_chunks):
        logits = gain * conds[k] + noise[k]
        logits[idx[:k * m]] = -np.inf
        np.testing.assert_array_equal(np.sort(idx[k * m:(k + 1) * m]),
                                      np.sort(np.argsort(-logits)[:m]))


def test_selection_is_valid_and_deterministic():
    n, b = 320, 64
    S = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jnp.float32)
    scores = S.sum(1)
    key, other = jax.random.key(0), jax.random.key(1)
    for fn in (lambda k: selection.joint_select(k, S, b, 16),
               lambda k: selection.independent_select(k, scores, b, "sample"),
               lambda k: selection.uniform_select(k, n, b)):
        a, again, different = fn(key), fn(key), fn(other)
        check_valid(a, n, b)
        np.testing.assert_array_equal(a, again)
        assert set(np.asarray(a).tolist()) != set(np.asarray(different).tolist())
    top = selection.independent_select(key, scores, b, "topk")
    check_valid(top, n, b)
    np.testing.assert_array_equal(np.sort(top), np.sort(np.argsort(-np.asarray(scores))[:b]))


def test_jit_matches_eager():
    S = jnp.asarray(np.random.default_rng(2).normal(size=(96, 96)), jnp.float32)
    key = jax.random.key(3)
    eager = selection.joint_select(key, S, 32, 4)
    jitted = jax.jit(selection.joint_select, static_argnums=(2, 3))(key, S, 32, 4)
    np.testing.assert_array_equal(eager, jitted)


def test_joint_picks_the_planted_set():
    """Members of a planted set score high together; their diagonal alone is modest."""
    rng = np.random.default_rng(4)
    n, b, chunks = 128, 32, 8
    planted = rng.choice(n, b, replace=False)
    S = 0.1 * rng.normal(size=(n, n))
    S[np.ix_(planted, planted)] += 1.0
    # Decoys: the best diagonal, but they score badly with everything else.
    decoys = np.setdiff1d(np.arange(n), planted)[:b]
    S[decoys, decoys] += 3.0
    S[decoys, :] -= 1.0
    S[:, decoys] -= 1.0
    S[decoys, decoys] += 2.0  # undo the diagonal's share of the two penalties
    idx = selection.joint_select(jax.random.key(0), jnp.asarray(S, jnp.float32), b, chunks,
                                 score_gain=5.0)
    picked = set(np.asarray(idx).tolist())
    assert len(picked & set(planted.tolist())) >= b - b // chunks  # all but the first chunk
    assert len(picked & set(decoys.tolist())) <= b // chunks


def test_first_chunk_follows_softmax_of_the_diagonal():
    """Chunk 1 with m = 1 draws i with p = softmax(g · S_ii): chi-square test, fixed seed."""
    n, gain, draws = 6, 1.5, 20000
    rng = np.random.default_rng(5)
    S = rng.normal(size=(n, n))
    first = jax.vmap(lambda k: selection.joint_select(k, jnp.asarray(S, jnp.float32), 3, 3,
                                                      gain)[0])
    samples = np.asarray(first(jax.random.split(jax.random.key(11), draws)))
    p = np.exp(gain * np.diag(S))
    p /= p.sum()
    counts = np.bincount(samples, minlength=n)
    assert stats.chisquare(counts, draws * p).pvalue > 1e-3


def test_first_chunk_of_two_is_sampling_without_replacement():
    """With m = 2, P({a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b)."""
    n, gain, draws = 5, 1.0, 20000
    S = np.random.default_rng(6).normal(size=(n, n))
    first = jax.vmap(lambda k: selection.joint_select(k, jnp.asarray(S, jnp.float32), 4, 2,
                                                      gain)[:2])
    samples = np.sort(np.asarray(first(jax.random.split(jax.random.key(12), draws))), axis=1)
    p = np.exp(gain * np.diag(S))
    p /= p.sum()
    pairs = list(itertools.combinations(range(n), 2))
    expected = np.array([p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b]) for a, b in pairs])
    observed = np.array([np.sum((samples[:, 0] == a) & (samples[:, 1] == b)) for a, b in pairs])
    np.testing.assert_allclose(expected.sum(), 1.0)
    assert stats.chisquare(observed, draws * expected).pvalue > 1e-3


@pytest.mark.parametrize("criterion", ["learnability", "hard_learner", "easy_reference"])
def test_matrix_free_equals_dense_float64(criterion):
    rng = np.random.default_rng(7)
    n, b, chunks = 200, 40, 8
    with jax.enable_x64(True):
        learner = random_embeddings(rng, n, 16)
        reference = random_embeddings(rng, n, 16, log_t=np.log(20.0), bias=-5.0)
        fn = criteria.get(criterion)
        ref = reference if criteria.needs_reference(fn) else None
        S = np.asarray(fn(np_pairs(learner), None if ref is None else np_pairs(reference)))
        for seed in range(3):
            key = jax.random.key(seed)
            dense, dense_c = selection.joint_select(key, jnp.asarray(S), b, chunks,
                                                    return_conditionals=True)
            free, free_c = selection.joint_select_from_embeddings(
                key, learner, ref, criterion, b, chunks, return_conditionals=True)
            np.testing.assert_array_equal(dense, free)
            np.testing.assert_allclose(free_c, np_conditionals(S, np.asarray(free), chunks),
                                       rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(selection.score_matrix(learner, ref, criterion), S,
                                   rtol=1e-12, atol=1e-12)
        rows = selection.row_scores_from_embeddings(learner, ref, criterion, block_size=48)
        np.testing.assert_allclose(rows, S.sum(1), rtol=1e-10)
        idx = np.asarray(dense)
        np.testing.assert_allclose(selection.batch_score(learner, ref, criterion, dense),
                                   S[np.ix_(idx, idx)].sum() / b, rtol=1e-10)


def test_matrix_free_matches_dense_float32():
    """float32 sums in a different order may flip near-ties: ≥ 99% of indices agree."""
    rng = np.random.default_rng(8)
    n, b, chunks = 1280, 256, 16
    learner = random_embeddings(rng, n, 32, dtype=np.float32)
    reference = random_embeddings(rng, n, 32, log_t=np.log(20.0), bias=-5.0, dtype=np.float32)
    S = selection.score_matrix(learner, reference, "learnability")
    overlap = []
    for seed in range(3):
        key = jax.random.key(seed)
        dense = selection.joint_select(key, S, b, chunks)
        free = jax.jit(selection.joint_select_from_embeddings, static_argnums=(3, 4, 5))(
            key, learner, reference, "learnability", b, chunks)
        check_valid(free, n, b)
        overlap.append(len(set(np.asarray(dense).tolist()) & set(np.asarray(free).tolist())) / b)
    assert min(overlap) >= 0.99, overlap


def test_size_errors_are_clear():
    S = jnp.zeros((10, 10))
    with pytest.raises(ValueError, match="num_select=6 must be divisible by num_chunks=4"):
        selection.joint_select(jax.random.key(0), S, 6, 4)
    with pytest.raises(ValueError, match=r"num_select=12 must be in \[1, num_candidates=10\]"):
        selection.joint_select(jax.random.key(0), S, 12, 4)
    with pytest.raises(ValueError, match="num_select=11"):
        selection.uniform_select(jax.random.key(0), 10, 11)
    with pytest.raises(ValueError, match="sampling='best'"):
        selection.independent_select(jax.random.key(0), jnp.zeros(10), 2, "best")


def test_criteria_registry():
    assert {"learnability", "hard_learner", "easy_reference"} <= set(criteria.names())
    learner, reference = jnp.array([3.0, 1.0]), jnp.array([1.0, 2.0])
    np.testing.assert_array_equal(criteria.get("learnability")(learner, reference), [2.0, -1.0])
    np.testing.assert_array_equal(criteria.get("hard_learner")(learner, None), [3.0, 1.0])
    np.testing.assert_array_equal(criteria.get("easy_reference")(learner, reference), [-1, -2])
    assert not criteria.needs_reference(criteria.get("hard_learner"))
    assert criteria.needs_reference(criteria.get("learnability"))
    assert criteria.get("jest_jax.criteria:hard_learner") is criteria.hard_learner
    with pytest.raises(ValueError, match="unknown criterion 'learnabilty'"):
        criteria.get("learnabilty")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        criteria.get("no_such_module:fn")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        criteria.get("jest_jax.criteria:nope")

    @criteria.register("test_only_negated")
    def negated(learner, reference):
        return -learner

    assert criteria.get("test_only_negated") is negated
    with pytest.raises(ValueError, match="already registered"):
        criteria.register("test_only_negated")(lambda a, b: a)


def test_minus_infinity_scores_never_repeat_indices():
    """A criterion may exclude examples with -inf (or produce NaN); picks stay distinct."""
    rng = np.random.default_rng(9)
    n, b = 40, 24
    S = rng.normal(size=(n, n))
    S[rng.random((n, n)) < 0.7] = -np.inf
    S[3, 3] = np.nan
    idx = selection.joint_select(jax.random.key(0), jnp.asarray(S, jnp.float32), b, 4)
    check_valid(idx, n, b)
    learner = random_embeddings(rng, n, 8, dtype=np.float32)

    def cutoff(learner_losses, reference_losses):
        return jnp.where(learner_losses > 1e-3, -jnp.inf, learner_losses)
    cutoff.needs_reference = False
    idx = selection.joint_select_from_embeddings(jax.random.key(0), learner, None, cutoff, b, 4)
    check_valid(idx, n, b)


def test_bad_inputs_are_named():
    key = jax.random.key(0)
    rng = np.random.default_rng(10)
    learner = random_embeddings(rng, 12, 4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"per-example scores f\[N\], got shape \(12, 12\)"):
        selection.independent_select(key, jnp.zeros((12, 12)), 4)
    with pytest.raises(ValueError, match=r"square score matrix f\[N, N\], got shape \(12, 6\)"):
        selection.joint_select(key, jnp.zeros((12, 6)), 4, 2)
    with pytest.raises(ValueError, match="'learnability' needs reference embeddings"):
        selection.joint_select_from_embeddings(key, learner, None, "learnability", 4, 2)
    other = random_embeddings(rng, 10, 4, dtype=np.float32)
    with pytest.raises(ValueError, match="different candidates: 12 vs 10"):
        selection.joint_select_from_embeddings(key, learner, other, "learnability", 4, 2)

    def row_means(learner_losses, reference_losses):  # not elementwise
        return learner_losses.mean(axis=-1)
    with pytest.raises(ValueError, match="'row_means' returned shape .* must be elementwise"):
        selection.joint_select_from_embeddings(key, learner, learner, row_means, 4, 2)


def test_broken_user_criterion_modules_are_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_criteria.py").write_text("def f(a, b):\n    return a +\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot import 'broken_criteria' .SyntaxError"):
        criteria.get("broken_criteria:f")
    with pytest.raises(ValueError, match="must be 'package.module:function'"):
        criteria.get("jest_jax.criteria:")


# --- criteria with arguments and context -----------------------------------------------


def with_margin(learner, reference, *, margin):
    gap = learner - reference
    return jnp.where(gap > margin, gap, 0.0)


def with_prior(learner, reference, *, context, field="quality", weight=1.0):
    """A per-example field on the matched pairs, plus a row×column term and the step:
    everything a context offers, still elementwise in (i, j)."""
    prior = jnp.where(context.positive, context.row(field), 0.0)
    mix = 0.1 * context.row("learner_image_norm") * context.col("learner_text_norm")
    return learner - reference + weight * prior + mix * (context.step >= 3)


def np_with_prior(S_learner, S_reference, quality, image_norm, text_norm, step, weight):
    prior = np.diag(quality)
    mix = 0.1 * np.outer(image_norm, text_norm) * (step >= 3)
    return S_learner - S_reference + weight * prior + mix


@pytest.mark.parametrize("step", [0, 5])
def test_context_criterion_dense_and_matrix_free_agree_with_numpy(step):
    """Fields, norms, the matched-pair mask and the step reach every block the same way:
    dense and matrix-free pick the same indices, and S matches float64 NumPy."""
    rng = np.random.default_rng(11)
    n, b, chunks = 96, 24, 4
    with jax.enable_x64(True):
        learner = random_embeddings(rng, n, 8)
        learner = learner._replace(image_norm=jnp.asarray(rng.uniform(0.5, 2, n)),
                                   text_norm=jnp.asarray(rng.uniform(0.5, 2, n)))
        reference = random_embeddings(rng, n, 8, log_t=np.log(20.0), bias=-5.0)
        quality = rng.uniform(size=n)
        context = criteria.Context(jnp.int32(step), {
            "quality": jnp.asarray(quality), "learner_image_norm": learner.image_norm,
            "learner_text_norm": learner.text_norm})
        bound = criteria.bind(with_prior, {"weight": 3.0})
        S = np_with_prior(np_pairs(learner), np_pairs(reference), quality,
                          np.asarray(learner.image_norm), np.asarray(learner.text_norm), step,
                          3.0)
        np.testing.assert_allclose(selection.score_matrix(learner, reference, bound, context), S,
                                   rtol=1e-12, atol=1e-12)
        for seed in range(2):
            key = jax.random.key(seed)
            dense = selection.joint_select(key, jnp.asarray(S), b, chunks)
            free = selection.joint_select_from_embeddings(key, learner, reference, bound, b,
                                                          chunks, context=context)
            np.testing.assert_array_equal(dense, free)
        np.testing.assert_allclose(
            selection.row_scores_from_embeddings(learner, reference, bound, 40, context),
            S.sum(1), rtol=1e-10)
        np.testing.assert_allclose(
            selection.diagonal_scores(learner, reference, bound, context), np.diag(S),
            rtol=1e-12)
        idx = np.asarray(dense)
        np.testing.assert_allclose(
            selection.batch_score(learner, reference, bound, jnp.asarray(idx), context),
            S[np.ix_(idx, idx)].sum() / b, rtol=1e-10)


def test_criterion_arguments_are_checked_against_the_signature():
    bound = criteria.bind(with_margin, {"margin": 0.5})
    np.testing.assert_array_equal(bound(jnp.array([2.0, 1.0]), jnp.array([1.0, 0.8]),
                                        criteria.Context()), [1.0, 0.0])
    with pytest.raises(criteria.ConfigError,
                       match=r"config.selection.criterion_args.margn=0.5 is invalid: criterion "
                             r"'with_margin' takes no argument 'margn' \(did you mean "
                             r"'margin'\?\); it takes \['margin'\]"):
        criteria.bind(with_margin, {"margn": 0.5})
    with pytest.raises(criteria.ConfigError,
                       match=r"config.selection.criterion_args is missing \['margin'\]"):
        criteria.bind(with_margin, {})
    assert criteria.bind(with_prior).wants_context
    assert not criteria.bind("learnability").wants_context
    with pytest.raises(ValueError, match="first two arguments"):
        criteria.bind(lambda losses: losses)


def test_a_missing_context_field_is_named():
    context = criteria.Context(0, {"is_clean": jnp.ones(4)}).block(jnp.arange(4),
                                                                   jnp.arange(4))
    with pytest.raises(criteria.ConfigError, match=r"per-example field 'quality'.*carry "
                                                   r"\['is_clean'\]"):
        context.row("quality")


class SelectionKernelVariants(chex.TestCase):
    """The selection kernels give the float64 reference's numbers jitted and not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_joint_conditionals(self):
        n, b, chunks = 40, 12, 3
        S = np.random.default_rng(3).normal(size=(n, n))
        with jax.enable_x64(True):
            fn = self.variant(lambda key, s: selection.joint_select(
                key, s, b, chunks, 2.0, return_conditionals=True))
            idx, conds = fn(jax.random.key(0), jnp.asarray(S))
            check_valid(idx, n, b)
            np.testing.assert_allclose(conds, np_conditionals(S, np.asarray(idx), chunks),
                                       rtol=1e-12, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matrix_free_with_context(self):
        rng = np.random.default_rng(12)
        n, b, chunks = 48, 16, 4
        with jax.enable_x64(True):
            learner = random_embeddings(rng, n, 8)
            reference = random_embeddings(rng, n, 8, bias=-5.0)
            quality = rng.uniform(size=n)
            bound = criteria.bind(lambda le, re, *, context: le - re + jnp.where(
                context.positive, context.row("quality"), 0.0))
            free = self.variant(lambda key, le, re, q: selection.joint_select_from_embeddings(
                key, le, re, bound, b, chunks, return_conditionals=True,
                context=criteria.Context(0, {"quality": q})))
            idx, conds = free(jax.random.key(1), learner, reference, jnp.asarray(quality))
            S = np_pairs(learner) - np_pairs(reference) + np.diag(quality)
            np.testing.assert_allclose(conds, np_conditionals(S, np.asarray(idx), chunks),
                                       rtol=1e-10, atol=1e-10)

    def test_kernel_boundaries_check_shapes(self):
        with pytest.raises(AssertionError, match="rank"):
            selection.batch_score(random_embeddings(np.random.default_rng(0), 8, 4,
                                                    dtype=np.float32), None,
                                  "hard_learner", jnp.zeros((2, 2), jnp.int32))


class ScoringKernelVariants(chex.TestCase):
    """The scoring kernel (embeddings → scores → method) jitted and not, dense and
    matrix-free: the same indices, and diagnostics that match float64 NumPy."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_scorer_picks_the_same_both_ways(self):
        from jest_jax import methods, scoring

        rng = np.random.default_rng(13)
        n, b = 64, 16
        with jax.enable_x64(True):
            learner = random_embeddings(rng, n, 8)
            reference = random_embeddings(rng, n, 8, bias=-5.0)

            class Reference:  # a reference source of fixed embeddings
                def embed(self, step_input, batch, norms=False):
                    return reference

            S = np_pairs(learner) - np_pairs(reference)
            picked = {}
            for implementation in ("dense", "matrix_free"):
                spec = scoring.SelectionSpec(methods.Joint(b, 4, 1.0),
                                             criteria.bind("learnability"), b, n,
                                             implementation)
                scorer = scoring.Scorer(spec, 0, lambda p, batch, norms=False: learner,
                                        Reference())
                idx, metrics, ok = self.variant(scorer)(jax.random.key(2), {}, {},
                                                        {"index": jnp.arange(n)})
                idx = np.asarray(idx)
                check_valid(idx, n, b)
                assert bool(ok)
                np.testing.assert_allclose(metrics["selection/score_selected"],
                                           S[np.ix_(idx, idx)].sum() / b, rtol=1e-10)
                np.testing.assert_allclose(metrics["selection/self_score_super"],
                                           np.diag(S).mean(), rtol=1e-10)
                picked[implementation] = idx
            np.testing.assert_array_equal(picked["dense"], picked["matrix_free"])
