"""Model registry: name → constructor. Explicit construction, no import-by-string."""

from __future__ import annotations

from flax import nnx


from unitok_jax.models.tokenflow import TokenFlow
from unitok_jax.models.unitok import UniTok, model_config

MODELS = {"unitok": UniTok, "tokenflow": TokenFlow}


def build_model(name: str, cfg, rngs: nnx.Rngs):
    """Build a registered model: `build_model('unitok', cfg, nnx.Rngs(0))`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name](cfg, rngs=rngs)


__all__ = ["MODELS", "build_model", "UniTok", "TokenFlow", "model_config"]
