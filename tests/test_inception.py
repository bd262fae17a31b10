"""FID InceptionV3: key/shape table, loader errors and round trip, output shapes, resize semantics,
and (only if torch is installed) parity with a PyTorch re-implementation of the pytorch-fid graph."""

import jax
import numpy as np
import pytest

import unitok_jax  # noqa: F401
from unitok_jax.evals import inception as inc


@pytest.fixture(scope="module")
def state_dict():
    return inc.random_state_dict(0)


@pytest.fixture(scope="module")
def model(state_dict):
    return inc.load_fid_inception(state_dict)


def test_shape_table_matches_published_layout():
    table = inc.state_dict_shapes()
    assert len(table) == 94 * 5 + 2  # 94 BasicConv2d (conv.weight + 4 bn tensors) + fc.weight/bias
    # Spot checks against the pytorch-fid file layout.
    assert table["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert table["Conv2d_1a_3x3.bn.running_var"] == (32,)
    assert table["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert table["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert table["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
    assert table["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert table["Mixed_7b.branch3x3dbl_1.conv.weight"] == (448, 1280, 1, 1)
    assert table["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert table["fc.weight"] == (1008, 2048) and table["fc.bias"] == (1008,)
    assert not any("AuxLogits" in k for k in table)
    # torchvision inception_v3 has 27,161,264 parameters; minus the aux head (3,326,696), fc 1000 -> 1008 (+16,392).
    n_params = sum(int(np.prod(s)) for k, s in table.items() if not k.endswith(("running_mean", "running_var")))
    assert n_params == 27_161_264 - 3_326_696 + 16_392


def test_loader_round_trip(state_dict, model, tmp_path):
    exported = inc.export_state_dict(model)
    assert set(exported) == {k for k in state_dict if not k.endswith("num_batches_tracked")}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, state_dict[k], err_msg=k)
    # torch-free deployment: an .npz of the exported dict loads back to the same weights.
    np.savez(tmp_path / "inception.npz", **exported)
    again = inc.load_fid_inception(str(tmp_path / "inception.npz"))
    np.testing.assert_array_equal(
        np.asarray(again.Mixed_7b.branch3x3_2a.conv.kernel[...]),
        np.asarray(model.Mixed_7b.branch3x3_2a.conv.kernel[...]),
    )
    # Layouts: torch OIHW -> HWIO, Linear (out, in) -> (in, out).
    np.testing.assert_array_equal(
        np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel[...]),
        state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), state_dict["fc.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(model.Mixed_7c.branch1x1.bn.var[...]), state_dict["Mixed_7c.branch1x1.bn.running_var"]
    )


def test_loader_errors(state_dict):
    sd = dict(state_dict)
    del sd["Mixed_6c.branch7x7_1.bn.running_mean"]
    with pytest.raises(ValueError, match=r"1 missing keys: Mixed_6c\.branch7x7_1\.bn\.running_mean"):
        inc.load_fid_inception(sd)
    sd = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match=r"1 unexpected keys: AuxLogits\.fc\.weight"):
        inc.load_fid_inception(sd)
    sd = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(
        ValueError, match=r"shape mismatches: fc\.weight: file \(1000, 2048\) vs expected \(1008, 2048\)"
    ):
        inc.load_fid_inception(sd)
    with pytest.raises(FileNotFoundError):
        inc.load_fid_inception("/nonexistent/pt_inception-2015-12-05-6726825d.pth")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0, 1, (2, 64, 48, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def outputs(model, images):
    # One jit compile of the full 299x299 network for the whole module (compiling dominates on CPU).
    return jax.jit(lambda m, a: m(a))(model, images)


def test_forward_shapes(state_dict, outputs):
    assert outputs["pool3"].shape == (2, 2048)
    assert outputs["logits"].shape == outputs["logits_unbiased"].shape == (2, 1008)
    np.testing.assert_allclose(
        np.asarray(outputs["logits"]) - np.asarray(outputs["logits_unbiased"]),
        np.broadcast_to(state_dict["fc.bias"], (2, 1008)),
        atol=1e-4,
    )
    pool3 = np.asarray(outputs["pool3"])
    assert np.all(pool3 >= 0) and np.isfinite(pool3).all()  # mean of ReLU outputs
    assert not np.allclose(pool3[0], pool3[1])


@pytest.mark.parametrize("mode", inc.RESIZE_MODES)
def test_resize_matrices(mode):
    m = inc.bilinear_matrix(256, 299, mode)
    assert m.shape == (299, 256)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # partition of unity
    np.testing.assert_allclose(inc.bilinear_matrix(299, 299, mode), np.eye(299), atol=0)
    if mode == "pytorch_fid":
        # Half-pixel centres: output pixel 0 maps to src = 0.5 * 256/299 - 0.5 < 0 -> clamped to input pixel 0.
        assert m[0, 0] == 1.0
        src = (10 + 0.5) * 256 / 299 - 0.5
    else:
        assert m[0, 0] == 1.0
        src = 10 * 256 / 299
    lo = int(np.floor(src))
    np.testing.assert_allclose([m[10, lo], m[10, lo + 1]], [1 - (src - lo), src - lo], atol=1e-6)
    # A linear ramp is reproduced exactly away from the clamped borders.
    ramp = np.arange(256, dtype=np.float64)
    got = m.astype(np.float64) @ ramp
    dst = np.arange(299)
    ref = (dst + 0.5) * 256 / 299 - 0.5 if mode == "pytorch_fid" else dst * 256 / 299
    inner = (ref > 0) & (ref < 255)
    np.testing.assert_allclose(got[inner], ref[inner], atol=1e-4)


def test_preprocess_ranges():
    x = np.linspace(0, 1, 3 * 8 * 8, dtype=np.float32).reshape(1, 8, 8, 3)
    y = np.asarray(inc.preprocess(x, "pytorch_fid"))
    assert y.shape == (1, 299, 299, 3) and y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    z = np.asarray(inc.preprocess(np.ones((1, 299, 299, 3), np.float32), "torch_fidelity"))
    np.testing.assert_allclose(z, 127 / 128)  # (255 - 128) / 128: torch-fidelity's uint8 convention
    u8 = np.full((1, 299, 299, 3), 255, np.uint8)
    np.testing.assert_allclose(np.asarray(inc.preprocess(u8, "pytorch_fid")), 1.0)
    with pytest.raises(ValueError, match="available"):
        inc.preprocess(x, "bicubic")


# ------------------------------------------------------------------------------------ optional torch parity


def _torch_reference(sd, x_nchw, mode, preprocess_only=False):
    """PyTorch re-implementation of the pytorch-fid FID InceptionV3 forward (FIDInceptionA/C/E_1/E_2)."""
    import torch
    import torch.nn.functional as F

    W = {k: torch.from_numpy(np.asarray(v)) for k, v in (sd or {}).items()}

    def conv(x, name, stride=1, padding=0):
        x = F.conv2d(x, W[f"{name}.conv.weight"], stride=stride, padding=padding)
        x = F.batch_norm(
            x,
            W[f"{name}.bn.running_mean"],
            W[f"{name}.bn.running_var"],
            W[f"{name}.bn.weight"],
            W[f"{name}.bn.bias"],
            training=False,
            eps=1e-3,
        )
        return F.relu(x)

    def avgp(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def block_a(x, n):
        b1 = conv(x, f"{n}.branch1x1")
        b5 = conv(conv(x, f"{n}.branch5x5_1"), f"{n}.branch5x5_2", padding=2)
        b3 = conv(
            conv(conv(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", padding=1), f"{n}.branch3x3dbl_3", padding=1
        )
        return torch.cat([b1, b5, b3, conv(avgp(x), f"{n}.branch_pool")], 1)

    def block_b(x, n):
        b3 = conv(x, f"{n}.branch3x3", stride=2)
        bd = conv(
            conv(conv(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", padding=1), f"{n}.branch3x3dbl_3", stride=2
        )
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)

    def block_c(x, n):
        b1 = conv(x, f"{n}.branch1x1")
        b7 = conv(
            conv(conv(x, f"{n}.branch7x7_1"), f"{n}.branch7x7_2", padding=(0, 3)), f"{n}.branch7x7_3", padding=(3, 0)
        )
        bd = conv(x, f"{n}.branch7x7dbl_1")
        for i, pad in zip((2, 3, 4, 5), ((3, 0), (0, 3), (3, 0), (0, 3))):
            bd = conv(bd, f"{n}.branch7x7dbl_{i}", padding=pad)
        return torch.cat([b1, b7, bd, conv(avgp(x), f"{n}.branch_pool")], 1)

    def block_d(x, n):
        b3 = conv(conv(x, f"{n}.branch3x3_1"), f"{n}.branch3x3_2", stride=2)
        b7 = conv(
            conv(
                conv(conv(x, f"{n}.branch7x7x3_1"), f"{n}.branch7x7x3_2", padding=(0, 3)),
                f"{n}.branch7x7x3_3",
                padding=(3, 0),
            ),
            f"{n}.branch7x7x3_4",
            stride=2,
        )
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    def block_e(x, n, pool):
        b1 = conv(x, f"{n}.branch1x1")
        b3 = conv(x, f"{n}.branch3x3_1")
        b3 = torch.cat(
            [conv(b3, f"{n}.branch3x3_2a", padding=(0, 1)), conv(b3, f"{n}.branch3x3_2b", padding=(1, 0))], 1
        )
        bd = conv(conv(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", padding=1)
        bd = torch.cat(
            [conv(bd, f"{n}.branch3x3dbl_3a", padding=(0, 1)), conv(bd, f"{n}.branch3x3dbl_3b", padding=(1, 0))], 1
        )
        pooled = avgp(x) if pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, conv(pooled, f"{n}.branch_pool")], 1)

    with torch.no_grad():
        x = torch.from_numpy(x_nchw)
        if mode == "pytorch_fid":
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
        else:  # torch-fidelity: uint8 input, TF1 bilinear ('slow' manual path), (x - 128) / 128
            x = torch.round(x.clamp(0, 1) * 255)
            h, w = x.shape[2:]
            gy = torch.arange(299, dtype=torch.float32) * torch.tensor(h / 299, dtype=torch.float32)
            gx = torch.arange(299, dtype=torch.float32) * torch.tensor(w / 299, dtype=torch.float32)
            y0, x0 = gy.long(), gx.long()
            y1, x1 = (y0 + 1).clamp_max(h - 1), (x0 + 1).clamp_max(w - 1)
            dy, dx = (gy - y0.float()).view(1, 1, 299, 1), (gx - x0.float()).view(1, 1, 1, 299)
            a, b = x[:, :, y0][:, :, :, x0], x[:, :, y0][:, :, :, x1]
            c, d = x[:, :, y1][:, :, :, x0], x[:, :, y1][:, :, :, x1]
            top, bot = a + (b - a) * dx, c + (d - c) * dx
            x = ((top + (bot - top) * dy) - 128) / 128
        if preprocess_only:
            return x.numpy()
        x = conv(x, "Conv2d_1a_3x3", stride=2)
        x = conv(x, "Conv2d_2a_3x3")
        x = conv(x, "Conv2d_2b_3x3", padding=1)
        x = F.max_pool2d(x, 3, stride=2)
        x = conv(conv(x, "Conv2d_3b_1x1"), "Conv2d_4a_3x3")
        x = F.max_pool2d(x, 3, stride=2)
        for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = block_a(x, n)
        x = block_b(x, "Mixed_6a")
        for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = block_c(x, n)
        x = block_d(x, "Mixed_7a")
        x = block_e(x, "Mixed_7b", "avg")
        x = block_e(x, "Mixed_7c", "max")
        pool3 = x.mean(dim=(2, 3))
        logits = F.linear(pool3, W["fc.weight"], W["fc.bias"])
    return pool3.numpy(), logits.numpy()


def test_parity_with_torch(state_dict, images, outputs):
    """End to end in 'pytorch_fid' mode (F.interpolate + 2x-1 + network)."""
    pytest.importorskip("torch")
    ref_pool3, ref_logits = _torch_reference(state_dict, images.transpose(0, 3, 1, 2).copy(), "pytorch_fid")
    np.testing.assert_allclose(np.asarray(outputs["pool3"]), ref_pool3, atol=1e-4 * np.abs(ref_pool3).max(), rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(outputs["logits"]), ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=1e-4
    )


@pytest.mark.parametrize("mode", inc.RESIZE_MODES)
def test_preprocess_parity_with_torch(images, mode):
    """The input pipeline alone, both modes (the network after it is shared and checked above)."""
    pytest.importorskip("torch")
    ref = _torch_reference(None, images.transpose(0, 3, 1, 2).copy(), mode, preprocess_only=True)
    got = np.asarray(inc.preprocess(images, mode)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, atol=1e-5)  # float32 weight rounding differs by ~1 ulp
