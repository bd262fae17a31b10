"""TokenFlow parity with the official PyTorch code (tests/fixtures/tokenflow_tiny.*, README §5).

For each case (base 64 px / scales 1,2,4 and interp 80 px / scales 1,2,4,5 with interpolated positional tables) one
jitted function runs: converter-loaded model -> full forward with intermediates -> documented loss -> jax.grad ->
decode_code(indices). Everything stored under out*/ and grad*/ is compared with the README §1 tolerances.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unitok_jax  # noqa: F401  (disables eager sharding)
from unitok_jax.convert.tokenflow import _inv, load_tokenflow, tokenflow_key_map
from unitok_jax.losses.distillation import tokenflow_loss_terms

jax.config.update("jax_default_matmul_precision", "highest")

ACT_TOL = 2e-5  # activations / losses: max|d| <= 2e-5 * max(1, max|ref|)
PIX_TOL = 1e-4  # pixel-CNN outputs:    max|d| <= 1e-4 * max|ref|
GRAD_TOL = 1e-4  # gradients:            max|d| <= 1e-4 * max|ref|


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    data = np.load(fixtures_dir / "tokenflow_tiny.npz")
    meta = json.loads((fixtures_dir / "tokenflow_tiny.json").read_text())
    arrays = {k: data[k] for k in data.files}
    sd = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    return arrays, meta, sd


def _nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def _run_case(model, images, sem_target, grad_paths):
    """One compiled program: forward (+ decode-from-indices batched through the same decoders), loss, grads
    w.r.t. the parameters the fixture stores (XLA drops the rest of the backward pass)."""
    graphdef, params = nnx.split(model, nnx.Param)
    wanted = {p: v for p, v in nnx.to_flat_state(params) if tuple(p) in grad_paths}
    rest = {p: v for p, v in nnx.to_flat_state(params) if tuple(p) not in grad_paths}

    def forward(wanted_vals, rest_vals):
        state = nnx.from_flat_state(
            {**{p: v for p, v in zip(wanted, wanted_vals)}, **{p: v for p, v in zip(rest, rest_vals)}}
        )
        m = nnx.merge(graphdef, state)
        f, aux = m.encode(images, return_intermediates=True, log_distance_norms=True)
        # decode_code(indices) == decode(indices_to_quant(indices)); run it as extra batch rows (no gradient).
        fq = jax.lax.stop_gradient(m.indices_to_quant(aux["indices"]))
        sem_all, pix_all, daux = m.decode(jnp.concatenate([f, fq], axis=0))
        b = images.shape[0]
        d = m.semantic_dim
        aux.update({k: v[:b] for k, v in daux.items()})
        aux.update(final_quantize=f, quant_sem=f[..., :d], quant_pix=f[..., d:], sem_rec=sem_all[:b])
        terms = tokenflow_loss_terms(images, pix_all[:b], aux, sem_target)
        return terms["total"], (pix_all[:b], aux, terms, sem_all[b:], pix_all[b:])

    def step(wanted_vals, rest_vals):
        (_, outs), grads = jax.value_and_grad(forward, has_aux=True)(wanted_vals, rest_vals)
        return outs, grads

    # Tiny tensors: LLVM -O0 cuts compile time by ~30% on CPU without changing results beyond fp32 noise.
    fn = jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})
    wv = [v.get_value() for v in wanted.values()]
    rv = [v.get_value() for v in rest.values()]
    (pix_rec, aux, terms, dc_sem, dc_pix), grads = jax.device_get(fn(wv, rv))
    return {
        "pix_rec": pix_rec,
        "aux": aux,
        "terms": terms,
        "dc_sem": dc_sem,
        "dc_pix": dc_pix,
        "grads": {tuple(p): np.asarray(g) for p, g in zip(wanted, grads)},
    }


@pytest.fixture(scope="module", params=["base", pytest.param("interp", marks=pytest.mark.slow)])  # interp: CI only
def case(request, fx):
    arrays, meta, sd = fx
    name = request.param
    cfg = meta["model_config"] if name == "base" else meta["model_config_interp"]
    ins = "in" if name == "base" else "in_interp"
    model = load_tokenflow(sd, cfg)
    images = jnp.asarray(_nchw_to_nhwc(arrays[f"{ins}/images"]))
    sem_target = jnp.asarray(arrays[f"{ins}/sem_target"])
    grad_prefix = "grad" if name == "base" else "grad_interp"
    entries, _ = tokenflow_key_map(model)
    by_key = {e[0][0]: e for e in entries.entries if len(e[0]) == 1}
    grad_keys = [k[len(grad_prefix) + 1 :] for k in arrays if k.startswith(grad_prefix + "/")]
    res = _run_case(model, images, sem_target, {by_key[k][1] for k in grad_keys})
    res.update(
        name=name,
        out="out" if name == "base" else "out_interp",
        grad=grad_prefix,
        model=model,
        meta=meta,
        arrays=arrays,
        by_key=by_key,
    )
    return res


def _check(name, ours, ref, *, tol, relative_to_one=True):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    scale = np.abs(ref).max() if ref.size else 0.0
    scale = max(1.0, scale) if relative_to_one else scale
    err = np.abs(ours - ref).max() if ref.size else 0.0
    assert err <= tol * scale, f"{name}: max|diff| {err:.3g} > {tol:g} * {scale:.4g}"


def _ours_for(key, res):
    """Map a fixture out/ name to our array in the fixture's layout."""
    aux, sub = res["aux"], key.split("/", 1)[1]
    nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)  # noqa: E731
    if sub.startswith("scale"):
        i, field = sub[len("scale") :].split("/")
        v = aux["scales"][int(i)][field] if field != "indices" else aux["indices_per_scale"][int(i)]
        return nchw(v) if field in ("residual_in", "zq", "zq_up") else v
    direct = {
        "pix_rec": nchw(res["pix_rec"]),
        "decode_code/sem_rec": res["dc_sem"],
        "decode_code/pix_rec": nchw(res["dc_pix"]),
    }
    if sub in direct:
        return direct[sub]
    if sub.startswith("loss_terms/"):
        return res["terms"][sub.split("/")[1]]
    if sub.startswith("losses_train/") or sub.startswith("losses_eval/"):
        field = sub.split("/")[1]
        if field == "codebook_usage":
            return None  # FIFO semantics; checked separately
        return aux[field]
    v = aux[sub]
    return nchw(v) if np.ndim(v) == 4 else v


