"""UniTok composite tokenizer (arXiv 2502.20321): ViTamin encoder → AttnProjection → multi-codebook quantizer →
AttnProjection → pixel decoder, plus a CLIP head on the quantized tokens and an OpenCLIP text tower.

The quant_proj → quantizer → post_quant_proj region always runs in float32 at HIGHEST matmul precision (the
official code disables autocast there; bf16/TF32 would flip code assignments). Everything else uses the
configured compute dtype; parameters are always float32. Losses live in `unitok_jax.losses`, not here: the forward
returns the reconstruction and an aux dict carrying everything a loss or eval needs.

Config schema = the `model_config` block of tests/fixtures/unitok_tiny.json plus optional extras
(dtype, drop_path_rate, remat, scan_blocks); `model_config(name)` gives the released presets.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unitok_jax.models import layers as L
from unitok_jax.models.attn_projection import AttnProjection, check_attn_projection
from unitok_jax.models.mcq import MultiCodebookQuantizer
from unitok_jax.models.residual_quantizer import ResidualQuantizer
from unitok_jax.models.pixel_decoder import PixelDecoder
from unitok_jax.models.text_tower import TEXT_POOLS, TextTransformer, torch_default_uniform
from unitok_jax.models.vit import REMAT_POLICIES, InitKeys
from unitok_jax.models.vitamin import ViTaminEncoder
from unitok_jax.parallel import logical_axes as ax

HIGHEST = jax.lax.Precision.HIGHEST
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EXTRA_DEFAULTS = {"dtype": "float32", "drop_path_rate": 0.0, "remat": "none", "scan_blocks": False}


QUANTIZERS = {"mcq": MultiCodebookQuantizer, "rq": ResidualQuantizer.from_mcq_args}


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def _preset(
    *, image_size, stem, stages, vit_width, vit_depth, vit_heads, k, K, d, quant_heads, channel_table, embed_dim, text
):
    return {
        "image_size": image_size,
        "encoder": {
            "stem_width": stem,
            "stage_widths": list(stages),
            "stage_depths": [2, 4],
            "mbconv_expand_ratio": 4,
            "vit_width": vit_width,
            "vit_depth": vit_depth,
            "vit_heads": vit_heads,
            "mlp": "geglu",
            "mlp_ratio": 2,
            "pos_embed": "none",
        },
        "quant_proj": {
            "in_dim": vit_width,
            "out_dim": k * d,
            "heads": quant_heads,
            "head_reduction": "mean",
            "causal": False,
        },
        "quantizer": {
            "type": "mcq",
            "num_codebooks": k,
            "codebook_size": K,
            "codebook_dim": d,
            "beta": 0.25,
            "l2_norm": True,
        },
        "post_quant_proj": {
            "in_dim": k * d,
            "out_dim": vit_width,
            "heads": quant_heads,
            "head_reduction": "concat",
            "causal": False,
        },
        "decoder": {
            "vit_width": vit_width,
            "vit_depth": vit_depth,
            "vit_heads": vit_heads,
            "channel_table": list(channel_table),
            "inv_mbconv_depths": [4, 2],
            "mbconv_expand_ratio": 4,
        },
        "clip": {"embed_dim": embed_dim, "logit_scale_max": math.log(100.0)},
        "text": text,
    }


_OPENCLIP_TEXT = {
    "width": 768,
    "layers": 12,
    "heads": 12,
    "context_length": 77,
    "vocab_size": 49408,
    "causal": True,
    "pool": "argmax_eot",
}

PRESETS: dict[str, dict] = {
    # Paper / released checkpoint: 820,298,692 parameters incl. the frozen zero encoder pos_embed.
    "vitamin_large": _preset(
        image_size=256,
        stem=160,
        stages=(160, 320),
        vit_width=1024,
        vit_depth=31,
        vit_heads=16,
        k=8,
        K=4096,
        d=8,
        quant_heads=16,
        channel_table=(1024, 320, 160),
        embed_dim=768,
        text=_OPENCLIP_TEXT,
    ),
    # Smaller variant present in the official code (317,502,660 parameters); not used for released results.
    "vitamin_base": _preset(
        image_size=256,
        stem=128,
        stages=(128, 256),
        vit_width=768,
        vit_depth=14,
        vit_heads=12,
        k=8,
        K=4096,
        d=8,
        quant_heads=12,
        channel_table=(768, 256, 128),
        embed_dim=768,
        text=_OPENCLIP_TEXT,
    ),
    # = tests/fixtures/unitok_tiny.json `model_config` (CI size).
    "tiny": _preset(
        image_size=64,
        stem=32,
        stages=(32, 64),
        vit_width=128,
        vit_depth=2,
        vit_heads=4,
        k=4,
        K=64,
        d=4,
        quant_heads=8,
        channel_table=(128, 64, 32),
        embed_dim=32,
        text={
            "width": 64,
            "layers": 2,
            "heads": 4,
            "context_length": 77,
            "vocab_size": 49408,
            "causal": True,
            "pool": "argmax_eot",
        },
    ),
}


def model_config(name: str) -> ml_collections.ConfigDict:
    """A released preset ('vitamin_large', 'vitamin_base') or 'tiny', as a ConfigDict with the extras filled in."""
    if name not in PRESETS:
        raise ValueError(f"unknown UniTok preset {name!r}; available: {sorted(PRESETS)}")
    return normalize_config(PRESETS[name])


def _to_plain(obj):
    if isinstance(obj, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def normalize_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Accept a dict / ConfigDict (e.g. the fixture JSON block; keys starting with '_' are dropped), fill the optional
    extras, validate and return a ConfigDict."""
    plain = copy.deepcopy(_to_plain(cfg))
    for key, value in EXTRA_DEFAULTS.items():
        plain.setdefault(key, value)
    plain.setdefault("text", None)
    if isinstance(plain.get("quantizer"), dict):  # configs from before the switch (and the fixtures) mean MCQ
        plain["quantizer"].setdefault("type", "mcq")
    out = ml_collections.ConfigDict(plain)
    validate_config(out)
    return out


