"""Discriminator registry: name -> constructor; explicit construction, no import-by-string.

    disc = build_discriminator("dino", config.discriminator, rngs=nnx.Rngs(params=0))
    logits = disc(images_nhwc_in_minus1_1, rngs_or_key=key)   # [b, m]

Both discriminators share that call signature. Trainable weights are exactly `nnx.Param`
(`nnx.split(disc, nnx.Param, ...)`); the DINO backbone is `dinov2.FrozenParam` and lands in the rest.
Config fields: see `patch_discriminator` ("patch") and `dino_discriminator` ("dino") module docstrings; fields that a
discriminator does not use are ignored (e.g. `num_layers` for "dino", `dino_path` for "patch").
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from unitok_jax.models.dino_discriminator import DinoDiscriminator
from unitok_jax.models.patch_discriminator import PatchDiscriminator

DISCRIMINATORS: dict[str, Callable[..., nnx.Module]] = {
    "patch": PatchDiscriminator,
    "dino": DinoDiscriminator,
}


def build_discriminator(name: str, cfg: Mapping[str, Any] | None, rngs: nnx.Rngs) -> nnx.Module:
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}; available: {sorted(DISCRIMINATORS)}")
    return DISCRIMINATORS[name](cfg, rngs=rngs)
