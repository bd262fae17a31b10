"""Multi-scale residual quantisation (TokenFlow §3.4-3.5) and the RQ baseline with UniTok's MCQ interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.models.bicubic import area_resize, bicubic_resize
from unitok_jax.models.residual_quantizer import MultiScaleResidualQuantizer, ResidualQuantizer
from unitok_jax.models.shared_quantizer import SharedDualCodebookQuantizer

jax.config.update("jax_default_matmul_precision", "highest")

K, DS, DP = 512, 4, 2
SCALES = (1, 2, 4, 8)


def _msrq(scales=SCALES, scale_drop_prob=0.0, seed=0):
    q = SharedDualCodebookQuantizer(K, DS, DP, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    q.embedding_sem.set_value(jnp.asarray(rng.normal(size=(K, DS)), jnp.float32))
    q.embedding_pix.set_value(jnp.asarray(rng.normal(size=(K, DP)), jnp.float32))
    return MultiScaleResidualQuantizer(q, scales, scale_drop_prob=scale_drop_prob)


def _smooth_map(b=2, size=8, norm=3.0):
    """Low-frequency field; each half rescaled to norm `norm` per position."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    rng = np.random.default_rng(1)
    chans = []
    for _ in range(b * (DS + DP)):
        a, c, s = rng.normal(size=3)
        chans.append(a + c * np.cos(np.pi * yy / size) + s * np.sin(np.pi * xx / size))
    h = np.stack(chans, -1).reshape(size, size, b, DS + DP).transpose(2, 0, 1, 3)
    hs, hp = h[..., :DS], h[..., DS:]
    hs = norm * hs / np.linalg.norm(hs, axis=-1, keepdims=True)
    hp = norm * hp / np.linalg.norm(hp, axis=-1, keepdims=True)
    return jnp.asarray(np.concatenate([hs, hp], -1), jnp.float32)


@nnx.jit(static_argnames=("deterministic",))
def _run(m, h, key=None, deterministic=True):
    return m(h, deterministic=deterministic, key=key, return_intermediates=True)


def _manual(m, h, keep):
    keep = tuple(bool(k) for k in keep)
    return jax.device_get(_manual_jit(m, h, keep))


@nnx.jit(static_argnums=2)
def _manual_jit(m, h, keep):
    """Reference loop (spec §3.4), skipping dropped scales."""
    final = m.scales[-1]
    r, f, losses = h, jnp.zeros_like(h), []
    for s, k in zip(m.scales, keep):
        if not k:
            continue
        zq, aux = m.quantizer.quantize(area_resize(r, s) if s != final else r)
        up = bicubic_resize(zq, final) if s != final else zq
        f, r = f + up, r - up
        losses.append(aux["vq_loss"])
    return f, jnp.mean(jnp.stack(losses))


def test_residual_shrinks_across_scales_on_smooth_input():
    """Each scale removes about one unit code per half, so on a smooth map whose halves have norm 4 the residual
    shrinks at every one of the 4 scales. (TokenFlow's codes are unit-norm and there is no phi/scale, so once the
    residual is below ~0.5 per half a further scale can overshoot: an inherent property, not tested.)"""
    m = _msrq()
    h = _smooth_map(norm=4.0)
    f, aux = jax.device_get(_run(m, h))
    norms, acc = [], np.zeros_like(np.asarray(h))
    for entry in aux["scales"]:
        acc = acc + entry["zq_up"]
        norms.append(np.linalg.norm(np.asarray(h) - acc, axis=-1).mean())
    start = np.linalg.norm(np.asarray(h), axis=-1).mean()
    assert all(b < a for a, b in zip([start] + norms[:-1], norms)), (start, norms)
    np.testing.assert_allclose(f, acc, atol=1e-5)
    # final_quantize is a sum of unit vectors per half, not re-normalised
    assert np.linalg.norm(np.asarray(f)[..., :DS], axis=-1).max() > 1.5


