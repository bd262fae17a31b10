"""Numerical parity with the official PyTorch UniTok (tests/fixtures/unitok_tiny*.npz, README §1-§2).

The fixture weights are loaded through the official-checkpoint converter; the whole forward (every stored
intermediate), the loss terms and every stored gradient are computed by ONE jitted function per fixture to keep
CPU compile time down. Tolerances are the fixture README's: activations/losses max|ours − ref| ≤ 2e-5·max(1, max|ref|),
gradients ≤ 5e-5·max|ref|, indices exact (except the listed near-ties).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import unitok_jax  # noqa: F401
from unitok_jax.convert.official import load_unitok, to_official_state_dict

# The unseen-seed fixture runs in CI, not in the fast tier (one fixture compiles for ~20 s on 2 cores).
FIXTURES = ("unitok_tiny", pytest.param("unitok_tiny_seed1", marks=pytest.mark.slow))
NOT_MODEL_OUTPUTS = {"index_margin"}  # a reference diagnostic, checked separately below


def fast_compile(fn, *args):
    """jax.jit(fn) compiled at XLA CPU backend optimisation level 0: about half the compile time of the default
    on these tiny graphs, and well inside the parity tolerances."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _nhwc(a):
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def assert_close(name, ours, ref, rel):
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    tol = rel * max(1.0, float(np.max(np.abs(ref)))) if rel > 0 else 0.0
    assert err <= tol, f"{name}: max abs err {err:.3e} > tol {tol:.3e}"
    if rel > 0:  # and elementwise, as the issue states it: rtol 1e-4, atol 1e-5 in fp32
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5, err_msg=name)


def assert_grad_close(name, ours, ref):
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref)))
    tol = 5e-5 * float(np.max(np.abs(ref)))
    assert err <= tol, f"{name}: max abs err {err:.3e} > tol {tol:.3e}"


def loss_terms(rec, aux, images):
    """L = 0.2·L1 + L2 + vq + symmetric CLIP CE (world size 1), the fixture's gradient loss."""
    l1 = jnp.mean(jnp.abs(rec - images))
    l2 = jnp.mean(jnp.square(rec - images))
    img, txt = aux["clip_image_features"], aux["clip_text_features"]
    logits = aux["logit_scale"] * jnp.dot(img, txt.T, precision=jax.lax.Precision.HIGHEST)
    labels = jnp.arange(img.shape[0])
    clip = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    )
    vq = aux["vq_loss"]
    return {"l1": l1, "l2": l2, "vq": vq, "clip": clip, "total": 0.2 * l1 + l2 + vq + clip}


class Case:
    def __init__(self, name, fixtures_dir):
        self.name = name
        self.meta = json.loads((fixtures_dir / f"{name}.json").read_text())
        npz = np.load(fixtures_dir / f"{name}.npz")
        self.arrays = {k: npz[k] for k in npz.files}
        self.state_dict = {k[len("param/") :]: v for k, v in self.arrays.items() if k.startswith("param/")}
        self.model = load_unitok(self.state_dict, self.meta["model_config"])
        self.images = jnp.asarray(_nhwc(self.arrays["in/images"]))
        self.text_ids = jnp.asarray(self.arrays["in/text_ids"])
        self.ties = {
            tuple(t[:3]) for t in self.meta["quantizer_index_ties"]["near_ties_margin_below_1e-4_[b,k,n,margin]"]
        }

        a = self.arrays
        stored = tuple(jnp.asarray(a[k]) for k in ("out/encoder_tokens", "out/quant", "out/post_quant", "out/indices"))
        graphdef, state = nnx.split(self.model)

        def loss_fn(model, images, ids):
            rec, aux = model(images, ids, return_intermediates=True)
            terms = loss_terms(rec, aux, images)
            return terms["total"], (rec, aux, terms)

        def run(state, images, ids, tokens, quant, post, indices):
            model = nnx.merge(graphdef, state)
            (_, (rec, aux, terms)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, images, ids)
            # Module tests on the reference's own intermediates (README §1 "suggested test layout" 2).
            modules = {
                "z": model.quant_proj(tokens),
                "post_quant": model.post_quant_proj(quant),
                "rec": model.decoder(post)[0],
                "quant_lookup": model.quantizer.lookup(indices),
            }
            return rec, aux, terms, nnx.state(grads), modules

        args = (state, self.images, self.text_ids) + stored
        with jax.default_matmul_precision("highest"):
            rec, aux, terms, grads, modules = fast_compile(run, *args)(*args)
        self.rec = rec
        self.aux = jax.device_get(aux)
        self.inter = self.aux["intermediates"]
        self.terms = jax.device_get(terms)
        self.modules = jax.device_get(modules)
        self.grads = to_official_state_dict(grads, self.model.config, include_buffers=False)

    def index_flips(self):
        ours = np.asarray(self.inter["indices"])
        ref = self.arrays["out/indices"]
        flips = {tuple(int(i) for i in p) for p in np.argwhere(ours != ref)}
        return flips


