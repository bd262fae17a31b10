"""Official UniTok checkpoint converter: full key coverage of the 820M model (abstractly), parameter counts,
lossless round trips, config resolution and clear errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.convert import official
from unitok_jax.convert.official import (
    build_abstract,
    load_unitok,
    official_key_shapes,
    param_count,
    to_official_state_dict,
    unitok_params_from_state_dict,
)
from unitok_jax.models.unitok import model_config, normalize_config


def _read_key_list(path):
    shapes, dtypes = {}, set()
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        dtypes.add(dtype)
    return shapes, dtypes


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    meta = json.loads((fixtures_dir / "unitok_tiny.json").read_text())
    npz = np.load(fixtures_dir / "unitok_tiny.npz")
    sd = {k[len("param/") :]: npz[k] for k in npz.files if k.startswith("param/")}
    return meta["model_config"], sd


def _fake_state_dict(shapes):
    """Zero-stride views: a full-size state dict that allocates (almost) nothing."""
    return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_vitamin_large_key_list_matches_official(fixtures_dir, scan):
    ref, dtypes = _read_key_list(fixtures_dir / "unitok_L_state_dict.txt")
    assert len(ref) == 1335 and dtypes == {"float32"}
    cfg = model_config("vitamin_large")
    cfg.scan_blocks = scan
    model = build_abstract(cfg)  # ShapeDtypeStructs only
    ours = official_key_shapes(model)
    assert set(ours) == set(ref), (sorted(set(ref) - set(ours))[:10], sorted(set(ours) - set(ref))[:10])
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, list(wrong.items())[:10]
    assert sum(int(np.prod(s)) for s in ref.values()) == 820_333_508


def test_parameter_counts():
    large = build_abstract(model_config("vitamin_large"))
    # Released count 820,298,692 includes the frozen all-zero encoder.pos_embed (1024), which we do not keep.
    assert param_count(large) == 820_297_668
    assert param_count(large) + 1024 == 820_298_692
    base = build_abstract(model_config("vitamin_base"))
    assert param_count(base) + 768 == 317_502_660
    scanned = model_config("vitamin_base")
    scanned.scan_blocks = True
    assert param_count(build_abstract(scanned)) == param_count(base)


def test_fixture_state_dict_round_trip(tiny):
    cfg, sd = tiny
    model = load_unitok(sd, cfg)
    back = to_official_state_dict(model)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # The same weights through a scanned model: same official dict.
    scanned = load_unitok(sd, cfg, scan_blocks=True)
    qkv = scanned.encoder.blocks.layers.attn.qkv.kernel
    assert scanned.encoder.blocks.scan and qkv.shape == (2, 128, 384)
    assert qkv.get_metadata()["out_sharding"] == (None, "embed", "heads")  # converter keeps logical axes
    back = to_official_state_dict(scanned)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_jax_to_official_to_jax_is_lossless(tiny):
    cfg, _ = tiny
    model = build_abstract(cfg)
    rng = np.random.default_rng(0)
    state = nnx.state(model, nnx.Param)
    filled = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), state)
    nnx.update(model, filled)
    sd = to_official_state_dict(model)
    assert np.all(sd["encoder.pos_embed"] == 0) and sd["quant_proj.attn.zero_k_bias"].shape == (128,)
    assert sd["quantizer.codebooks.3.vocab_usage"].shape == (64,)
    for scan in (False, True):
        again = load_unitok(sd, cfg, scan_blocks=scan)
        flat_a = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        sd_again = to_official_state_dict(again)
        for k in sd:
            np.testing.assert_array_equal(sd_again[k], sd[k], err_msg=k)
        if not scan:
            for path, var in nnx.to_flat_state(nnx.state(again, nnx.Param)):
                np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(flat_a[path].get_value()))


def test_params_state_has_model_structure(tiny):
    cfg, sd = tiny
    model = build_abstract(cfg)
    params = unitok_params_from_state_dict(sd, model)
    ref = nnx.state(model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for (p1, a), (p2, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(ref)):
        assert p1 == p2 and a.get_value().shape == b.get_value().shape and a.get_value().dtype == np.float32
    # Linear (out, in) → kernel (in, out); conv (O, I, kh, kw) → (kh, kw, I, O); depthwise (C,1,3,3) → (3,3,1,C).
    np.testing.assert_array_equal(
        params["quant_proj"]["attn"]["qkv"]["kernel"].get_value(), sd["quant_proj.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(
        params["encoder"]["stem"]["conv1"]["kernel"].get_value(),
        sd["encoder.patch_embed.backbone.stem.conv1.weight"].transpose(2, 3, 1, 0),
    )
    dw = params["encoder"]["stages"][1][0]["conv2_kxk"]["kernel"].get_value()
    assert dw.shape == (3, 3, 1, 256)
    np.testing.assert_array_equal(
        params["text_encoder"]["text_projection"].get_value(), sd["text_encoder.text_projection"]
    )
    np.testing.assert_array_equal(
        params["quantizer"]["codebooks"].get_value()[2], sd["quantizer.codebooks.2.codebook.weight"]
    )


def test_clear_errors(tiny):
    cfg, sd = tiny
    model = build_abstract(cfg)
    missing = dict(sd)
    del missing["decoder.up_conv4.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.up_conv4\.conv2\.weight"):
        unitok_params_from_state_dict(missing, model)
    extra = dict(sd, **{"encoder.blocks.7.attn.qkv.weight": np.zeros((384, 128), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys.*encoder\.blocks\.7\.attn\.qkv\.weight"):
        unitok_params_from_state_dict(extra, model)
    wrong = dict(sd, **{"projection.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch for projection\.weight.*\(32, 64\).*\(32, 128\)"):
        unitok_params_from_state_dict(wrong, model)
    nonzero = dict(sd, **{"encoder.pos_embed": np.ones((1, 1, 128), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.pos_embed is expected to be all zeros"):
        unitok_params_from_state_dict(nonzero, model)
    bad_buffer = dict(sd, **{"quantizer.codebooks.0.vocab_usage": np.zeros((65,), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch for quantizer\.codebooks\.0\.vocab_usage"):
        unitok_params_from_state_dict(bad_buffer, model)
    # Ignored buffers: non-persistent causal mask and (non-zero) usage EMA are accepted.
    ok = dict(
        sd,
        **{
            "text_encoder.attn_mask": np.zeros((77, 77), np.float32),
            "quantizer.codebooks.1.vocab_usage": np.full((64,), 1 / 64, np.float32),
        },
    )
    unitok_params_from_state_dict(ok, model)
    with pytest.raises(ValueError, match="cannot infer the UniTok config from encoder width 128"):
        load_unitok(sd)


def test_config_resolution(tiny):
    cfg, sd = tiny
    assert normalize_config(cfg).to_dict() == model_config("tiny").to_dict()
    m = load_unitok({"args": {"model": "vitamin_tiny"}, "trainer": {"unitok": sd}}, "tiny")
    assert m.config.quantizer.codebook_size == 64
    # Preset inference from shapes on a zero-memory fake of the released state dict.
    large = model_config("vitamin_large")
    shapes = official_key_shapes(
        build_abstract(
            large,
        )
    )
    inferred = official._config_from_shapes(_fake_state_dict(shapes))
    assert normalize_config(inferred).to_dict() == large.to_dict()
    args = {
        "model": "vitamin_large",
        "vocab_size": 32768,
        "num_codebooks": 8,
        "vocab_width": 64,
        "embed_dim": 768,
        "img_size": 256,
        "text_width": 768,
        "text_heads": 12,
        "text_layers": 12,
        "text_vocab_size": 49408,
        "text_context_length": 77,
    }
    assert normalize_config(official._config_from_args(args)).to_dict() == large.to_dict()
    base = model_config("vitamin_base")
    inferred = official._config_from_shapes(_fake_state_dict(official_key_shapes(build_abstract(base))))
    assert normalize_config(inferred).to_dict() == base.to_dict()
    with pytest.raises(ValueError, match="supported"):
        official._config_from_args({"model": "vitamin_small"})