def test_outputs_losses_and_decode_from_indices():
    m = _msrq()
    h = _smooth_map(norm=1.0) + 0.3 * jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, DS + DP)), jnp.float32)
    f, aux = jax.device_get(_run(m, h))
    assert aux["indices"].shape == (2, 85) and aux["indices"].dtype == np.int32
    np.testing.assert_array_equal(aux["indices"], np.concatenate(aux["indices_per_scale"], 1))
    for s, e in zip(SCALES, aux["scales"]):
        assert e["residual_in"].shape == (2, s, s, DS + DP) and e["zq"].shape == (2, s, s, DS + DP)
    f_ref, vq_ref = _manual(m, h, [True] * 4)
    np.testing.assert_allclose(f, f_ref, atol=1e-6)
    np.testing.assert_allclose(aux["vq_loss"], vq_ref, rtol=1e-6)
    np.testing.assert_allclose(aux["commit_loss"], 0.25 * vq_ref, rtol=1e-6)
    assert aux["codebook_counts"].shape == (K,) and aux["codebook_counts"].sum() == 170
    # decode-from-indices = looked-up rows, bicubic-upsampled and summed
    np.testing.assert_allclose(jax.jit(m.indices_to_quant)(jnp.asarray(aux["indices"])), f, atol=1e-5)


@pytest.mark.slow
def test_random_scale_drop_masks_one_scale():
    m = _msrq(scale_drop_prob=1.0)
    h = _smooth_map()
    seen = set()
    for seed in range(8):
        f, aux = jax.device_get(_run(m, h, jax.random.key(seed), deterministic=False))
        keep = aux["scale_keep"]
        assert keep[0] == 1 and keep.sum() == len(SCALES) - 1
        j = int(np.argmin(keep))
        seen.add(j)
        assert (aux["indices_per_scale"][j] == -1).all()
        start = sum(s * s for s in SCALES[:j])
        assert (np.delete(aux["indices"], np.arange(start, start + SCALES[j] ** 2), axis=1) >= 0).all()
        assert aux["codebook_counts"].sum() == 2 * (85 - SCALES[j] ** 2)
        f_ref, vq_ref = _manual(m, h, keep > 0)
        np.testing.assert_allclose(f, f_ref, atol=1e-6)  # dropping == removing the scale
        np.testing.assert_allclose(aux["vq_loss"], vq_ref, rtol=1e-6)  # losses averaged over kept scales
        np.testing.assert_allclose(jax.jit(m.indices_to_quant)(jnp.asarray(aux["indices"])), f, atol=1e-5)
    assert seen == {1, 2, 3}  # the first scale is never dropped, the finest can be
    # eval mode and p = 0 never drop
    _, aux = jax.device_get(_run(m, h))
    assert aux["scale_keep"].min() == 1
    with pytest.raises(ValueError, match="rng"):
        m(h, deterministic=False)


def test_gradient_reaches_input_through_every_scale():
    m = _msrq(scales=(1, 2))
    h = _smooth_map(size=2)
    g = jax.jit(jax.grad(lambda h: jnp.sum(m(h)[0] * jnp.arange(DS + DP, dtype=jnp.float32))))(h)
    assert float(jnp.abs(g).max()) > 0
    # the coarse scale alone: gradient of its STE output flows into every position through the area pooling
    g1 = jax.jit(jax.grad(lambda h: jnp.sum(m(h, return_intermediates=True)[1]["scales"][0]["zq"] ** 3)))(h)
    assert (np.abs(np.asarray(g1)).sum(-1) > 0).all()


def test_index_splitting_and_config_errors():
    m = _msrq()
    parts = m.split_indices(jnp.arange(85)[None])
    assert [p.shape for p in parts] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)]
    assert len(m.split_indices(jnp.zeros((1, 5), jnp.int32))) == 2
    with pytest.raises(ValueError, match="prefix"):
        m.split_indices(jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="increasing"):
        MultiScaleResidualQuantizer(m.quantizer, (1, 4, 2))
    with pytest.raises(ValueError, match="last quantizer scale"):
        m(jnp.zeros((1, 6, 6, DS + DP)))


