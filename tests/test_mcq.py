"""MultiCodebookQuantizer invariants: code values, STE gradient, loss formula, index layout, ties, usage stats,
and the one-codebook-at-a-time memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.models.mcq import MultiCodebookQuantizer, usage_stats

K_BOOKS, SIZE, DIM = 4, 64, 4


@pytest.fixture(scope="module")
def quantizer():
    return MultiCodebookQuantizer(K_BOOKS, SIZE, DIM, rngs=nnx.Rngs(0))


def _z(seed=0, b=2, n=9):
    return jax.random.normal(jax.random.key(seed), (b, n, K_BOOKS * DIM), jnp.float32)


def _normalize_chunks(z):
    b, n, _ = z.shape
    zc = z.reshape(b, n, K_BOOKS, DIM)
    return (zc / jnp.maximum(jnp.linalg.norm(zc, axis=-1, keepdims=True), 1e-12)).reshape(b, n, -1)


def test_init_and_param_layout(quantizer):
    cb = quantizer.codebooks
    assert cb.shape == (K_BOOKS, SIZE, DIM) and cb.dtype == jnp.float32
    bound = (1 / np.sqrt(DIM)) / 36
    assert float(jnp.max(jnp.abs(cb[...]))) <= bound
    assert cb.get_metadata()["out_sharding"] == (None, "codebook", None)


def test_output_rows_are_normalised_codebook_rows(quantizer):
    z = _z()
    quant, aux = quantizer(z)
    idx = np.asarray(aux["indices"])
    assert idx.shape == (2, K_BOOKS, 9) and idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < SIZE
    cb = np.asarray(quantizer.normalized_codebooks())
    np.testing.assert_allclose(np.linalg.norm(cb, axis=-1), 1.0, atol=1e-6)
    expected = np.stack([cb[k][idx[:, k, :]] for k in range(K_BOOKS)], axis=2).reshape(2, 9, -1)
    np.testing.assert_allclose(np.asarray(quant), expected, atol=1e-6)  # STE value = q up to rounding
    np.testing.assert_allclose(np.asarray(aux["quant_lookup"]), expected, atol=1e-7)
    np.testing.assert_allclose(np.asarray(quantizer.lookup(aux["indices"])), expected, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(quantizer.encode(z)), idx)
    np.testing.assert_allclose(np.asarray(aux["z_normalized"]), np.asarray(_normalize_chunks(z)), atol=1e-7)
    # The chosen code is the most cosine-similar row of its own codebook.
    zn = np.asarray(_normalize_chunks(z)).reshape(2, 9, K_BOOKS, DIM)
    sims = np.einsum("bnkd,kvd->bknv", zn, cb)
    np.testing.assert_array_equal(np.argmax(sims, axis=-1), idx)


def test_straight_through_gradient(quantizer):
    """d quant / d ẑ = identity, so grads wrt z equal those of the chunk-normalisation alone."""
    z = _z(1)
    w = jax.random.normal(jax.random.key(2), z.shape)
    g_ste = jax.grad(lambda z: jnp.sum(w * quantizer(z)[0]))(z)
    g_norm = jax.grad(lambda z: jnp.sum(w * _normalize_chunks(z)))(z)
    np.testing.assert_allclose(np.asarray(g_ste), np.asarray(g_norm), rtol=1e-5, atol=1e-6)
    # No gradient reaches the codebooks through the STE output (only through the loss).
    gm = nnx.grad(lambda m: jnp.sum(w * m(z)[0]))(quantizer)
    assert float(jnp.max(jnp.abs(gm["codebooks"][...]))) == 0.0
    # Without l2 normalisation the STE is the exact identity.
    raw = MultiCodebookQuantizer(K_BOOKS, SIZE, DIM, l2_norm=False, rngs=nnx.Rngs(1))
    g_raw = jax.grad(lambda z: jnp.sum(w * raw(z)[0]))(z)
    np.testing.assert_allclose(np.asarray(g_raw), np.asarray(w), atol=1e-6)


def test_loss_formula_and_gradients(quantizer):
    z = _z(3)
    _, aux = quantizer(z)
    zn = np.asarray(aux["z_normalized"]).reshape(-1, K_BOOKS, DIM)
    q = np.asarray(aux["quant_lookup"]).reshape(-1, K_BOOKS, DIM)
    per_book = 1.25 * np.mean((q - zn) ** 2, axis=(0, 2))  # β·commit + codebook term, equal in value
    np.testing.assert_allclose(np.asarray(aux["loss_per_codebook"]), per_book, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss"]), per_book.mean(), rtol=1e-5)
    # β only scales the commitment (encoder-side) gradient; the codebook gradient has weight 1.
    gz = jax.grad(lambda z: quantizer(z)[1]["loss"])(z)
    zsg = jax.lax.stop_gradient(aux["quant_lookup"])
    gz_ref = jax.grad(
        lambda z: jnp.mean(jnp.mean((zsg - _normalize_chunks(z)).reshape(-1, K_BOOKS, DIM) ** 2, axis=(0, 2))) * 0.25
    )(z)
    np.testing.assert_allclose(np.asarray(gz), np.asarray(gz_ref), rtol=1e-4, atol=1e-7)
    gm = nnx.grad(lambda m: m(z)[1]["loss"])(quantizer)
    assert float(jnp.max(jnp.abs(gm["codebooks"][...]))) > 0


def test_index_layout_codebook_k_owns_channels_k_d():
    q = MultiCodebookQuantizer(K_BOOKS, SIZE, DIM, rngs=nnx.Rngs(0))
    cb = np.asarray(q.normalized_codebooks())
    rng = np.random.default_rng(0)
    want = rng.integers(0, SIZE, size=(2, K_BOOKS, 5)).astype(np.int32)  # (b, k, n)
    # z at token n, channels k·d..(k+1)·d = 3 × row want[b,k,n] of codebook k (scale does not matter)
    z = np.zeros((2, 5, K_BOOKS * DIM), np.float32)
    for b in range(2):
        for k in range(K_BOOKS):
            for n in range(5):
                z[b, n, k * DIM : (k + 1) * DIM] = 3.0 * cb[k, want[b, k, n]]
    _, aux = q(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(aux["indices"]), want)


def test_argmax_ties_pick_first_index():
    q = MultiCodebookQuantizer(1, 8, 2, rngs=nnx.Rngs(0))
    rows = np.array([[0, 1], [1, 0.1], [-1, 0], [1, 0], [0, -1], [0.5, 0.5], [1, 0], [1, 0]], np.float32)
    q.codebooks[...] = jnp.asarray(rows[None])
    _, aux = q(jnp.asarray([[[2.0, 0.0]]]))
    assert int(aux["indices"][0, 0, 0]) == 3  # rows 3, 6, 7 tie exactly; torch.argmax picks the first


def test_usage_and_perplexity_hand_made():
    counts = jnp.asarray([[5.0, 5.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [8.0, 0.0, 0.0, 0.0]])
    usage, ppl = usage_stats(counts)
    np.testing.assert_allclose(np.asarray(usage), [0.5, 1.0, 0.25])
    np.testing.assert_allclose(np.asarray(ppl), [2.0, 4.0, 1.0], rtol=1e-6)
    # threshold is strictly greater than 0.01/K of the batch
    usage, _ = usage_stats(jnp.asarray([[1.0] + [0.0] * 99 + [99.0] * 1]))  # K=101, p0 = 0.01 > 0.01/101
    assert float(usage[0]) == pytest.approx(2 / 101)
    # Through the quantizer: all tokens on row 3 of codebook 0 → one used entry, perplexity 1.
    q = MultiCodebookQuantizer(1, 8, 2, rngs=nnx.Rngs(0))
    rows = np.stack([np.cos(np.arange(8) * 0.7), np.sin(np.arange(8) * 0.7)], -1).astype(np.float32)
    q.codebooks[...] = jnp.asarray(rows[None])
    _, aux = q(jnp.tile(jnp.asarray(rows[3])[None, None], (2, 6, 1)))
    np.testing.assert_array_equal(np.asarray(aux["counts"][0]), [0, 0, 0, 12, 0, 0, 0, 0])
    assert float(aux["usage"][0]) == pytest.approx(1 / 8) and float(aux["perplexity"][0]) == pytest.approx(1.0)


def test_counts_sum_and_one_codebook_at_a_time(quantizer):
    b, n = 2, 9
    z = _z(4, b, n)
    _, aux = quantizer(z)
    np.testing.assert_array_equal(np.asarray(aux["counts"]).sum(-1), [b * n] * K_BOOKS)
    # No (k, b·n, K) similarity tensor anywhere in the program; the (b·n, K) one exists (inside the map body).
    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(lambda z: quantizer(z))(z).jaxpr)
    assert (b * n, SIZE) in shapes
    assert (K_BOOKS, b * n, SIZE) not in shapes and (b * n, K_BOOKS, SIZE) not in shapes


def test_bad_channel_count_raises(quantizer):
    with pytest.raises(ValueError, match="num_codebooks\\*codebook_dim"):
        quantizer(jnp.zeros((1, 4, 15)))
    with pytest.raises(ValueError, match="expected 4"):
        quantizer.lookup(jnp.zeros((1, 3, 4), jnp.int32))
