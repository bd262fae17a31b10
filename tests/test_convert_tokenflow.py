"""Official TokenFlow state dict <-> unitok_jax TokenFlow: round trip, strictness, error messages, teacher loading.
(Numerical parity of the loaded model is in test_tokenflow_parity.py.)"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.convert.tokenflow import CODEBOOK_USED_LEN, load_teacher, load_tokenflow, to_official_state_dict
from unitok_jax.models.tokenflow import random_tokenflow

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    data = np.load(fixtures_dir / "tokenflow_tiny.npz")
    meta = json.loads((fixtures_dir / "tokenflow_tiny.json").read_text())
    sd = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    return sd, meta


@pytest.fixture(scope="module")
def loaded(fx):
    sd, meta = fx
    return load_tokenflow(sd, meta["model_config"])


def test_round_trip_is_exact(fx, loaded):
    sd, _ = fx
    back = to_official_state_dict(loaded)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == np.float32, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert back["quantize.codebook_used"].shape == (CODEBOOK_USED_LEN,)
    # and it loads again
    again = load_tokenflow(back, loaded.cfg)
    np.testing.assert_array_equal(again.encoder.conv_in.kernel[...], loaded.encoder.conv_in.kernel[...])


def test_layouts(fx, loaded):
    sd, _ = fx
    np.testing.assert_array_equal(
        loaded.encoder_vqkd.resblocks[0].attn.in_proj.kernel[...],
        sd["encoder_vqkd.transformer.resblocks.0.attn.in_proj_weight"].T,
    )
    np.testing.assert_array_equal(
        loaded.encoder.conv_blocks[2].downsample.conv.kernel[...],
        sd["encoder.conv_blocks.2.downsample.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(loaded.quantize.quantizer.embedding_pix[...], sd["quantize.embedding_vqgan.weight"])
    np.testing.assert_array_equal(loaded.decoder_vqkd.pos_embed[...], sd["decoder_vqkd.pos_embed"])
    np.testing.assert_array_equal(loaded.encode_task_layer.fc2.bias[...], sd["encode_task_layer.2.bias"])


def test_checkpoint_wrappers(fx, loaded):
    sd, meta = fx
    garbage = {"nothing": np.zeros(1)}
    for wrapped in (
        {"model": sd, "optimizer": {}},
        {"ema": sd, "model": garbage},
        {"state_dict": sd},
        {"module." + k: v for k, v in sd.items()},
    ):
        m = load_tokenflow(wrapped, meta["model_config"])
        np.testing.assert_array_equal(m.decoder.conv_out.kernel[...], loaded.decoder.conv_out.kernel[...])
    # the usage FIFO is ignored whatever it holds
    sd2 = dict(sd, **{"quantize.codebook_used": np.arange(CODEBOOK_USED_LEN, dtype=np.float32)})
    load_tokenflow(sd2, "tiny")


def test_missing_unexpected_and_shape_errors(fx):
    sd, meta = fx
    cfg = meta["model_config"]
    missing = {k: v for k, v in sd.items() if k != "decoder_vqkd.blocks.1.attn.v_bias"}
    with pytest.raises(KeyError, match=r"missing 1 key.*decoder_vqkd\.blocks\.1\.attn\.v_bias"):
        load_tokenflow(missing, cfg)
    extra = dict(sd, **{"encoder_vqkd.proj": np.zeros((64, 48), np.float32)})
    with pytest.raises(KeyError, match=r"unexpected 1 key.*encoder_vqkd\.proj"):
        load_tokenflow(extra, cfg)
    bigger = copy.deepcopy(cfg)
    bigger["quantizer"]["codebook_size"] = 512
    msg = r"shape mismatch for 'quantize\.embedding_vqkd\.weight'.*\(256, 32\).*\(512, 32\)"
    with pytest.raises(ValueError, match=msg):
        load_tokenflow(sd, bigger)
    deeper = copy.deepcopy(cfg)
    deeper["semantic_encoder"]["layers"] = 3
    with pytest.raises(KeyError, match=r"encoder_vqkd\.transformer\.resblocks\.2\."):
        load_tokenflow(sd, deeper)
    with pytest.raises(FileNotFoundError):
        load_tokenflow("/nonexistent/tokenflow.pt", cfg)


SIGLIP_MICRO = {
    "image_size": 32,
    "scales": [1, 2, 4],
    "pixel_image_size": None,
    "semantic_encoder": {
        "kind": "siglip_vit",
        "input_resolution": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 3,
        "heads": 2,
        "mlp_dim": 48,
        "input_scaling": "siglip",
    },
    "encode_task_layer": {"hidden": 32, "out": 8},
    "pixel_encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
    "quantizer": {"codebook_size": 16, "semantic_dim": 8, "pixel_dim": 4},
    "semantic_decoder": {"embed_dim": 32, "depth": 1, "heads": 2, "out_dim": 32},
    "decode_task_layer": {"hidden": 32, "out": 32},
    "pixel_decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
}


def test_siglip_keys_pack_qkv_and_ignore_unused_tail():
    m = random_tokenflow(SIGLIP_MICRO, seed=0)
    sd = to_official_state_dict(m)
    p = "encoder_vqkd.vision_model."
    assert p + "encoder.layers.1.self_attn.k_proj.weight" in sd and p + "embeddings.position_embedding.weight" in sd
    assert not any(k.startswith(p + "encoder.layers.2.") for k in sd)  # hidden_states[-2]: last block not built
    k = np.asarray(m.encoder_vqkd.resblocks[1].attn.in_proj.kernel[...])
    np.testing.assert_array_equal(sd[p + "encoder.layers.1.self_attn.k_proj.weight"], k[:, 32:64].T)
    # a real SiglipVisionModel checkpoint also has the unused last block, post_layernorm, MAP head, scaling buffers
    full = dict(sd)
    full[p + "encoder.layers.2.mlp.fc1.weight"] = np.zeros((48, 32), np.float32)
    full[p + "post_layernorm.weight"] = np.ones(32, np.float32)
    full[p + "head.probe"] = np.zeros((1, 1, 32), np.float32)
    full[p + "embeddings.position_ids"] = np.arange(16)[None]
    full["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
    m2 = load_tokenflow(full, SIGLIP_MICRO)
    for path in (
        ("resblocks", 1, "attn", "in_proj", "kernel"),
        ("resblocks", 0, "attn", "in_proj", "bias"),
        ("positional_embedding",),
        ("conv1", "bias"),
    ):
        a, b = m.encoder_vqkd, m2.encoder_vqkd
        for step in path:
            a, b = (a[step], b[step]) if isinstance(step, int) else (getattr(a, step), getattr(b, step))
        np.testing.assert_array_equal(a[...], b[...])
    # the flattened HF layout (no `vision_model.`) is accepted too
    flat = {k.replace("vision_model.", ""): v for k, v in full.items()}
    load_tokenflow(flat, SIGLIP_MICRO)


def test_teacher_from_npz_matches_student_tower(fx, loaded, tmp_path):
    """An OpenAI-CLIP-layout teacher (`visual.*` + `proj`) loads from .npz; its tokens are ln_post(x)[:, 1:] @ proj."""
    sd, _ = fx
    proj = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32) / 8
    teacher_sd = {"visual." + k[len("encoder_vqkd.") :]: v for k, v in sd.items() if k.startswith("encoder_vqkd.")}
    teacher_sd["visual.proj"] = proj
    teacher_sd["logit_scale"] = np.zeros(())  # text-side keys of a full CLIP checkpoint are ignored
    path = tmp_path / "clip_teacher.npz"
    np.savez(path, **teacher_sd)
    teacher = load_teacher(str(path), "tiny")
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(1, 64, 64, 3)), jnp.float32)

    @nnx.jit
    def both(t, s, x):
        return t.vit(x)[0], s.encoder_vqkd(x)[0], t(x)

    t_tokens, s_tokens, t_full = jax.device_get(both(teacher, loaded, x))
    np.testing.assert_allclose(t_tokens, s_tokens @ proj, atol=2e-5)
    assert t_full.shape == (1, 16, 48)
    bad = {k: v for k, v in teacher_sd.items() if k != "visual.ln_post.bias"}
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(KeyError, match=r"visual\.ln_post\.bias"):
        load_teacher(str(tmp_path / "bad.npz"), "tiny")
