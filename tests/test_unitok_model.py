"""UniTok composite: aux contents, inference API, bf16 compute, scan/remat equivalence, configs and registry.

Numerical runs reuse the tiny fixture weights (loaded abstractly through the converter: no init compute) and put
everything one test needs into a single compiled function to keep CPU compile time low.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.convert.official import build_abstract, load_unitok, to_official_state_dict
from unitok_jax.models import MODELS, TokenFlow, build_model
from unitok_jax.models.unitok import UniTok, model_config, normalize_config


def fast_compile(fn, *args):
    """jax.jit compiled at XLA CPU backend opt level 0 (about half the compile time; numerics unaffected here)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    meta = json.loads((fixtures_dir / "unitok_tiny.json").read_text())
    npz = np.load(fixtures_dir / "unitok_tiny.npz")
    arrays = {k: npz[k] for k in npz.files}
    sd = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    images = jnp.asarray(arrays["in/images"].transpose(0, 2, 3, 1))
    ids = jnp.asarray(arrays["in/text_ids"])
    return meta["model_config"], sd, arrays, images, ids


@pytest.fixture(scope="module")
def fp32_run(fx):
    cfg, sd, _, images, ids = fx
    model = load_unitok(sd, cfg)
    graphdef, state = nnx.split(model)

    def run(state, images, ids):
        m = nnx.merge(graphdef, state)
        rec, aux = m(images, ids)
        idx = m.img_to_idx(images)
        b, k, n = idx.shape
        # idx_to_img = clip(decode_latent(lookup(idx))): one decoder copy covers both (each copy costs compile time).
        return {
            "rec": rec,
            "aux": aux,
            "img_to_idx": idx,
            "idx_to_img": m.idx_to_img(idx.reshape(b, k, 4, 4)),
            "encode_image": m.encode_image(images),
            "encode_text": m.encode_text(ids),
            "last_conv_out": m.last_decoder_conv(aux["decoder_last_input"]),
        }

    with jax.default_matmul_precision("highest"):
        out = fast_compile(run, state, images, ids)(state, images, ids)
    return model, jax.device_get(out)


def test_aux_entries_shapes_and_values(fx, fp32_run):
    cfg, _, arrays, images, _ = fx
    model, out = fp32_run
    aux = out["aux"]
    b, k, kk, n = 2, 4, 64, 16
    expected = {
        "indices": ((b, k, n), np.int32),
        "vq_loss": ((), np.float32),
        "codebook_counts": ((k, kk), np.float32),
        "codebook_usage": ((k,), np.float32),
        "codebook_perplexity": ((k,), np.float32),
        "encoder_tokens": ((b, n, 128), np.float32),
        "z": ((b, n, 16), np.float32),
        "z_normalized": ((b, n, 16), np.float32),
        "quant": ((b, n, 16), np.float32),
        "post_quant": ((b, n, 128), np.float32),
        "decoder_last_input": ((b, 64, 64, 32), np.float32),
        "clip_image_features": ((b, 32), np.float32),
        "clip_text_features": ((b, 32), np.float32),
        "logit_scale": ((), np.float32),
    }
    for name, (shape, dtype) in expected.items():
        assert aux[name].shape == shape and aux[name].dtype == dtype, (name, aux[name].shape, aux[name].dtype)
    assert out["rec"].shape == images.shape and out["rec"].dtype == np.float32
    np.testing.assert_array_equal(aux["codebook_counts"].sum(-1), [b * n] * k)
    assert np.all((aux["codebook_usage"] >= 0) & (aux["codebook_usage"] <= 1))
    assert np.all((aux["codebook_perplexity"] >= 1) & (aux["codebook_perplexity"] <= kk))
    np.testing.assert_allclose(np.linalg.norm(aux["clip_image_features"], axis=-1), 1, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(aux["clip_text_features"], axis=-1), 1, rtol=1e-6)
    np.testing.assert_allclose(aux["logit_scale"], math.exp(2.65625), rtol=1e-6)
    np.testing.assert_array_equal(aux["indices"], arrays["out/indices"])
    np.testing.assert_allclose(out["last_conv_out"], out["rec"], atol=1e-6)  # the GAN-weight layer closes the decoder


