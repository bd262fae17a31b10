"""DINOv2 backbone, DINO discriminator and PatchGAN discriminator.

What is checked (no pretrained weights exist here, so nothing is compared against a real DINOv2 checkpoint):
- DINOv2: the loader on a random state dict with the real key names (ViT-S/14 shapes, 2 blocks instead of 12): every
  key consumed, strict errors, and the JAX forward equals a float64 numpy re-implementation written directly against
  the PyTorch layout (so transposes / qkv order / LayerScale / GELU mapping are tested). Positional-table interpolation:
  identity when the grid matches; with torch installed, equal to `F.interpolate(..., scale_factor=(g + 0.1) / 37,
  mode='bicubic')` for 37 -> 18 (the 252 x 252 case).
- Heads: circular Conv1d = numpy wrap-around reference; circular shifts of the token sequence shift the head output;
  GroupNorm = numpy reference of torch.nn.GroupNorm; xavier-normal(gain 0.5) init statistics.
- Discriminators: output shapes, preprocessing (crop vs area coin flip), trainable/frozen separation, registry errors.
"""

import math

import numpy as np
import pytest

import unitok_jax  # noqa: F401
import jax
import jax.numpy as jnp
from flax import nnx

from unitok_jax.models import bicubic, dino_discriminator as dd, dinov2, discriminators, patch_discriminator

TINY_DINO = dict(width=64, dino_depth=3, dino_heads=2, patch_size=8, pretrain_grid=4, taps=(0, 2))
# One small DINOv2 shape set shared by the backbone tests (first-time compilation of init ops dominates CPU time).
SMALL = dinov2.DinoV2Config(patch_size=4, dim=64, depth=3, heads=2, pretrain_grid=4)


def _tiny_dino_cfg():
    return dinov2.DinoV2Config(
        patch_size=TINY_DINO["patch_size"],
        dim=TINY_DINO["width"],
        depth=TINY_DINO["dino_depth"],
        heads=TINY_DINO["dino_heads"],
        pretrain_grid=TINY_DINO["pretrain_grid"],
    )


