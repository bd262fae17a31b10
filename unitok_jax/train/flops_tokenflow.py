"""Analytic forward FLOPs of TokenFlow (one image), in the units of `unitok_jax.train.flops_common` (2 per MAC, matmuls
and convolutions only; attention products included unless asked not to).

Parts: semantic tower (CLIP / SigLIP ViT or ViTamin), encode_task_layer, pixel CNN encoder + quant_conv, the
multi-scale quantizer (distances to both codebook halves, area down- and bicubic up-sampling matrices), BEiT
semantic decoder + decode_task_layer, post_quant_conv + pixel CNN decoder, and the frozen teacher (forward only).
"""

from __future__ import annotations

from typing import Any, Mapping

from unitok_jax.train.flops_common import Term, attention_products, conv, dense, encoder_flops


def _plain(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _tower_config(se: Mapping[str, Any]):
    """The tower's ViTConfig / ViTaminSemanticConfig (student or teacher block; wrapper-only keys dropped)."""
    from unitok_jax.models.clip_vit import ViTConfig
    from unitok_jax.models.vitamin_semantic import ViTaminSemanticConfig

    tower = {k: v for k, v in _plain(se).items() if k not in ("input_scaling", "normalize", "interpolate")}
    return (ViTaminSemanticConfig if tower.get("kind") == "vitamin" else ViTConfig).from_dict(tower)


def semantic_tower_flops(se: Mapping[str, Any], image_size: int, *, include_attention: bool = True) -> float:
    """CLIP / SigLIP ViT (class token, `output_layer`, optional teacher `proj`) or the ViTamin hybrid."""
    cfg = _tower_config(se)
    if cfg.kind == "vitamin":
        return sum(encoder_flops(cfg, image_size, include_attention=include_attention).values())
    g = image_size // cfg.patch_size
    n = g * g + (1 if cfg.class_token else 0)
    w, hidden = cfg.width, cfg.mlp_dim or 4 * cfg.width
    block = dense(n, w, 3 * w) + dense(n, w, w) + dense(n, w, hidden) + dense(n, hidden, w)
    if include_attention:
        block += attention_products(n, w)
    out = conv(g, g, cfg.patch_size, 3, w) + cfg.num_blocks * block
    if cfg.proj_dim:
        out += dense(g * g, w, cfg.proj_dim)
    return out


def _resnet(r: int, cin: int, cout: int) -> float:
    return conv(r, r, 3, cin, cout) + conv(r, r, 3, cout, cout) + (conv(r, r, 1, cin, cout) if cin != cout else 0.0)


def _attn(r: int, c: int, include_attention: bool) -> float:
    return 4 * conv(r, r, 1, c, c) + (attention_products(r * r, c) if include_attention else 0.0)


def pixel_encoder_flops(pe: Mapping[str, Any], image_size: int, *, include_attention: bool = True) -> float:
    ch, mult, nres = pe["ch"], list(pe["ch_mult"]), pe["num_res_blocks"]
    r = image_size
    f = conv(r, r, 3, 3, ch)
    block_in = ch
    for i, m in enumerate(mult):
        block_out = ch * m
        for _ in range(nres):
            f += _resnet(r, block_in, block_out)
            block_in = block_out
            if i == len(mult) - 1 and pe.get("attn_at_last_level", True):
                f += _attn(r, block_in, include_attention)
        if i != len(mult) - 1:
            r //= 2
            f += conv(r, r, 3, block_in, block_in)  # pad + 3x3 stride-2 conv
    f += 2 * _resnet(r, block_in, block_in) + _attn(r, block_in, include_attention)
    return f + conv(r, r, 3, block_in, pe["z_channels"])


def pixel_decoder_flops(pd: Mapping[str, Any], grid: int, *, include_attention: bool = True) -> float:
    ch, mult, nres = pd["ch"], list(pd["ch_mult"]), pd["num_res_blocks"]
    r = grid
    block_in = ch * mult[-1]
    f = conv(r, r, 3, pd["z_channels"], block_in)
    f += 2 * _resnet(r, block_in, block_in) + _attn(r, block_in, include_attention)
    for i in range(len(mult)):
        block_out = ch * mult[len(mult) - i - 1]
        for _ in range(nres + 1):
            f += _resnet(r, block_in, block_out)
            block_in = block_out
            if i == 0 and pd.get("attn_at_coarsest_level", True):
                f += _attn(r, block_in, include_attention)
        if i != len(mult) - 1:
            r *= 2
            f += conv(r, r, 3, block_in, block_in)  # nearest x2 + 3x3 conv
    return f + conv(r, r, 3, block_in, 3)


def quantizer_flops(q: Mapping[str, Any], scales, grid: int) -> float:
    """Per scale k: k² tokens against all K entries of both halves; area-downsample the residual to k x k and
    bicubic-upsample the chosen codes back to the grid (separable resampling matrices, both halves)."""
    c = q["semantic_dim"] + q["pixel_dim"]
    f = 0.0
    for k in scales:
        f += dense(k * k, q["semantic_dim"], q["codebook_size"]) + dense(k * k, q["pixel_dim"], q["codebook_size"])
        if k != grid:
            f += dense(k * grid, grid, c) + dense(k * k, grid, c)  # area: rows, then columns
            f += dense(grid * k, k, c) + dense(grid * grid, k, c)  # bicubic back up
    return f


def beit_decoder_flops(sd: Mapping[str, Any], in_dim: int, grid: int, *, include_attention: bool = True) -> float:
    d, hidden = sd["embed_dim"], int(sd["embed_dim"] * sd.get("mlp_ratio", 4))
    n = grid * grid + 1
    block = dense(n, d, 3 * d) + dense(n, d, d) + dense(n, d, hidden) + dense(n, hidden, d)
    if include_attention:
        block += attention_products(n, d)
    return conv(grid, grid, 1, in_dim, d) + sd["depth"] * block


def tokenflow_forward_flops(
    model_cfg, image_size: int | None = None, *, include_attention: bool = True
) -> dict[str, float]:
    """Forward FLOPs of one image through each part of TokenFlow ('teacher' is the frozen distillation target)."""
    from unitok_jax.models.tokenflow_config import normalize_config

    cfg = normalize_config(_plain(model_cfg))
    s = int(image_size or cfg["image_size"])
    se, q = cfg["semantic_encoder"], cfg["quantizer"]
    grid = cfg["scales"][-1]
    n = grid * grid
    width = _tower_config(se).width
    et, dt = cfg["encode_task_layer"], cfg["decode_task_layer"]
    out = {
        "semantic_encoder": semantic_tower_flops(se, s, include_attention=include_attention),
        "encode_task_layer": dense(n, width, et["hidden"]) + dense(n, et["hidden"], et["out"]),
        "pixel_encoder": pixel_encoder_flops(
            cfg["pixel_encoder"], int(cfg.get("pixel_image_size") or s), include_attention=include_attention
        )
        + conv(grid, grid, 1, cfg["pixel_encoder"]["z_channels"], q["pixel_dim"]),
        "quantizer": quantizer_flops(q, cfg["scales"], grid),
        "semantic_decoder": beit_decoder_flops(
            cfg["semantic_decoder"], q["semantic_dim"], grid, include_attention=include_attention
        )
        + dense(n, cfg["semantic_decoder"]["embed_dim"], dt["hidden"])
        + dense(n, dt["hidden"], dt["out"]),
        "pixel_decoder": conv(grid, grid, 1, q["pixel_dim"], cfg["pixel_decoder"]["z_channels"])
        + pixel_decoder_flops(cfg["pixel_decoder"], grid, include_attention=include_attention),
    }
    if cfg.get("teacher"):
        out["teacher"] = semantic_tower_flops(cfg["teacher"], s, include_attention=include_attention)
    return out


def tokenflow_step_terms(config, batch: int, image_size: int, *, include_attention: bool = True) -> list[Term]:
    """The generator's terms of one step for the global batch: code assignment (not differentiated) and the frozen
    teacher (its output is a target) forward only, every other part trained (x3)."""
    fwd = tokenflow_forward_flops(config.model, image_size, include_attention=include_attention)
    return [Term(name, batch * f, 1 if name in ("quantizer", "teacher") else 3) for name, f in fwd.items()]