# ------------------------------------------------------------------------------------------------ RQ baseline
def _rq(stages=3, size=32, dim=6, l2_norm=False, seed=0):
    rq = ResidualQuantizer(stages, size, dim, l2_norm=l2_norm, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    cb = np.stack([rng.normal(size=(size, dim)) * 0.5**i for i in range(stages)])
    cb[:, 0] = 0.0  # a zero row per stage: the residual can never grow
    rq.codebooks.set_value(jnp.asarray(cb, jnp.float32))
    return rq


@nnx.jit
def _rq_call(rq, z):
    return rq(z)


def test_rq_interface_and_ste():
    rq = _rq()
    z = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 6)), jnp.float32)
    quant, aux = jax.device_get(_rq_call(rq, z))
    assert quant.shape == (2, 5, 6)
    assert aux["indices"].shape == (2, 3, 5) and aux["indices"].dtype == np.int32
    assert aux["codebook_counts"].shape == (3, 32) and aux["codebook_usage"].shape == (3,)
    assert aux["codebook_perplexity"].shape == (3,) and aux["loss_per_codebook"].shape == (3,)
    np.testing.assert_array_equal(aux["codebook_counts"].sum(-1), [10, 10, 10])
    for a, b in (
        ("loss", "vq_loss"),
        ("counts", "codebook_counts"),
        ("usage", "codebook_usage"),
        ("perplexity", "codebook_perplexity"),
    ):
        np.testing.assert_array_equal(aux[a], aux[b])
    np.testing.assert_allclose(quant, aux["quant_lookup"], atol=1e-6)  # forward value = sum of codes
    np.testing.assert_array_equal(jax.jit(rq.encode)(z), aux["indices"])
    np.testing.assert_allclose(jax.jit(rq.lookup)(jnp.asarray(aux["indices"])), aux["quant_lookup"], atol=1e-6)
    # straight-through: d quant / d z = identity
    g = jnp.asarray(np.random.default_rng(4).normal(size=z.shape), jnp.float32)
    gz = jax.jit(jax.grad(lambda z: jnp.sum(rq(z)[0] * g)))(z)
    np.testing.assert_allclose(gz, g, atol=1e-6)


def test_rq_residual_error_non_increasing_and_loss_value():
    rq = _rq(stages=4)
    z = jnp.asarray(np.random.default_rng(5).normal(size=(3, 7, 6)), jnp.float32)
    _, aux = jax.device_get(_rq_call(rq, z))
    cb = np.asarray(rq.codebooks[...])
    zz, acc, errs, losses = np.asarray(z), 0.0, [], []
    for i in range(4):
        r = zz - acc
        q = cb[i][aux["indices"][:, i]]
        # the chosen row is the nearest one of stage i
        d = ((r[..., None, :] - cb[i]) ** 2).sum(-1)
        np.testing.assert_array_equal(aux["indices"][:, i], d.argmin(-1))
        losses.append(1.25 * np.mean((q - r) ** 2))
        acc = acc + q
        errs.append(np.linalg.norm(zz - acc, axis=-1))
    assert all((b <= a + 1e-6).all() for a, b in zip(errs, errs[1:]))
    assert errs[-1].mean() < np.linalg.norm(zz, axis=-1).mean()
    np.testing.assert_allclose(aux["vq_loss"], np.mean(losses), rtol=1e-5)


def test_rq_loss_gradients_and_l2_norm():
    rq = _rq(l2_norm=True)
    z = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 6)), jnp.float32)
    _, aux = jax.device_get(_rq_call(rq, z))
    np.testing.assert_allclose(np.linalg.norm(aux["z_normalized"], axis=-1), 1.0, rtol=1e-6)
    graphdef, params = nnx.split(rq)
    gp, gz = jax.jit(jax.grad(lambda p, z: nnx.merge(graphdef, p)(z)[1]["vq_loss"], argnums=(0, 1)))(params, z)
    assert float(jnp.abs(gz).max()) > 0 and float(jnp.abs(gp["codebooks"][...]).max()) > 0


