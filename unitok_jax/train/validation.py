"""Whole-config validation that runs before anything is built or compiled.

Every error names the field and the fix (`config_lib.ConfigError`). Model-architecture checks live next to the
models (they raise the same error type while the abstract model is built, still before compilation).
"""

from __future__ import annotations

import jax
import ml_collections

from unitok_jax.config_lib import ConfigError, check, check_divisible, check_files
from unitok_jax.parallel import sharding as shd

_DATA_PARALLEL_AXES = ("data", "fsdp")


def validate_config(
    config: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int | None = None
) -> None:
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    weights: list[tuple[str, str, str]] = []  # (path, field, what needs it): checked together at the end
    for name in (
        "total_steps",
        "ckpt_every_steps",
        "log_every_steps",
        "image_every_steps",
        "global_batch_size",
        "keep_checkpoints",
        "max_consecutive_nonfinite",
    ):
        check(
            int(config[name]) > 0,
            name,
            f"must be a positive integer, got {config[name]}",
            f"set --config.{name} to a value > 0",
        )

    try:
        data, fsdp, tensor = shd.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(
            "mesh", str(e), "make data*fsdp*tensor equal the number of devices, or set one axis to -1"
        ) from e
    try:
        shd.resolve_rules(config.mesh.rules)
    except ValueError as e:
        raise ConfigError(
            "mesh.rules", str(e), f"use a preset {sorted(shd.RULE_PRESETS)} or a mapping to {shd.MESH_AXES}"
        ) from e
    check_divisible(
        config.global_batch_size,
        data * fsdp,
        "global_batch_size",
        f"global batch vs data-parallel size data*fsdp={data * fsdp}",
        "use a multiple of the data-parallel size",
    )
    check_divisible(
        config.global_batch_size,
        process_count,
        "global_batch_size",
        "global batch vs number of processes",
        "use a multiple of the number of hosts",
    )

    from unitok_jax.models import MODELS

    check(
        config.model_name in MODELS,
        "model_name",
        f"unknown model {config.model_name!r}",
        f"use one of {sorted(MODELS)}",
    )
    image_size = int(config.data.image_size)
    check_divisible(
        image_size,
        16,
        "data.image_size",
        "image size vs the tokenizer's 16x down-sampling",
        "use a multiple of 16 (e.g. 64, 256)",
    )
    model = config.model
    if model.get("text"):
        check(
            int(config.data.context_length) <= int(model.text.context_length),
            "data.context_length",
            f"{config.data.context_length} exceeds the text tower's context_length {model.text.context_length}",
            "make them equal",
        )
        if config.data.tokenizer == "bytes":
            check(
                int(model.text.vocab_size) >= 259,
                "model.text.vocab_size",
                "the byte tokenizer needs 259 ids",
                "set model.text.vocab_size >= 259 or use data.tokenizer='clip_bpe'",
            )
        if config.data.tokenizer == "clip_bpe":
            check(
                int(model.text.vocab_size) >= 49408,
                "model.text.vocab_size",
                "CLIP BPE needs 49408 ids",
                "set it to 49408",
            )
            weights.append((config.data.bpe_path, "data.bpe_path", "the CLIP BPE tokenizer"))

    if config.loss.lpips:
        weights.append((config.loss.lpips_path, "loss.lpips_path", "the LPIPS loss (loss.lpips > 0)"))
    for field, what in (
        ("teacher_path", "the frozen TokenFlow teacher"),
        ("semantic_init_path", "the pretrained TokenFlow semantic encoder"),
    ):
        if config.get(field):
            check(
                config.model_name == "tokenflow",
                field,
                f"{field} is set but model_name is {config.model_name!r}",
                "it applies to TokenFlow only; clear it",
            )
            weights.append((config[field], field, what))
    if config.loss.gan:
        from unitok_jax.models.discriminators import DISCRIMINATORS

        name = config.discriminator.name
        check(
            name in DISCRIMINATORS,
            "discriminator.name",
            f"unknown discriminator {name!r}",
            f"use one of {sorted(DISCRIMINATORS)}",
        )
        if name == "dino":
            weights.append((config.discriminator.dino_path, "discriminator.dino_path", "the DINOv2 discriminator"))
    for field in ("loss.gan_start", "loss.gan_ramp", "optimizer.warmup", "disc_optimizer.warmup"):
        section, key = field.split(".")
        value = float(config[section][key])
        check(
            value >= 0,
            field,
            f"durations must be >= 0, got {value}",
            "use a fraction (<= 1) of total_steps or a step count",
        )
    check_files(weights)
