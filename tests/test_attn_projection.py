"""AttnProjection: shapes, head pooling (mean vs concat) against a NumPy reference, causal masking, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.models.attn_projection import AttnProjection, check_attn_projection


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference(m: AttnProjection, x, causal=False):
    """Straight NumPy transcription of the official AttnProjection forward (float64)."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.state(m, nnx.Param).to_pure_dict())
    x = np.asarray(x, np.float64)
    b, n, _ = x.shape
    heads, width, mode = m.attn.heads, m.attn.width, m.attn.head_reduction
    lin = lambda t, q: t @ q["kernel"] + q.get("bias", 0.0)  # noqa: E731
    s = lin(_ln(x, p["norm3"]["scale"], p["norm3"]["bias"], 1e-5), p["proj"])
    u = _ln(x, p["norm1"]["scale"], p["norm1"]["bias"], 1e-5)
    a = p["attn"]
    qkv = u @ a["qkv"]["kernel"] + np.concatenate([a["q_bias"], np.zeros(width), a["v_bias"]])
    qkv = qkv.reshape(b, n, 3, heads, width // heads).transpose(2, 0, 3, 1, 4)  # (3, b, h, n, hd)
    logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(width // heads)
    if causal:
        logits = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, logits)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ qkv[2]  # (b, h, n, hd)
    o = o.mean(1) if mode == "mean" else o.transpose(0, 2, 1, 3).reshape(b, n, width)
    y = s + lin(o, a["proj"])
    mp = p["mlp"]
    h = _ln(_ln(y, p["norm2"]["scale"], p["norm2"]["bias"], 1e-5), mp["norm"]["scale"], mp["norm"]["bias"], 1e-6)
    return y + lin(_gelu_tanh(lin(h, mp["w0"])) * lin(h, mp["w1"]), mp["w2"])


def _perturb(m, seed):
    """Random non-trivial biases/norms so that a mis-wired bias or LN shows up."""
    rng = np.random.default_rng(seed)
    state = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda v: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32), state))


@pytest.mark.parametrize(
    "in_dim,out_dim,heads,mode", [(128, 16, 8, "mean"), (16, 128, 8, "concat"), (64, 8, 8, "mean")]
)
def test_matches_numpy_reference(in_dim, out_dim, heads, mode):
    m = AttnProjection(in_dim, out_dim, heads, head_reduction=mode, rngs=nnx.Rngs(0))
    _perturb(m, 1)
    x = jax.random.normal(jax.random.key(0), (2, 7, in_dim))
    y, inter = m(x, return_intermediates=True)
    assert y.shape == (2, 7, out_dim) and y.dtype == jnp.float32
    assert inter["shortcut"].shape == inter["attn"].shape == (2, 7, out_dim)
    width = max(in_dim, out_dim)
    assert m.attn.qkv.kernel.shape == (in_dim, 3 * width) and m.attn.qkv.bias is None
    assert m.attn.q_bias.shape == m.attn.v_bias.shape == (width,)
    assert m.attn.proj.kernel.shape == ((width // heads, out_dim) if mode == "mean" else (width, out_dim))
    assert m.mlp.w0.kernel.shape == (out_dim, 2 * out_dim)
    np.testing.assert_allclose(np.asarray(y), _reference(m, x), rtol=2e-5, atol=2e-5)


def test_mean_and_concat_pooling_differ_only_in_head_reduction():
    """Same weights, two reductions: 'mean' of the per-head outputs equals the head-averaged 'concat' output."""
    m = AttnProjection(32, 8, 4, head_reduction="mean", rngs=nnx.Rngs(0))
    _perturb(m, 2)
    x = jax.random.normal(jax.random.key(1), (1, 5, 32))
    u = m.norm1(x)
    bias = jnp.concatenate([m.attn.q_bias[...], jnp.zeros(32), m.attn.v_bias[...]])
    qkv = (m.attn.qkv(u) + bias).reshape(1, 5, 3, 4, 8)
    from unitok_jax.models.vit import dot_product_attention

    per_head = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # (1, 5, 4, 8)
    np.testing.assert_allclose(np.asarray(m.attn(u)), np.asarray(m.attn.proj(per_head.mean(2))), rtol=1e-5, atol=1e-6)
    concat = per_head.reshape(1, 5, 32)
    np.testing.assert_allclose(np.asarray(concat[..., 8:16]), np.asarray(per_head[:, :, 1]))  # head-major


@pytest.mark.parametrize("in_dim,out_dim,mode", [(64, 8, "mean"), (8, 64, "concat")])
def test_causal_variant_masks_the_future(in_dim, out_dim, mode):
    causal = AttnProjection(in_dim, out_dim, 8, head_reduction=mode, causal=True, rngs=nnx.Rngs(0))
    _perturb(causal, 3)
    full = AttnProjection(in_dim, out_dim, 8, head_reduction=mode, causal=False, rngs=nnx.Rngs(0))
    nnx.update(full, nnx.state(causal, nnx.Param))
    x = jax.random.normal(jax.random.key(2), (2, 9, in_dim))
    j = 5
    x2 = x.at[:, j].add(jax.random.normal(jax.random.key(3), (2, in_dim)))  # not a constant: LN would remove it
    yc, yc2 = causal(x), causal(x2)
    np.testing.assert_allclose(np.asarray(yc[:, :j]), np.asarray(yc2[:, :j]), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(yc[:, j:] - yc2[:, j:]))) > 1e-3
    yf, yf2 = full(x), full(x2)
    assert float(jnp.max(jnp.abs(yf[:, :j] - yf2[:, :j]))) > 1e-3  # full attention sees the change everywhere
    np.testing.assert_allclose(np.asarray(yc), _reference(causal, x, causal=True), rtol=2e-5, atol=2e-5)


def test_highest_precision_and_dtype():
    m = AttnProjection(16, 128, 8, head_reduction="concat", rngs=nnx.Rngs(0))
    assert m.attn.qkv.precision == jax.lax.Precision.HIGHEST and m.proj.precision == jax.lax.Precision.HIGHEST
    assert m.attn.qkv.kernel.get_metadata()["out_sharding"] == (None, "heads")
    assert m.proj.kernel.get_metadata()["out_sharding"] == (None, "embed")


def test_validation_errors_name_the_field():
    with pytest.raises(ValueError, match="quant_proj: attention width .*128.* not divisible by heads=3"):
        check_attn_projection(128, 16, 3, "mean", "quant_proj")
    with pytest.raises(ValueError, match="quant_proj: head_reduction 'mean' needs .* != out_dim=32"):
        check_attn_projection(128, 32, 8, "mean", "quant_proj")
    with pytest.raises(ValueError, match="post_quant_proj: head_reduction 'concat' needs out_dim >= in_dim"):
        check_attn_projection(128, 16, 8, "concat", "post_quant_proj")
    with pytest.raises(ValueError, match="head_reduction must be one of"):
        check_attn_projection(128, 16, 8, "max", "quant_proj")
