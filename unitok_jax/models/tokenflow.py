"""TokenFlow (arXiv 2412.03069): dual-encoder tokenizer with a shared-index dual codebook and multi-scale residual VQ.

Pipeline (NHWC, images in [-1, 1]):
  semantic ViT (CLIP / SigLIP / ViTamin) -> encode_task_layer -> 32-d map  \\
                                                                    concat (40-d) -> multi-scale residual VQ over
  pixel CNN (LlamaGen VQ-16) -> quant_conv -> 8-d map             /  one shared index space (semantic + pixel rows)
  final_quantize[..., :32] -> BEiT decoder -> decode_task_layer -> sem_rec (distilled to a frozen teacher, cosine)
  final_quantize[..., 32:] -> post_quant_conv -> CNN decoder -> pix_rec

This module holds the model and the frozen teacher (`Teacher`). Its presets and config normalisation are in
`models/tokenflow_config.py`, the official training recipes in `configs/tokenflow.py`, its weight loaders (`load_teacher`,
`load_semantic_encoder`, `load_tokenflow`) are in `convert/tokenflow.py`, its distillation loss in
`losses/distillation.py`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_collections

from unitok_jax.models import layers as L
from unitok_jax.models.init_keys import ShapeOnlyRngs, as_keyseq, numpy_fill_
from unitok_jax.models.beit_decoder import BeitDecoder
from unitok_jax.models.bicubic import bicubic_resize
from unitok_jax.models.clip_vit import CLIPViT, TaskLayer, ViTConfig
from unitok_jax.models.residual_quantizer import MultiScaleResidualQuantizer
from unitok_jax.models.shared_quantizer import SharedDualCodebookQuantizer
from unitok_jax.models.vitamin_semantic import ViTaminSemantic, ViTaminSemanticConfig
from unitok_jax.models.tokenflow_config import DTYPES, normalize_config
from unitok_jax.models.vqgan_cnn import Decoder, Encoder

# CLIP's pixel statistics (the frozen teacher; the CLIP *student* sees raw [-1, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


class TokenFlow(nnx.Module):
    """`TokenFlow(cfg, *, rngs)`; see the module docstring. All image tensors are NHWC in [-1, 1].

    Attribute names follow the official state-dict prefixes (encoder_vqkd, encode_task_layer, encoder, quant_conv,
    quantize, decoder_vqkd, decode_task_layer, post_quant_conv, decoder) so the converter is mechanical.
    """

    def __init__(self, cfg: Mapping[str, Any] | str, *, rngs: nnx.Rngs):
        cfg = normalize_config(cfg)
        rngs = as_keyseq(rngs)
        # Frozen (hashable) like UniTok's: the graphdef is then hashable, so jitted functions cache by value.
        self.config = ml_collections.FrozenConfigDict(cfg)
        dtype = DTYPES[cfg["dtype"]]
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


def abstract_tokenflow(cfg: Mapping[str, Any] | str) -> TokenFlow:
    """A TokenFlow whose params are ShapeDtypeStructs (no init compute); fill them with the converter or
    `numpy_fill_`."""
    cfg = normalize_config(cfg)
    return nnx.eval_shape(lambda: TokenFlow(cfg, rngs=ShapeOnlyRngs()))


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
        self.vit = semantic_vit(cfg, rngs=as_keyseq(rngs))

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
