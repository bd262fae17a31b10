"""TokenFlow model: PyTorch-exact resampling, module shapes/invariants, composite API, presets, teacher, losses.

Numerical parity against the official code is in test_tokenflow_parity.py; this file uses a micro config
(16 px, 4x4 grid) so every compile stays small.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers  # noqa: F401  (puts the repository root on sys.path: configs/)
import unitok_jax  # noqa: F401
from unitok_jax.convert.tokenflow import load_teacher, tokenflow_key_map
from unitok_jax.losses.distillation import cosine_distillation_loss
from unitok_jax.models.bicubic import area_matrix, area_resize, bicubic_matrix, bicubic_resize, interpolate_pos_table
from unitok_jax.models.clip_vit import CLIPViT, ViTConfig
from configs.tokenflow import TOKENFLOW_TRAIN_RECIPES
from unitok_jax.models.init_keys import ShapeOnlyRngs, numpy_fill_
from unitok_jax.models.tokenflow import abstract_tokenflow, random_tokenflow
from unitok_jax.models.tokenflow_config import normalize_config, tokenflow_model_config

jax.config.update("jax_default_matmul_precision", "highest")

MICRO = {
    "image_size": 16,
    "scales": [1, 2, 4],
    "infer_interpolate": False,
    "semantic_encoder": {
        "kind": "clip_vit",
        "input_resolution": 16,
        "patch_size": 4,
        "width": 32,
        "layers": 1,
        "heads": 2,
        "act": "quick_gelu",
        "class_token": True,
    },
    "encode_task_layer": {"hidden": 32, "out": 8, "act": "tanh"},
    "pixel_encoder": {"ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
    "quantizer": {"codebook_size": 64, "semantic_dim": 8, "pixel_dim": 4, "w_dis": 1.0, "beta": 0.25},
    "semantic_decoder": {"embed_dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2, "out_dim": 16},
    "decode_task_layer": {"hidden": 32, "out": 16, "act": "tanh"},
    "pixel_decoder": {"ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
    "teacher": {
        "kind": "clip_vit",
        "input_resolution": 16,
        "patch_size": 4,
        "width": 32,
        "layers": 1,
        "heads": 2,
        "proj_dim": 16,
        "normalize": "clip",
    },
}


# ------------------------------------------------------------------------------------------------ resampling
def _torch_bicubic_1d_reference(x, out_size, scale=None):
    """Direct transcription of PyTorch's upsample_bicubic2d CPU kernel along one axis (a = -0.75)."""
    a = -0.75
    n = len(x)
    ratio = 1.0 / scale if scale else n / out_size

    def c1(t):
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def c2(t):
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    out = []
    for i in range(out_size):
        real = ratio * (i + 0.5) - 0.5
        i0 = int(np.floor(real))
        t = real - i0
        w = [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]
        out.append(sum(w[k] * x[min(max(i0 - 1 + k, 0), n - 1)] for k in range(4)))
    return np.array(out)


