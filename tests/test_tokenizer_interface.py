"""Both tokenizer families implement `models.tokenizer.Tokenizer`, and what the train step builds on it holds: the
adaptive GAN weight's kernel gradient from `last_decoder_conv` + aux["decoder_last_input"] equals autodiff's
gradient of that kernel (TokenFlow could not take the adaptive weight before the interface), codes are
[b, codebooks, tokens] within `code_layout`, graphdefs are hashable, and the extra losses / CLIP pair are what each family reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_tokenflow_model import MICRO
from train_helpers import micro_config
from unitok_jax.demo import random_model
from unitok_jax.models.tokenflow import random_tokenflow
from unitok_jax.models.tokenizer import Tokenizer
from unitok_jax.train import step as step_lib

jax.config.update("jax_default_matmul_precision", "highest")


def _unitok(tmp_path):
    config = micro_config(tmp_path, gan=False)
    return random_model(config, seed=0), config.model.image_size


def _tokenflow(tmp_path):
    return random_tokenflow(MICRO, seed=0), MICRO["image_size"]


@pytest.mark.parametrize("build", [_unitok, _tokenflow], ids=["unitok", "tokenflow"])
def test_interface_and_adaptive_kernel_gradient(build, tmp_path):
    model, size = build(tmp_path)
    assert isinstance(model, Tokenizer)
    hash(nnx.graphdef(model))  # hashable: jitted eval/train functions are cached by value, not by object identity
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2, size, size, 3)), jnp.float32)
    text = jnp.ones((2, 16), jnp.int32) if model.takes_text else None
    if text is not None:
        text = text[:, : model.config.text.context_length]

    def nll(rec):
        return jnp.mean(jnp.square(rec.astype(jnp.float32) - images))

    @nnx.jit
    def run(m):
        rec, aux = m(images, text, deterministic=True)
        via_interface, _ = step_lib.adaptive_kernel_grads(m, aux, rec.astype(jnp.float32), nll, nll)
        grads = nnx.grad(lambda mm: nll(mm(images, text, deterministic=True)[0]))(m)
        return via_interface, grads, m.codes(aux), m.extra_losses(aux), m.clip_pair(aux)

    via_interface, grads, codes, extra, clip_pair = run(model)
    direct = _kernel_grad_of(model, grads)
    np.testing.assert_allclose(np.asarray(via_interface), np.asarray(direct), rtol=2e-4, atol=1e-7)
    assert float(jnp.linalg.norm(via_interface)) > 0

    k, entries = model.code_layout
    assert codes.ndim == 3 and codes.shape[:2] == (2, k)
    assert int(codes.min()) >= 0 and int(codes.max()) < entries
    if model.takes_text:
        assert extra == {} and clip_pair is not None and clip_pair[0].shape == clip_pair[1].shape
    else:
        assert set(extra) == {"commit"} and clip_pair is None and not model.has_clip_head


def _kernel_grad_of(model, grads):
    """The gradient of `model.last_decoder_conv.kernel`, found by the module's path in the model graph."""
    target = model.last_decoder_conv
    for path, node in nnx.iter_graph(model):
        if node is target:
            sub = grads
            for key in path:
                sub = sub[key]
            return sub["kernel"][...]
    raise AssertionError("last_decoder_conv is not a submodule of the model")