# Every accepted field (optional ones included); anything else is reported as a likely typo.
SCHEMA = {
    "": {
        "image_size",
        "encoder",
        "quant_proj",
        "quantizer",
        "post_quant_proj",
        "decoder",
        "clip",
        "text",
        *EXTRA_DEFAULTS,
    },
    "encoder": {
        "stem_width",
        "stage_widths",
        "stage_depths",
        "mbconv_expand_ratio",
        "vit_width",
        "vit_depth",
        "vit_heads",
        "mlp",
        "mlp_ratio",
        "pos_embed",
    },
    "quant_proj": {"in_dim", "out_dim", "heads", "head_reduction", "causal"},
    "post_quant_proj": {"in_dim", "out_dim", "heads", "head_reduction", "causal"},
    "quantizer": {"type", "num_codebooks", "codebook_size", "codebook_dim", "beta", "l2_norm"},
    "decoder": {
        "vit_width",
        "vit_depth",
        "vit_heads",
        "channel_table",
        "inv_mbconv_depths",
        "mbconv_expand_ratio",
        "mlp_ratio",
    },
    "clip": {"embed_dim", "logit_scale_max"},
    "text": {"width", "layers", "heads", "context_length", "vocab_size", "causal", "pool", "mlp_ratio"},
}


def _check_fields(cfg) -> None:
    for block, allowed in SCHEMA.items():
        node = cfg if not block else cfg.get(block)
        if node is None:
            continue
        for key in node.keys():
            if key not in allowed:
                where = f"{block}.{key}" if block else key
                raise ValueError(f"model config: unknown field {where!r}; allowed: {sorted(allowed)}")


def _req(cfg, path: str):
    node = cfg
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"model config: missing field {path!r}") from None
    return node


