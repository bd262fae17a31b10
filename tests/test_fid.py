"""FID maths: sqrtm vs scipy, Frechet distance invariants and known values, streaming stats, multi-process
merge (simulated), .npz cache, Inception Score, and the FidEvaluator flow with a stand-in feature function."""

import numpy as np
import pytest

import unitok_jax  # noqa: F401
from unitok_jax import evals
from unitok_jax.evals import fid

sl = pytest.importorskip("scipy.linalg")  # reference: what pytorch-fid calls


def _cov(rng, d, n, jitter=0.0):
    x = rng.standard_normal((n, d)) @ (0.3 * rng.standard_normal((d, d))) + rng.standard_normal(d)
    return np.cov(x, rowvar=False) + jitter * np.eye(d)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    "n,jitter",
    [(200, 0.0), (40, 1e-9), (40, 1e-6)],  # SPD; near-singular (rank 40 of 64 + tiny ridge); singular-ish
    ids=["spd", "near_singular_1e-9", "near_singular_1e-6"],
)
def test_sqrtm_matches_scipy_symmetric(n, jitter):
    rng = np.random.default_rng(n)
    a = _cov(rng, 64, n, jitter)
    ref = sl.sqrtm(a)
    got = fid.sqrtm(a)
    assert not np.iscomplexobj(got)
    assert _rel(got, ref) <= 1e-6
    np.testing.assert_allclose(fid.sqrtm_psd(a), got, atol=1e-10 * np.abs(got).max())


@pytest.mark.parametrize(
    "n1,n2,jitter",
    [(200, 200, 0.0), (40, 200, 1e-6), (40, 40, 1e-9)],
    ids=["spd", "near_singular", "both_near_singular"],
)
def test_sqrtm_matches_scipy_product(n1, n2, jitter):
    rng = np.random.default_rng(n1 + 7 * n2)
    s1, s2 = _cov(rng, 48, n1, jitter), _cov(rng, 48, n2, jitter)
    a = s1 @ s2  # not symmetric: the general path
    ref = sl.sqrtm(a)
    got = fid.sqrtm(a)
    assert _rel(got, ref) <= 1e-6
    assert _rel(got @ got, a) <= 1e-8
    tr_ref = np.trace(ref).real
    assert abs(fid.trace_sqrt_product(s1, s2) - tr_ref) <= 1e-6 * abs(tr_ref)
    # Both similarity transforms (Cholesky for PD S1, eigh square root otherwise) give the same trace.
    r = fid.sqrtm_psd(s1)
    tr_eigh = np.sqrt(np.maximum(np.linalg.eigvalsh(r @ s2 @ r), 0)).sum()
    assert abs(fid.trace_sqrt_product(s1, s2) - tr_eigh) <= 1e-7 * abs(tr_eigh)