def test_rq_is_a_drop_in_for_unitok_mcq():
    """Same constructor arguments, call/encode/lookup surface and aux keys/shapes as MultiCodebookQuantizer."""
    mcq_mod = pytest.importorskip("unitok_jax.models.mcq")
    args = dict(num_codebooks=4, codebook_size=16, codebook_dim=3)
    mcq = mcq_mod.MultiCodebookQuantizer(**args, rngs=nnx.Rngs(0))
    rq = ResidualQuantizer.from_mcq_args(**args, rngs=nnx.Rngs(0))
    assert rq.dim == 12 and rq.num_stages == 4
    z = jnp.asarray(np.random.default_rng(7).normal(size=(2, 5, 12)), jnp.float32)
    (qm, am), (qr, ar) = jax.device_get((nnx.jit(lambda m, z: m(z))(mcq, z), _rq_call(rq, z)))
    assert qm.shape == qr.shape
    for key, v in am.items():
        assert key in ar, key
        assert np.shape(ar[key]) == np.shape(v), key
    assert np.asarray(jax.jit(rq.lookup)(jnp.asarray(ar["indices"]))).shape == qr.shape
    assert jax.jit(rq.encode)(z).shape == jax.jit(mcq.encode)(z).shape


def test_unitok_quantizer_type_switch_builds_the_rq_ablation():
    """`model.quantizer.type='rq'` is the paper's MCQ-vs-RQ ablation in one switch: same code width/count, trains
    (gradients reach the RQ codebooks and the encoder), decodes from indices; the official export refuses it."""
    from unitok_jax.convert.official import to_official_state_dict
    from unitok_jax.models.init_keys import numpy_fill_
    from unitok_jax.models.unitok import UniTok, model_config

    cfg = model_config("tiny")
    k, K, d = cfg.quantizer.num_codebooks, cfg.quantizer.codebook_size, cfg.quantizer.codebook_dim
    cfg.quantizer.type = "rq"
    # Built shape-only and filled from numpy, then one jitted program: eager init and an eager grad compile every
    # op separately (~100 s on 2 cores for the same checks).
    model = numpy_fill_(nnx.eval_shape(lambda: UniTok(cfg, rngs=nnx.Rngs(0))), 0)
    if model.drop_rngs is not None:  # the shape-only Rngs carries no key
        model.drop_rngs = nnx.Rngs(dropout=0)
    assert isinstance(model.quantizer, ResidualQuantizer)
    assert model.quantizer.codebooks.shape == (k, K, k * d)  # k stages over the whole k*d latent
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, cfg.image_size, cfg.image_size, 3)), jnp.float32)

    def loss_fn(m):
        rec, aux = m(images)
        return jnp.mean(jnp.square(rec - images)) + aux["vq_loss"], aux

    @nnx.jit
    def run(m):
        grads, aux = nnx.grad(loss_fn, has_aux=True)(m)
        idx = m.img_to_idx(images)
        from_indices = m.idx_to_img(aux["indices"])
        from_latent = m.decode_latent(m.quantizer.lookup(aux["indices"]))
        return grads, aux, idx, from_indices, from_latent

    grads, aux, idx, from_indices, rec_from_latent = run(model)
    n = (cfg.image_size // 16) ** 2
    assert aux["indices"].shape == (2, k, n) and aux["codebook_counts"].shape == (k, K)
    assert float(jnp.sum(jnp.abs(grads["quantizer"]["codebooks"][...]))) > 0
    assert float(jnp.sum(jnp.abs(jax.tree.leaves(grads["encoder"])[0]))) > 0
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(aux["indices"]))
    # Decoding the indices = decoding the quantized latent (the sum of the k stage codes).
    np.testing.assert_allclose(
        np.asarray(from_indices), np.clip(np.asarray(rec_from_latent), -1, 1), rtol=1e-5, atol=1e-5
    )
    assert rec_from_latent.shape == images.shape
    with pytest.raises(ValueError, match="official UniTok layout only has the multi-codebook"):
        to_official_state_dict(model)

    cfg.quantizer.type = "fsq"
    with pytest.raises(ValueError, match=r"quantizer.type='fsq' is unknown; use one of \['mcq', 'rq'\]"):
        UniTok(cfg, rngs=nnx.Rngs(0))
