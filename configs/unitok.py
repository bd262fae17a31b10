"""UniTok tokenizer training configs.

Variants (select with `--config=configs/unitok.py:<variant>`, override any field with `--config.x=y`):

  tiny            CPU-sized model on the embedded procedural dataset. The README's main command:
                    python -m unitok_jax.main --config=configs/unitok.py:tiny --workdir=runs/tiny
                  Expected on a 2-core CPU: ~10 min; L2 falls well below its start value (see README for numbers).
  b16_single_gpu  ViTamin-B tokenizer (317.5 M params with text tower) on one 80 GB GPU, ArrayRecord data.
  base            ViTamin-B with the official recipe (`--model vitamin_base`).
  paper           ViTamin-L, 8x4096 MCQ, text tower, DINOv2-S discriminator, global batch 16384, official
                  optimiser/schedule (arXiv 2502.20321), FSDP mesh for a pod:
                    python -m unitok_jax.main --config=configs/unitok.py:paper --workdir=gs://bucket/unitok_paper \
                      --config.data.train_files='/data/datacomp/*.array_record' \
                      --config.loss.lpips_path=/weights/lpips_with_vgg.pth \
                      --config.discriminator.dino_path=/weights/dinov2_vits14_pretrain.pth

Durations (`loss.gan_start`, `loss.gan_ramp`, `optimizer.warmup`, ...) are fractions of `total_steps` when
<= 1.0 and numbers of steps otherwise.
"""

from __future__ import annotations

import ml_collections

from unitok_jax.config_lib import parse_variant

VARIANTS = ("tiny", "b16_single_gpu", "base", "paper")


def _optimizer(
    lr: float, b1: float, b2: float, weight_decay: float, warmup: float, end_lr_ratio: float, clip_norm: float
):
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            b1=b1,
            b2=b2,
            eps=1e-6,
            weight_decay=weight_decay,
            # Official rule: no decay on params with ndim < 2 (biases, norms, logit_scale); every matrix, conv,
            # codebook and embedding decays. The regex can exempt more (matched against 'a/b/kernel' paths).
            wd_exclude="",
            warmup=warmup,
            end_lr_ratio=end_lr_ratio,
            clip_norm=clip_norm,
            groups=[],  # [(regex, {'lr_mult': 0.1}) or (regex, {'frozen': True})], first match wins
        )
    )


