"""unitok_jax: JAX/Flax training of unified image tokenizers (UniTok, TokenFlow)."""

import flax

# Parameters carry *logical* axis names (see unitok_jax/parallel/logical_axes.py); the mapping to mesh axes
# happens once, in the trainer. Flax >= 0.12 would otherwise try to shard each variable eagerly at creation
# time and demand a mesh context just to build a model.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
