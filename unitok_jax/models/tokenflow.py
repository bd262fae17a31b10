"""TokenFlow (arXiv 2412.03069): dual-encoder tokenizer with a shared-index dual codebook and multi-scale residual VQ.

Pipeline (NHWC, images in [-1, 1]):
  semantic ViT (CLIP / SigLIP / ViTamin) -> encode_task_layer -> 32-d map  \\
                                                                    concat (40-d) -> multi-scale residual VQ over
  pixel CNN (LlamaGen VQ-16) -> quant_conv -> 8-d map             /  one shared index space (semantic + pixel rows)
  final_quantize[..., :32] -> BEiT decoder -> decode_task_layer -> sem_rec (distilled to a frozen teacher, cosine)
  final_quantize[..., 32:] -> post_quant_conv -> CNN decoder -> pix_rec

This module also holds the config presets (`tokenflow_model_config`), the official training hyper-parameters
(`TOKENFLOW_TRAIN_RECIPES`) and the frozen teacher (`Teacher`). Its weight loaders (`load_teacher`,
`load_semantic_encoder`, `load_tokenflow`) are in `convert/tokenflow.py`, its distillation loss in
`losses/distillation.py`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_collections

from unitok_jax.models import layers as L
from unitok_jax.models.beit_decoder import BeitDecoder
from unitok_jax.models.bicubic import bicubic_resize
from unitok_jax.models.clip_vit import CLIPViT, TaskLayer, ViTConfig
from unitok_jax.models.residual_quantizer import MultiScaleResidualQuantizer
from unitok_jax.models.shared_quantizer import SharedDualCodebookQuantizer
from unitok_jax.models.vitamin_semantic import ViTaminSemantic, ViTaminSemanticConfig
from unitok_jax.models.vqgan_cnn import Decoder, Encoder

# CLIP's pixel statistics (the frozen teacher; the CLIP *student* sees raw [-1, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

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
# timm `vitamin_xlarge_256` with head/fc_norm deleted (spec §2.2): `norm` is Identity, no positional table.
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
    (width -> teacher_dim): the same structure for every semantic tower (spec §2.3, §4.1)."""
    return {
        "encode_task_layer": {"hidden": width, "out": 32, "act": "tanh"},
        "semantic_decoder": {"embed_dim": width, "depth": 3, "heads": 12, "mlp_ratio": 4, "out_dim": teacher_dim},
        "decode_task_layer": {"hidden": width, "out": teacher_dim, "act": "tanh"},
    }


