"""TokenFlow model configs: the presets (official geometries + the parity fixture's `tiny`) and `normalize_config`,
which fills defaults and validates a config before the model is built. Plain nested dicts with official naming."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_TINY = {
    # == tests/fixtures/tokenflow_tiny.json `model_config` (official naming), plus the extras below.
    "teacher_branch": "clipb_224",
    "image_size": 64,
    "scales": [1, 2, 4],
    "infer_interpolate": False,
    "semantic_encoder": {
        "kind": "clip_vit",
        "input_resolution": 64,
        "patch_size": 16,
        "width": 64,
        "layers": 2,
        "heads": 2,
        "act": "quick_gelu",
        "class_token": True,
    },
    "encode_task_layer": {"hidden": 64, "out": 32, "act": "tanh"},
    "pixel_encoder": {
        "ch": 32,
        "ch_mult": [1, 1, 2, 2, 2],
        "num_res_blocks": 2,
        "z_channels": 32,
        "attn_at_last_level": True,
    },
    "quantizer": {
        "codebook_size": 256,
        "semantic_dim": 32,
        "pixel_dim": 8,
        "w_dis": 1.0,
        "beta": 0.25,
        "l2_norm": True,
    },
    "semantic_decoder": {"embed_dim": 64, "depth": 3, "heads": 2, "mlp_ratio": 4, "out_dim": 48},
    "decode_task_layer": {"hidden": 64, "out": 48, "act": "tanh"},
    "pixel_decoder": {
        "ch": 32,
        "ch_mult": [1, 1, 2, 2, 2],
        "num_res_blocks": 2,
        "z_channels": 32,
        "attn_at_coarsest_level": True,
    },
    # extras (not in the fixture block)
    "teacher": {
        "kind": "clip_vit",
        "input_resolution": 64,
        "patch_size": 16,
        "width": 64,
        "layers": 2,
        "heads": 2,
        "proj_dim": 48,
        "normalize": "clip",
    },
}

_CLIP_B16 = {
    "kind": "clip_vit",
    "input_resolution": 224,
    "patch_size": 16,
    "width": 768,
    "layers": 12,
    "heads": 12,
    "act": "quick_gelu",
    "class_token": True,
}
_SIGLIP_SO400M = {
    "kind": "siglip_vit",
    "input_resolution": 384,
    "patch_size": 14,
    "width": 1152,
    "layers": 27,
    "heads": 16,
    "mlp_dim": 4304,
    "output_layer": -2,
}
# timm `vitamin_xlarge_256` with head/fc_norm deleted: `norm` is Identity, no positional table.
_VITAMIN_XL = {
    "kind": "vitamin",
    "input_resolution": 256,
    "stem_width": 192,
    "stage_widths": [192, 384],
    "stage_depths": [2, 4],
    "mbconv_expand_ratio": 4.0,
    "vit_width": 1152,
    "vit_depth": 32,
    "vit_heads": 16,
    "mlp_ratio": 2.0,
    "final_norm": False,
}
_PIX_ENC = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256, "attn_at_last_level": True}
_PIX_DEC = {
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "z_channels": 256,
    "attn_at_coarsest_level": True,
}
_QUANT = {"codebook_size": 32768, "semantic_dim": 32, "pixel_dim": 8, "w_dis": 1.0, "beta": 0.25, "l2_norm": True}


def _semantic_heads(width: int, teacher_dim: int) -> dict:
    """encode_task_layer (width -> 32), BEiT semantic decoder (3 blocks, 12 heads) and decode_task_layer
    (width -> teacher_dim): the same structure for every semantic tower."""
    return {
        "encode_task_layer": {"hidden": width, "out": 32, "act": "tanh"},
        "semantic_decoder": {"embed_dim": width, "depth": 3, "heads": 12, "mlp_ratio": 4, "out_dim": teacher_dim},
        "decode_task_layer": {"hidden": width, "out": teacher_dim, "act": "tanh"},
    }


_CLIPB_224 = {
    # tokenflow/tokenizer/vq_model.py:113-161 (teacher 'clipb_224')
    "teacher_branch": "clipb_224",
    "image_size": 224,
    "scales": [1, 2, 4, 6, 8, 10, 12, 14],
    "infer_interpolate": False,
    "semantic_encoder": dict(_CLIP_B16),
    **_semantic_heads(768, 512),
    "pixel_encoder": dict(_PIX_ENC),
    "quantizer": dict(_QUANT),
    "pixel_decoder": dict(_PIX_DEC),
    "teacher": dict(_CLIP_B16, proj_dim=512, normalize="clip"),
}

_PRESETS: dict[str, dict] = {
    "tiny": _TINY,
    "clipb_224": _CLIPB_224,
    # Released T2I tokenizer geometry at 256 px (positional tables interpolated 14 -> 16, 817 tokens).
    "clipb_256": dict(
        copy.deepcopy(_CLIPB_224), image_size=256, infer_interpolate=True, scales=[1, 2, 4, 6, 8, 10, 12, 14, 16]
    ),
    # tokenflow_clipb_32k_enhanced.pt: same, with the "enhanced" pixel decoder (ch 256, 4+1 res blocks per level).
    "clipb_256_enhanced": dict(
        copy.deepcopy(_CLIPB_224),
        image_size=256,
        infer_interpolate=True,
        scales=[1, 2, 4, 6, 8, 10, 12, 14, 16],
        pixel_decoder=dict(_PIX_DEC, ch=256, num_res_blocks=4),
    ),
    # tokenflow_siglip_32k.pt (I2T): SigLIP-so400m/14 student (hidden_states[-2]), 27x27 grid, 2227 tokens.
    "siglip_384": {
        "teacher_branch": "siglip_384",
        "image_size": 384,
        "pixel_image_size": 432,  # the pixel CNN sees a 432 px bicubic resize (27 x 16), decoded back to 384
        "scales": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27],
        "infer_interpolate": False,
        "semantic_encoder": dict(_SIGLIP_SO400M, input_scaling="siglip"),
        **_semantic_heads(1152, 1152),
        "pixel_encoder": dict(_PIX_ENC),
        "quantizer": dict(_QUANT, token_chunk=1024),
        "pixel_decoder": dict(_PIX_DEC),
        "teacher": dict(_SIGLIP_SO400M, normalize="siglip"),
    },
    # The paper's third semantic encoder (no released checkpoint): ViTamin-XL/16 student at 256 px with CLIP
    # mean/std input (ScalingLayerForClip), a frozen ViTamin-XL teacher (`forward_features`, CLIP mean/std), 16x16
    # grid, 817 tokens, D = 1152 for the task layers and the BEiT decoder (vq_model.py:162-166, 187-198).
    "vitamin_xlarge_256": {
        "teacher_branch": "vitamin_xlarge_256",
        "image_size": 256,
        "scales": [1, 2, 4, 6, 8, 10, 12, 14, 16],
        "infer_interpolate": False,
        "semantic_encoder": dict(_VITAMIN_XL, input_scaling="clip"),
        **_semantic_heads(1152, 1152),
        "pixel_encoder": dict(_PIX_ENC),
        "quantizer": dict(_QUANT),
        "pixel_decoder": dict(_PIX_DEC),
        "teacher": dict(_VITAMIN_XL, normalize="clip"),
    },
}


def tokenflow_model_config(name: str) -> dict:
    """A deep copy of a preset config: 'tiny' (= the parity fixture), 'clipb_224', 'clipb_256',
    'clipb_256_enhanced', 'siglip_384', 'vitamin_xlarge_256'."""
    if name not in _PRESETS:
        raise ValueError(f"unknown TokenFlow model config {name!r}; available: {sorted(_PRESETS)}")
    return copy.deepcopy(_PRESETS[name])


def _to_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    out = {}
    for k, v in dict(cfg).items():
        out[k] = _to_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
    return out


def normalize_config(cfg: Mapping[str, Any] | str) -> dict:
    """Fill defaults and validate a TokenFlow config (fixture `model_config` blocks are accepted as is)."""
    if isinstance(cfg, str):
        return tokenflow_model_config(cfg)
    c = _to_dict(cfg)
    c.pop("_doc", None)
    required = [
        "image_size",
        "scales",
        "semantic_encoder",
        "encode_task_layer",
        "pixel_encoder",
        "quantizer",
        "semantic_decoder",
        "decode_task_layer",
        "pixel_decoder",
    ]
    missing = [k for k in required if k not in c]
    if missing:
        raise ValueError(f"TokenFlow config is missing {missing}")
    c.setdefault("infer_interpolate", False)
    c.setdefault("dtype", "float32")
    c.setdefault("scale_drop_prob", 0.1)
    c.setdefault("pixel_image_size", None)
    if c["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {c['dtype']!r}; available: {sorted(DTYPES)}")
    for blk in ("encode_task_layer", "decode_task_layer"):
        if c[blk].get("act", "tanh") != "tanh":
            raise ValueError(f"{blk}.act must be 'tanh' (the only official choice)")
    if "w_dis" in c:  # top-level override
        c["quantizer"]["w_dis"] = c["w_dis"]
    if not c["quantizer"].get("l2_norm", True):
        raise ValueError("quantizer.l2_norm=False is not supported (TokenFlow always normalises)")
    se = dict(c["semantic_encoder"])
    c["semantic_encoder"] = se
    se.setdefault("input_scaling", "none")
    if se["input_scaling"] not in INPUT_SCALINGS:
        raise ValueError(
            f"semantic_encoder.input_scaling must be one of {list(INPUT_SCALINGS)}, got {se['input_scaling']!r}"
        )
    if se.get("kind", "clip_vit") not in SEMANTIC_ENCODER_KINDS:
        raise ValueError(f"unknown semantic_encoder.kind {se.get('kind')!r}; available: {list(SEMANTIC_ENCODER_KINDS)}")
    return c


# How the student's pixels are scaled (official `scaling_layer`): 'none' = raw [-1, 1] (CLIP student),
# 'siglip' = clamp to [-1, 1] (ScalingLayerForSigLip), 'clip' = CLIP mean/std (ScalingLayerForClip, ViTamin).
INPUT_SCALINGS = ("none", "siglip", "clip")
SEMANTIC_ENCODER_KINDS = ("clip_vit", "siglip_vit", "vitamin")