def test_bicubic_known_pytorch_values():
    # torch.nn.functional.interpolate(torch.tensor([[[[0., 1.]]]]), size=(1, 4), mode='bicubic')
    np.testing.assert_allclose(
        bicubic_matrix(2, 4) @ np.array([0.0, 1.0]), [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-12
    )
    # spec §10.1: 2x2 -> 14x14 PyTorch bicubic overshoots to [-0.33, 3.33] for inputs in [0, 3]
    y = bicubic_resize(jnp.array([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None], 14)
    assert abs(float(y.min()) + 0.328) < 1e-3 and abs(float(y.max()) - 3.328) < 1e-3
    # rows sum to one; identity at equal size
    for n, m in [(2, 14), (4, 5), (14, 16), (27, 22), (5, 4)]:
        np.testing.assert_allclose(bicubic_matrix(n, m).sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(bicubic_matrix(5, 5), np.eye(5), atol=1e-12)


@pytest.mark.parametrize(
    "n,m,scale", [(4, 5, None), (4, 5, 5.1 / 4), (14, 16, 16.1 / 14), (27, 22, None), (2, 7, None), (6, 3, None)]
)
def test_bicubic_matches_direct_kernel(n, m, scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    ours = bicubic_matrix(n, m, scale) @ x
    np.testing.assert_allclose(ours, _torch_bicubic_1d_reference(x, m, scale), atol=1e-12)


def test_bicubic_scale_factor_differs_from_size_and_separable():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
    by_scale = bicubic_resize(x, scale_factor=5.1 / 4)
    by_size = bicubic_resize(x, 5)
    assert by_scale.shape == by_size.shape == (2, 5, 5, 3)
    assert float(jnp.abs(by_scale - by_size).max()) > 1e-3  # the DINO +0.1 trick is not size=5
    # source coordinate for scale factor 5.1/4: (i + 0.5) / 1.275 - 0.5 (README §5.2)
    ref = np.stack([_torch_bicubic_1d_reference(r, 5, 1.275) for r in np.asarray(x)[0, :, :, 0]])
    ref = np.stack([_torch_bicubic_1d_reference(c, 5, 1.275) for c in ref.T]).T
    np.testing.assert_allclose(np.asarray(by_scale)[0, :, :, 0], ref, atol=1e-5)
    # jax.image.resize is a different kernel (a = -0.5): never use it for parity
    assert float(jnp.abs(jax.image.resize(x, (2, 5, 5, 3), "bicubic") - by_size).max()) > 1e-3


def test_interpolate_pos_table():
    t = jnp.asarray(np.random.default_rng(2).normal(size=(16, 6)), jnp.float32)
    assert interpolate_pos_table(t, 4) is t
    out = interpolate_pos_table(t, 5)
    ref = bicubic_resize(t.reshape(1, 4, 4, 6), scale_factor=5.1 / 4).reshape(25, 6)
    np.testing.assert_array_equal(out, ref)
    assert interpolate_pos_table(jnp.zeros((196, 2)), 16).shape == (256, 2)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_table(jnp.zeros((15, 2)), 4)


def test_area_is_adaptive_avg_pool():
    # 5 -> 2 windows overlap: [0, 3) and [2, 5)
    np.testing.assert_allclose(area_matrix(5, 2), [[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]])
    x = np.random.default_rng(3).normal(size=(1, 14, 14, 2)).astype(np.float32)
    for s in (1, 2, 6, 7, 10, 14):
        ours = np.asarray(area_resize(jnp.asarray(x), s))
        ref = np.zeros((1, s, s, 2))
        for i in range(s):
            for j in range(s):
                hs, he = (i * 14) // s, -((-(i + 1) * 14) // s)
                ws, we = (j * 14) // s, -((-(j + 1) * 14) // s)
                ref[0, i, j] = x[0, hs:he, ws:we].mean(axis=(0, 1))
        np.testing.assert_allclose(ours, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ modules
def test_vit_variants():
    cfg = {
        "kind": "siglip_vit",
        "input_resolution": 28,
        "patch_size": 14,
        "width": 32,
        "layers": 3,
        "heads": 2,
        "mlp_dim": 48,
    }
    vc = ViTConfig.from_dict(cfg)
    assert (vc.class_token, vc.act, vc.ln_eps, vc.num_blocks, vc.patch_bias) == (False, "gelu_tanh", 1e-6, 2, True)
    vit = nnx.eval_shape(lambda: CLIPViT(vc, rngs=nnx.Rngs(0)))
    assert vit.positional_embedding.get_value().shape == (4, 32) and len(vit.resblocks) == 2
    assert vit.ln_pre is None and vit.ln_post is None and vit.class_embedding is None
    with pytest.raises(ValueError, match="available"):
        ViTConfig.from_dict({"kind": "vitamin"})
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        ViTConfig.from_dict({"kind": "clip_vit", "depth": 3})


def test_vit_requires_interpolate_flag():
    vit = numpy_fill_(nnx.eval_shape(lambda: CLIPViT(MICRO["semantic_encoder"], rngs=ShapeOnlyRngs())))
    with pytest.raises(ValueError, match="infer_interpolate"):
        vit(jnp.zeros((1, 20, 20, 3)), interpolate=False)
    tokens, aux = jax.eval_shape(lambda x: vit(x, interpolate=True), jnp.zeros((1, 20, 20, 3)))
    assert tokens.shape == (1, 25, 32) and aux["pos_embed_used"].shape == (1, 26, 32)


# ------------------------------------------------------------------------------------------------ composite
@pytest.fixture(scope="module")
def micro():
    return random_tokenflow(MICRO, seed=0)


@pytest.fixture(scope="module")
def micro_out(micro):
    """One compiled program: forward + semantic-loss gradient + the index API (XLA CSEs the shared parts)."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)), jnp.float32)
    tgt = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16)), jnp.float32)

    def sem_loss(m):
        rec, aux = m(x)
        return cosine_distillation_loss(aux["sem_rec"], tgt), (rec, aux)

    @nnx.jit
    def run(m):
        (_, (rec, aux)), grads = nnx.value_and_grad(sem_loss, has_aux=True)(m)
        idx = m.img_to_idx(x)
        sem_dc, pix_dc = m.decode_code(idx)
        img = m.idx_to_img(idx)
        grads = {
            "conv1": grads.encoder_vqkd.conv1.kernel[...],
            "codebook": grads.quantize.quantizer.embedding_sem[...],
            "conv_out": grads.decoder.conv_out.kernel[...],
        }
        return rec, aux, idx, sem_dc, pix_dc, img, grads

    return x, jax.device_get(run(micro))


def test_forward_shapes_and_aux(micro, micro_out):
    x, (rec, aux, idx, *_rest) = micro_out
    assert micro.num_tokens == 21 and micro.scales == (1, 2, 4)
    assert rec.shape == x.shape
    assert aux["indices"].shape == (2, 21) and aux["indices"].dtype == np.int32
    assert [a.shape for a in aux["indices_per_scale"]] == [(2, 1), (2, 4), (2, 16)]
    assert aux["sem_rec"].shape == (2, 16, 16)
    assert aux["final_quantize"].shape == (2, 4, 4, 12)
    assert aux["decoder_last_input"].shape == (2, 16, 16, 32)
    assert aux["codebook_counts"].shape == (64,) and aux["codebook_counts"].sum() == 42
    for k in ("vq_loss", "commit_loss", "entropy_loss", "codebook_usage", "codebook_perplexity"):
        assert np.ndim(aux[k]) == 0 and np.isfinite(aux[k]), k
    np.testing.assert_allclose(aux["commit_loss"], 0.25 * aux["vq_loss"], rtol=1e-5)
    np.testing.assert_array_equal(idx, aux["indices"])
    assert (idx >= 0).all() and (idx < 64).all()


def test_decode_code_consistency(micro, micro_out):
    x, (rec, aux, idx, sem_dc, pix_dc, img, _) = micro_out
    # decoding the looked-up codes equals decoding the STE sum up to fp32 noise (reference: <= 2.5e-5)
    np.testing.assert_allclose(pix_dc, rec, atol=1e-4)
    np.testing.assert_allclose(sem_dc, aux["sem_rec"], atol=1e-5)
    assert img.min() >= -1 and img.max() <= 1
    np.testing.assert_array_equal(img, np.clip(pix_dc, -1, 1))
    # a prefix of whole scales decodes (official decode_code accepts prefix sums)
    f2 = jax.jit(micro.indices_to_quant)(jnp.asarray(idx[:, :5]))
    np.testing.assert_allclose(
        f2,
        np.asarray(
            jax.jit(micro.indices_to_quant)(jnp.asarray(np.concatenate([idx[:, :5], -np.ones((2, 16), np.int32)], 1)))
        ),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="prefix"):
        micro.quantize.split_indices(jnp.zeros((2, 3), jnp.int32))


def test_gradient_paths(micro_out):
    """STE: the semantic loss reaches the ViT encoder through the quantizer; codebooks only get the VQ loss and
    the pixel decoder gets nothing from the semantic loss."""
    grads = micro_out[1][-1]
    assert np.abs(grads["conv1"]).max() > 0
    assert np.abs(grads["codebook"]).max() == 0
    assert np.abs(grads["conv_out"]).max() == 0


def test_training_mode_needs_rngs_for_scale_drop(micro):
    with pytest.raises(ValueError, match="rngs"):
        micro.encode(jnp.zeros((1, 16, 16, 3)), deterministic=False)


def test_cosine_distillation_loss():
    a = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 7)), jnp.float32)
    assert abs(float(cosine_distillation_loss(a, 3.0 * a))) < 1e-6
    assert abs(float(cosine_distillation_loss(a, -a)) - 2.0) < 1e-6
    g = jax.grad(lambda t: cosine_distillation_loss(a, t))(a + 1.0)
    assert float(jnp.abs(g).max()) == 0.0  # teacher side is stop-gradient


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    "name,tokens,params,counts",
    [
        ("clipb_224", 561, 181_902_251, {"encoder_vqkd": 151, "encoder": 144, "decoder": 194, "decoder_vqkd": 45}),
        ("clipb_256", 817, 181_902_251, {"encoder_vqkd": 151, "encoder": 144, "decoder": 194, "decoder_vqkd": 45}),
        ("clipb_256_enhanced", 817, 376_569_643, {"decoder": 294}),
        ("siglip_384", 2227, 523_529_803, {"encoder_vqkd": 3 + 26 * 16, "decoder": 194}),
    ],
)
def test_presets_match_spec(name, tokens, params, counts):
    """Token counts (spec §1), parameter counts (spec §7: 181.90 M, 376.57 M, 523.53 M trainable SigLIP) and
    official state-dict key counts per prefix (spec §7 table)."""
    m = abstract_tokenflow(name)
    assert m.num_tokens == tokens
    _, st = nnx.split(m, nnx.Param)
    assert sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(st)) == params
    entries, _ = tokenflow_key_map(m)
    got = {}
    for tkeys, _, _ in entries.entries:
        for k in tkeys:
            got[k.split(".")[0]] = got.get(k.split(".")[0], 0) + 1
    for prefix, n in counts.items():
        assert got[prefix] == n, (prefix, got[prefix], n)
    assert got["quantize"] == 2 and got["encode_task_layer"] == got["decode_task_layer"] == 4
    # abstract forward: shapes of spec §1 (siglip: pixel CNN at 432, reconstruction resized back to 384)
    res = m.cfg["image_size"]
    rec, aux = nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32))
    g = m.scales[-1]
    assert rec.shape == (2, res, res, 3) and aux["indices"].shape == (2, tokens)
    assert aux["final_quantize"].shape == (2, g, g, 40)
    assert aux["sem_rec"].shape == (2, g * g, m.cfg["decode_task_layer"]["out"])


def test_config_errors_and_recipes():
    with pytest.raises(ValueError, match="available"):
        tokenflow_model_config("clipb_9000")
    bad = tokenflow_model_config("tiny")
    bad["encode_task_layer"]["out"] = 16
    with pytest.raises(ValueError, match="semantic_dim"):
        abstract_tokenflow(bad)
    with pytest.raises(ValueError, match="missing"):
        normalize_config({"image_size": 64})
    c = normalize_config(dict(tokenflow_model_config("tiny"), w_dis=0.5))
    assert c["quantizer"]["w_dis"] == 0.5
    r = TOKENFLOW_TRAIN_RECIPES["clipb_224"]
    assert (r["learning_rate"], r["b2"], r["grad_clip_norm"], r["disc_start"], r["disc_weight"]) == (
        1e-4,
        0.95,
        1.0,
        20000,
        0.5,
    )


def test_load_teacher_random_warns(caplog):
    with caplog.at_level(logging.WARNING):
        t = load_teacher(None, MICRO)
    assert "RANDOM" in caplog.text
    x = jnp.zeros((1, 16, 16, 3))
    out = t(x)
    assert out.shape == (1, 16, 16)
    # CLIP mean/std preprocessing of a mid-grey image
    np.testing.assert_allclose(
        t.preprocess(x)[0, 0, 0],
        (0.5 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711]),
        rtol=1e-6,
    )


# ------------------------------------------------------------------------------------------------ sharding / dtype
def test_fsdp_shards_almost_all_parameter_bytes():
    from unitok_jax.parallel import sharding as shd

    mesh = shd.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    _, params = nnx.split(abstract_tokenflow("clipb_224"), nnx.Param)
    shardings = shd.state_shardings(params, mesh, shd.resolve_rules("fsdp"))
    assert shd.replicated_fraction(params, shardings) < 0.02


@pytest.mark.slow
def test_sharded_forward_equals_unsharded(micro, micro_out):
    from unitok_jax.parallel import sharding as shd

    x, (rec, aux, *_rest) = micro_out
    mesh = shd.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    graphdef, params = nnx.split(micro, nnx.Param)
    shardings = shd.state_shardings(params, mesh, shd.resolve_rules("fsdp_tensor"))
    params = jax.device_put(params, shardings)
    xs = jax.device_put(np.concatenate([x] * 4), shd.batch_sharding(mesh, 4))  # batch 8 over data x fsdp

    @jax.jit
    def fwd(params, x):
        rec, aux = nnx.merge(graphdef, params)(x)
        return rec, aux["indices"], aux["vq_loss"]

    rec_s, idx_s, vq_s = jax.device_get(fwd(params, xs))
    np.testing.assert_array_equal(idx_s, np.concatenate([aux["indices"]] * 4))
    np.testing.assert_allclose(rec_s, np.concatenate([rec] * 4), atol=1e-4)
    np.testing.assert_allclose(vq_s, aux["vq_loss"], rtol=1e-5)


def test_bfloat16_compute_keeps_quantizer_in_float32():
    cfg = dict(MICRO, dtype="bfloat16")
    m = abstract_tokenflow(cfg)
    assert m.encoder.conv_in.kernel.get_value().dtype == jnp.float32  # params stay fp32
    rec, aux = nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    assert aux["final_quantize"].dtype == jnp.float32 and aux["vq_loss"].dtype == jnp.float32
    assert aux["sem_rec"].dtype == jnp.float32 and aux["indices"].dtype == jnp.int32
    assert rec.shape == (2, 16, 16, 3)