def validate_config(cfg) -> None:
    """Raise ValueError naming the offending field(s) for any inconsistent UniTok config."""

    def fail(msg):
        raise ValueError(f"model config: {msg}")

    _check_fields(cfg)

    for path in (
        "image_size",
        "encoder.stem_width",
        "encoder.vit_width",
        "encoder.vit_depth",
        "encoder.vit_heads",
        "quantizer.num_codebooks",
        "quantizer.codebook_size",
        "quantizer.codebook_dim",
        "decoder.vit_width",
        "decoder.vit_depth",
        "decoder.vit_heads",
        "clip.embed_dim",
    ):
        v = _req(cfg, path)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if path.endswith("depth") else 1):
            fail(f"{path} must be a positive integer, got {v!r}")
    if cfg.quantizer.get("type", "mcq") not in QUANTIZERS:
        fail(f"quantizer.type={cfg.quantizer.type!r} is unknown; use one of {sorted(QUANTIZERS)}")
    if cfg.image_size % 16:
        fail(f"image_size={cfg.image_size} must be divisible by 16 (total downsampling)")
    enc = cfg.encoder
    if len(_req(cfg, "encoder.stage_widths")) != 2 or len(_req(cfg, "encoder.stage_depths")) != 2:
        fail(
            "encoder.stage_widths and encoder.stage_depths must have 2 entries (16x downsampling, matching the decoder)"
        )
    if any(d < 1 for d in enc.stage_depths):
        fail(f"encoder.stage_depths must be >= 1, got {list(enc.stage_depths)}")
    if enc.vit_width % enc.vit_heads:
        fail(f"encoder.vit_width={enc.vit_width} is not divisible by encoder.vit_heads={enc.vit_heads}")
    if enc.get("mlp", "geglu") != "geglu":
        fail(f"encoder.mlp must be 'geglu', got {enc.mlp!r}")
    if enc.get("pos_embed", "none") != "none":
        fail(f"encoder.pos_embed must be 'none' (UniTok has no positional embedding), got {enc.pos_embed!r}")
    q, qp, pq, dec = cfg.quantizer, cfg.quant_proj, cfg.post_quant_proj, cfg.decoder
    latent = q.num_codebooks * q.codebook_dim
    if qp.in_dim != enc.vit_width:
        fail(f"quant_proj.in_dim={qp.in_dim} must equal encoder.vit_width={enc.vit_width}")
    if qp.out_dim != latent:
        fail(
            f"quantizer.num_codebooks*codebook_dim={q.num_codebooks}*{q.codebook_dim}={latent} "
            f"!= quant_proj.out_dim={qp.out_dim}"
        )
    check_attn_projection(qp.in_dim, qp.out_dim, qp.heads, qp.get("head_reduction", "mean"), "quant_proj")
    if pq.in_dim != latent:
        fail(f"post_quant_proj.in_dim={pq.in_dim} must equal num_codebooks*codebook_dim={latent}")
    if pq.out_dim != dec.vit_width:
        fail(f"post_quant_proj.out_dim={pq.out_dim} must equal decoder.vit_width={dec.vit_width}")
    check_attn_projection(pq.in_dim, pq.out_dim, pq.heads, pq.get("head_reduction", "concat"), "post_quant_proj")
    if dec.vit_width % dec.vit_heads:
        fail(f"decoder.vit_width={dec.vit_width} is not divisible by decoder.vit_heads={dec.vit_heads}")
    if len(dec.channel_table) != 3:
        fail(f"decoder.channel_table must have 3 entries, got {list(dec.channel_table)}")
    if dec.channel_table[0] != dec.vit_width:
        fail(f"decoder.channel_table[0]={dec.channel_table[0]} must equal decoder.vit_width={dec.vit_width}")
    if len(dec.inv_mbconv_depths) != 2 or any(d < 1 for d in dec.inv_mbconv_depths):
        fail(f"decoder.inv_mbconv_depths must be 2 entries >= 1, got {list(dec.inv_mbconv_depths)}")
    if not 0.0 <= float(q.get("beta", 0.25)):
        fail(f"quantizer.beta must be >= 0, got {q.beta}")
    if float(cfg.clip.get("logit_scale_max", math.log(100.0))) < 0:
        fail("clip.logit_scale_max must be >= 0")
    text = cfg.get("text")
    if text is not None:
        for field in ("width", "layers", "heads", "context_length", "vocab_size"):
            v = _req(cfg, f"text.{field}")
            if not isinstance(v, int) or v < 1:
                fail(f"text.{field} must be a positive integer, got {v!r}")
        if text.width % text.heads:
            fail(f"text.width={text.width} is not divisible by text.heads={text.heads}")
        if text.get("pool", "argmax_eot") not in TEXT_POOLS:
            fail(f"text.pool must be one of {list(TEXT_POOLS)}, got {text.pool!r}")
    if cfg.dtype not in DTYPES:
        fail(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.remat not in REMAT_POLICIES:
        fail(f"remat must be one of {list(REMAT_POLICIES)}, got {cfg.remat!r}")
    if not 0.0 <= float(cfg.drop_path_rate) < 1.0:
        fail(f"drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class UniTok(nnx.Module):
    """UniTok tokenizer. Images are NHWC float32 in [-1, 1]; text ids (b, t) int.

    `rngs` initialises the parameters; when `drop_path_rate > 0` a 'dropout' stream forked from it is kept for
    stochastic depth (used only with deterministic=False; a per-call `rngs=` overrides it).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        cfg = normalize_config(cfg)
        drop_rngs = nnx.Rngs(dropout=rngs.dropout()) if cfg.drop_path_rate > 0 else None
        rngs = InitKeys.from_rngs(rngs)  # stateless key source: keeps traced init linear in model size
        self.config = ml_collections.FrozenConfigDict(cfg)
        dtype = DTYPES[cfg.dtype]
        self.dtype = dtype
        kw = dict(dtype=dtype, remat=cfg.remat, scan_blocks=bool(cfg.scan_blocks))
        self.encoder = ViTaminEncoder(cfg.encoder, drop_path_rate=cfg.drop_path_rate, rngs=rngs, **kw)
        qp, q, pq = cfg.quant_proj, cfg.quantizer, cfg.post_quant_proj
        # float32 + HIGHEST: the official code runs this region with autocast disabled.
        self.quant_proj = AttnProjection(
            qp.in_dim,
            qp.out_dim,
            qp.heads,
            head_reduction=qp.get("head_reduction", "mean"),
            causal=bool(qp.get("causal", False)),
            dtype=jnp.float32,
            precision=HIGHEST,
            rngs=rngs,
        )
        # 'mcq' (the paper) or 'rq' (the paper's ablation baseline: num_codebooks residual stages over the whole
        # num_codebooks*codebook_dim latent, same code width and number of codes); both share one call surface.
        self.quantizer = QUANTIZERS[q.get("type", "mcq")](
            q.num_codebooks,
            q.codebook_size,
            q.codebook_dim,
            beta=q.get("beta", 0.25),
            l2_norm=q.get("l2_norm", True),
            rngs=rngs,
        )
        self.post_quant_proj = AttnProjection(
            pq.in_dim,
            pq.out_dim,
            pq.heads,
            head_reduction=pq.get("head_reduction", "concat"),
            causal=bool(pq.get("causal", False)),
            dtype=jnp.float32,
            precision=HIGHEST,
            rngs=rngs,
        )
        self.decoder = PixelDecoder(
            cfg.decoder,
            mlp_ratio=cfg.decoder.get("mlp_ratio", cfg.encoder.mlp_ratio),
            drop_path_rate=cfg.drop_path_rate,
            rngs=rngs,
            **kw,
        )
        width, embed = cfg.post_quant_proj.out_dim, cfg.clip.embed_dim
        self.fc_norm = L.layer_norm(width, 1e-6, dtype=dtype, rngs=rngs)
        self.projection = L.dense(
            width,
            embed,
            axes=(ax.EMBED, None),
            dtype=dtype,
            kernel_init=torch_default_uniform(width),
            bias_init=torch_default_uniform(width),
            rngs=rngs,
        )
        self.text_encoder = (
            TextTransformer(cfg.text, embed, dtype=dtype, remat=cfg.remat, scan_blocks=bool(cfg.scan_blocks), rngs=rngs)
            if cfg.text is not None
            else None
        )
        init_scale = L.partitioned(lambda key, shape, dt: jnp.full(shape, math.log(1 / 0.07), dt), ())
        self.logit_scale = nnx.Param(init_scale(rngs.params(), (), jnp.float32))
        self.logit_scale_max = float(cfg.clip.get("logit_scale_max", math.log(100.0)))
        self.drop_rngs = drop_rngs

    # -- the Tokenizer interface (models/tokenizer.py) ----------------------------------------------------------
    has_clip_head = True

    @property
    def takes_text(self) -> bool:
        return self.text_encoder is not None

    @property
    def last_decoder_conv(self) -> nnx.Conv:
        """`decoder.up_conv4.conv2`: the layer whose gradient norms give the adaptive GAN weight."""
        return self.decoder.last_conv

    @property
    def code_layout(self) -> tuple[int, int]:
        q = self.config.quantizer
        return int(q.get("num_codebooks", 1)), int(q["codebook_size"])

    def codes(self, aux) -> jax.Array:
        return aux["indices"]  # [b, k, n]

    def clip_pair(self, aux):
        if aux.get("clip_text_features") is None:
            return None
        return aux["clip_image_features"], aux["clip_text_features"], aux["logit_scale"]

    def extra_losses(self, aux) -> dict:
        del aux
        return {}

    # -- pieces --------------------------------------------------------------------------------------------------

    def _rngs(self, rngs):
        return rngs if rngs is not None else self.drop_rngs

    def encode_tokens(self, images, *, deterministic=True, rngs=None, return_intermediates=False):
        """images → (encoder tokens float32 (b, n, d), grid (h, w), intermediates)."""
        tokens, grid, inter = self.encoder(
            images, deterministic=deterministic, rngs=self._rngs(rngs), return_intermediates=return_intermediates
        )
        return tokens.astype(jnp.float32), grid, inter

    def clip_image_head(self, post_quant, *, return_intermediates=False):
        """mean over tokens → fc_norm → projection → l2 (float32)."""
        pooled = jnp.mean(post_quant.astype(jnp.float32), axis=1)
        normed = self.fc_norm(pooled)
        proj = self.projection(normed)
        feats = L.l2_normalize(proj, axis=-1)
        if return_intermediates:
            return feats, {"clip_image_pooled": pooled, "clip_image_fc_norm": normed, "clip_image_proj": proj}
        return feats

    def get_logit_scale(self):
        """exp(logit_scale clamped to [0, logit_scale_max])."""
        return jnp.exp(jnp.clip(self.logit_scale[...], 0.0, self.logit_scale_max))

    def clip_features(self, images, text_ids, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        """`__call__`'s (clip_image_features, clip_text_features, logit_scale) without decoding the image.

        Same random draws as `__call__` for the same `rngs` (the encoder draws first there too; the text tower
        draws none), so full-batch gradient accumulation gets the CLIP pair from this cheaper pass.
        """
        tokens, _, _ = self.encode_tokens(images, deterministic=deterministic, rngs=self._rngs(rngs))
        quant, _ = self.quantizer(self.quant_proj(tokens))
        img_feats = self.clip_image_head(self.post_quant_proj(quant))
        raw, _ = self.text_encoder(text_ids)
        return img_feats, L.l2_normalize(raw, axis=-1), self.get_logit_scale()

    # -- training forward ----------------------------------------------------------------------------------------
    def __call__(
        self,
        images,
        text_ids=None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_intermediates: bool = False,
    ):
        """images (b, H, W, 3) [, text_ids (b, t)] → (rec (b, H, W, 3) float32 unclamped, aux dict).

        aux: indices (b,k,n) int32, vq_loss, codebook_counts (k,K), codebook_usage (k,) fraction,
        codebook_perplexity (k,), encoder_tokens, z, z_normalized, quant, post_quant, decoder_last_input,
        clip_image_features (b,e), clip_text_features (b,e) or None, logit_scale (= exp of the clamped param);
        with return_intermediates also 'intermediates' (fixture-named activations, NHWC maps).
        """
        rngs = self._rngs(rngs)
        tokens, grid, enc_inter = self.encode_tokens(
            images, deterministic=deterministic, rngs=rngs, return_intermediates=return_intermediates
        )
        z, qp_inter = self.quant_proj(tokens, return_intermediates=True)
        quant, qaux = self.quantizer(z)
        post, pq_inter = self.post_quant_proj(quant, return_intermediates=True)
        rec, last_input, dec_inter = self.decoder(
            post, grid, deterministic=deterministic, rngs=rngs, return_intermediates=return_intermediates
        )
        img_feats, head_inter = self.clip_image_head(post, return_intermediates=True)
        txt_feats, txt_inter = None, None
        if text_ids is not None:
            if self.text_encoder is None:
                raise ValueError("text_ids given but the model was built without a text tower (config.text is None)")
            raw, txt_inter = self.text_encoder(text_ids, return_intermediates=return_intermediates)
            txt_feats = L.l2_normalize(raw, axis=-1)
        aux = {
            "indices": qaux["indices"],
            "vq_loss": qaux["loss"],
            "codebook_counts": qaux["counts"],
            "codebook_usage": qaux["usage"],
            "codebook_perplexity": qaux["perplexity"],
            "encoder_tokens": tokens,
            "z": z,
            "z_normalized": qaux["z_normalized"],
            "quant": quant,
            "post_quant": post,
            "decoder_last_input": last_input,
            "clip_image_features": img_feats,
            "clip_text_features": txt_feats,
            "logit_scale": self.get_logit_scale(),
        }
        if return_intermediates:
            inter = dict(enc_inter)
            inter.update(
                {
                    "quant_proj_shortcut": qp_inter["shortcut"],
                    "quant_proj_attn": qp_inter["attn"],
                    "z": z,
                    "z_normalized": qaux["z_normalized"],
                    "indices": qaux["indices"],
                    "quant": quant,
                    "quant_lookup": qaux["quant_lookup"],
                    "vq_loss": qaux["loss"],
                    "codebook_usage_pct": 100.0 * jnp.mean(qaux["usage"]),
                    "post_quant_proj_shortcut": pq_inter["shortcut"],
                    "post_quant_proj_attn": pq_inter["attn"],
                    "post_quant": post,
                    "clip_image_features": img_feats,
                    "logit_scale_exp": aux["logit_scale"],
                }
            )
            inter.update(dec_inter)
            inter.update(head_inter)
            if txt_inter is not None:
                inter.update(txt_inter)
                inter["clip_text_features"] = txt_feats
            aux["intermediates"] = inter
        return rec, aux

    # -- inference API (official method names) -------------------------------------------------------------------
    def img_to_idx(self, images) -> jax.Array:
        """images (b, H, W, 3) → indices (b, k, H/16·W/16) int32."""
        tokens, _, _ = self.encode_tokens(images)
        return self.quantizer.encode(self.quant_proj(tokens))

    def decode_latent(self, quant, grid_hw: tuple[int, int] | None = None) -> jax.Array:
        """Quantized latent (b, n, k·d) → post_quant_proj → decoder → unclamped images (b, 16h, 16w, 3)."""
        post = self.post_quant_proj(quant.astype(jnp.float32))
        rec, _, _ = self.decoder(post, grid_hw)
        return rec

    def idx_to_img(self, indices) -> jax.Array:
        """indices (b, k, n) (square grid) or (b, k, h, w) → images (b, 16h, 16w, 3) clipped to [-1, 1]."""
        grid = None
        if indices.ndim == 4:
            b, k, h, w = indices.shape
            grid = (h, w)
            indices = indices.reshape(b, k, h * w)
        rec = self.decode_latent(self.quantizer.lookup(indices), grid)
        return jnp.clip(rec, -1.0, 1.0)

    def encode_image(self, images) -> jax.Array:
        """CLIP image features (b, e), l2-normalised, via the discrete path (indices → codes → post_quant_proj)."""
        idx = self.img_to_idx(images)
        post = self.post_quant_proj(self.quantizer.lookup(idx))
        return self.clip_image_head(post)

    def encode_text(self, ids) -> jax.Array:
        """CLIP text features (b, e), l2-normalised."""
        if self.text_encoder is None:
            raise ValueError("the model was built without a text tower (config.text is None)")
        raw, _ = self.text_encoder(ids)
        return L.l2_normalize(raw, axis=-1)
