"""Codebook usage: counting (host and jit), usage / official usage / perplexity, streaming and process merge."""

import jax
import numpy as np
import pytest

import unitok_jax  # noqa: F401
from unitok_jax.evals import codebook as cb


def test_counts_host_and_device_agree():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, (5, 3, 7))  # UniTok layout [b, k, n]
    u = cb.CodebookUsage(3, 16)
    u.update(idx)
    ref = np.stack([np.bincount(idx[:, i].ravel(), minlength=16) for i in range(3)])
    np.testing.assert_array_equal(u.counts, ref)
    dev = jax.jit(lambda x: cb.batch_code_counts(x, 3, 16))(idx)
    np.testing.assert_array_equal(np.asarray(dev), ref)
    # Codebook-last layout and a single shared codebook (TokenFlow).
    np.testing.assert_array_equal(
        np.asarray(cb.batch_code_counts(np.moveaxis(idx, 1, -1), 3, 16, codebook_axis=-1)), ref
    )
    single = cb.CodebookUsage(1, 16, codebook_axis=None)
    single.update(idx)
    np.testing.assert_array_equal(single.counts[0], ref.sum(0))
    # Out-of-range: host raises, device drops.
    with pytest.raises(ValueError, match="out of range"):
        u.update(np.full((1, 3, 1), 16))
    bad = np.zeros((1, 3, 2), np.int32)
    bad[0, 0, 1] = 99
    assert int(np.asarray(cb.batch_code_counts(bad, 3, 16)).sum()) == 5
    with pytest.raises(ValueError, match="expected 3"):
        u.update(np.zeros((2, 4, 5), np.int32))


def test_summary_values():
    k_size = 200
    counts = np.zeros((3, k_size), np.int64)
    counts[0] = 5  # uniform: all used, perplexity K
    counts[1, 0] = 1000  # one code
    counts[2, :100] = 1  # half the entries once, plus one dominant entry
    counts[2, 100] = 10_000
    s = cb.codebook_summary(counts, prefix="eval/codebook/")
    assert s["eval/codebook/usage/cb0"] == 1.0 and s["eval/codebook/perplexity/cb0"] == pytest.approx(k_size)
    assert s["eval/codebook/usage_official/cb0"] == 1.0
    assert s["eval/codebook/usage/cb1"] == 1 / k_size and s["eval/codebook/perplexity/cb1"] == pytest.approx(1.0)
    assert s["eval/codebook/usage_official/cb1"] == 1 / k_size
    # cb2: 101 entries used; the rare ones have p = 1/10100 = 9.9e-5 > 0.01/200 = 5e-5, so they count officially.
    assert s["eval/codebook/usage/cb2"] == 101 / k_size
    assert s["eval/codebook/usage_official/cb2"] == 101 / k_size
    p = np.r_[np.full(100, 1 / 10_100), 10_000 / 10_100]
    assert s["eval/codebook/perplexity/cb2"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert s["eval/codebook/usage"] == pytest.approx((1 + 1 / k_size + 101 / k_size) / 3)
    assert s["eval/codebook/num_tokens"] == 1000
    # Official threshold really cuts: a code used once among 1e6 tokens is "used" but not "officially used".
    c = np.zeros((1, 10), np.int64)
    c[0, 0], c[0, 1] = 1_000_000, 1
    s = cb.codebook_summary(c)
    assert s["usage"] == 0.2 and s["usage_official"] == 0.1
    assert set(s) == {
        "usage",
        "usage_official",
        "perplexity",
        "num_tokens",
        "usage/cb0",
        "usage_official/cb0",
        "perplexity/cb0",
    }


def test_empty_codebook():
    s = cb.codebook_summary(np.zeros((2, 8), np.int64))
    assert s["usage"] == 0.0 and s["usage_official"] == 0.0 and np.isnan(s["perplexity"])


def test_streaming_and_merge_equal_one_shot():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 64, (40, 2, 9))
    one = cb.CodebookUsage(2, 64)
    one.update(idx)
    a, b = cb.CodebookUsage(2, 64), cb.CodebookUsage(2, 64)
    for i in range(0, 40, 6):
        (a if i % 12 else b).update(idx[i : i + 6])
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.counts, one.counts)
    dev = cb.CodebookUsage(2, 64)
    for i in range(0, 40, 8):
        dev.update_counts(cb.batch_code_counts(idx[i : i + 8], 2, 64))
    np.testing.assert_array_equal(dev.counts, one.counts)
    assert merged.compute() == one.compute() == cb.codebook_summary(one.counts)


def test_allreduce_simulated_two_processes(monkeypatch):
    from jax.experimental import multihost_utils

    u = cb.CodebookUsage(2, 8)
    u.update(np.array([[[0, 1, 1], [2, 3, 3]]]))  # [b=1, k=2, n=3]
    other = np.zeros((2, 8), np.int64)
    other[1, 7] = 3_000_000_000  # beyond int32: the hi/lo float transport keeps integers exact

    sent = []

    def fake_allgather(x, tiled=False):
        x = np.asarray(x)
        from unitok_jax import evals

        hi, lo = evals._split_f64(other.astype(np.float64))
        theirs = hi if len(sent) == 0 else lo
        sent.append(x.dtype)
        return np.stack([x, theirs])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    total = u.allreduce()
    assert total.dtype == np.int64 and sent == [np.float32, np.float32]
    np.testing.assert_array_equal(total, u.counts + other)
