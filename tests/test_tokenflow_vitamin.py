"""TokenFlow's ViTamin semantic-encoder variant (`vitamin_xlarge_256`): preset geometry, timm key layout, teacher
and student loading from timm weights, and a training run that starts the student from pretrained weights.

No TokenFlow ViTamin checkpoint was released, so there is no official golden output; the ViTamin blocks themselves
are the UniTok encoder's, which test_parity_unitok.py checks against the official code.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.convert.tokenflow import (
    load_semantic_encoder,
    load_teacher,
    load_tokenflow,
    to_official_state_dict,
    tokenflow_key_map,
)
from unitok_jax.models.tokenflow import abstract_tokenflow, clip_normalize, random_tokenflow

_VIT = {
    "kind": "vitamin",
    "input_resolution": 32,
    "stem_width": 8,
    "stage_widths": [8, 16],
    "stage_depths": [1, 1],
    "mbconv_expand_ratio": 2.0,
    "vit_width": 32,
    "vit_depth": 1,
    "vit_heads": 2,
    "mlp_ratio": 2.0,
    "final_norm": False,
}
MICRO = {
    "image_size": 32,
    "scales": [1, 2],
    "semantic_encoder": dict(_VIT, input_scaling="clip"),
    "encode_task_layer": {"hidden": 32, "out": 8, "act": "tanh"},
    "pixel_encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
    "quantizer": {"codebook_size": 64, "semantic_dim": 8, "pixel_dim": 4, "w_dis": 1.0, "beta": 0.25},
    "semantic_decoder": {"embed_dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2, "out_dim": 32},
    "decode_task_layer": {"hidden": 32, "out": 32, "act": "tanh"},
    "pixel_decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32},
    "teacher": dict(_VIT, normalize="clip"),
}


def _param_count(module) -> int:
    _, params = nnx.split(module, nnx.Param)
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params))


def _timm_state_dict(model) -> dict:
    """The micro student's tower as a timm ViTamin checkpoint would hold it (plus head/fc_norm, which TokenFlow
    deletes and the loaders must ignore)."""
    sd = {
        k[len("encoder_vqkd.") :]: v for k, v in to_official_state_dict(model).items() if k.startswith("encoder_vqkd.")
    }
    sd["fc_norm.weight"], sd["fc_norm.bias"] = np.ones(32, np.float32), np.zeros(32, np.float32)
    sd["head.weight"], sd["head.bias"] = np.zeros((10, 32), np.float32), np.zeros(10, np.float32)
    return sd


def test_vitamin_xlarge_256_preset_has_the_timm_geometry():
    m = abstract_tokenflow("vitamin_xlarge_256")
    assert m.num_tokens == 817 and m.vit_cfg.grid == 16 and m.vit_cfg.width == 1152
    # The tower without the head (Linear 1152 -> 1152, timm num_classes=1152) and fc_norm that TokenFlow deletes;
    # with them it would be 436,055,232 (436.06 M).
    assert _param_count(m.encoder_vqkd) == 434_724_672
    entries, _ = tokenflow_key_map(m)
    keys = [k for tkeys, _, _ in entries.entries for k in tkeys]
    assert "encoder_vqkd.patch_embed.backbone.stem.conv1.weight" in keys
    assert "encoder_vqkd.blocks.31.attn.qkv.weight" in keys
    assert "encoder_vqkd.norm.weight" not in keys  # timm's `norm` is Identity under global_pool='avg'
    assert not any(k.startswith(("encoder_vqkd.head", "encoder_vqkd.fc_norm", "encoder_vqkd.pos_embed")) for k in keys)
    rec, aux = nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert rec.shape == (1, 256, 256, 3) and aux["indices"].shape == (1, 817)
    assert aux["sem_rec"].shape == (1, 256, 1152)


@pytest.mark.slow
def test_round_trip_teacher_and_student_loading_from_timm_weights(tmp_path):
    model = random_tokenflow(MICRO, seed=3)
    again = load_tokenflow(to_official_state_dict(model), MICRO)
    for (pa, a), (pb, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(again, nnx.Param))
    ):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))

    path = tmp_path / "vitamin_timm.npz"
    np.savez(path, **_timm_state_dict(model))
    teacher = load_teacher(str(path), MICRO)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(teacher(x)), np.asarray(model.encoder_vqkd(clip_normalize(x))[0]), rtol=1e-5, atol=1e-6
    )
    student = dict(nnx.to_flat_state(load_semantic_encoder(str(path), MICRO)))
    ours = dict(nnx.to_flat_state(nnx.state(model.encoder_vqkd, nnx.Param)))
    assert student.keys() == ours.keys()
    for k in ours:
        np.testing.assert_array_equal(np.asarray(student[k].get_value()), np.asarray(ours[k].get_value()))

    missing = {k: v for k, v in _timm_state_dict(model).items() if not k.startswith("blocks.0.attn.qkv")}
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.qkv"):
        load_semantic_encoder(missing, MICRO)


@pytest.mark.slow
def test_tiny_tokenflow_trains_with_a_pretrained_vitamin_student(tmp_path):
    """The TokenFlow trainer path end to end on the embedded dataset: ViTamin student initialised from timm weights
    (`semantic_init_path`), frozen ViTamin teacher from the same file, codebook usage of the shared index space."""
    from configs import tokenflow as tokenflow_configs
    from unitok_jax.train import trainer
    from unitok_jax.train.checkpointing import restore_params_only

    pretrained = random_tokenflow(MICRO, seed=7)
    path = tmp_path / "vitamin_timm.npz"
    np.savez(path, **_timm_state_dict(pretrained))

    c = tokenflow_configs.get_config("tiny")
    c.model = ml_collections.ConfigDict(MICRO)
    c.semantic_init_path = c.teacher_path = str(path)
    c.total_steps, c.ckpt_every_steps, c.log_every_steps, c.image_every_steps = 2, 2, 1, 1000
    c.global_batch_size, c.async_checkpointing = 8, False
    c.data.image_size = 32
    c.data.data_dir = str(tmp_path / "data")
    c.data.embedded.update(dict(num_train=32, num_eval=8, image_size=32))
    c.loss.gan = 0.0
    c.optimizer.lr = 0.0  # the trained student must still equal the pretrained weights (Adam, no weight decay)
    c.eval.every_steps, c.eval.names, c.eval.num_batches = 2, "recon", 1  # a periodic eval at the last step
    workdir = str(tmp_path / "run")

    summary = trainer.train(c, workdir)
    assert summary["origin"].startswith("started from scratch with the semantic encoder from")
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    last = next(r for r in records if r["step"] == 2 and "train/loss/total" in r)
    assert 0.0 < last["train/codebook/usage"] <= 1.0
    assert np.isfinite(last["train/loss/total"]) and last["train/loss/distill"] > 0.0
    # The eval suite runs on TokenFlow too: usage of the one shared index space over all scales' tokens.
    evals = next(r for r in records if "eval/recon/psnr" in r)
    assert 0.0 < evals["eval/recon/usage"] <= 1.0 and evals["eval/recon/num_tokens"] == 8 * 5  # scales 1 + 4
    assert not any(k.endswith("/skipped") and "error" in str(v) for k, v in evals.items())

    def by_name(tree):  # restored checkpoints are plain dicts ('value' leaves, string indices)
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        return {
            "/".join(
                str(getattr(k, "key", getattr(k, "idx", k))) for k in path if getattr(k, "key", None) != "value"
            ): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in flat
        }

    trained = by_name(restore_params_only(os.path.join(workdir, "checkpoints", "2"), None)["encoder_vqkd"])
    want = by_name(nnx.state(pretrained.encoder_vqkd, nnx.Param))
    assert trained.keys() == want.keys() and len(want) > 20
    for k in want:
        np.testing.assert_array_equal(trained[k], want[k], err_msg=k)
