"""Zero-shot classification (prompt-ensembled text classifier) and image-text retrieval recall@k.

Model-agnostic: takes plain callables (`tokenizer(list[str]) -> tokens`, `encode_text_fn(tokens) -> [n, d]`) and
arrays, so any CLIP-style tower works. Mirrors open_clip's `build_zero_shot_classifier` as used by UniTok
(`utils/eval_acc.py`): for each class, encode its prompts (80 OpenAI ImageNet templates by default),
L2-normalise each, average, re-normalise; classes processed `batch_classes` at a time (10 in UniTok);
logits = 100 * normalised image features @ classifier (a fixed 100, not the learned logit scale).
Data files (evals/data/): imagenet_classes.txt = open_clip `IMAGENET_CLASSNAMES` (1000 OpenAI-cleaned names,
class-index order; note 'missile' appears twice, at 657 and 744, as in the original list) and
clip_templates.txt = `OPENAI_IMAGENET_TEMPLATES` (80, '{}' marks the class name).
Not here: image pre-processing and the dataset loop (the trainer's eval step), the text tokenizer.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.evals import sum_across_processes

DATA_DIR = pathlib.Path(__file__).parent / "data"
_HIGHEST = jax.lax.Precision.HIGHEST


def _read_lines(name: str) -> list[str]:
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: the package data of unitok_jax.evals was not installed")
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def imagenet_classnames() -> list[str]:
    """The 1000 OpenAI CLIP ImageNet class names (open_clip IMAGENET_CLASSNAMES), index = ImageNet label."""
    return _read_lines("imagenet_classes.txt")


def openai_imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates (open_clip OPENAI_IMAGENET_TEMPLATES), '{}' = class name."""
    return _read_lines("clip_templates.txt")


def _format(template: str | Callable[[str], str], class_name: str) -> str:
    return template(class_name) if callable(template) else template.format(class_name)


def _l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def build_classifier(
    encode_text_fn: Callable[[object], jax.Array],
    tokenizer: Callable[[list[str]], object],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    batch_classes: int = 10,
) -> jax.Array:
    """Zero-shot classifier weights [d, C] (float32, unit-norm columns).

    Every call to `encode_text_fn` sees exactly batch_classes * len(templates) prompts (the last batch is padded
    by repeating its last class and the padding is dropped), so a jitted text tower compiles once.
    """
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    names = list(class_names)
    n_t = len(templates)
    columns = []
    for start in range(0, len(names), batch_classes):
        batch = names[start : start + batch_classes]
        n_real = len(batch)
        batch = batch + [batch[-1]] * (batch_classes - n_real)
        texts = [_format(t, c) for c in batch for t in templates]
        emb = jnp.asarray(encode_text_fn(tokenizer(texts)), jnp.float32)
        if emb.shape[0] != len(texts):
            raise ValueError(f"encode_text_fn returned {emb.shape[0]} embeddings for {len(texts)} prompts")
        emb = _l2_normalize(emb).reshape(batch_classes, n_t, -1)
        columns.append(_l2_normalize(emb.mean(axis=1))[:n_real])
    return jnp.concatenate(columns, axis=0).T


def zero_shot_logits(
    image_features: jax.Array, classifier: jax.Array, scale: float = 100.0, *, normalize: bool = True
) -> jax.Array:
    """scale * normalise(image_features) @ classifier: [b, d] x [d, C] -> [b, C] float32 logits."""
    f = _l2_normalize(image_features) if normalize else jnp.asarray(image_features, jnp.float32)
    return scale * jnp.dot(f, jnp.asarray(classifier, jnp.float32), precision=_HIGHEST)


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)) -> dict[int, jax.Array]:
    """{k: number of rows whose label is among the k highest logits} (jit-able). Labels < 0 (padding) never count."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    kmax = min(max(ks), logits.shape[-1])
    _, top = jax.lax.top_k(logits, kmax)  # [b, kmax], highest first
    hit = (top == labels[:, None]) & (labels[:, None] >= 0)
    return {k: jnp.sum(jnp.any(hit[:, : min(k, kmax)], axis=1)) for k in ks}


def topk_accuracy(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{'top1': fraction, 'top5': fraction} over rows with labels >= 0 (fractions in [0, 1])."""
    counts = topk_correct(logits, labels, ks)
    n = int(np.sum(np.asarray(labels) >= 0))
    return {f"top{k}": float(counts[k]) / max(n, 1) for k in ks}


class TopKAccumulator:
    """Sums top-k hits and the number of labelled rows over batches and processes (`compute` is collective)."""

    def __init__(self, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.correct = np.zeros(len(self.ks), np.int64)
        self.count = 0

    def update(self, logits, labels) -> None:
        counts = topk_correct(logits, labels, self.ks)
        self.correct += np.asarray([int(counts[k]) for k in self.ks], np.int64)
        self.count += int(np.sum(np.asarray(labels) >= 0))

    def compute(self) -> dict[str, float]:
        totals = sum_across_processes(np.concatenate([self.correct, [self.count]]).astype(np.int64))
        n = int(totals[-1])
        return {f"top{k}": float(c) / max(n, 1) for k, c in zip(self.ks, totals[:-1])} | {"count": n}


def recall_at_k(image_feats: jax.Array, text_feats: jax.Array, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall@k with one caption per image (pair i is the match): keys 'image_to_text/R@k' and
    'text_to_image/R@k', fractions in [0, 1]. Features are L2-normalised here (cosine similarity).

    Rank of the match = number of candidates scoring strictly higher, so exact ties count as retrieved.
    """
    img = _l2_normalize(image_feats)
    txt = _l2_normalize(text_feats)
    if img.shape != txt.shape:
        raise ValueError(f"need paired features of equal shape, got {img.shape} and {txt.shape}")
    sim = jnp.dot(img, txt.T, precision=_HIGHEST)  # [n_img, n_txt]
    diag = jnp.diagonal(sim)
    rank_i2t = jnp.sum(sim > diag[:, None], axis=1)  # texts beating the true caption, per image
    rank_t2i = jnp.sum(sim > diag[None, :], axis=0)  # images beating the true image, per caption
    out = {}
    for k in ks:
        out[f"image_to_text/R@{k}"] = float(jnp.mean(rank_i2t < k))
        out[f"text_to_image/R@{k}"] = float(jnp.mean(rank_t2i < k))
    return out


def chance_accuracy(num_classes: int, k: int = 1) -> float:
    """Expected top-k accuracy of a uniformly random classifier: min(k, C) / C."""
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    return min(k, num_classes) / num_classes


def zero_shot_summary(metrics: Mapping[str, float], num_classes: int, prefix: str = "zeroshot") -> dict[str, float]:
    """Flat metric keys: {'zeroshot/top1': ..., 'zeroshot/top5': ..., 'zeroshot/chance_top1': ...}."""
    out = {f"{prefix}/{k}": v for k, v in metrics.items()}
    for key in metrics:
        if key.startswith("top") and key[3:].isdigit():
            out[f"{prefix}/chance_{key}"] = chance_accuracy(num_classes, int(key[3:]))
    return out