def test_indices_exact(case):
    arrays, meta, out = case["arrays"], case["meta"], case["out"]
    # README §1: indices are exact except for near-ties listed in the JSON (`quantizer_index_ties`). This fixture
    # lists none (smallest best-vs-second gap 1.2e-3 in distance units, fp32 noise ~1e-6), so every index must
    # match; a flip at a listed tie would only be tolerated, with downstream arrays then not comparable.
    ties = meta.get("quantizer_index_ties") or []
    ref = arrays[f"{out}/indices"]
    ours = np.asarray(case["aux"]["indices"])
    assert ours.dtype == np.int32 and ours.shape == ref.shape
    bad = np.argwhere(ours != ref)
    if len(bad):
        pytest.fail(f"{case['name']}: {len(bad)} index mismatches at {bad[:5].tolist()}; listed ties: {ties}")
    # the stored margins agree with ours, so no assignment was decided by noise
    assert min(float(arrays[f"{out}/scale{s}/index_margin"].min()) for s in range(len(case["model"].scales))) > 1e-4
    for s in range(len(case["model"].scales)):
        assert np.array_equal(np.asarray(case["aux"]["indices_per_scale"][s]), arrays[f"{out}/scale{s}/indices"])


def test_forward_and_losses(case):
    arrays, out = case["arrays"], case["out"]
    checked = 0
    for key in sorted(k for k in arrays if k.startswith(out + "/")):
        sub = key.split("/", 1)[1]
        if sub == "indices" or sub.endswith("/indices"):
            continue  # exact test above
        ours = _ours_for(key, case)
        if ours is None:
            continue
        pixel = sub.startswith("pix_") or sub in ("pix_rec", "decode_code/pix_rec", "post_quant")
        if pixel:
            _check(key, ours, arrays[key], tol=PIX_TOL, relative_to_one=False)
        else:
            _check(key, ours, arrays[key], tol=ACT_TOL)
        if not sub.endswith("pix_rec"):
            # and elementwise, as the issue states it (fp32: rtol 1e-4, atol 1e-5). Not for the pixel-CNN output:
            # after ~20 fp32 convs a few near-zero pixels (9 of 38 400) differ from PyTorch by up to 2.6e-5 in
            # absolute terms (summation order), which the max-relative bound above covers.
            np.testing.assert_allclose(
                np.asarray(ours, np.float64), np.asarray(arrays[key], np.float64), rtol=1e-4, atol=1e-5, err_msg=key
            )
        checked += 1
    assert checked >= (45 if case["name"] == "base" else 40), checked


def test_codebook_usage_matches_official_fifo_semantics(case):
    """The official train-mode usage = |unique(FIFO)| / K averaged over scales, FIFO starting all-zero (so
    index 0 is 'used'); reproduce it from our indices to show the per-scale indices feed usage correctly."""
    arrays, out = case["arrays"], case["out"]
    k = case["model"].codebook.codebook_size
    seen, usages = {0}, []
    for idx in case["aux"]["indices_per_scale"]:
        seen |= set(np.asarray(idx).reshape(-1).tolist())
        usages.append(len(seen) / k)
    np.testing.assert_allclose(np.mean(usages), arrays[f"{out}/losses_train/codebook_usage"], rtol=1e-6)
    # our stateless metrics over the shared index space
    counts = np.asarray(case["aux"]["codebook_counts"])
    assert counts.shape == (k,) and counts.sum() == case["aux"]["indices"].size
    assert np.isclose(case["aux"]["codebook_usage"], (counts > 0).mean())


def test_gradients(case):
    arrays, grad_prefix = case["arrays"], case["grad"]
    by_key = case["by_key"]
    keys = [k for k in arrays if k.startswith(grad_prefix + "/")]
    assert len(keys) == (21 if case["name"] == "base" else 6)
    for key in keys:
        tkey = key[len(grad_prefix) + 1 :]
        _, path, kind = by_key[tkey]
        ours = _inv(kind, case["grads"][path], 1)[0]
        _check(key, ours, arrays[key], tol=GRAD_TOL, relative_to_one=False)
