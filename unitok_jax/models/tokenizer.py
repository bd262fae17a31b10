"""The `Tokenizer` interface: what the train step, the evals, code export and FLOP counting need from a tokenizer.

Both families implement it (`models/unitok.py`, `models/tokenflow.py`); code outside `models/` calls these members
instead of telling the families apart by aux keys or shapes. Adding a third tokenizer means one model file that
implements this, plus its entry in the registry (`models/__init__.py`) and its FLOP counter (`train/flops.py`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx


@runtime_checkable
class Tokenizer(Protocol):
    takes_text: bool  # consumes caption ids (it has a text tower), so the CLIP loss and zero-shot evals apply
    has_clip_head: bool  # produces CLIP image features (aux["clip_image_features"])

    def __call__(
        self, images: jax.Array, text_ids: jax.Array | None = None, *, deterministic: bool = True, rngs=None
    ) -> tuple[jax.Array, dict[str, Any]]:
        """images [b, H, W, 3] in [-1, 1] (+ caption ids) -> (reconstruction, aux). aux holds at least `vq_loss`,
        `codebook_usage`, `codebook_perplexity`, `indices` and `decoder_last_input` (the input of
        `last_decoder_conv`)."""
        ...

    @property
    def last_decoder_conv(self) -> nnx.Conv:
        """The decoder's last convolution: its gradient norms give the adaptive GAN weight."""
        ...

    @property
    def code_layout(self) -> tuple[int, int]:
        """(codebooks, entries per codebook) of `codes`: UniTok (k, K); TokenFlow (1, K) (one shared index space)."""
        ...

    def codes(self, aux: dict[str, Any]) -> jax.Array:
        """The discrete codes of a forward as [b, codebooks, tokens]."""
        ...

    def clip_pair(self, aux: dict[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """(image features, text features, logit scale) when the forward produced a CLIP pair, else None."""
        ...

    def extra_losses(self, aux: dict[str, Any]) -> dict[str, jax.Array]:
        """Model-specific quantizer terms added to the loss with the VQ weight (TokenFlow: 'commit')."""
        ...
