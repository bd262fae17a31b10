"""OpenAI-CLIP / open_clip byte-level BPE tokenizer (what UniTok's text tower was trained with); no vocab download.

Reproduces `open_clip/tokenizer.py` (`SimpleTokenizer` + `tokenize(context_length=77)`), fixtures README §3:

1. Normalisation (`clean_text`): `ftfy.fix_text` -> `html.unescape` twice -> strip -> collapse every run of Unicode
   whitespace (Python `re` `\\s`: NBSP, U+2003, U+3000, ...) to one space -> strip -> `str.lower()`.
   ftfy is optional. When it is not importable, `fix_text_fallback` re-implements the parts of ftfy 6.3's default
   `fix_text` that matter for captions: per-line processing, HTML entity unescape (only when the line has no '<'),
   a *restricted* mojibake repair (the whole line encoded as latin-1 / Windows-1252 must decode as strict UTF-8;
   ftfy's badness heuristic, other code pages and partial-line repairs are not reproduced), C1 controls as
   Windows-1252, Latin ligatures (ﬁ -> fi ...), full-/half-width forms (NFKC on U+FF01..U+FFEF, U+3000 -> space),
   curly quotes -> straight, line breaks, ANSI terminal escapes, ftfy's control-character list (incl. U+FEFF),
   NFC; repeated until stable, as ftfy does. All 60 fixture cases normalise identically with the fallback.
2. Pre-tokenisation: the special tokens `<start_of_text>` / `<end_of_text>`, the contractions 's 't 're 've 'm 'll 'd
   (case-insensitive), runs of letters (\\p{L}), single numeric characters (\\p{N}), runs of other non-space symbols.
   With the `regex` package this is the official pattern; without it a scanner based on `unicodedata.category`
   gives the same splits (letters = category L*, numbers = N*, spaces = Unicode White_Space); the only possible
   difference is the Unicode version of the two databases.
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
import unicodedata
from collections.abc import Sequence

import numpy as np

from unitok_jax import paths

try:  # optional, as in open_clip
    import ftfy  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

try:  # optional: the official pre-tokeniser pattern needs \p{L} / \p{N}
    import regex  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    regex = None

SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
SPECIAL_TOKENS = (SOT_TEXT, EOT_TEXT)
NUM_MERGES = 49152 - 256 - 2  # open_clip: merges[1:49152-256-2+1]
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


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

# ftfy 6.x chardata / fixes tables (the subset used by the fallback).
_FTFY_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)
_FTFY_LIGATURES = {
    ord("Ĳ"): "IJ", ord("ĳ"): "ij", ord("ŉ"): "ʼn", ord("Ǳ"): "DZ", ord("ǲ"): "Dz", ord("ǳ"): "dz",
    ord("Ǆ"): "DŽ", ord("ǅ"): "Dž", ord("ǆ"): "dž", ord("Ǉ"): "LJ", ord("ǈ"): "Lj", ord("ǉ"): "lj",
    ord("Ǌ"): "NJ", ord("ǋ"): "Nj", ord("ǌ"): "nj", ord("ﬀ"): "ff", ord("ﬁ"): "fi", ord("ﬂ"): "fl",
    ord("ﬃ"): "ffi", ord("ﬄ"): "ffl", ord("ﬅ"): "ſt", ord("ﬆ"): "st",
}
_FTFY_WIDTH_MAP = {0x3000: " "}
for _i in range(0xFF01, 0xFFF0):
    _alt = unicodedata.normalize("NFKC", chr(_i))
    if _alt != chr(_i):
        _FTFY_WIDTH_MAP[_i] = _alt
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_RE = re.compile("[\x80-\x9f]")
_LINE_BREAK_RE = re.compile("\r\n|\r|\u2028|\u2029|\u0085")


def _unescape_entity(match: re.Match) -> str:
    entity = match.group(0)
    out = html.unescape(entity)
    return out if out != entity else entity


def _sloppy_cp1252_encode(text: str) -> bytes:
    """Windows-1252 with the 5 undefined bytes passed through as latin-1 (ftfy's 'sloppy-windows-1252')."""
    out = bytearray()
    for ch in text:
        try:
            out += ch.encode("cp1252")
        except UnicodeEncodeError:
            o = ord(ch)
            if o in (0x81, 0x8D, 0x8F, 0x90, 0x9D):
                out.append(o)
            else:
                raise
    return bytes(out)


def _fix_mojibake(text: str) -> str:
    """Restricted ftfy.fix_encoding: UTF-8 that was decoded as latin-1 / Windows-1252, repaired for a whole line."""
    if text.isascii():
        return text
    for encode in (lambda t: t.encode("latin-1"), _sloppy_cp1252_encode):
        try:
            fixed = encode(text).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if fixed != text:
            return fixed
    return text


def _fix_c1(match: re.Match) -> str:
    try:
        return bytes([ord(match.group(0))]).decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        orig = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = _fix_mojibake(text)
        text = _C1_RE.sub(_fix_c1, text)
        text = text.translate(_FTFY_LIGATURES)
        text = text.translate(_FTFY_WIDTH_MAP)
        text = _DOUBLE_QUOTE_RE.sub('"', _SINGLE_QUOTE_RE.sub("'", text))
        text = _LINE_BREAK_RE.sub("\n", text)
        text = _ANSI_RE.sub("", text)
        text = text.translate(_FTFY_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == orig:
            return text


def fix_text_fallback(text: str) -> str:
    """Approximation of `ftfy.fix_text` (6.3 defaults) used when ftfy is not installed; see the module docstring."""
    out, pos, unescape = [], 0, True
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        segment = text[pos:end]
        if "<" in segment:
            unescape = False  # ftfy: once a line contains '<', HTML stays escaped for the rest of the text
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


def fix_text(text: str) -> str:
    return ftfy.fix_text(text) if ftfy is not None else fix_text_fallback(text)


def basic_clean(text: str) -> str:
    text = fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def clean_text(text: str) -> str:
    """open_clip's default 'lower' cleaning: the string the pre-tokeniser sees."""
    return whitespace_clean(basic_clean(text)).lower()


# ---------------------------------------------------------------------------------------------- pre-tokeniser --

_OFFICIAL_PATTERN = (
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# Unicode White_Space property (what `regex` matches with \s).
_WHITE_SPACE = frozenset(
    [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)


def _char_class(ch: str) -> str:
    if ord(ch) in _WHITE_SPACE:
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "o"


def pre_tokenize_fallback(text: str) -> list[str]:
    """The official regex alternation evaluated by hand (first matching alternative at each position)."""
    out, i, n = [], 0, len(text)
    low = text.lower()
    while i < n:
        special = next((t for t in SPECIAL_TOKENS if low.startswith(t, i)), None)
        if special is not None:
            out.append(text[i:i + len(special)])
            i += len(special)
            continue
        contraction = next((c for c in CONTRACTIONS if low.startswith(c, i)), None)
        if contraction is not None:
            out.append(text[i:i + len(contraction)])
            i += len(contraction)
            continue
        cls = _char_class(text[i])
        if cls == "s":
            i += 1
            continue
        if cls == "N":
            out.append(text[i])
            i += 1
            continue
        j = i + 1
        while j < n and _char_class(text[j]) == cls:
            j += 1
        out.append(text[i:j])
        i = j
    return out


@functools.lru_cache(maxsize=1)
def _compiled_pattern():
    return regex.compile(_OFFICIAL_PATTERN, regex.IGNORECASE) if regex is not None else None


def pre_tokenize(text: str, *, use_regex: bool | None = None) -> list[str]:
    """Split cleaned text into pre-tokens (the official `regex` pattern when available, else the scanner)."""
    if use_regex is None:
        use_regex = regex is not None
    if use_regex:
        if regex is None:
            raise ImportError("pre_tokenize(use_regex=True) needs the 'regex' package")
        return _compiled_pattern().findall(text)
    return pre_tokenize_fallback(text)


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
    for line_no, line in enumerate(lines[1:1 + num_merges], start=2):
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
        text = "".join(self.decoder[i] for i in np.asarray(ids).reshape(-1).tolist()
                       if i in self.decoder and i not in (self.sot_id, self.eot_id, self.pad_id))
        data = bytearray(self.byte_decoder[c] for c in text)  # '<', '/', 'w', '>' are in the byte alphabet
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Sequence[str] | str, context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return assemble_ids([self.encode(t) for t in texts], self.sot_id, self.eot_id,
                            context_length or self.context_length)

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
