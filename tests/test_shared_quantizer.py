"""Shared-mapping dual codebook (TokenFlow §3.2-3.3): assignment, straight-through, losses, usage statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.models.shared_quantizer import SharedDualCodebookQuantizer, codebook_stats

jax.config.update("jax_default_matmul_precision", "highest")

K, DS, DP = 64, 8, 4


def _quantizer(w_dis=1.0, seed=0, **kw):
    q = SharedDualCodebookQuantizer(K, DS, DP, w_dis=w_dis, rngs=nnx.Rngs(seed), **kw)
    rng = np.random.default_rng(seed)  # well-spread rows (the official uniform(+-1/K) init is also fine)
    q.embedding_sem.set_value(jnp.asarray(rng.normal(size=(K, DS)), jnp.float32))
    q.embedding_pix.set_value(jnp.asarray(rng.normal(size=(K, DP)), jnp.float32))
    return q


def _z(seed=1, shape=(2, 3, 3)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape + (DS + DP,)), jnp.float32)


@nnx.jit(static_argnames=("log",))
def _quantize(q, z, log=True):
    return q.quantize(z, log_distance_norms=log)


def _np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_assignment_matches_numpy_reference():
    q = _quantizer()
    z = _z()
    zq, aux = jax.device_get(_quantize(q, z))
    zs, zp = _np_normalize(np.asarray(z)[..., :DS]), _np_normalize(np.asarray(z)[..., DS:])
    es, ep = _np_normalize(np.asarray(q.embedding_sem[...])), _np_normalize(np.asarray(q.embedding_pix[...]))
    d_sem = (zs**2).sum(-1)[..., None] + (es**2).sum(-1) - 2 * zs @ es.T
    d_pix = (zp**2).sum(-1)[..., None] + (ep**2).sum(-1) - 2 * zp @ ep.T
    ref = np.argmin(d_sem + d_pix, axis=-1)
    np.testing.assert_array_equal(aux["indices"], ref)
    assert aux["indices"].dtype == np.int32 and aux["indices"].shape == (2, 3, 3)
    # equivalently argmax of cos_sem + cos_pix (spec §3.2)
    np.testing.assert_array_equal(ref, np.argmax(zs @ es.T + zp @ ep.T, axis=-1))
    # both halves of the output come from the same index (the shared mapping)
    np.testing.assert_allclose(zq[..., :DS], es[aux["indices"]], atol=1e-6)
    np.testing.assert_allclose(zq[..., DS:], ep[aux["indices"]], atol=1e-6)
    # logging scalars: mean over positions of sum_k d_x[k]^2
    np.testing.assert_allclose(aux["d_sem_norm"], (d_sem**2).sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["d_pix_norm"], (d_pix**2).sum(-1).mean(), rtol=1e-5)
    d = np.sort(d_sem + d_pix, axis=-1)
    np.testing.assert_allclose(aux["index_margin"], d[..., 1] - d[..., 0], atol=1e-5)


def test_w_dis_zero_is_semantic_only_and_weight_matters():
    q0 = _quantizer(w_dis=0.0)
    z = _z(seed=2, shape=(4, 8))
    _, aux0 = jax.device_get(_quantize(q0, z))
    zs = _np_normalize(np.asarray(z)[..., :DS])
    es = _np_normalize(np.asarray(q0.embedding_sem[...]))
    np.testing.assert_array_equal(aux0["indices"], np.argmax(zs @ es.T, axis=-1))
    # a large pixel weight follows the pixel half instead
    qbig = _quantizer(w_dis=1e4)
    _, auxb = jax.device_get(_quantize(qbig, z))
    zp = _np_normalize(np.asarray(z)[..., DS:])
    ep = _np_normalize(np.asarray(qbig.embedding_pix[...]))
    np.testing.assert_array_equal(auxb["indices"], np.argmax(zp @ ep.T, axis=-1))
    assert (aux0["indices"] != auxb["indices"]).any()


def test_first_index_on_ties():
    q = _quantizer()
    es = np.asarray(q.embedding_sem[...]).copy()
    ep = np.asarray(q.embedding_pix[...]).copy()
    es[40], ep[40] = es[7] * 3.0, ep[7] * 0.5  # same direction -> identical normalised rows
    q.embedding_sem.set_value(jnp.asarray(es))
    q.embedding_pix.set_value(jnp.asarray(ep))
    z = jnp.concatenate([jnp.asarray(es[7]), jnp.asarray(ep[7])])[None]
    _, aux = jax.device_get(_quantize(q, z))
    assert int(aux["indices"][0]) == 7


def test_straight_through_and_losses():
    q = _quantizer()
    z = _z(seed=3, shape=(5,))
    g_out = jnp.asarray(np.random.default_rng(4).normal(size=z.shape), jnp.float32)

    def f(z):
        zq, aux = q.quantize(z)
        return jnp.sum(zq * g_out), aux

    grad_z, aux = jax.jit(jax.grad(f, has_aux=True))(z)
    # the STE passes the output gradient to the *normalised* input: d/dz sum(g * zn(z))
    grad_ref = jax.grad(lambda z: jnp.sum(q.split_normalize(z) * g_out))(z)
    np.testing.assert_allclose(grad_z, grad_ref, atol=1e-6)
    zq, aux = jax.device_get(_quantize(q, z))
    zn = np.asarray(q.split_normalize(z))
    np.testing.assert_allclose(aux["vq_loss"], np.mean((zq - zn) ** 2), rtol=1e-5)
    np.testing.assert_allclose(aux["commit_loss"], 0.25 * np.mean((zq - zn) ** 2), rtol=1e-5)
    assert float(aux["entropy_loss"]) == 0.0
    # per position mean over the 40 (here 12) dims of |zq - zn|^2 = (d_sem + d_pix) / dim (spec §3.3)
    es, ep = q.normalized_codebooks()
    i = aux["indices"]
    d = np.sum((zn[:, :DS] - np.asarray(es)[i]) ** 2, -1) + np.sum((zn[:, DS:] - np.asarray(ep)[i]) ** 2, -1)
    np.testing.assert_allclose(aux["vq_loss"], d.mean() / (DS + DP), rtol=1e-5)


def test_loss_gradients_reach_the_right_side():
    """vq_loss trains the codebooks (through the row normalisation), commit_loss trains the encoder side."""
    q = _quantizer()
    z = _z(seed=5, shape=(6,))
    graphdef, params = nnx.split(q)

    def loss(params, z, which):
        return nnx.merge(graphdef, params).quantize(z)[1][which]

    for which, z_has, cb_has in (("vq_loss", False, True), ("commit_loss", True, False)):
        gp, gz = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, z, which)
        assert (float(jnp.abs(gz).max()) > 0) == z_has, which
        assert (float(jnp.abs(gp["embedding_sem"][...]).max()) > 0) == cb_has, which
        assert (float(jnp.abs(gp["embedding_pix"][...]).max()) > 0) == cb_has, which


def test_chunked_assignment_equals_unchunked():
    z = _z(seed=6, shape=(3, 7))  # 21 positions, chunk 8 -> padded to 24
    a = jax.device_get(_quantize(_quantizer(), z))
    b = jax.device_get(_quantize(_quantizer(token_chunk=8), z))
    np.testing.assert_array_equal(a[1]["indices"], b[1]["indices"])
    np.testing.assert_allclose(a[0], b[0], atol=0)
    np.testing.assert_allclose(a[1]["d_sem_norm"], b[1]["d_sem_norm"], rtol=1e-6)
    np.testing.assert_allclose(a[1]["index_margin"], b[1]["index_margin"], atol=1e-6)


def test_entropy_loss_optional():
    q = _quantizer(entropy_ratio=0.1)
    _, aux = jax.device_get(_quantize(q, _z(seed=7, shape=(10,)), log=False))
    assert np.isfinite(aux["entropy_loss"]) and aux["entropy_loss"] != 0.0


def test_codebook_stats():
    idx = jnp.asarray([[0, 0, 1, 3]])
    st = jax.device_get(codebook_stats(idx, 8))
    np.testing.assert_array_equal(st["counts"], [2, 1, 0, 1, 0, 0, 0, 0])
    assert st["usage"] == 3 / 8
    p = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(st["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    uniform = jax.device_get(codebook_stats(jnp.arange(16) % 8, 8))
    np.testing.assert_allclose(uniform["perplexity"], 8.0, rtol=1e-6)
    masked = jax.device_get(codebook_stats(idx, 8, valid=jnp.asarray([[True, False, True, False]])))
    np.testing.assert_array_equal(masked["counts"][:4], [1, 1, 0, 0])


def test_wrong_width_raises():
    with pytest.raises(ValueError, match="channels"):
        _quantizer().quantize(jnp.zeros((2, 5)))