_CLIPB_224 = {
    # tokenflow/tokenizer/vq_model.py:113-161 (teacher 'clipb_224'), spec §1-§4.
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

# Official TokenFlow training hyper-parameters (reference/tokenflow_spec.md §5 "Losses" and §6 "Training recipe",
# from tokenflow/tokenizer/vq_train.py, vq_loss.py and tokenflow/scripts/*.sh). Values marked "inferred" are
# not in the code: the released weights were trained on ~100M LAION+COYO samples (issue #19) and the global batch
# of 256 is implied by issue #22 (the scripts pass 32).
_BASE_RECIPE = {
    "optimizer": "adam",
    "learning_rate": 1e-4,
    "b1": 0.9,
    "b2": 0.95,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "grad_clip_norm": 1.0,
    "disc_grad_clip_norm": 1.0,
    "disc_optimizer": "adam",
    "disc_learning_rate": 1e-4,
    "disc_b1": 0.9,
    "disc_b2": 0.95,
    "global_batch_size": 256,  # inferred (issue #22); scripts: --global-batch-size 32
    "epochs": 100,
    "dataset": "imagenet2012_train",
    "augmentation": "random_crop_arr (short side to U[S, S/0.8], random SxS crop) + horizontal flip -> [-1, 1]",
    "rec_loss": "l2",
    "rec_weight": 1.0,
    "perceptual_loss": "lpips_vgg16",
    "perceptual_weight": 1.0,
    "lpips_dropout": True,
    "disc": "patchgan_nlayer3_bn",
    "disc_loss": "hinge",
    "gen_adv_loss": "hinge",
    "disc_weight": 0.5,
    "disc_start": 20000,
    "adaptive_disc_weight": False,
    "codebook_beta": 0.25,
    "entropy_ratio": 0.0,
    "codebook_weight": 1.0,  # codebook_weight is never applied
    "sem_distill_loss": "cosine",
    "sem_distill_weight": 1.0,
    "scale_drop_prob": 0.1,
    "ema": False,
    "mixed_precision": "fp16 (official); bf16 suggested",
    "ckpt_every_steps": 5000,
    "log_every_steps": 100,
}
TOKENFLOW_TRAIN_RECIPES: dict[str, dict] = {
    "clipb_224": dict(_BASE_RECIPE, model="clipb_224", image_size=224, teacher_normalize="clip"),
    "vitamin_xlarge_256": dict(_BASE_RECIPE, model="vitamin_xlarge_256", image_size=256, teacher_normalize="clip"),
    "siglip_384": dict(_BASE_RECIPE, model="siglip_384", image_size=384, teacher_normalize="siglip"),
    # Stage 3 (scripts/train_vq_finetune_enhanced_decoder.sh, spec §4.3): only `decoder.*` trains (Adam over the
    # pixel decoder), the enhanced decoder starts from random init, everything else frozen, model in train mode
    # (scale drop still on), GAN active from the first step (steps restored > 20000; reset steps explicitly).
    "clipb_224_enhanced_decoder_finetune": dict(
        _BASE_RECIPE,
        model="clipb_256_enhanced",
        image_size=224,
        trainable_regex=r"^decoder/",
        init_from="base",
        disc_start=0,
    ),
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
    if c["dtype"] not in _DTYPES:
        raise ValueError(f"unknown dtype {c['dtype']!r}; available: {sorted(_DTYPES)}")
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


def clip_normalize(images: jax.Array) -> jax.Array:
    """[-1, 1] images -> CLIP mean/std normalised, after clamping to [0, 1] (the official ScalingLayerForClip)."""
    x01 = jnp.clip((images.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
    return (x01 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def semantic_vit(cfg: Mapping[str, Any], *, rngs, dtype=jnp.float32) -> nnx.Module:
    """The semantic tower for `cfg['kind']`: CLIPViT ('clip_vit', 'siglip_vit') or ViTaminSemantic ('vitamin').
    Both return `(tokens [b, n, width], aux)` and expose `.cfg` with `kind`, `width` and `grid`."""
    cfg = dict(cfg)
    if cfg.get("kind", "clip_vit") == "vitamin":
        return ViTaminSemantic(ViTaminSemanticConfig.from_dict(cfg), rngs=rngs, dtype=dtype)
    return CLIPViT(ViTConfig.from_dict(cfg), rngs=rngs, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class KeySeq:
    """Duck-typed stand-in for `nnx.Rngs` during construction: one draw from the caller's Rngs, then
    fold_in(key, i) per parameter with a Python counter. A real Rngs bumps a counter Variable per draw and, when
    construction is traced (jit / eval_shape), flax compares the traced counter's `.sharding`, whose error path
    walks the whole trace: init becomes quadratic (~15 s for the tiny model). Flax layers only call
    `rngs.params()` at construction, which this provides."""

    def __init__(self, key: jax.Array):
        self._key = key
        self._count = 0

    def _next(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)

    params = dropout = default = _next

    def __call__(self) -> jax.Array:
        return self._next()


def _as_keyseq(rngs) -> "KeySeq":
    if isinstance(rngs, nnx.Rngs):
        return KeySeq(rngs.params())
    return rngs  # already a KeySeq-like object (e.g. the converter's shape-only stand-in)


class TokenFlow(nnx.Module):
    """`TokenFlow(cfg, *, rngs)`; see the module docstring. All image tensors are NHWC in [-1, 1].

    Attribute names follow the official state-dict prefixes (encoder_vqkd, encode_task_layer, encoder, quant_conv,
    quantize, decoder_vqkd, decode_task_layer, post_quant_conv, decoder) so the converter is mechanical.
    """

    def __init__(self, cfg: Mapping[str, Any] | str, *, rngs: nnx.Rngs):
        cfg = normalize_config(cfg)
        rngs = _as_keyseq(rngs)
        # Frozen (hashable) like UniTok's: the graphdef is then hashable, so jitted functions cache by value.
        self.config = ml_collections.FrozenConfigDict(cfg)
        dtype = _DTYPES[cfg["dtype"]]
        self.dtype = dtype
        se_cfg = {k: v for k, v in cfg["semantic_encoder"].items() if k != "input_scaling"}
        self.encoder_vqkd = semantic_vit(se_cfg, dtype=dtype, rngs=rngs)
        self.vit_cfg = self.encoder_vqkd.cfg
        et = cfg["encode_task_layer"]
        q = cfg["quantizer"]
        if et["out"] != q["semantic_dim"]:
            raise ValueError(f"encode_task_layer.out ({et['out']}) != quantizer.semantic_dim ({q['semantic_dim']})")
        self.encode_task_layer = TaskLayer(self.vit_cfg.width, et["hidden"], et["out"], dtype=dtype, rngs=rngs)
        pe = cfg["pixel_encoder"]
        self.encoder = Encoder(
            ch=pe["ch"],
            ch_mult=tuple(pe["ch_mult"]),
            num_res_blocks=pe["num_res_blocks"],
            z_channels=pe["z_channels"],
            attn_at_last_level=pe.get("attn_at_last_level", True),
            dtype=dtype,
            rngs=rngs,
        )
        self.quant_conv = L.conv2d(pe["z_channels"], q["pixel_dim"], 1, padding=0, dtype=dtype, rngs=rngs)
        # `quantize` = multi-scale residual loop around the shared dual codebook (official prefix `quantize.`).
        self.quantize = MultiScaleResidualQuantizer(
            SharedDualCodebookQuantizer(
                q["codebook_size"],
                q["semantic_dim"],
                q["pixel_dim"],
                w_dis=q.get("w_dis", 1.0),
                beta=q.get("beta", 0.25),
                entropy_ratio=q.get("entropy_ratio", 0.0),
                token_chunk=q.get("token_chunk"),
                rngs=rngs,
            ),
            cfg["scales"],
            scale_drop_prob=cfg["scale_drop_prob"],
        )
        sd = cfg["semantic_decoder"]
        self.decoder_vqkd = BeitDecoder(
            in_chans=q["semantic_dim"],
            embed_dim=sd["embed_dim"],
            depth=sd["depth"],
            heads=sd["heads"],
            mlp_ratio=sd.get("mlp_ratio", 4),
            grid=sd.get("grid", self.vit_cfg.grid),
            dtype=dtype,
            rngs=rngs,
        )
        dt = cfg["decode_task_layer"]
        self.decode_task_layer = TaskLayer(sd["embed_dim"], dt["hidden"], dt["out"], dtype=dtype, rngs=rngs)
        pd = cfg["pixel_decoder"]
        self.post_quant_conv = L.conv2d(q["pixel_dim"], pd["z_channels"], 1, padding=0, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(
            ch=pd["ch"],
            ch_mult=tuple(pd["ch_mult"]),
            num_res_blocks=pd["num_res_blocks"],
            z_channels=pd["z_channels"],
            attn_at_coarsest_level=pd.get("attn_at_coarsest_level", True),
            dtype=dtype,
            rngs=rngs,
        )

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def scales(self) -> tuple[int, ...]:
        return self.quantize.scales

    @property
    def num_tokens(self) -> int:
        return self.quantize.num_tokens

    @property
    def codebook(self) -> SharedDualCodebookQuantizer:
        return self.quantize.quantizer

    @property
    def semantic_dim(self) -> int:
        return self.quantize.quantizer.semantic_dim

    # -- encoder ---------------------------------------------------------------------------------------------
    def encode_features(self, images: jax.Array, *, return_intermediates: bool = False) -> tuple[jax.Array, dict]:
        """images [b, H, W, 3] -> h [b, g, g, sem+pix] (un-normalised concat of both streams)."""
        cfg = self.config
        interp = bool(cfg["infer_interpolate"])
        sem_in = images
        scaling = cfg["semantic_encoder"]["input_scaling"]
        if scaling == "siglip":
            sem_in = jnp.clip(images, -1.0, 1.0)  # ScalingLayerForSigLip: identity with a clamp
        elif scaling == "clip":
            sem_in = clip_normalize(images)
        tokens, vaux = self.encoder_vqkd(sem_in, interpolate=interp)
        b, n, _ = tokens.shape
        g = int(round(np.sqrt(n)))
        sem = self.encode_task_layer(tokens).reshape(b, g, g, -1)
        pix_in = images
        if cfg.get("pixel_image_size"):
            s = cfg["pixel_image_size"]
            pix_in = bicubic_resize(images.astype(jnp.float32), s).astype(images.dtype)
        enc = self.encoder(pix_in, return_intermediates=return_intermediates)
        pix_enc, einter = enc if return_intermediates else (enc, {})
        pix = self.quant_conv(pix_enc)
        if pix.shape[1:3] != sem.shape[1:3]:
            raise ValueError(f"semantic grid {sem.shape[1:3]} != pixel grid {pix.shape[1:3]}")
        h = jnp.concatenate([sem.astype(jnp.float32), pix.astype(jnp.float32)], axis=-1)
        inter = {}
        if return_intermediates:
            inter = {"sem_vit_tokens": tokens, "sem_feat": sem, "pix_enc": pix_enc, "pix_feat": pix, "h": h}
            if "pos_embed_used" in vaux:  # ViTamin has no positional table
                inter["clip_pos_embed_used"] = vaux["pos_embed_used"]
            inter.update({f"pix_enc_{k}": v for k, v in einter.items()})
        return h, inter

    def encode(
        self,
        images: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_intermediates: bool = False,
        log_distance_norms: bool = False,
    ) -> tuple[jax.Array, dict]:
        """images -> (final_quantize [b, F, F, 40], aux) with the quantizer's aux (indices, losses, usage)."""
        key = None
        if not deterministic and self.quantize.scale_drop_prob > 0:
            if rngs is None:
                raise ValueError("TokenFlow.encode(deterministic=False) with scale drop needs rngs")
            key = rngs.dropout()
        h, inter = self.encode_features(images, return_intermediates=return_intermediates)
        f, qaux = self.quantize(
            h,
            deterministic=deterministic,
            key=key,
            return_intermediates=return_intermediates,
            log_distance_norms=log_distance_norms,
        )
        qaux.update(inter)
        return f, qaux

    # -- decoders --------------------------------------------------------------------------------------------
    def decode_semantic(self, quant_sem: jax.Array) -> tuple[jax.Array, dict]:
        tokens, daux = self.decoder_vqkd(quant_sem, interpolate=bool(self.config["infer_interpolate"]))
        return self.decode_task_layer(tokens).astype(jnp.float32), {
            "sem_dec_tokens": tokens,
            "sem_dec_pos_embed_used": daux["pos_embed_used"],
        }

    def decode_pixel(self, quant_pix: jax.Array) -> tuple[jax.Array, dict]:
        post = self.post_quant_conv(quant_pix.astype(self.dtype))
        rec, inter = self.decoder(post, return_intermediates=True)
        if self.config.get("pixel_image_size"):
            rec = bicubic_resize(rec, self.config["image_size"])
        out = {"post_quant": post, "decoder_last_input": inter.pop("last_input")}
        out.update({f"pix_dec_{k}": v for k, v in inter.items()})
        return rec, out

    def decode(self, final_quantize: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        """final_quantize [b, F, F, 40] -> (sem_rec [b, F*F, teacher_dim], pix_rec [b, H, W, 3], aux)."""
        d = self.semantic_dim
        sem_rec, saux = self.decode_semantic(final_quantize[..., :d])
        pix_rec, paux = self.decode_pixel(final_quantize[..., d:])
        saux.update(paux)
        return sem_rec, pix_rec, saux

    @property
    def cfg(self) -> dict:
        """The normalised config as a plain nested dict (official naming; what `normalize_config` returns)."""
        return normalize_config(self.config)

    # -- the Tokenizer interface (models/tokenizer.py) -------------------------------------------------------
    takes_text = False  # no text tower: the semantic branch is distilled from a frozen teacher instead
    has_clip_head = False

    @property
    def last_decoder_conv(self) -> nnx.Conv:
        """The pixel decoder's `conv_out`: the layer whose gradient norms give the adaptive GAN weight."""
        return self.decoder.conv_out

    @property
    def code_layout(self) -> tuple[int, int]:
        return 1, int(self.config["quantizer"]["codebook_size"])  # one index space shared by both halves

    def codes(self, aux) -> jax.Array:
        return aux["indices"][:, None, :]  # [b, tokens of all scales] -> [b, 1, tokens]

    def clip_pair(self, aux):
        del aux
        return None

    def extra_losses(self, aux) -> dict:
        return {"commit": aux["commit_loss"]}  # the official code reports codebook and commitment terms apart

    # -- full forward ----------------------------------------------------------------------------------------
    def __call__(
        self,
        images: jax.Array,
        text_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_intermediates: bool = False,
        log_distance_norms: bool = False,
    ) -> tuple[jax.Array, dict]:
        """images [b, H, W, 3] -> (pix_rec [b, H, W, 3] (not clipped), aux). `text_ids` is ignored (no text tower;
        accepted so every tokenizer is called the same way).

        aux: 'indices' [b, total_tokens], 'indices_per_scale', 'vq_loss', 'commit_loss', 'entropy_loss',
        'codebook_counts', 'codebook_usage', 'codebook_perplexity', 'sem_rec' [b, n, teacher_dim],
        'final_quantize' [b, F, F, 40], 'quant_sem', 'quant_pix', 'decoder_last_input', 'post_quant',
        plus intermediates when asked.
        """
        del text_ids
        f, aux = self.encode(
            images,
            deterministic=deterministic,
            rngs=rngs,
            return_intermediates=return_intermediates,
            log_distance_norms=log_distance_norms,
        )
        sem_rec, pix_rec, daux = self.decode(f)
        d = self.semantic_dim
        aux.update(final_quantize=f, quant_sem=f[..., :d], quant_pix=f[..., d:], sem_rec=sem_rec)
        if return_intermediates:
            aux.update(daux)
        else:
            aux.update(decoder_last_input=daux["decoder_last_input"], post_quant=daux["post_quant"])
        return pix_rec, aux

    # -- index interface -------------------------------------------------------------------------------------
    def img_to_idx(self, images: jax.Array) -> jax.Array:
        """images [b, H, W, 3] -> int32 [b, total_tokens] (eval mode, coarse -> fine)."""
        h, _ = self.encode_features(images)
        _, aux = self.quantize(h, deterministic=True)
        return aux["indices"]

    def indices_to_quant(self, indices: jax.Array) -> jax.Array:
        return self.quantize.indices_to_quant(indices)

    def decode_code(self, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        """int [b, total_tokens] (or a prefix of whole scales) -> (sem_rec, pix_rec [b, H, W, 3])."""
        sem_rec, pix_rec, _ = self.decode(self.indices_to_quant(indices))
        return sem_rec, pix_rec

    def idx_to_img(self, indices: jax.Array) -> jax.Array:
        """int [b, total_tokens] -> images [b, H, W, 3] clipped to [-1, 1]."""
        _, pix_rec = self.decode_code(indices)
        return jnp.clip(pix_rec, -1.0, 1.0)


def create_tokenflow(cfg: Mapping[str, Any] | str, seed: int = 0) -> TokenFlow:
    """Random-init TokenFlow (official initializers) with the whole initialisation compiled as one program
    (eager init dispatches and compiles every initializer separately). On CPU the threefry-heavy init program
    itself takes ~15-40 s to compile; tests use `random_tokenflow` instead."""
    cfg = normalize_config(cfg)
    return nnx.jit(lambda: TokenFlow(cfg, rngs=nnx.Rngs(seed)))()


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` inside `nnx.eval_shape`: every stream returns the same key, nothing is counted
    (shapes only; see `KeySeq` for why a real Rngs is slow under tracing)."""

    def __init__(self):
        self._key = jax.random.key(0)

    def _draw(self) -> jax.Array:
        return self._key

    params = dropout = default = _draw

    def __call__(self) -> jax.Array:
        return self._key


def abstract_tokenflow(cfg: Mapping[str, Any] | str) -> TokenFlow:
    """A TokenFlow whose params are ShapeDtypeStructs (no init compute); fill them with the converter or
    `numpy_fill_`."""
    cfg = normalize_config(cfg)
    return nnx.eval_shape(lambda: TokenFlow(cfg, rngs=ShapeOnlyRngs()))


def numpy_fill_(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fill every Param of `module` (abstract or not) in place from a host numpy RNG: fast, for tests and smoke
    runs, NOT the official init distributions. Kernels ~ N(0, 1/fan_in), norm scales 1 + 0.1 N, codebook rows
    N(0, 1), positional/class tables 0.02 N, other vectors (biases) 0.05 N, CLIP `proj` N(0, 1/rows)."""
    rng = np.random.default_rng(seed)
    _, params = nnx.split(module, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        shape = tuple(var.get_value().shape)
        name = path[-1]
        if name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(int(np.prod(shape[:-1])))
        elif name == "scale":
            v = 1.0 + 0.1 * rng.normal(size=shape)
        elif name in ("embedding_sem", "embedding_pix", "codebooks"):
            v = rng.normal(size=shape)
        elif name in ("positional_embedding", "pos_embed", "cls_token", "class_embedding"):
            v = 0.02 * rng.normal(size=shape)
        elif name == "proj":
            v = rng.normal(size=shape) / np.sqrt(shape[0])
        else:
            v = 0.05 * rng.normal(size=shape)
        var.set_value(jnp.asarray(v, jnp.float32))
    return module


def random_tokenflow(cfg: Mapping[str, Any] | str, seed: int = 0) -> TokenFlow:
    """`numpy_fill_(abstract_tokenflow(cfg), seed)`: a random TokenFlow in about a second."""
    return numpy_fill_(abstract_tokenflow(cfg), seed)


# ---------------------------------------------------------------------------------------------------------------
# Frozen teacher
# ---------------------------------------------------------------------------------------------------------------


class Teacher(nnx.Module):
    """Frozen semantic teacher: CLIP ViT (`ln_post(x)[:, 1:] @ proj`, CLIP mean/std input), SigLIP
    (hidden_states[-2]) or ViTamin (`forward_features`, CLIP mean/std input).
    `__call__(images [-1, 1]) -> [b, n, teacher_dim]` (wrapped in stop_gradient)."""

    def __init__(self, cfg: Mapping[str, Any], *, rngs: nnx.Rngs):
        cfg = dict(cfg)
        self.normalize = cfg.pop("normalize", "clip")
        if self.normalize not in ("clip", "siglip", "none"):
            raise ValueError(f"teacher normalize must be one of ['clip', 'siglip', 'none'], got {self.normalize!r}")
        self.interpolate = bool(cfg.pop("interpolate", True))
        self.vit = semantic_vit(cfg, rngs=_as_keyseq(rngs))

    def preprocess(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        if self.normalize == "clip":
            return clip_normalize(x)
        if self.normalize == "siglip":
            return jnp.clip(x, -1.0, 1.0)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        feats, _ = self.vit(self.preprocess(images), interpolate=self.interpolate)
        return jax.lax.stop_gradient(feats.astype(jnp.float32))