@pytest.fixture(scope="module")
def tiny_disc():
    # DINO weights from a random state dict in the real key layout (the loader path the trainer uses).
    cfg = dict(TINY_DINO, dino_path=random_dinov2_state_dict(_tiny_dino_cfg(), seed=5))
    return discriminators.build_discriminator("dino", cfg, rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def small_dino():
    model = nnx.eval_shape(lambda: dinov2.DinoV2(SMALL, rngs=nnx.Rngs(0)))
    return dinov2.load_dinov2_weights(model, random_dinov2_state_dict(SMALL, seed=1))


# ------------------------------------------------------------------------------------------------ DINOv2 -------


def random_dinov2_state_dict(cfg: dinov2.DinoV2Config, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shape in dinov2.expected_dinov2_keys(cfg).items():
        scale = 0.02 if ("weight" in k and len(shape) > 1) or k in ("cls_token", "pos_embed") else 0.1
        base = 1.0 if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight" else 0.0
        sd[k] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return sd


def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def numpy_dinov2(sd, x_nchw, heads, taps):
    """float64 DINOv2 forward straight from the PyTorch state dict (grid = pretrain grid, no interpolation)."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]
    d, _, p, _ = w.shape
    b, c, h, wd = x_nchw.shape
    patches = x_nchw.reshape(b, c, h // p, p, wd // p, p).transpose(0, 2, 4, 1, 3, 5)  # b gh gw c p p
    t = np.einsum("bhwcij,ocij->bhwo", patches, w).reshape(b, -1, d) + sd["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), t], 1) + sd["pos_embed"]
    outs = []
    for i in range(max(taps) + 1):
        pre = f"blocks.{i}."
        y = _ln(t, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
        qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
        n = t.shape[1]
        qkv = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)  # 3 b h n hd
        q, k, v = qkv
        a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        o = o @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        t = t + sd[pre + "ls1.gamma"] * o
        y = _ln(t, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
        y = _gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        t = t + sd[pre + "ls2.gamma"] * (y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"])
        if i in taps:
            outs.append((t[:, 1:], t[:, 0]))
    return outs


def test_dinov2_forward_matches_numpy_reference(small_dino):
    sd = random_dinov2_state_dict(SMALL, seed=1)
    model = dinov2.load_dinov2_weights(small_dino, sd)
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ours = jax.jit(lambda m, a: m.intermediate_layers(a, (0, 2)))(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    ref = numpy_dinov2(sd, x.astype(np.float64), heads=2, taps=(0, 2))
    for (p, c), (rp, rc) in zip(ours, ref):
        assert p.shape == (2, 16, 64) and c.shape == (2, 64)
        np.testing.assert_allclose(np.asarray(p), rp, atol=2e-5 * max(1, np.abs(rp).max()))
        np.testing.assert_allclose(np.asarray(c), rc, atol=2e-5 * max(1, np.abs(rc).max()))


def test_dinov2_loader_real_key_layout():
    cfg = dinov2.DinoV2Config(depth=2)  # real ViT-S/14 shapes (pos_embed (1, 1370, 384)), fewer blocks
    sd = random_dinov2_state_dict(cfg)
    assert sd["pos_embed"].shape == (1, 1370, 384) and sd["blocks.1.attn.qkv.weight"].shape == (1152, 384)
    inferred = dinov2.config_from_state_dict(sd)
    assert inferred == cfg
    model = dinov2.load_dinov2(sd)  # frozen by default
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    frozen = nnx.state(model, dinov2.FrozenParam)
    n_frozen = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(frozen))
    assert n_frozen == sum(int(np.prod(v.shape)) for v in sd.values())  # every key landed somewhere, nothing else
    np.testing.assert_array_equal(np.asarray(model.blocks[1].attn.qkv.kernel[...]), sd["blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(model.patch_embed.kernel[...]), sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(np.asarray(model.blocks[0].ls2.gamma[...]), sd["blocks.0.ls2.gamma"])
    out = jax.eval_shape(lambda m, a: m.intermediate_layers(a, (0, 1)), model, jnp.zeros((1, 252, 252, 3)))
    assert [o[0].shape for o in out] == [(1, 324, 384)] * 2


def test_dinov2_loader_errors(small_dino):
    sd = random_dinov2_state_dict(SMALL)
    bad = dict(sd)
    del bad["blocks.1.ls1.gamma"]
    bad["blocks.3.ls1.gamma"] = np.ones(64, np.float32)
    bad["pos_embed"] = np.zeros((1, 10, 64), np.float32)
    with pytest.raises(ValueError) as e:
        dinov2.load_dinov2_weights(small_dino, bad)
    msg = str(e.value)
    assert "missing keys: ['blocks.1.ls1.gamma']" in msg
    assert "unexpected keys: ['blocks.3.ls1.gamma']" in msg
    assert "pos_embed: got (1, 10, 64), expected (1, 17, 64)" in msg


def test_dinov2_pth_loader(tmp_path):
    torch = pytest.importorskip("torch")
    sd = random_dinov2_state_dict(SMALL)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    model = dinov2.load_dinov2(str(path), heads=2)
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), sd["pos_embed"])


def test_pos_embed_interpolation_identity_and_grid():
    cfg = dinov2.DinoV2Config(patch_size=4, dim=8, depth=1, heads=2, pretrain_grid=6)
    model = nnx.eval_shape(lambda: dinov2.DinoV2(cfg, rngs=nnx.Rngs(0)))  # only the table matters here
    table = np.random.default_rng(0).standard_normal((1, 37, 8)).astype(np.float32)
    model.pos_embed.set_value(jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(model.pos_embed_for(6, 6)), table)
    small = model.pos_embed_for(3, 3)
    assert small.shape == (1, 10, 8)
    np.testing.assert_array_equal(np.asarray(small[:, 0]), table[:, 0])  # class position kept
    assert not np.allclose(np.asarray(small[:, 1:]), table[:, 1:10])
    # A constant table stays constant (the bicubic weights of every output sum to one).
    model.pos_embed.set_value(jnp.full((1, 37, 8), 0.7))
    np.testing.assert_allclose(np.asarray(model.pos_embed_for(3, 3)), 0.7, atol=1e-6)


def test_pos_embed_interpolation_matches_torch_37_to_18():
    torch = pytest.importorskip("torch")
    table = np.random.default_rng(0).standard_normal((37 * 37, 16)).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(table).reshape(1, 37, 37, 16).permute(0, 3, 1, 2),
            scale_factor=((18 + 0.1) / 37, (18 + 0.1) / 37),
            mode="bicubic",
            antialias=False,
        )
        .permute(0, 2, 3, 1)
        .reshape(-1, 16)
        .numpy()
    )
    ours = np.asarray(bicubic.interpolate_pos_table(jnp.asarray(table), (18, 18)))
    np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())


# ------------------------------------------------------------------------------------------------ heads --------


def test_circular_conv_matches_numpy_and_is_shift_equivariant(tiny_disc):
    head = tiny_disc.heads[1]
    block = head.residual
    x = jax.random.normal(jax.random.key(1), (2, 20, 64))
    # Conv alone vs a wrap-around numpy reference.
    k = np.asarray(block.conv.kernel[...], np.float64)  # (9, in, out)
    bias = np.asarray(block.conv.bias[...], np.float64)
    xn = np.asarray(x, np.float64)
    L = xn.shape[1]
    ref = np.stack([sum(xn[:, (i + j - 4) % L] @ k[j] for j in range(9)) + bias for i in range(L)], axis=1)
    conv = jax.jit(lambda c, a: c(a))
    ours = conv(block.conv, dd.circular_pad(x, 4))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    # Zero padding differs (the test can tell the two apart).
    assert not np.allclose(np.asarray(conv(block.conv, jnp.pad(x, ((0, 0), (4, 4), (0, 0))))), ref, atol=1e-3)
    # GroupNorm statistics are over all tokens, so the block and the whole head commute with circular shifts.
    shifted = jnp.stack([jnp.roll(x, s, axis=1) for s in (0, 1, 5, 19)])  # [4, b, L, C]
    yb = jax.jit(jax.vmap(lambda m, a: m(a), in_axes=(None, 0)))(block, shifted)
    yh = jax.jit(jax.vmap(lambda m, a: m(a), in_axes=(None, 0)))(head, shifted)
    for i, s in enumerate((0, 1, 5, 19)):
        np.testing.assert_allclose(np.asarray(yb[i]), np.asarray(jnp.roll(yb[0], s, axis=1)), atol=1e-5)
        np.testing.assert_allclose(np.asarray(yh[i]), np.asarray(jnp.roll(yh[0], s, axis=1)), atol=1e-5)


def test_group_norm_matches_numpy_reference():
    gn = dd.group_norm(64, 32, 1e-6, rngs=nnx.Rngs(0))
    gn.scale[...] = jax.random.normal(jax.random.key(2), (64,))
    gn.bias[...] = jax.random.normal(jax.random.key(3), (64,))
    x = 3.0 + jax.random.normal(jax.random.key(4), (3, 11, 64)) * 2.0
    xn = np.asarray(x, np.float64).reshape(3, 11, 32, 2)
    mean = xn.mean(axis=(1, 3), keepdims=True)
    var = xn.var(axis=(1, 3), keepdims=True)  # biased, as torch
    ref = ((xn - mean) / np.sqrt(var + 1e-6)).reshape(3, 11, 64) * np.asarray(gn.scale[...]) + np.asarray(gn.bias[...])
    np.testing.assert_allclose(np.asarray(gn(x)), ref, atol=1e-5)


def test_head_init_xavier_gain_half(tiny_disc):
    head = tiny_disc.heads[0]
    k = np.asarray(head.residual.conv.kernel[...])  # (9, 64, 64): fan_in = fan_out = 9 * 64
    assert k.std() == pytest.approx(0.5 * math.sqrt(2.0 / (2 * 9 * 64)), rel=0.03)
    assert np.abs(k).max() > 3.5 * k.std()  # untruncated normal
    k1 = np.asarray(head.block.conv.kernel[...])
    assert k1.std() == pytest.approx(0.5 * math.sqrt(2.0 / (2 * 64)), rel=0.06)
    for conv in (head.block.conv, head.residual.conv, head.out):
        np.testing.assert_array_equal(np.asarray(conv.bias[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(head.block.norm.scale[...]), 1.0)


# ------------------------------------------------------------------------------------------------ discriminators


def test_dino_discriminator_shapes_and_rng(tiny_disc):
    disc = tiny_disc
    x = jax.random.uniform(jax.random.key(0), (2, 36, 36, 3), minval=-1, maxval=1)
    fwd = jax.jit(lambda d, a, k: d(a, rngs_or_key=k))
    outs = [np.asarray(fwd(disc, x, jax.random.key(i))) for i in range(6)]
    assert all(o.shape == (2, 2 * 16) for o in outs)  # 36 -> 32 -> 4x4 tokens, 2 taps
    assert all(np.isfinite(o).all() for o in outs)
    assert len({o.tobytes() for o in outs}) > 1  # crop offsets / coin flips differ between keys
    np.testing.assert_array_equal(outs[0], np.asarray(fwd(disc, x, jax.random.key(0))))
    det = np.asarray(jax.jit(lambda d, a: d(a))(disc, x))
    assert det.shape == (2, 32)


def test_dino_preprocess_crop_or_area(tiny_disc):
    disc = tiny_disc
    x = jax.random.uniform(jax.random.key(0), (2, 36, 36, 3), minval=-1, maxval=1)
    std, mean = np.array(dd.IMAGENET_STD), np.array(dd.IMAGENET_MEAN)
    normed = (np.asarray(x) * 0.5 + 0.5 - mean) / std
    area = np.asarray(bicubic.area_resize(jnp.asarray(normed, jnp.float32), (32, 32)))
    np.testing.assert_allclose(np.asarray(disc.preprocess(x, None)), area, atol=1e-5)
    kinds = set()
    prep = jax.jit(disc.preprocess)
    for i in range(12):
        y = np.asarray(prep(x, jax.random.key(i)))
        if np.allclose(y, area, atol=1e-5):
            kinds.add("area")
            continue
        hits = [
            (t, l) for t in range(5) for l in range(5) if np.allclose(y, normed[:, t : t + 32, l : l + 32], atol=1e-5)
        ]
        assert hits, f"key {i}: neither the area resize nor a 32x32 crop"
        kinds.add("crop")
    assert kinds == {"area", "crop"}
    # Inputs already a multiple of the patch are only normalised.
    z = jnp.zeros((1, 32, 32, 3))
    np.testing.assert_allclose(
        np.asarray(disc.preprocess(z, jax.random.key(0)))[0, 0, 0], (0.5 - mean) / std, rtol=1e-6
    )


def test_trainable_vs_frozen_split_and_grads(tiny_disc):
    disc = tiny_disc
    trainable, frozen = dd.trainable_and_frozen(disc)
    t_paths = [p for p, _ in nnx.to_flat_state(trainable)]
    f_paths = [p for p, _ in nnx.to_flat_state(frozen)]
    assert t_paths and all(p[0] == "heads" for p in t_paths)
    assert f_paths and all(p[0] == "dino" for p in f_paths)
    graphdef, params, rest = nnx.split(disc, nnx.Param, ...)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)

    def loss(p, img):
        return jnp.mean(nnx.merge(graphdef, p, rest)(img))

    g_params, g_img = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert jax.tree.structure(g_params) == jax.tree.structure(params)
    assert float(jnp.abs(g_img).max()) > 0  # the generator gets gradients through the frozen DINO
    # Sharding metadata (logical axes) is kept on the frozen weights too.
    specs = nnx.get_partition_spec(frozen)
    assert specs["dino"]["blocks"][0]["attn"]["qkv"]["kernel"].get_value() is not None


def test_full_size_dino_discriminator_abstract_shapes():
    big = nnx.eval_shape(lambda: discriminators.build_discriminator("dino", {}, rngs=nnx.Rngs(params=0)))
    out = jax.eval_shape(
        lambda m, a: m(a, rngs_or_key=jax.random.key(0)), big, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    )
    assert out.shape == (2, 5 * 324)  # spec §3: (B, 1620)
    n_heads = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(big, nnx.Param)))
    n_dino = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(big, dinov2.FrozenParam)))
    assert n_dino == 22_056_576  # ViT-S/14 with 37x37 pos table and mask token
    assert n_heads == 5 * (384 * 384 + 384 + 2 * 384 + 9 * 384 * 384 + 384 + 2 * 384 + 384 + 1)


def test_patch_discriminator():
    x = jax.random.uniform(jax.random.key(0), (3, 64, 64, 3), minval=-1, maxval=1)
    # The default-depth PatchGAN, abstractly: 64 -> 32 -> 16 -> 8 -> 7 -> 6, i.e. 36 logits.
    big = nnx.eval_shape(
        lambda: discriminators.build_discriminator("patch", dict(width=32, num_layers=3), rngs=nnx.Rngs(params=0))
    )
    assert jax.eval_shape(lambda d, a: d(a, rngs_or_key=jax.random.key(0)), big, x).shape == (3, 36)
    # A concrete small one: 64 -> 32 -> 16 -> 15 -> 14.
    disc = discriminators.build_discriminator("patch", dict(width=16, num_layers=2), rngs=nnx.Rngs(params=0))
    y = jax.jit(lambda d, a: d(a, rngs_or_key=jax.random.key(0)))(disc, x)
    assert y.shape == (3, 14 * 14) and bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.std(y)) > 0
    assert not jax.tree.leaves(nnx.state(disc, dinov2.FrozenParam))
    with pytest.raises(ValueError, match="num_layers >= 1"):
        patch_discriminator.PatchDiscriminator(dict(num_layers=0), rngs=nnx.Rngs(0))


def test_registry_errors():
    assert set(discriminators.DISCRIMINATORS) == {"patch", "dino"}
    with pytest.raises(ValueError, match=r"unknown discriminator 'x'; available: \['dino', 'patch'\]"):
        discriminators.build_discriminator("x", {}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="taps"):
        discriminators.build_discriminator("dino", dict(TINY_DINO, taps=(5,)), rngs=nnx.Rngs(0))
