"""Text tokenizers for the CLIP text tower: an offline byte-level default and a name -> constructor registry.

The text tower pools the feature at ``argmax(ids)``, so every tokenizer here must make EOT the largest id and put
exactly one EOT in each row (truncation keeps it). Padding is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad 0, byte b -> b + 1 (1..256), SOT 257, EOT 258; vocab_size 259.

    Needs no vocabulary file, so it is the default for tests and the embedded dataset.
    """

    pad_id = 0
    sot_id = 257
    eot_id = 258
    vocab_size = 259

    def __init__(self, context_length: int = 77):
        if int(context_length) < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.context_length = int(context_length)

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of one text, [SOT] + bytes + [EOT], truncated to context_length with EOT kept last."""
        if isinstance(text, (bytes, bytearray)):
            # Same treatment as records/transforms: invalid UTF-8 becomes U+FFFD rather than an error.
            text = bytes(text).decode("utf-8", errors="replace")
        elif text is None:
            text = ""
        data = str(text).encode("utf-8", errors="replace")[: self.context_length - 2]
        return [self.sot_id, *(b + 1 for b in data), self.eot_id]

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """int32 [b, context_length] ids (a single string gives b = 1)."""
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Inverse of ``encode`` for one row (stops at EOT, ignores SOT/pad); for debugging and sample logging."""
        data = bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eot_id:
                break
            if 1 <= i <= 256:
                data.append(i - 1)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(context_length={self.context_length})"


def _make_bytes(*, context_length: int = 77, bpe_path: str | None = None) -> ByteTokenizer:
    del bpe_path  # a config may carry a bpe_path for another tokenizer; bytes needs none
    return ByteTokenizer(context_length)


def _make_clip_bpe(*, context_length: int = 77, bpe_path: str | None = None):
    if not bpe_path:
        raise ValueError(
            "tokenizer 'clip_bpe' needs a vocabulary file: set data.bpe_path to open_clip's "
            "bpe_simple_vocab_16e6.txt.gz (or use tokenizer='bytes', which needs none)"
        )
    # Imported here: the BPE tokenizer is optional and written separately; 'bytes' must work without it.
    from unitok_jax.data.clip_bpe import ClipBpeTokenizer  # pylint: disable=g-import-not-at-top

    return ClipBpeTokenizer(bpe_path, context_length)


TOKENIZERS: dict[str, Callable[..., Callable[[Sequence[str]], np.ndarray]]] = {
    "bytes": _make_bytes,
    "clip_bpe": _make_clip_bpe,
}


def build_tokenizer(name: str, **kwargs):
    """``build_tokenizer('bytes', context_length=77)`` or ``build_tokenizer('clip_bpe', bpe_path=..., context_length=77)``.

    Every tokenizer maps ``list[str]`` to int32 ``[b, context_length]`` with EOT as its largest id.
    """
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; available: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](**kwargs)
