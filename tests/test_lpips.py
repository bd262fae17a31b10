"""LPIPS: parity with UniTok's official LPIPS on random weights (fixtures/lpips_random.*), invariants, loader errors.

Tolerances follow fixtures/README.md §1: activations/losses max|ours-ref| <= 2e-5*max(1, max|ref|); input gradients
<= 5e-5*max|ref|.
"""

import numpy as np
import pytest

import unitok_jax  # noqa: F401  (flax config)
import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import lpips as lp


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    with np.load(fixtures_dir / "lpips_random.npz") as z:
        return {k: np.asarray(z[k]) for k in z.files}


@pytest.fixture(scope="module")
def model(fixture):
    return lp.load_lpips(fixture)  # a dict with param/ prefix: the prefix is stripped


def nhwc(a):
    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def to_nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def assert_act(ours, ref, name):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = np.max(np.abs(ours - ref))
    tol = 2e-5 * max(1.0, np.max(np.abs(ref)))
    assert err <= tol, f"{name}: max err {err:.3g} > {tol:.3g}"


def test_forward_parity(model, fixture):
    x0, x1 = nhwc(fixture["in/x0"]), nhwc(fixture["in/x1"])
    out = jax.jit(lambda m, a, b: m.layer_outputs(a, b))(model, x0, x1)
    assert_act(to_nchw(out["scaled_input"]), fixture["out/scaled_input"], "scaled_input")
    for i in range(5):
        assert_act(to_nchw(out["maps"][i]), fixture[f"out/layer{i}_map"], f"layer{i}_map")
        assert_act(out["per_sample"][i], fixture[f"out/layer{i}_per_sample"], f"layer{i}_per_sample")
        assert_act(out["dists"][i], fixture[f"out/layer{i}_dist"], f"layer{i}_dist")
    assert_act(to_nchw(out["features"][3]), fixture["out/feat3"], "feat3")
    assert_act(to_nchw(out["features"][4]), fixture["out/feat4"], "feat4")
    assert_act(out["value"], fixture["out/lpips"], "lpips")
    assert_act(lp.lpips_loss(model, x0, x1), fixture["out/lpips"], "lpips_loss")
    assert_act(jnp.sum(model(x0, x1)) / 2, fixture["out/sum_of_layer_dists"], "per_example")


@pytest.mark.slow
def test_input_gradient_parity(model, fixture):
    x0, x1 = nhwc(fixture["in/x0"]), nhwc(fixture["in/x1"])
    g0, g1 = jax.jit(jax.grad(lambda a, b: lp.lpips_loss(model, a, b), argnums=(0, 1)))(x0, x1)
    for ours, key in ((g0, "grad/in0"), (g1, "grad/in1")):
        ref = fixture[key]
        err = np.max(np.abs(to_nchw(ours).astype(np.float64) - ref))
        tol = 5e-5 * np.max(np.abs(ref))
        assert err <= tol, f"{key}: max err {err:.3g} > {tol:.3g}"


def test_identical_inputs_give_zero(model, fixture):
    x = nhwc(fixture["in/x0"])
    d = model(x, x)
    assert d.shape == (2,)
    np.testing.assert_array_equal(np.asarray(d), 0.0)


def test_abstract_shapes_any_resolution():
    m = nnx.eval_shape(lambda: lp.LPIPS(nnx.Rngs(0)))  # no 14.7 M-weight random init on CPU
    x = jax.ShapeDtypeStruct((3, 48, 40, 3), jnp.float32)
    out = jax.eval_shape(lambda mod, a, b: mod.layer_outputs(a, b), m, x, x)
    assert out["per_example"].shape == (3,) and out["value"].shape == ()
    assert [t.shape[1:3] for t in out["maps"]] == [(48, 40), (24, 20), (12, 10), (6, 5), (3, 2)]


def _state_dict(fixture):
    return {k[len("param/") :]: v for k, v in fixture.items() if k.startswith("param/")}


def test_loader_accepts_npz_and_plain_dict(tmp_path, fixture, model):
    sd = _state_dict(fixture)
    # The official .pth holds only net.* + lins.*; shift/scale_inv are buffers registered afterwards.
    bare = {k: v for k, v in sd.items() if k not in ("shift", "scale_inv")}
    m2 = lp.load_lpips(bare)
    path = tmp_path / "w.npz"
    np.savez(path, **sd)
    m3 = lp.load_lpips(str(path))
    x0, x1 = nhwc(fixture["in/x0"]), nhwc(fixture["in/x1"])
    ref = np.asarray(model(x0, x1))
    np.testing.assert_allclose(np.asarray(m2(x0, x1)), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m3(x0, x1)), ref, rtol=0, atol=0)


def test_loader_errors(fixture):
    sd = _state_dict(fixture)
    missing = dict(sd)
    del missing["lins.2.model.1.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['lins.2.model.1.weight'\]"):
        lp.load_lpips(missing)
    extra = dict(sd, **{"net.slice6.0.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: \['net.slice6.0.weight'\]"):
        lp.load_lpips(extra)
    bad = dict(sd, **{"net.slice1.0.weight": np.zeros((64, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"wrong shapes: \['net.slice1.0.weight: got \(64, 3, 5, 5\)"):
        lp.load_lpips(bad)
    with pytest.raises(FileNotFoundError):
        lp.load_lpips("/nonexistent/lpips_with_vgg.npz")


def test_pth_loader(tmp_path, fixture, model):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v.copy()) for k, v in _state_dict(fixture).items() if k not in ("shift", "scale_inv")}
    path = tmp_path / "lpips_with_vgg.pth"
    torch.save(sd, path)
    m = lp.load_lpips(str(path))
    x0, x1 = nhwc(fixture["in/x0"]), nhwc(fixture["in/x1"])
    np.testing.assert_allclose(np.asarray(m(x0, x1)), np.asarray(model(x0, x1)), rtol=1e-6)
