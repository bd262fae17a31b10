"""Where a config's train-step memory goes: each part's forward+backward compiled alone, abstractly, on one device.

    python benchmarks/memory_breakdown.py --config=configs/unitok.py:paper --per_device_batch=64 \
        [--remat=full] [--dtype=bfloat16] [--parts=tokenizer,lpips,gan_g,disc_d,text]

Parts (each is the gradient computation the real step does for it, with the batch of one device):
  tokenizer  UniTok image path (encoder → projections → MCQ → decoder, CLIP image head) w.r.t. its params,
             loss L1 + L2 + VQ (the text tower is its own part)
  encoder    only the ViTamin encoder (conv stem + MBConv stages + ViT) w.r.t. its params
  decoder    only the pixel decoder (ViT + conv up-sampler) from the token grid w.r.t. its params
  lpips      LPIPS(rec, target) w.r.t. rec (frozen VGG on the gradient path)
  gan_g      the generator's adversarial loss through DiffAug + the discriminator w.r.t. rec
  disc_d     the discriminator update: hinge on real/fake + bCR views w.r.t. the discriminator's params
  text       the text tower w.r.t. its params
Per part: XLA's temp (activations and intermediates) and argument sizes, in GiB. The full step
(benchmarks/aot_memory.py) runs these one after another, so its temp is roughly the largest part plus the
state, not their sum. Same caveats as aot_memory.py: the CPU compiler's buffer assignment is an estimate.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/unitok.py:paper", "config file")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 64, "images per device")
_REMAT = flags.DEFINE_string("remat", None, "override model.remat")
_DTYPE = flags.DEFINE_string("dtype", None, "override model.dtype")
_PARTS = flags.DEFINE_list(
    "parts", ["tokenizer", "encoder", "decoder", "lpips", "gan_g", "disc_d", "text"], "parts to compile"
)

GiB = 2**30


def _compile(fn, *abstract_args):
    import jax

    compiled = jax.jit(fn).lower(*abstract_args).compile()
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes / GiB, m.argument_size_in_bytes / GiB


def main(_):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unitok_jax.losses import adversarial, reconstruction
    from unitok_jax.train import trainer

    config = _CONFIG.value
    if _REMAT.value:
        config.model.remat = _REMAT.value
    if _DTYPE.value:
        config.model.dtype = _DTYPE.value
    b, s = _PER_DEVICE_BATCH.value, int(config.data.image_size)
    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)

    model = nnx.eval_shape(lambda: trainer._build_model(config, int(config.seed)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rows = []

    def report(name, temp, arg):
        rows.append((name, temp, arg))
        print(f"{name:>10}: temp {temp:7.2f} GiB, arguments {arg:6.2f} GiB", flush=True)

    if "tokenizer" in _PARTS.value:

        def tokenizer_loss(p, r, x):
            m = nnx.merge(graphdef, p, r, copy=True)
            rec, aux = m(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
            rec = rec.astype(jnp.float32)
            return (
                0.2 * reconstruction.l1_loss(rec, x)
                + reconstruction.l2_loss(rec, x)
                + aux["vq_loss"]
                + jnp.sum(aux["clip_image_features"]) * 0.0
            )

        report("tokenizer", *_compile(jax.grad(tokenizer_loss), params, rest, images))

    for name in ("encoder", "decoder"):
        if name not in _PARTS.value:
            continue
        sub_graph, sub_params, sub_rest = nnx.split(getattr(model, name), nnx.Param, ...)
        if name == "encoder":
            x_in = images
        else:  # the decoder starts from the (b, tokens, width) grid the post-quant projection gives it
            n_side = s // 16
            x_in = jax.ShapeDtypeStruct((b, n_side * n_side, int(config.model.decoder.vit_width)), jnp.float32)

        def part_loss(p, r, x, sub_graph=sub_graph):
            out = nnx.merge(sub_graph, p, r, copy=True)(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
            return jnp.mean(jnp.square(out[0].astype(jnp.float32)))

        report(name, *_compile(jax.grad(part_loss), sub_params, sub_rest, x_in))

    if "lpips" in _PARTS.value and config.loss.lpips:
        from unitok_jax.models.lpips import LPIPS, lpips_loss

        lp_graph, lp_state = nnx.split(nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0))))
        grad = jax.grad(lambda r, st, x: lpips_loss(nnx.merge(lp_graph, st), x, r))
        report("lpips", *_compile(grad, images, lp_state, images))

    disc_name = config.discriminator.get("name") if config.get("discriminator") else None
    if disc_name and ({"gan_g", "disc_d"} & set(_PARTS.value)):
        from unitok_jax.losses.diffaug import diff_augment

        disc = nnx.eval_shape(lambda: trainer._build_discriminator(config, int(config.seed)))
        d_graph, d_params, d_rest = nnx.split(disc, nnx.Param, ...)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)

        def logits(dp, dr, x, k):
            return nnx.merge(d_graph, dp, dr, copy=True)(diff_augment(x, k), rngs_or_key=k)

        if "gan_g" in _PARTS.value:
            grad = jax.grad(lambda r, dp, dr, k: adversarial.generator_adversarial_loss(logits(dp, dr, r, k)))
            report("gan_g", *_compile(grad, images, d_params, d_rest, key))
        if "disc_d" in _PARTS.value:

            def d_loss(dp, dr, real, fake, k):
                lr, lf = logits(dp, dr, real, k), logits(dp, dr, fake, k)
                strong_r, strong_f = logits(dp, dr, real, k + 1), logits(dp, dr, fake, k + 1)
                return adversarial.hinge_discriminator_loss(lr, lf) + 4.0 * (
                    adversarial.consistency_loss(strong_r, lr) + adversarial.consistency_loss(strong_f, lf)
                )

            report("disc_d", *_compile(jax.grad(d_loss), d_params, d_rest, images, images, key))

    if "text" in _PARTS.value and config.model.get("text"):
        text_graph, text_params, text_rest = nnx.split(model.text_encoder, nnx.Param, ...)
        ids = jax.ShapeDtypeStruct((b, int(config.data.context_length)), jnp.int32)

        def text_loss(p, r, t):
            out = nnx.merge(text_graph, p, r, copy=True)(t)
            return jnp.sum(out[0] if isinstance(out, tuple) else out)

        report("text", *_compile(jax.grad(text_loss), text_params, text_rest, ids))

    print(
        f"{config.get('variant', '?')} config, {b} images/device at {s}px, model.remat={config.model.remat}, "
        f"model.dtype={config.model.dtype}, jax {jax.__version__}"
    )


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
