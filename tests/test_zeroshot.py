"""Zero-shot classifier and retrieval on synthetic embeddings; the ImageNet class / template data files."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unitok_jax  # noqa: F401
from unitok_jax.evals import zeroshot as zs


def test_data_files():
    names = zs.imagenet_classnames()
    templates = zs.openai_imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80
    assert len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)
    # Class-index order spot checks (ImageNet-1k labels).
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet paper"
    assert names[151] == "Chihuahua" and names[281] == "tabby cat" and names[409] == "analog clock"
    assert names[852] == "tennis ball" and names[954] == "banana"
    # The OpenAI list keeps one duplicate name ('missile' for 'missile' and 'projectile, missile').
    assert len(set(names)) == 999 and names[657] == names[744] == "missile"
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert all(n == n.strip() and n for n in names)


def _toy_text_tower(d=16, seed=0):
    """A 'text tower' whose embedding is a class direction (from the class word) plus template-dependent noise."""
    rng = np.random.default_rng(seed)
    vocab = {}

    def tokenizer(texts):
        ids = []
        for t in texts:
            word = t.split("<")[1].split(">")[0]  # class names are wrapped as <name> in the test
            ids.append([vocab.setdefault(word, len(vocab)), zlib.crc32(t.encode()) % 997])
        return np.asarray(ids)

    class_dirs = rng.standard_normal((64, d))
    noise = rng.standard_normal((997, d))
    calls = []

    def encode(tokens):
        tokens = np.asarray(tokens)
        calls.append(tokens.shape[0])
        return jnp.asarray(class_dirs[tokens[:, 0]] * 5.0 + 0.5 * noise[tokens[:, 1]])

    return tokenizer, encode, class_dirs, vocab, calls


def test_build_classifier_and_perfect_separation():
    tokenizer, encode, class_dirs, vocab, calls = _toy_text_tower()
    names = [f"<c{i}>" for i in range(23)]
    templates = ["a photo of a {}.", "art of the {}.", "itap of my {}."]
    w = zs.build_classifier(encode, tokenizer, names, templates, batch_classes=10)
    assert w.shape == (16, 23)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=0), 1.0, atol=1e-6)
    assert calls == [30, 30, 30]  # fixed batch shape: 10 classes x 3 templates, last batch padded
    # Manual ensemble for one class: normalise each prompt, average, renormalise.
    e = np.asarray(encode(tokenizer([t.format(names[4]) for t in templates])))
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    ref = e.mean(0) / np.linalg.norm(e.mean(0))
    np.testing.assert_allclose(np.asarray(w[:, 4]), ref, atol=1e-6)

    # Images lying along their class direction are perfectly separated.
    labels = np.arange(23).repeat(3)
    ids = np.asarray([vocab[n.strip("<>")] for n in names])[labels]
    img = class_dirs[ids] + 0.05 * np.random.default_rng(1).standard_normal((69, 16))
    logits = zs.zero_shot_logits(img, w)
    assert logits.shape == (69, 23)
    acc = zs.topk_accuracy(logits, labels, ks=(1, 5))
    assert acc == {"top1": 1.0, "top5": 1.0}
    # scale only rescales; normalisation makes image norms irrelevant.
    np.testing.assert_allclose(
        np.asarray(zs.zero_shot_logits(3 * img, w, scale=1.0)) * 100, np.asarray(logits), rtol=1e-5, atol=1e-4
    )
    # Callable templates work too.
    w2 = zs.build_classifier(encode, tokenizer, names[:2], [lambda c: f"a photo of a {c}."])
    assert w2.shape == (16, 2)


def test_topk_accuracy_counts():
    logits = jnp.asarray(
        [
            [0.1, 0.9, 0.0, 0.3],  # label 1: top1
            [0.8, 0.1, 0.5, 0.3],  # label 2: rank 2
            [0.1, 0.2, 0.3, 0.4],  # label 0: rank 4
            [0.1, 0.2, 0.3, 0.4],
        ]
    )  # label -1: padding, ignored
    labels = jnp.asarray([1, 2, 0, -1])
    assert zs.topk_accuracy(logits, labels, ks=(1, 2, 4, 5)) == {"top1": 1 / 3, "top2": 2 / 3, "top4": 1.0, "top5": 1.0}
    counts = jax.jit(lambda a, b: zs.topk_correct(a, b, (1, 2)))(logits, labels)
    assert int(counts[1]) == 1 and int(counts[2]) == 2
    acc = zs.TopKAccumulator(ks=(1, 2))
    acc.update(logits[:2], labels[:2])
    acc.update(logits[2:], labels[2:])
    assert acc.compute() == {"top1": 1 / 3, "top2": 2 / 3, "count": 3}


def test_chance_accuracy_and_summary():
    assert zs.chance_accuracy(1000) == 0.001
    assert zs.chance_accuracy(1000, k=5) == 0.005
    assert zs.chance_accuracy(3, k=5) == 1.0
    with pytest.raises(ValueError):
        zs.chance_accuracy(0)
    s = zs.zero_shot_summary({"top1": 0.5, "top5": 0.9}, 1000)
    assert s == {
        "zeroshot/top1": 0.5,
        "zeroshot/top5": 0.9,
        "zeroshot/chance_top1": 0.001,
        "zeroshot/chance_top5": 0.005,
    }


def test_recall_at_k():
    rng = np.random.default_rng(2)
    n, d = 50, 32
    img = rng.standard_normal((n, d))
    # Perfect pairs: every match is rank 0.
    r = zs.recall_at_k(img, 2.0 * img, ks=(1, 5))
    assert all(v == 1.0 for v in r.values()) and set(r) == {
        "image_to_text/R@1",
        "image_to_text/R@5",
        "text_to_image/R@1",
        "text_to_image/R@5",
    }
    # Unrelated features: recall@k ~ k / n.
    r = zs.recall_at_k(img, rng.standard_normal((n, d)), ks=(1, 10, 50))
    assert r["image_to_text/R@50"] == 1.0 and r["text_to_image/R@50"] == 1.0
    assert r["image_to_text/R@1"] <= 0.15
    # A hand-made case where the two directions differ.
    img3 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt3 = np.array([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    # i2t: img0 best text is t1 (not t0) -> rank 1; img1 best t2 (rank of t1 = 2); img2 -> t0/t1/t2 ...
    sim = (img3 / np.linalg.norm(img3, axis=1, keepdims=True)) @ (txt3 / np.linalg.norm(txt3, axis=1, keepdims=True)).T
    rank_i2t = (sim > np.diag(sim)[:, None]).sum(1)
    rank_t2i = (sim > np.diag(sim)[None, :]).sum(0)
    r = zs.recall_at_k(img3, txt3, ks=(1, 2))
    for k in (1, 2):
        assert r[f"image_to_text/R@{k}"] == pytest.approx(np.mean(rank_i2t < k))
        assert r[f"text_to_image/R@{k}"] == pytest.approx(np.mean(rank_t2i < k))
    assert r["image_to_text/R@1"] != r["text_to_image/R@1"]
    with pytest.raises(ValueError, match="paired"):
        zs.recall_at_k(img3, txt3[:2])
