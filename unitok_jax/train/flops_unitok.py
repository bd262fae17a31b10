"""Analytic forward FLOPs of UniTok (one image and one caption) and its terms in a train step.

Validated (tests/test_flops.py) against the official model's FlopCounterMode numbers and XLA's `cost_analysis()`.
"""

from __future__ import annotations

from unitok_jax.train.flops_common import Term, attention_products, config_value, conv, dense, encoder_flops, vit_block


def attn_projection_flops(n: int, in_dim: int, out_dim: int, *, include_attention: bool = True) -> float:
    width = max(in_dim, out_dim)
    heads_out = out_dim if out_dim < width else width  # 'mean' reduces heads to out_dim; 'concat' keeps width
    f = dense(n, in_dim, out_dim)  # shortcut
    f += dense(n, in_dim, 3 * width)  # qkv
    f += dense(n, heads_out, out_dim)  # attn.proj
    f += 3 * dense(n, out_dim, 2 * out_dim)  # GeGLU w0, w1, w2
    if include_attention:
        f += attention_products(n, width)
    return f


def decoder_flops(dec, tokens_hw: int, *, mlp_ratio: float, include_attention: bool = True) -> dict[str, float]:
    """ViT blocks, then Upsample2d / InvMBConv up-sampler (full 3x3 convs at the expanded width) / InvStem."""
    c0, c1, c2 = dec.channel_table
    d2, d3 = dec.inv_mbconv_depths
    er = dec.mbconv_expand_ratio
    r = tokens_hw
    vit = dec.vit_depth * vit_block(
        r * r, dec.vit_width, int(dec.vit_width * mlp_ratio), geglu=True, include_attention=include_attention
    )
    r *= 2
    convs = conv(r, r, 3, c0, c1)  # up_conv1

    def inv_block(cin, cout, stride, r_in):
        mid = int(cout * er)
        r_out = r_in * stride
        f = conv(r_in, r_in, 1, cin, mid)
        if stride == 2:
            f += conv(r_out, r_out, 3, cin, cout)  # shortcut Upsample2d
            f += conv(r_out, r_out, 3, mid, mid)  # Upsample2d(mid, mid): the expensive one
        elif cin != cout:
            f += conv(r_out, r_out, 1, cin, cout)
        f += conv(r_out, r_out, 3, mid, mid, groups=mid) + conv(r_out, r_out, 1, mid, cout)
        return f, r_out

    for i in range(d2):
        f, r = inv_block(c1, c1, 2 if i == 0 else 1, r)
        convs += f
    for i in range(d3):
        f, r = inv_block(c1 if i == 0 else c2, c2, 2 if i == 0 else 1, r)
        convs += f
    r *= 2
    convs += conv(r, r, 3, c2, c2) + conv(r, r, 3, c2, 3)  # InvStem
    return {"decoder_vit": vit, "decoder_convs": convs}


def text_flops(text, embed_dim: int, *, include_attention: bool = True) -> float:
    t, w = text.context_length, text.width
    hidden = int(w * float(config_value(text, "mlp_ratio", 4.0)))
    per_layer = dense(t, w, 3 * w) + dense(t, w, w) + dense(t, w, hidden) + dense(t, hidden, w)
    if include_attention:
        per_layer += attention_products(t, w)
    return text.layers * per_layer + dense(1, w, embed_dim)


def unitok_forward_flops(
    model_cfg, image_size: int | None = None, *, include_attention: bool = True
) -> dict[str, float]:
    """Forward FLOPs of one image (and one caption) through each part of UniTok."""
    s = int(image_size or model_cfg.image_size)
    n_side = s // 16
    n = n_side * n_side
    qp, q, pq = model_cfg.quant_proj, model_cfg.quantizer, model_cfg.post_quant_proj
    out = dict(encoder_flops(model_cfg.encoder, s, include_attention=include_attention))
    out["quant_proj"] = attn_projection_flops(n, qp.in_dim, qp.out_dim, include_attention=include_attention)
    if config_value(q, "type", "mcq") == "rq":  # k stages, each against K entries of the full k·d latent
        out["quantizer"] = dense(n * q.num_codebooks, q.num_codebooks * q.codebook_dim, q.codebook_size)
    else:  # k chunks of d dims, each against its own K entries (cosine similarities)
        out["quantizer"] = dense(n * q.num_codebooks, q.codebook_dim, q.codebook_size)
    out["post_quant_proj"] = attn_projection_flops(n, pq.in_dim, pq.out_dim, include_attention=include_attention)
    mlp_ratio = float(config_value(model_cfg.decoder, "mlp_ratio", model_cfg.encoder.mlp_ratio))
    out.update(decoder_flops(model_cfg.decoder, n_side, mlp_ratio=mlp_ratio, include_attention=include_attention))
    out["clip_head"] = dense(1, pq.out_dim, model_cfg.clip.embed_dim)
    if config_value(model_cfg, "text") is not None:
        out["text"] = text_flops(model_cfg.text, model_cfg.clip.embed_dim, include_attention=include_attention)
    return out


def unitok_step_terms(config, batch: int, image_size: int, *, include_attention: bool = True) -> list[Term]:
    """The generator's terms of one step for the global batch: every part trained (x3) except the code assignment
    (stop-gradient, x1), plus the contrastive logits when the CLIP loss is on."""
    fwd = unitok_forward_flops(config.model, image_size, include_attention=include_attention)
    terms = [Term(name, batch * f, 1 if name == "quantizer" else 3) for name, f in fwd.items()]
    if "text" in fwd and config.loss.clip:
        terms.append(Term("contrastive_logits", 4.0 * batch * batch * int(config.model.clip.embed_dim), 3))
    return terms