def test_sqrtm_edge_cases():
    np.testing.assert_allclose(fid.sqrtm(np.diag([4.0, 9.0, 0.0])), np.diag([2.0, 3.0, 0.0]))
    np.testing.assert_array_equal(fid.sqrtm(np.zeros((3, 3))), np.zeros((3, 3)))
    # A defective (non-diagonalisable) matrix: no eigendecomposition, scipy's Schur method still works.
    jordan = np.array([[4.0, 1.0], [0.0, 4.0]])
    got = fid.sqrtm(jordan)
    np.testing.assert_allclose(got, sl.sqrtm(jordan), atol=1e-10)
    np.testing.assert_allclose(got @ got, jordan, atol=1e-10)
    # Negative eigenvalue: complex principal root, like scipy.
    neg = np.diag([-4.0, 1.0])
    np.testing.assert_allclose(fid.sqrtm(neg), sl.sqrtm(neg), atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        fid.sqrtm(np.zeros((2, 3)))


def test_fid_identical_and_symmetric():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(32), _cov(rng, 32, 100)
    assert abs(fid.frechet_distance(mu, s, mu, s)) <= 1e-9 * np.trace(s)
    mu2, s2 = rng.standard_normal(32), _cov(rng, 32, 100)
    d12, d21 = fid.frechet_distance(mu, s, mu2, s2), fid.frechet_distance(mu2, s2, mu, s)
    assert d12 > 0 and abs(d12 - d21) <= 1e-9 * d12
    # pytorch-fid's literal formula (sqrtm of the product) agrees.
    assert abs(fid.frechet_distance(mu, s, mu2, s2, method="sqrtm") - d12) <= 1e-8 * d12


def test_fid_known_value_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([4.0, 1.0, 0.25, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 5 + (1 + 1 + 0 + 0.5)
    for method in ("eigh", "sqrtm"):
        got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Singular covariances (rank-deficient): still exact with the symmetric method.
    got = fid.frechet_distance(mu1, np.diag([1.0, 0.0, 0.0, 0.0]), mu1, np.diag([0.0, 4.0, 0.0, 0.0]))
    np.testing.assert_allclose(got, 5.0, rtol=1e-12)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        fid.frechet_distance(mu1, np.diag(a), mu2[:3], np.diag(b[:3]))


def test_fid_matches_scipy_reference_on_singular_features():
    # Fewer samples than dimensions (singular covariances): pytorch-fid's formula with scipy as the reference.
    rng = np.random.default_rng(3)
    f1, f2 = rng.standard_normal((30, 64)), 0.5 + rng.standard_normal((30, 64))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = sl.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = 1e-6 * np.eye(64)
        covmean = sl.sqrtm((s1 + off) @ (s2 + off))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - ref) <= 1e-6 * abs(ref)


def test_feature_stats_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    feats = 3.0 + rng.standard_normal((257, 16))
    one = fid.FeatureStats(16).update(feats)
    parts = [fid.FeatureStats(16).update(feats[i:j]) for i, j in [(0, 100), (100, 101), (101, 257)]]
    merged = parts[2].merge(parts[0]).merge(parts[1])
    streamed = fid.FeatureStats(16)
    for i in range(0, 257, 64):
        streamed.update(feats[i : i + 64])
    for s in (one, merged, streamed):
        assert s.count == 257
        np.testing.assert_allclose(s.mean(), feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.covariance(), np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    summed = fid.FeatureStats(16).update_sums(257, feats.sum(0), feats.T @ feats)
    np.testing.assert_allclose(summed.covariance(), one.covariance(), rtol=1e-9, atol=1e-12)  # raw sums cancel a bit
    with pytest.raises(ValueError, match="feature dim"):
        one.update(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureStats(4).update(np.zeros((1, 4))).covariance()


def test_large_mean_no_cancellation():
    rng = np.random.default_rng(8)
    feats = 1e6 + rng.standard_normal((300, 4))
    s = fid.FeatureStats(4)
    for i in range(0, 300, 7):
        s.update(feats[i : i + 7])
    np.testing.assert_allclose(s.covariance(), np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-9)


def test_allreduce_single_process_is_identity():
    s = fid.FeatureStats(4).update(np.arange(12.0).reshape(3, 4))
    r = s.allreduce()
    assert r.count == 3 and r is not s
    np.testing.assert_array_equal(r.covariance(), s.covariance())


def test_allreduce_simulated_two_processes(monkeypatch):
    """Two fake processes: process_allgather stacks this process's payload with a second one's."""
    import jax
    from jax.experimental import multihost_utils

    rng = np.random.default_rng(2)
    fa, fb = 1e3 + rng.standard_normal((50, 8)), 1e3 + rng.standard_normal((70, 8))
    sa, sb = fid.FeatureStats(8).update(fa), fid.FeatureStats(8).update(fb)
    other = {}  # payloads "sent" by the second process, in call order

    def fake_allgather(x, tiled=False):
        x = np.asarray(x)
        key = (x.shape, str(x.dtype), len(other.setdefault("calls", [])))
        other["calls"].append(key)
        theirs = other["queue"].pop(0)
        return np.stack([x, np.asarray(theirs, x.dtype)])

    # What process b would send, in the order allreduce sends it: count (hi, lo), mean (hi, lo), M2 (hi, lo).
    queue = []
    for v in (np.asarray([sb.count], np.float64), sb.mean(), sb.m2):
        queue.extend(evals._split_f64(np.asarray(v, np.float64)))
    other["queue"] = queue
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    r = sa.allreduce()
    both = np.concatenate([fa, fb])
    assert r.count == 120
    # The float32 hi/lo transport keeps ~1e-14 relative precision; centred scatter avoids cancellation at mean 1e3.
    np.testing.assert_allclose(r.mean(), both.mean(0), rtol=1e-13)
    np.testing.assert_allclose(r.covariance(), np.cov(both, rowvar=False), rtol=1e-10, atol=1e-12)


def test_split_f64_precision():
    x = np.array([np.pi * 1e6, 123456789012.0, 1e-3 / 3, 2.0**40 + 1])
    hi, lo = evals._split_f64(x)
    assert hi.dtype == lo.dtype == np.float32
    np.testing.assert_allclose(hi.astype(np.float64) + lo.astype(np.float64), x, rtol=1e-14)


def test_reference_stats_npz_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.FeatureStats(8).update(rng.standard_normal((40, 8)))
    fp = fid.source_fingerprint(dataset="imagenet", split="val", resolution=256, n=40)
    assert fp == fid.source_fingerprint(n=40, resolution=256, split="val", dataset="imagenet")  # order-free
    assert fp != fid.source_fingerprint(dataset="imagenet", split="val", resolution=384, n=40)
    ref = stats.to_reference(fp)
    path = tmp_path / "sub" / "ref.npz"
    ref.save(path)
    loaded = fid.ReferenceStats.load(path, expected_fingerprint=fp)
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)
    assert loaded.count == 40 and loaded.fingerprint == fp
    with pytest.raises(ValueError, match="different source"):
        fid.ReferenceStats.load(path, expected_fingerprint="0" * 64)
    # pytorch-fid style cache: only mu and sigma.
    legacy = tmp_path / "legacy.npz"
    np.savez(legacy, mu=ref.mu, sigma=ref.sigma)
    old = fid.ReferenceStats.load(legacy)
    assert old.count == 0 and old.fingerprint == ""
    np.savez(tmp_path / "bad.npz", mean=ref.mu)
    with pytest.raises(ValueError, match="mu"):
        fid.ReferenceStats.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        fid.ReferenceStats.load(tmp_path / "missing.npz")


def test_file_digest(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"abc")
    assert fid.file_digest(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_inception_score_uniform_and_peaked():
    n, c = 1000, 1008
    mean, std = fid.inception_score(np.zeros((n, c)))
    assert abs(mean - 1.0) < 1e-12 and std < 1e-12
    # Confident and balanced over 10 classes in every split -> IS = 10.
    logits = np.full((n, c), -1e4)
    logits[np.arange(n), np.arange(n) % 10] = 0.0
    mean, std = fid.inception_score(logits)
    assert abs(mean - 10.0) < 1e-6 and std < 1e-6
    mean_shuf, _ = fid.inception_score(logits, shuffle=True, seed=0)
    assert 9.0 < mean_shuf <= 10.0 + 1e-9  # shuffled splits are only roughly balanced
    # Against a direct formula on random logits with uneven split sizes (N = 1003).
    x = np.random.default_rng(5).standard_normal((1003, 20)) * 3
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    scores = []
    for i in range(10):
        pc = p[i * 1003 // 10 : (i + 1) * 1003 // 10]
        scores.append(np.exp(np.mean(np.sum(pc * (np.log(pc) - np.log(pc.mean(0))), 1))))
    got = fid.inception_score(x)
    np.testing.assert_allclose(got, (np.mean(scores), np.std(scores)), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 10"):
        fid.inception_score(np.zeros((5, 3)))


# ------------------------------------------------------------------------------------------- evaluator


def test_evaluator_skips_without_weights():
    ev = fid.FidEvaluator(None, None)
    assert not ev.available
    ev.update(np.zeros((2, 8, 8, 3), np.float32))
    assert ev.compute() == {
        "skipped": "no InceptionV3 weights: set eval.fid.inception_path to pt_inception-2015-12-05-6726825d.pth"
    }


def _toy_features(images):
    """Stand-in for the InceptionV3: a fixed random projection of the pixels to 'pool3' and 'logits'."""
    x = np.asarray(images, np.float64).reshape(images.shape[0], -1)
    rng = np.random.default_rng(123)
    w = rng.standard_normal((x.shape[1], 16))
    v = rng.standard_normal((16, 12))
    pool3 = np.tanh(x @ w / np.sqrt(x.shape[1]))
    return {"pool3": pool3, "logits_unbiased": 4 * pool3 @ v}


def test_evaluator_flow_and_reference_cache(tmp_path):
    rng = np.random.default_rng(6)
    real = rng.uniform(0, 1, (45, 4, 4, 3)).astype(np.float32)
    fake = np.clip(real + 0.2 * rng.standard_normal(real.shape), 0, 1).astype(np.float32)
    cache = tmp_path / "ref_stats.npz"
    fp = fid.source_fingerprint(toy=True)
    ev = fid.FidEvaluator("unused", cache, feature_fn=_toy_features, feature_dim=16, reference_fingerprint=fp)
    for i in range(0, 45, 16):  # last batch short (13): padded and sliced
        ev.update(fake[i : i + 16], reference_images=real[i : i + 16])
    out = ev.compute()
    f_fake, f_real = _toy_features(fake), _toy_features(real)
    expected = fid.frechet_distance(
        f_fake["pool3"].mean(0),
        np.cov(f_fake["pool3"], rowvar=False),
        f_real["pool3"].mean(0),
        np.cov(f_real["pool3"], rowvar=False),
    )
    np.testing.assert_allclose(out["fid"], expected, rtol=1e-8)
    assert out["num_images"] == 45 and out["num_reference"] == 45
    is_ref = fid.inception_score(f_fake["logits_unbiased"], shuffle=True, seed=2020)
    np.testing.assert_allclose([out["inception_score"], out["inception_score_std"]], is_ref, rtol=1e-5)
    assert cache.exists()

    # A second evaluator reuses the cached reference and ignores reference images.
    ev2 = fid.FidEvaluator("unused", cache, feature_fn=_toy_features, feature_dim=16, reference_fingerprint=fp)
    assert ev2.reference is not None and ev2.reference.count == 45
    ev2.update(fake, reference_images=np.zeros_like(real))
    np.testing.assert_allclose(ev2.compute()["fid"], expected, rtol=1e-8)
    ev2.reset()
    assert ev2.compute()["fid_skipped"].startswith("only 0 images")
    # Stale cache: a different fingerprint refuses to load.
    with pytest.raises(ValueError, match="different source"):
        fid.FidEvaluator("unused", cache, feature_fn=_toy_features, feature_dim=16, reference_fingerprint="x")
    # No reference at all: FID skipped, IS still reported.
    ev3 = fid.FidEvaluator("unused", None, feature_fn=_toy_features, feature_dim=16)
    ev3.update(fake)
    out3 = ev3.compute()
    assert "fid" not in out3 and "reference" in out3["fid_skipped"] and "inception_score" in out3


@pytest.mark.slow
def test_evaluator_with_inception_network():
    """The real wiring: state dict -> FidInceptionV3 -> jitted forward -> stats (random weights, tiny set)."""
    from unitok_jax.evals import inception

    rng = np.random.default_rng(9)
    real = rng.uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
    ev = fid.FidEvaluator(inception.random_state_dict(0), None, is_splits=2)
    assert ev.available
    ev.update(real[:2], reference_images=real[:2])  # one network call on 4 images
    ev.update(real[2:], reference_images=real[2:])  # 1 + 1 padded to 4: same compiled shape
    # Same images on both sides -> identical statistics (padding and batching do not leak into features).
    np.testing.assert_allclose(ev.stats.mean(), ev.reference_accum.mean(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ev.stats.m2, ev.reference_accum.m2, rtol=1e-5, atol=1e-6)
    out = ev.compute()  # 2048-d Frechet distance of rank-2 covariances
    assert out["num_images"] == 3 and out["num_reference"] == 3
    trace = np.trace(ev.stats.covariance())
    assert abs(out["fid"]) <= 1e-5 * trace
    assert 1.0 <= out["inception_score"] <= 1008
