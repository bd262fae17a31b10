"""OpenAI-CLIP / open_clip byte-level BPE tokenizer (what UniTok's text tower was trained with); no vocab download.

Reproduces `open_clip/tokenizer.py` (`SimpleTokenizer` + `tokenize(context_length=77)`) and gives exactly its ids
(tests/fixtures/clip_bpe_cases.json, fixtures README §3):

1. Normalisation (`clean_text`): `ftfy.fix_text` -> `html.unescape` twice -> strip -> collapse runs of Unicode
   whitespace (`re` `\\s`: NBSP, U+3000, ...) to one space -> strip -> `str.lower()`.
2. Pre-tokenisation: the official `regex` pattern (special tokens, contractions, runs of \\p{L}, single \\p{N},
   runs of other non-space symbols).
3. Byte-level BPE: UTF-8 bytes -> printable "byte alphabet", `</w>` appended to the last symbol, merges applied by
   rank (lowest first, all occurrences left to right), results cached per pre-token.
4. Ids: vocab = 256 byte symbols + the same with `</w>` + one entry per merge + [`<start_of_text>`, `<end_of_text>`],
   i.e. SOT = 49406 and EOT = 49407 with the real `bpe_simple_vocab_16e6.txt.gz` (48 894 merges are used).
   A row is [SOT] + bpe ids + [EOT], zero-padded; longer rows keep the first `context_length` ids and the last one
   becomes EOT (open_clip's `tokenize`).

The vocab file is read from a user path (gzip text: a `#version` header line, then one "a b" merge per line).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from unitok_jax import paths

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
SPECIAL_TOKENS = (SOT_TEXT, EOT_TEXT)
NUM_MERGES = 49152 - 256 - 2  # open_clip: merges[1:49152-256-2+1]


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode character table (order defines ids 0..255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


# ---------------------------------------------------------------------------------------------- normalisation --


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def clean_text(text: str) -> str:
    """open_clip's default 'lower' cleaning: the string the pre-tokeniser sees."""
    return whitespace_clean(basic_clean(text)).lower()


# ---------------------------------------------------------------------------------------------- pre-tokeniser --

_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into pre-tokens with open_clip's pattern."""
    return _PATTERN.findall(text)


# ---------------------------------------------------------------------------------------------- tokenizer ------


def read_merges(bpe_path: str | os.PathLike, num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
    """Merges of a CLIP vocab file: skip the header line, take at most `num_merges` non-empty lines."""
    path = os.fspath(bpe_path)
    if not paths.exists(path):
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found: {path} (open_clip's bpe_simple_vocab_16e6.txt.gz; it is not downloaded)"
        )
    raw = paths.read_bytes(path)
    lines = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8").split("\n")
    merges = []
    for line_no, line in enumerate(lines[1 : 1 + num_merges], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{line_no}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class ClipBpeTokenizer:
    """`__call__(texts) -> int32 [b, context_length]`; `encode(text) -> list[int]` (bpe ids, no SOT/EOT, untruncated)."""

    pad_id = 0

    def __init__(self, bpe_path: str | os.PathLike, context_length: int = 77, *, num_merges: int = NUM_MERGES):
        if int(context_length) < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.context_length = int(context_length)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        merges = read_merges(bpe_path, num_merges)
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in SPECIAL_TOKENS}
        self.sot_id = self.encoder[SOT_TEXT]
        self.eot_id = self.encoder[EOT_TEXT]
        self.vocab_size = len(vocab)

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one byte-encoded pre-token (last symbol carries '</w>')."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def byte_encode(self, pre_token: str) -> str:
        return "".join(self.byte_encoder[b] for b in pre_token.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in pre_tokenize(clean_text(text)):
            ids.extend(self.encoder[piece] for piece in self.bpe(self.byte_encode(token)).split(" "))
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """open_clip's decode for debugging: drops padding and SOT/EOT; '</w>' becomes a space."""
        text = "".join(
            self.decoder[i]
            for i in np.asarray(ids).reshape(-1).tolist()
            if i in self.decoder and i not in (self.sot_id, self.eot_id, self.pad_id)
        )
        data = bytearray(self.byte_decoder[c] for c in text)  # '<', '/', 'w', '>' are in the byte alphabet
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Sequence[str] | str, context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return assemble_ids(
            [self.encode(t) for t in texts], self.sot_id, self.eot_id, context_length or self.context_length
        )

    def __repr__(self) -> str:
        return f"ClipBpeTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def assemble_ids(bpe_ids: Sequence[Sequence[int]], sot_id: int, eot_id: int, context_length: int) -> np.ndarray:
    """[SOT] + ids + [EOT], zero-padded to `context_length`; too long: cut and overwrite the last id with EOT."""
    out = np.zeros((len(bpe_ids), context_length), np.int32)
    for row, ids in enumerate(bpe_ids):
        tokens = [sot_id, *ids, eot_id]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot_id
        out[row, : len(tokens)] = tokens
    return out