def test_inference_api(fp32_run):
    _, out = fp32_run
    aux = out["aux"]
    np.testing.assert_array_equal(out["img_to_idx"], aux["indices"])
    assert out["img_to_idx"].dtype == np.int32
    rec_clipped = np.clip(out["rec"], -1, 1)
    assert out["idx_to_img"].min() >= -1 and out["idx_to_img"].max() <= 1
    np.testing.assert_allclose(out["idx_to_img"], rec_clipped, atol=2e-5)  # lookup path == STE forward
    model, _ = fp32_run
    for idx_shape in ((2, 4, 16), (2, 4, 4, 4)):
        img = nnx.eval_shape(lambda m, i: m.idx_to_img(i), model, jax.ShapeDtypeStruct(idx_shape, jnp.int32))
        assert img.shape == (2, 64, 64, 3)
    img = nnx.eval_shape(lambda m, i: m.idx_to_img(i), model, jax.ShapeDtypeStruct((1, 4, 2, 3), jnp.int32))
    assert img.shape == (1, 32, 48, 3)  # non-square grids need the 4-D form
    lat = nnx.eval_shape(lambda m, q: m.decode_latent(q), model, jax.ShapeDtypeStruct((2, 16, 16), jnp.float32))
    assert lat.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(out["encode_image"], aux["clip_image_features"], atol=2e-6)
    np.testing.assert_allclose(out["encode_text"], aux["clip_text_features"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["encode_image"], axis=-1), 1, rtol=1e-6)


def test_logit_scale_is_clamped(fp32_run):
    model, _ = fp32_run
    old = model.logit_scale[...]
    try:
        model.logit_scale[...] = jnp.asarray(10.0)
        assert float(model.get_logit_scale()) == pytest.approx(100.0, rel=1e-5)
        model.logit_scale[...] = jnp.asarray(-3.0)
        assert float(model.get_logit_scale()) == pytest.approx(1.0)
    finally:
        model.logit_scale[...] = old
    assert model.last_decoder_conv is model.decoder.up_conv4.conv2


@pytest.mark.slow
def test_bfloat16_compute(fx, fp32_run):
    cfg, sd, _, images, ids = fx
    model = load_unitok(sd, cfg, dtype="bfloat16")
    params = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(v.get_value().dtype == jnp.float32 for v in params)  # params stay fp32
    # dtypes of the intermediates, abstractly: bf16 trunk, fp32 quant region.
    _, aux = nnx.eval_shape(lambda m, x, t: m(x, t, return_intermediates=True), model, images, ids)
    inter = aux["intermediates"]
    assert inter["enc_block0"].dtype == jnp.bfloat16 and inter["dec_block0"].dtype == jnp.bfloat16
    for name in ("z", "quant", "post_quant", "quant_proj_attn", "post_quant_proj_attn"):
        assert inter[name].dtype == jnp.float32, name
    graphdef, state = nnx.split(model)

    def run(state, images, ids):
        return nnx.merge(graphdef, state)(images, ids)

    rec, aux = fast_compile(run, state, images, ids)(state, images, ids)
    ref = fp32_run[1]
    assert rec.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(rec)))
    # bf16 trunk: a few code assignments may flip, so compare loosely (mean error, index agreement).
    err = float(jnp.mean(jnp.abs(rec - ref["rec"])))
    agreement = float(jnp.mean(aux["indices"] == ref["aux"]["indices"]))
    print(f"bf16 vs fp32: mean |rec diff| {err:.4f}, index agreement {agreement:.3f}")
    assert err < 0.03 and agreement > 0.7, (err, agreement)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(aux["clip_image_features"]), axis=-1), 1, rtol=1e-5)


@pytest.mark.slow
def test_scan_and_remat_reproduce_reference_gradients(fx):
    """scan_blocks=True + remat='full' on the fixture weights: same forward and same grads as the official model."""
    cfg, sd, arrays, images, ids = fx
    model = load_unitok(sd, cfg, scan_blocks=True, remat="full")
    assert model.encoder.blocks.scan and model.text_encoder.resblocks.scan
    graphdef, state = nnx.split(model)

    def loss_fn(m):
        rec, aux = m(images, ids)
        img, txt = aux["clip_image_features"], aux["clip_text_features"]
        logits = aux["logit_scale"] * img @ txt.T
        lab = jnp.arange(img.shape[0])
        ce = lambda lg: -jnp.mean(jax.nn.log_softmax(lg)[lab, lab])  # noqa: E731
        loss = (
            0.2 * jnp.mean(jnp.abs(rec - images))
            + jnp.mean((rec - images) ** 2)
            + aux["vq_loss"]
            + 0.5 * (ce(logits) + ce(logits.T))
        )
        return loss, rec

    def run(state):
        (loss, rec), grads = nnx.value_and_grad(loss_fn, has_aux=True)(nnx.merge(graphdef, state))
        return loss, rec, nnx.state(grads)

    with jax.default_matmul_precision("highest"):
        loss, rec, grads = fast_compile(run, state)(state)
    np.testing.assert_allclose(float(loss), float(arrays["out/loss_terms/total"]), rtol=2e-5)
    ref_rec = arrays["out/rec"].transpose(0, 2, 3, 1)
    assert float(np.max(np.abs(np.asarray(rec) - ref_rec))) <= 2e-5
    official = to_official_state_dict(grads, model.config, include_buffers=False)
    for key in [k for k in arrays if k.startswith("grad/")]:
        ref = arrays[key]
        err = float(np.max(np.abs(official[key[len("grad/") :]] - ref)))
        assert err <= 5e-5 * float(np.max(np.abs(ref))), (key, err)


