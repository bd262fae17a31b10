"""ViT block / block stack (loop vs scan, remat, drop-path) and the structure of the ViTamin encoder and pixel decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.models.pixel_decoder import PixelDecoder
from unitok_jax.models.unitok import model_config
from unitok_jax.models.vit import Block, BlockStack, dot_product_attention
from unitok_jax.models.vitamin import ViTaminEncoder

DIM, HEADS = 32, 4


def _random(ctor, seed):
    """Build `ctor()` abstractly and fill every param with NumPy noise: no per-op eager compiles, and non-trivial
    norms/biases so that a mis-wired one shows up."""
    module = nnx.eval_shape(ctor)
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda v: (0.2 * rng.standard_normal(v.shape)).astype(np.float32), state))
    return module


def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_block_matches_numpy_reference():
    blk = _random(lambda: Block(DIM, HEADS, 2.0, rngs=nnx.Rngs(0)), 1)
    x0 = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, DIM)), np.float64)
    x = x0
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.state(blk, nnx.Param).to_pure_dict())
    lin = lambda t, q: t @ q["kernel"] + q["bias"]  # noqa: E731
    u = _ln(x, p["norm1"]["scale"], p["norm1"]["bias"])
    qkv = lin(u, p["attn"]["qkv"]).reshape(2, 6, 3, HEADS, DIM // HEADS).transpose(2, 0, 3, 1, 4)
    logit = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(DIM // HEADS)
    w = np.exp(logit - logit.max(-1, keepdims=True))
    o = ((w / w.sum(-1, keepdims=True)) @ qkv[2]).transpose(0, 2, 1, 3).reshape(2, 6, DIM)
    x = x + lin(o, p["attn"]["proj"])
    m = p["mlp"]
    h = _ln(_ln(x, p["norm2"]["scale"], p["norm2"]["bias"]), m["norm"]["scale"], m["norm"]["bias"])  # double LN
    a = lin(h, m["w0"])
    gelu_tanh = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    ref = x + lin(gelu_tanh * lin(h, m["w1"]), m["w2"])
    out = nnx.jit(lambda m, x: m(x))(blk, jnp.asarray(x0, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    assert blk.mlp.w0.kernel.shape == (DIM, 2 * DIM) and blk.attn.qkv.kernel.shape == (DIM, 3 * DIM)
    assert blk.attn.qkv.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert blk.mlp.w2.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")


def test_dot_product_attention_causal():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 4)) for i in range(3))
    full = dot_product_attention(q, k, v)
    causal = dot_product_attention(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(causal[:, 0]), np.asarray(v[:, 0]), rtol=1e-6)  # first token sees itself only
    np.testing.assert_allclose(np.asarray(causal[:, -1]), np.asarray(full[:, -1]), rtol=1e-5, atol=1e-6)


def _stacks(depth=3, rate=0.0, remat="none"):
    make = lambda r: Block(DIM, HEADS, 2.0, rngs=r)  # noqa: E731
    loop = _random(lambda: BlockStack(make, depth, rngs=nnx.Rngs(0), drop_path_rate=rate, remat=remat), 2)
    scan = nnx.eval_shape(
        lambda: BlockStack(make, depth, scan=True, rngs=nnx.Rngs(1), drop_path_rate=rate, remat=remat)
    )
    # Same weights: stack the loop's per-block params on a leading axis.
    per_block = [nnx.state(b, nnx.Param).to_pure_dict() for b in loop.layers]
    state = nnx.state(scan.layers, nnx.Param)  # keeps the stacked sharding metadata
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda *xs: jnp.stack(xs), *per_block))
    nnx.update(scan.layers, state)
    return loop, scan


def test_scan_equals_loop_and_params_are_stacked():
    loop, scan = _stacks()
    assert scan.layers.attn.qkv.kernel.shape == (3, DIM, 3 * DIM)
    assert scan.layers.attn.qkv.kernel.get_metadata()["out_sharding"] == (None, "embed", "heads")
    x = jax.random.normal(jax.random.key(3), (2, 5, DIM))
    run = nnx.jit(lambda m, x: m(x, return_all=True))
    y_loop, all_loop = run(loop, x)
    y_scan, all_scan = run(scan, x)
    np.testing.assert_allclose(np.asarray(y_scan), np.asarray(y_loop), rtol=1e-5, atol=1e-5)
    assert len(all_scan) == 3
    for a, b in zip(all_loop, all_scan):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_remat_gives_same_gradients():
    """Loop and scan, each without remat, with 'full' and with 'dots_saveable': six stacks, same weights."""
    variants = {remat: _stacks(remat=remat) for remat in ("none", "full", "dots_saveable")}
    x = jax.random.normal(jax.random.key(4), (2, 5, DIM))

    @nnx.jit
    def all_grads(variants):  # one compile for all six
        grad = lambda st: nnx.grad(lambda s: jnp.sum(jnp.sin(s(x)[0])))(st)  # noqa: E731
        return {k: (grad(loop), grad(scan)) for k, (loop, scan) in variants.items()}

    g = all_grads(variants)

    def assert_same(a, b):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb) and len(la) > 0
        for u, v in zip(la, lb):
            np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-5)

    g_loop, g_scan = g["none"]
    for remat in ("full", "dots_saveable"):
        assert_same(g_loop, g[remat][0])
        assert_same(g_scan, g[remat][1])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[g_loop["layers"][i] for i in range(3)])
    assert_same(stacked, g_scan["layers"])


def test_drop_path_rates_and_determinism():
    loop, scan = _stacks(depth=3, rate=0.5)
    assert loop.drop_rates == (0.0, 0.25, 0.5)
    x = jax.random.normal(jax.random.key(5), (16, 4, DIM))
    with pytest.raises(ValueError, match="needs rngs"):
        loop(x, deterministic=False)

    @nnx.jit
    def run(stack, x):
        train = [stack(x, deterministic=False, rngs=nnx.Rngs(dropout=s))[0] for s in (7, 7, 8)]
        return stack(x)[0], stack(x, deterministic=True)[0], train

    for stack in (loop, scan):
        y_eval, y_det, (y1, y2, y3) = run(stack, x)
        np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_det))
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
        assert float(jnp.max(jnp.abs(y1 - y3))) > 0
        assert float(jnp.max(jnp.abs(y1 - y_eval))) > 0


def test_vitamin_encoder_structure_and_shapes():
    cfg = model_config("tiny")
    enc = nnx.eval_shape(lambda: ViTaminEncoder(cfg.encoder, rngs=nnx.Rngs(0)))
    s0, s1 = enc.stages
    assert len(s0) == 2 and len(s1) == 4
    # 1x1 expand only where the channel count changes (stage 2 block 0: 32 → 64); stride-2 blocks pool.
    assert s0[0].shortcut.expand is None and s0[1].shortcut is None
    assert s1[0].shortcut.expand.kernel.shape == (1, 1, 32, 64)
    assert all(b.shortcut is None for b in list(s1)[1:])
    assert s1[0].conv2_kxk.strides == (2, 2) and s1[0].conv2_kxk.padding == ((1, 1), (1, 1))
    assert s1[0].conv2_kxk.kernel.shape == (3, 3, 1, 256) and s1[0].conv2_kxk.feature_group_count == 256
    assert enc.pool.proj.strides == (2, 2) and enc.pool.norm.epsilon == 1e-6
    assert not any("pos" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(enc, nnx.Param)))
    for size in (64, 96, 80):
        (tokens, grid, inter) = nnx.eval_shape(
            lambda e, x: e(x, return_intermediates=True), enc, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        )
        g = size // 16
        assert tokens.shape == (2, g * g, 128) and inter["enc_pool"].shape == (2, g, g, 128)
        assert inter["enc_stem"].shape == (2, size // 2, size // 2, 32)
        assert inter["enc_stage2"].shape == (2, size // 8, size // 8, 64)


def test_pixel_decoder_structure_and_shapes():
    cfg = model_config("tiny")
    dec = nnx.eval_shape(lambda: PixelDecoder(cfg.decoder, rngs=nnx.Rngs(0)))
    assert [b.up is not None for b in dec.up_conv2] == [True, False, False, False]
    assert [b.up is not None for b in dec.up_conv3] == [True, False]
    assert dec.up_conv2[0].up.conv.kernel.shape == (3, 3, 256, 256)  # full conv at the expanded width
    assert dec.up_conv3[0].shortcut.conv.kernel.shape == (3, 3, 64, 32)
    assert dec.up_conv3[1].shortcut is None
    assert dec.last_conv is dec.up_conv4.conv2 and dec.last_conv.kernel.shape == (3, 3, 32, 3)
    rec, last_in, _ = nnx.eval_shape(lambda d, t: d(t), dec, jax.ShapeDtypeStruct((2, 16, 128), jnp.float32))
    assert rec.shape == (2, 64, 64, 3) and last_in.shape == (2, 64, 64, 32)
    rec, _, _ = nnx.eval_shape(lambda d, t: d(t, (3, 5)), dec, jax.ShapeDtypeStruct((1, 15, 128), jnp.float32))
    assert rec.shape == (1, 48, 80, 3)
    with pytest.raises(ValueError, match="square token grid"):
        nnx.eval_shape(lambda d, t: d(t), dec, jax.ShapeDtypeStruct((1, 15, 128), jnp.float32))
