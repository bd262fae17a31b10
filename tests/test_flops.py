"""Analytic FLOPs (unitok_jax.train.flops) vs the official FlopCounter numbers and vs XLA's own count."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from train_helpers import unitok_configs
from unitok_jax.models import build_model
from unitok_jax.models.unitok import model_config
from unitok_jax.parallel import sharding as shd
from unitok_jax.train import aot, flops
from unitok_jax.train.flops_unitok import unitok_forward_flops


def test_vitamin_large_and_base_match_official_flop_counter():
    """Spec §1.9 (torch FlopCounterMode, one 256² image; its SDPA products were not counted)."""
    for preset, enc, dec, text, post in (("vitamin_large", 189, 504, 13, 4), ("vitamin_base", 57, 259, 13, 2.4)):
        f = unitok_forward_flops(model_config(preset), 256, include_attention=False)
        assert (f["encoder_convs"] + f["encoder_vit"]) / 1e9 == pytest.approx(enc, rel=0.01), preset
        assert (f["decoder_convs"] + f["decoder_vit"]) / 1e9 == pytest.approx(dec, rel=0.01), preset
        assert f["text"] / 1e9 == pytest.approx(text, rel=0.02), preset
        assert f["post_quant_proj"] / 1e9 == pytest.approx(post, rel=0.1), preset
    # Spec §10: the two full 3x3 convs at the expanded width in the up-sampler are ~242 GFLOP of the decoder.
    f = unitok_forward_flops(model_config("vitamin_large"), 256)
    assert 330e9 < f["decoder_convs"] < 345e9
    # Attention products add ~4 % to the encoder at 256 tokens.
    assert f["encoder_vit"] / unitok_forward_flops(model_config("vitamin_large"), 256, include_attention=False)[
        "encoder_vit"
    ] == pytest.approx(1.048, abs=0.005)


def test_step_multipliers_and_paper_totals():
    config = unitok_configs.get_config("paper")
    config.global_batch_size = 1
    no_gan = flops.step_flops(config, gan_active=False)
    gan = flops.step_flops(config, gan_active=True)
    d = no_gan.as_dict()
    fwd = unitok_forward_flops(config.model, 256)
    assert d["encoder_vit"] == 3 * fwd["encoder_vit"] and d["quantizer"] == fwd["quantizer"]
    lp = flops.lpips_flops(256)
    assert d["lpips_reconstruction"] == 2 * lp and d["lpips_target"] == lp
    assert 39e9 < lp < 41e9  # VGG-16 to relu5_3 at 256² ≈ 30.7 GFLOP at 224² scaled by (256/224)²
    extra = set(gan.as_dict()) - set(d)
    assert extra == {"disc_in_generator", "disc_backbone_in_disc_step", "disc_heads_in_disc_step"}
    # ~2.31 TFLOP per image without GAN, ~2.47 with it (most of it the decoder's up-sampling convs).
    assert 2.25e12 < no_gan.total < 2.35e12 and 2.42e12 < gan.total < 2.52e12


def test_peak_flops_table():
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device(jax.devices()[0]) is None  # CPU
    meter = flops.FlopsMeter(unitok_configs.get_config("tiny"), jax.devices())
    m = meter.metrics(steps_per_sec=2.0, gan_active=False)
    assert m["perf/tflops_per_device"] == pytest.approx(meter.flops_per_step(False) * 2 / jax.device_count() / 1e12)
    assert "perf/mfu" not in m  # unknown peak (CPU): no NaN in the logs
    meter.peak = 100e12
    assert meter.metrics(2.0, False)["perf/mfu"] == pytest.approx(m["perf/tflops_per_device"] / 100)


def _tiny_single_device():
    config = unitok_configs.get_config("tiny")
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return config, shd.create_mesh(config.mesh, devices=jax.devices()[:1])


def test_tiny_forward_matches_xla_matmul_count():
    """The compiled forward's dot/conv FLOPs equal the analytic forward (attention included)."""
    config, _ = _tiny_single_device()
    model = nnx.eval_shape(lambda: build_model("unitok", config.model, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    b, s, t = 4, config.data.image_size, config.model.text.context_length
    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def forward(state, images, text):
        rec, aux = nnx.merge(graphdef, state)(images, text)
        return rec, aux["clip_image_features"], aux["clip_text_features"]

    compiled = jax.jit(forward).lower(state, images, text).compile()
    xla = sum(flops.hlo_matmul_flops(compiled.as_text()).values())
    analytic = b * sum(unitok_forward_flops(config.model, s).values())
    assert xla == pytest.approx(analytic, rel=0.03)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] >= 0.97 * analytic  # + elementwise work (norms, erf-GELU ≈ 64 flops/element on CPU)


@pytest.mark.slow
def test_tiny_train_step_matches_xla_cost_analysis():
    """XLA's cost_analysis of the compiled GAN step (G + D update) is within 15 % of the analytic count.

    Measured on jax 0.10.2 CPU: ratio 1.04. The no-GAN step is not compared on total flops: there XLA CPU reports
    ~1.38x because (a) its rewrite of the weight gradient of conv-after-nearest-upsample computes 2x the necessary
    MACs and (b) exact-erf GELU costs ~64 flops/element, both large next to the tiny model's narrow convs (the
    forward dots/convs match the analytic count exactly, see the test above).
    """
    config, mesh = _tiny_single_device()
    compiled, _, _, _ = aot.compile_train_step(config, gan=True, mesh=mesh)
    analytic = flops.step_flops(config, gan_active=True)
    assert aot.xla_flops(compiled) == pytest.approx(analytic.total, rel=0.15)


def _tokenflow_configs():
    from test_convert_tokenflow import SIGLIP_MICRO
    from test_tokenflow_vitamin import MICRO as VITAMIN_MICRO
    from unitok_jax.models.tokenflow_config import tokenflow_model_config

    return {"clip_tiny": tokenflow_model_config("tiny"), "siglip_micro": SIGLIP_MICRO, "vitamin_micro": VITAMIN_MICRO}


@pytest.mark.parametrize("name", ["clip_tiny", "siglip_micro", "vitamin_micro"])
def test_tokenflow_forward_matches_xla_matmul_count(name):
    """Every semantic-tower kind: the compiled student forward's dot/conv FLOPs equal the analytic count."""
    from unitok_jax.models.tokenflow import abstract_tokenflow
    from unitok_jax.train.flops_tokenflow import tokenflow_forward_flops

    cfg = _tokenflow_configs()[name]
    graphdef, state = nnx.split(abstract_tokenflow(cfg))
    b, s = 2, cfg["image_size"]

    def forward(state, images):
        rec, aux = nnx.merge(graphdef, state)(images)
        return rec, aux["sem_rec"]

    compiled = jax.jit(forward).lower(state, jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)).compile()
    xla = sum(flops.hlo_matmul_flops(compiled.as_text()).values())
    analytic = tokenflow_forward_flops(cfg, s)
    assert xla == pytest.approx(b * sum(v for k, v in analytic.items() if k != "teacher"), rel=0.01)


def test_tokenflow_step_flops_and_meter():
    from configs import tokenflow as tokenflow_configs

    config = tokenflow_configs.get_config("clipb_256")
    config.global_batch_size = 1
    d = flops.step_flops(config, gan_active=False).as_dict()
    from unitok_jax.train.flops_tokenflow import tokenflow_forward_flops

    fwd = tokenflow_forward_flops(config.model, 256)
    assert d["semantic_encoder"] == 3 * fwd["semantic_encoder"] and d["teacher"] == fwd["teacher"]
    assert d["quantizer"] == fwd["quantizer"] and "contrastive_logits" not in d
    assert d["lpips_reconstruction"] == 2 * flops.lpips_flops(256)
    # CLIP-B/16 at 256 px (256 tokens + class): ~2 x 86 M params x 257 tokens ≈ 44 GFLOP + attention.
    assert 44e9 < fwd["semantic_encoder"] < 50e9 and fwd["teacher"] > fwd["semantic_encoder"]
    assert "disc_in_generator" in flops.step_flops(config, gan_active=True).as_dict()
    assert flops.FlopsMeter(config, jax.devices()).flops_per_step(False) > 0  # no longer NaN for TokenFlow