def _tiny_model() -> ml_collections.ConfigDict:
    """A CPU-sized UniTok with the paper's topology (conv stem + MBConv + ViT, MCQ, attention projections,
    InvMBConv up-sampler, text tower); widths chosen so the README command trains in minutes on 2 cores."""
    from unitok_jax.models.unitok import model_config

    model = ml_collections.ConfigDict(model_config("tiny"))
    model.image_size = 64
    model.encoder.update(
        dict(stem_width=16, stage_widths=(16, 32), stage_depths=(1, 2), vit_width=64, vit_depth=2, vit_heads=4)
    )
    model.quant_proj.update(dict(in_dim=64, out_dim=16, heads=4))
    model.quantizer.update(dict(num_codebooks=4, codebook_size=64, codebook_dim=4))
    model.post_quant_proj.update(dict(in_dim=16, out_dim=64, heads=4))
    model.decoder.update(
        dict(
            vit_width=64,
            vit_depth=2,
            vit_heads=4,
            channel_table=(64, 32, 16),
            inv_mbconv_depths=(2, 1),
            mbconv_expand_ratio=2,
        )
    )
    model.clip.embed_dim = 32
    # Byte tokens: the embedded captions are up to ~163 bytes. 160 keeps 99.9% of them whole (the official 77 BPE
    # tokens never truncate them either). At 32 only "a <size> <colour> <shape> in the" survived: the main object's
    # colour/shape, which the tiny image tower cannot learn to see in this run, while the easily seen background
    # was cut off, so CLIP sat at ln(batch) with collapsed features.
    model.text = ml_collections.ConfigDict(
        dict(width=64, layers=2, heads=4, context_length=160, vocab_size=259, causal=True, pool="argmax_eot")
    )
    return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_variant(arg, VARIANTS, default="tiny")
    from unitok_jax.data.pipeline import default_data_config
    from unitok_jax.models.unitok import model_config

    c = ml_collections.ConfigDict()
    c.variant = variant
    c.model_name = "unitok"
    c.seed = 0

    # Run length and cadence. Tooling relies on these three names existing in every training config.
    c.total_steps = 1000
    c.ckpt_every_steps = 250
    c.log_every_steps = 25
    c.image_every_steps = 250
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.max_consecutive_nonfinite = 20
    # Pod hygiene (launch/README.md): how long hosts wait for each other's async checkpoint writes; a device memory
    # budget the compiled steps are checked against at start-up (0 = the device's own limit; CPU reports none);
    # the hang watchdog (a step taking factor x the median step time, and at least min_timeout_s, ends the process
    # with exit code 75 so the supervisor restarts it; start-up/compilation/evals get startup_timeout_s).
    c.checkpoint_timeout_secs = 1200
    c.device_memory_limit_gib = 0.0
    c.watchdog = ml_collections.ConfigDict(
        dict(enabled=True, factor=20.0, min_timeout_s=600.0, startup_timeout_s=3600.0)
    )
    c.resume_from = ""  # explicit checkpoint dir used when the workdir has none
    c.init_from = ""  # params-only initialisation (fine-tuning)
    c.global_batch_size = 32
    c.grad_accum_steps = 1  # k > 1: each step sums the gradients of k micro-batches (1/k of the activation memory)
    # 'full_batch': exact full-batch CLIP negatives and adaptive GAN weight, one extra forward (train.full_batch_accum);
    # 'micro_batch': cheaper, CLIP/adaptive weight per micro-batch (train.grad_accum).
    c.grad_accum_mode = "full_batch"
    # unset: unroll the micro-batch loop on CPU only (XLA:CPU runs convolutions inside loops slowly); True/False force it
    c.grad_accum_unroll = ml_collections.config_dict.placeholder(bool)
    c.eval_batch_size = 16

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="data_parallel"))

    c.data = default_data_config()
    from unitok_jax.evals.config import default_eval_config

    c.eval = default_eval_config()  # evals inside training: every_steps (0 = off), names, fid/zeroshot paths
    c.loss = ml_collections.ConfigDict(
        dict(
            l1=0.2,
            l2=1.0,
            lpips=0.0,
            lpips_path="",
            vq=1.0,
            clip=1.0,
            gan=0.4,
            gan_start=0.375,
            gan_ramp=0.03,
            adaptive_gan_weight=True,
            adaptive_clamp=(0.015, 1e4),
            bcr=4.0,
            bcr_cutout=0.2,
            diffaug=ml_collections.ConfigDict(dict(translation=0.125, color=True, cutout=0.2, blur=False)),
        )
    )
    c.discriminator = ml_collections.ConfigDict(dict(name="patch", width=32, num_layers=3, dino_path="", dino_depth=12))
    c.optimizer = _optimizer(lr=5e-4, b1=0.9, b2=0.95, weight_decay=0.02, warmup=0.01, end_lr_ratio=0.1, clip_norm=10.0)
    c.disc_optimizer = _optimizer(
        lr=2e-5, b1=0.5, b2=0.9, weight_decay=0.2, warmup=0.03, end_lr_ratio=0.1, clip_norm=10.0
    )

    if variant == "tiny":
        c.model = _tiny_model()
        c.model.dtype = "float32"
        c.model.drop_path_rate = 0.0
        c.model.remat = "none"
        c.model.scan_blocks = False
        c.total_steps = 1000
        c.ckpt_every_steps = 250
        c.log_every_steps = 25
        c.image_every_steps = 250
        c.global_batch_size = 16
        c.optimizer.lr = 1e-3
        c.optimizer.warmup = 0.03
        c.disc_optimizer.lr = 1e-4
        c.loss.gan_start = 0.5
        c.loss.gan_ramp = 0.1
        c.data.name = "embedded"
        c.data.image_size = 64
        c.data.embedded.image_size = 64
        c.data.context_length = c.model.text.context_length
        c.data.tokenizer = "bytes"
        c.eval.every_steps = 500
        c.eval.names = "recon,zeroshot"
    else:
        preset = "vitamin_large" if variant == "paper" else "vitamin_base"
        c.model = ml_collections.ConfigDict(model_config(preset))
        c.model.dtype = "bfloat16"
        c.model.drop_path_rate = 0.1
        c.model.remat = "full"
        c.model.scan_blocks = True
        c.data.name = "array_record"
        c.data.image_size = 256
        c.data.tokenizer = "clip_bpe"
        c.data.context_length = 77
        c.loss.lpips = 1.0
        c.discriminator = ml_collections.ConfigDict(
            dict(name="dino", width=384, num_layers=0, dino_path="", dino_depth=12)
        )
        c.image_every_steps = 2000
        c.log_every_steps = 50
        if variant == "paper":
            # 1.28 B samples / 16384 = 78 125 steps (the official run rounds up to 78 128).
            c.global_batch_size = 16384
            c.total_steps = 78128
            c.ckpt_every_steps = 1000
            c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules="fsdp"))
            # 64 images/chip (256 chips) need ~200 GiB/chip in one pass (CPU AOT estimate, benchmarks/RESULTS.md);
            # 8 micro-batches with full-batch accumulation: ~33 GiB/chip, the same update (CLIP over all 16384
            # captions) for one extra forward pass. Set 1 where memory allows (fewer images per chip, bigger HBM).
            c.grad_accum_steps = 8
        else:
            c.global_batch_size = 64 if variant == "b16_single_gpu" else 4096
            c.total_steps = 100_000
            c.ckpt_every_steps = 2000
            c.mesh = ml_collections.ConfigDict(
                dict(data=-1, fsdp=1, tensor=1, rules="data_parallel" if variant == "b16_single_gpu" else "fsdp")
            )
    return c