def test_drop_path_plumbing(fx):
    cfg, sd, _, images, ids = fx
    model = load_unitok(sd, cfg, drop_path_rate=0.1)
    assert model.drop_rngs is not None and model.encoder.blocks.drop_rates[-1] == pytest.approx(0.1)
    assert model.decoder.blocks.drop_rates == model.encoder.blocks.drop_rates
    rec, _ = nnx.eval_shape(lambda m, x: m(x, deterministic=False), model, images)
    assert rec.shape == images.shape


@pytest.mark.slow
def test_clip_features_match_the_full_forward_with_drop_path(fx):
    """UniTok.clip_features (full-batch accumulation's first pass) draws the same drop-path masks as __call__."""
    cfg, sd, _, images, ids = fx
    model = load_unitok(sd, cfg, drop_path_rate=0.5)
    graphdef, state = nnx.split(model)

    def both(state, images, ids):
        m = nnx.merge(graphdef, state)
        _, aux = m(images, ids, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(3)))
        img, txt, scale = m.clip_features(images, ids, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(3)))
        other, _, _ = m.clip_features(images, ids, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(4)))
        return aux, img, txt, scale, other

    aux, img, txt, scale, other = fast_compile(both, state, images, ids)(state, images, ids)
    # Same masks; XLA fuses the two graphs differently, hence float rounding (~1e-7), not bitwise equality.
    np.testing.assert_allclose(img, aux["clip_image_features"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(txt, aux["clip_text_features"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, aux["logit_scale"], rtol=1e-6)
    assert np.abs(np.asarray(other) - np.asarray(img)).max() > 1e-3  # the masks do depend on the key


def test_without_text_tower():
    cfg = model_config("tiny")
    cfg.text = None
    model = build_abstract(cfg)
    assert model.text_encoder is None
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    rec, aux = nnx.eval_shape(lambda m, x: m(x), model, x)
    assert rec.shape == (1, 32, 32, 3) and aux["clip_text_features"] is None
    assert aux["indices"].shape == (1, 4, 4)
    with pytest.raises(ValueError, match="without a text tower"):
        model.encode_text(jnp.zeros((1, 77), jnp.int32))


def test_every_param_has_logical_axes():
    model = build_abstract(model_config("vitamin_large"))
    total = replicated = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        shape = var.get_value().shape
        assert axes is not None and len(axes) == len(shape), (path, axes, shape)
        size = math.prod(shape) * 4
        total += size
        if all(a in (None, "norm") for a in axes):
            replicated += size
    assert replicated / total < 0.02, replicated / total
    tok = model.text_encoder.token_embedding.embedding
    assert tok.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_presets_and_config_validation():
    large = model_config("vitamin_large")
    assert (large.encoder.stem_width, tuple(large.encoder.stage_widths), large.encoder.vit_width) == (
        160,
        (160, 320),
        1024,
    )
    assert (large.encoder.vit_depth, large.encoder.vit_heads, large.quant_proj.heads) == (31, 16, 16)
    assert (large.quantizer.num_codebooks, large.quantizer.codebook_size, large.quantizer.codebook_dim) == (8, 4096, 8)
    assert tuple(large.decoder.channel_table) == (1024, 320, 160) and tuple(large.decoder.inv_mbconv_depths) == (4, 2)
    assert (large.clip.embed_dim, large.text.width, large.text.layers, large.text.heads) == (768, 768, 12, 12)
    base = model_config("vitamin_base")
    assert (base.encoder.vit_width, base.encoder.vit_depth, base.quant_proj.heads) == (768, 14, 12)
    assert tuple(base.decoder.channel_table) == (768, 256, 128)
    assert (large.dtype, large.drop_path_rate, large.remat, large.scan_blocks) == ("float32", 0.0, "none", False)
    with pytest.raises(ValueError, match="unknown UniTok preset 'huge'; available"):
        model_config("huge")

    def bad(mutate, match):
        cfg = model_config("tiny").to_dict()
        mutate(cfg)
        with pytest.raises(ValueError, match=match):
            normalize_config(cfg)

    bad(lambda c: c["encoder"].update(vit_heads=3), r"encoder\.vit_width=128 is not divisible by encoder\.vit_heads=3")
    bad(lambda c: c["decoder"].update(vit_heads=5), r"decoder\.vit_width=128 is not divisible by decoder\.vit_heads=5")
    bad(
        lambda c: c["quantizer"].update(codebook_dim=8),
        r"num_codebooks\*codebook_dim=4\*8=32 != quant_proj\.out_dim=16",
    )
    bad(lambda c: c["quant_proj"].update(heads=6), r"quant_proj: attention width .* not divisible by heads=6")
    bad(lambda c: c["quant_proj"].update(heads=4), r"quant_proj: head_reduction 'mean' needs")
    bad(lambda c: c["post_quant_proj"].update(in_dim=32), r"post_quant_proj\.in_dim=32 must equal")
    bad(lambda c: c["decoder"].update(channel_table=[64, 64, 32]), r"decoder\.channel_table\[0\]=64")
    bad(lambda c: c["text"].update(heads=3), r"text\.width=64 is not divisible by text\.heads=3")
    bad(lambda c: c.update(dtype="float16"), r"dtype must be one of")
    bad(lambda c: c.update(remat="some"), r"remat must be one of")
    bad(lambda c: c["encoder"].pop("vit_depth"), r"missing field 'encoder\.vit_depth'")
    bad(lambda c: c.update(image_size=70), r"image_size=70 must be divisible by 16")
    bad(lambda c: c["encoder"].update(vit_dept=3), r"unknown field 'encoder\.vit_dept'")
    bad(lambda c: c.update(scan=True), r"unknown field 'scan'")


def test_registry():
    assert MODELS == {"unitok": UniTok, "tokenflow": TokenFlow}
    with pytest.raises(ValueError, match=r"unknown model 'vqgan'; available: \['tokenflow', 'unitok'\]"):
        build_model("vqgan", model_config("tiny"), nnx.Rngs(0))
    model = nnx.eval_shape(lambda: build_model("unitok", model_config("tiny"), nnx.Rngs(0)))
    assert isinstance(model, UniTok)


@pytest.mark.slow
def test_fsdp_sharded_forward_equals_unsharded(fx, fp32_run):
    """Params sharded by their logical axes on a (data=2, fsdp=4) mesh of fake CPU devices; same outputs."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unitok_jax.parallel import sharding as shd

    cfg, sd, _, images, ids = fx
    model = load_unitok(sd, cfg)
    graphdef, state = nnx.split(model)
    mesh = shd.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    shardings = shd.state_shardings(state, mesh, shd.RULES_FSDP)
    state = jax.device_put(state, shardings)
    qkv = state["encoder"]["blocks"]["layers"][0]["attn"]["qkv"]["kernel"]
    assert len(qkv.get_value().sharding.device_set) == 8 and qkv.get_value().sharding.spec[0] == "fsdp"
    batch = NamedSharding(mesh, P("data"))
    images, ids = jax.device_put(images, batch), jax.device_put(ids, batch)

    def run(state, images, ids):
        rec, aux = nnx.merge(graphdef, state)(images, ids)
        return rec, aux["indices"], aux["codebook_counts"], aux["clip_image_features"], aux["clip_text_features"]

    with jax.default_matmul_precision("highest"):
        rec, idx, counts, img, txt = fast_compile(run, state, images, ids)(state, images, ids)
    ref = fp32_run[1]
    np.testing.assert_array_equal(np.asarray(idx), ref["aux"]["indices"])
    np.testing.assert_array_equal(np.asarray(counts), ref["aux"]["codebook_counts"])  # global counts
    np.testing.assert_allclose(np.asarray(rec), ref["rec"], atol=2e-5)
    np.testing.assert_allclose(np.asarray(img), ref["aux"]["clip_image_features"], atol=2e-6)
    np.testing.assert_allclose(np.asarray(txt), ref["aux"]["clip_text_features"], atol=2e-6)


def test_fsdp_replicates_under_two_percent_of_vitamin_large():
    from unitok_jax.parallel import sharding as shd

    state = nnx.state(build_abstract(model_config("vitamin_large")), nnx.Param)
    mesh = shd.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    frac = shd.replicated_fraction(state, shd.state_shardings(state, mesh, shd.RULES_FSDP))
    assert frac < 0.02, frac