@pytest.fixture(scope="module", params=FIXTURES)
def case(request, fixtures_dir):
    return Case(request.param, fixtures_dir)


def test_forward_intermediates(case):
    flips = case.index_flips()
    assert flips <= case.ties, f"{case.name}: codebook indices differ at non-tie positions {sorted(flips - case.ties)}"
    downstream_ok = not flips  # a flipped near-tie legitimately changes everything after the quantizer
    checked = []
    for key, ref in case.arrays.items():
        if not key.startswith("out/") or key.startswith(("out/loss_terms/", "out/vocab_usage_after_forward/")):
            continue
        name = key[len("out/") :]
        if name in NOT_MODEL_OUTPUTS:
            continue
        assert name in case.inter, f"{case.name}: our forward does not produce {name}"
        if name == "indices":
            continue
        if (
            not downstream_ok
            and name
            not in (
                "enc_stem",
                "enc_stage1",
                "enc_stage2",
                "enc_pool",
                "z",
                "z_normalized",
                "encoder_tokens",
                "quant_proj_shortcut",
                "quant_proj_attn",
            )
            and not name.startswith(("enc_block", "text_"))
        ):
            continue
        assert_close(f"{case.name}/{name}", case.inter[name], _nhwc(ref), 2e-5)
        checked.append(name)
    assert len(checked) >= 36 or not downstream_ok, checked
    assert case.rec.shape == case.images.shape


def test_index_margin_and_usage_buffers(case):
    """Recompute the reference's best-minus-second similarity and the normalised per-codebook bincount."""
    q = case.model.quantizer
    cb = np.asarray(q.normalized_codebooks(), np.float64)  # (k, K, d)
    zn = np.asarray(case.inter["z_normalized"], np.float64)  # (b, n, k·d)
    b, n, _ = zn.shape
    k, _, d = cb.shape
    sims = np.einsum("bnkd,kvd->bknv", zn.reshape(b, n, k, d), cb)
    top2 = np.sort(sims, axis=-1)[..., -2:]
    assert_close(f"{case.name}/index_margin", top2[..., 1] - top2[..., 0], case.arrays["out/index_margin"], 2e-5)
    counts = np.asarray(case.aux["codebook_counts"])
    for j in range(k):
        assert_close(
            f"{case.name}/vocab_usage/{j}",
            counts[j] / counts[j].sum(),
            case.arrays[f"out/vocab_usage_after_forward/{j}"],
            2e-5,
        )
    assert_close(
        f"{case.name}/usage_pct", 100 * np.mean(case.aux["codebook_usage"]), case.arrays["out/codebook_usage_pct"], 2e-5
    )


def test_loss_terms(case):
    for name in ("l1", "l2", "vq", "clip", "total"):
        assert_close(f"{case.name}/loss/{name}", case.terms[name], case.arrays[f"out/loss_terms/{name}"], 2e-5)


def test_gradients(case):
    stored = [k for k in case.arrays if k.startswith("grad/")]
    assert stored == [] or len(stored) >= 31
    for key in stored:
        official = key[len("grad/") :]
        assert official in case.grads, f"converter reverse map has no key {official}"
        assert_grad_close(f"{case.name}/{key}", case.grads[official], case.arrays[key])


def test_modules_from_stored_intermediates(case):
    """encoder_tokens → quant_proj → z; quant → post_quant_proj → post_quant; post_quant → decoder → rec;
    reference indices → codebook lookup → the stored pure lookup."""
    a, mods = case.arrays, case.modules
    assert_close(f"{case.name}/module/z", mods["z"], a["out/z"], 2e-5)
    assert_close(f"{case.name}/module/post_quant", mods["post_quant"], a["out/post_quant"], 2e-5)
    assert_close(f"{case.name}/module/rec", mods["rec"], _nhwc(a["out/rec"]), 2e-5)
    assert_close(f"{case.name}/module/quant_lookup", mods["quant_lookup"], a["out/quant_lookup"], 2e-5)
