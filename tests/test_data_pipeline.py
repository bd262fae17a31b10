"""Grain pipeline: batch contract, determinism, checkpoint/restore (0 and 2 workers), sharding, eval padding,
mixtures, config validation; plus the tokenizer and transforms it relies on."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unitok_jax.data import pipeline, records, text_tokenizer, transforms


def _png(rng, h=20, w=24):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_indexed(path, n, *, offset=0, seed=0):
    """n records whose label is their index (+ offset): labels identify examples in batches."""
    rng = np.random.default_rng(seed)
    recs = [
        {"id": f"r{offset + i}", "image": _png(rng), "caption": f"record {offset + i}", "label": offset + i}
        for i in range(n)
    ]
    records.write_array_record(path, recs)
    return str(path)


@pytest.fixture(scope="module")
def embedded_config(tmp_path_factory):
    c = pipeline.default_data_config()
    c.data_dir = str(tmp_path_factory.mktemp("data"))
    c.embedded.num_train = 96
    c.embedded.num_eval = 20
    c.embedded.image_size = 32
    c.image_size = 24
    c.context_length = 32
    c.read_threads = 2
    c.prefetch = 16
    return c


@pytest.fixture(scope="module")
def indexed_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("indexed")
    _write_indexed(d / "a.array_record", 30)
    _write_indexed(d / "b.array_record", 34, offset=30, seed=1)
    c = pipeline.default_data_config()
    c.name = "array_record"
    c.train_files = str(d / "*.array_record")
    c.eval_files = str(d / "*.array_record")
    c.image_size = 16
    c.context_length = 16
    c.read_threads = 2
    c.prefetch = 8
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_contract(embedded_config):
    ds = pipeline.make_train_loader(embedded_config, global_batch_size=8, seed=0, process_index=0, process_count=1)
    batch = next(iter(ds))
    assert set(batch) == {"image", "text", "label", "num_skipped"}
    assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
    assert batch["text"].shape == (8, 32) and batch["text"].dtype == np.int32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert ((0 <= batch["label"]) & (batch["label"] < 48)).all()
    assert batch["num_skipped"].shape == (8,) and batch["num_skipped"].sum() == 0
    tok = text_tokenizer.ByteTokenizer(32)
    # Every row is SOT ... EOT with EOT the argmax (the text tower pools there).
    assert (batch["text"][:, 0] == tok.sot_id).all()
    assert (batch["text"].max(axis=1) == tok.eot_id).all()
    assert tok.decode(batch["text"][0]).startswith("a ")


def test_train_is_deterministic_per_seed(embedded_config):
    make = lambda seed: pipeline.make_train_loader(  # noqa: E731
        embedded_config, global_batch_size=8, seed=seed, process_index=0, process_count=1
    )
    a, b, c = _take(iter(make(1)), 3), _take(iter(make(1)), 3), _take(iter(make(2)), 3)
    _assert_same(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_reshuffle_and_recrop(indexed_config):
    ds = pipeline.make_train_loader(
        indexed_config, global_batch_size=64, seed=0, process_index=0, process_count=1, num_epochs=2
    )
    e1, e2 = list(iter(ds))
    assert sorted(e1["label"]) == sorted(e2["label"]) == list(range(64))  # each epoch sees every record once
    assert not np.array_equal(e1["label"], e2["label"])  # in a new order
    order1, order2 = np.argsort(e1["label"]), np.argsort(e2["label"])
    assert not np.array_equal(e1["image"][order1], e2["image"][order2])  # with new random crops


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_restore_reproduces_continuation(embedded_config, workers):
    cfg = ml_collections.ConfigDict(embedded_config.to_dict())
    cfg.worker_count = workers
    ds = pipeline.make_train_loader(cfg, global_batch_size=8, seed=3, process_index=0, process_count=1)
    it = iter(ds)
    _take(it, 5)  # 40 of 96 examples: the state lands mid-epoch
    state = pipeline.iterator_state(it)
    expected = _take(it, 9)  # crosses the epoch boundary
    it.close()
    it2 = pipeline.restore_iterator(iter(ds), state)
    _assert_same(_take(it2, 9), expected)
    it2.close()


def test_orbax_composite_checkpoint(embedded_config, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    ds = pipeline.make_train_loader(embedded_config, global_batch_size=8, seed=0, process_index=0, process_count=1)
    it = iter(ds)
    _take(it, 2)
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    mgr.save(
        2,
        args=ocp.args.Composite(
            **{
                "state": ocp.args.StandardSave({"w": np.arange(3.0)}),
                pipeline.CHECKPOINT_ITEM_NAME: pipeline.grain_checkpoint_save_args(it),
            }
        ),
    )
    mgr.wait_until_finished()
    expected = _take(it, 3)
    it2 = iter(ds)
    mgr2 = ocp.CheckpointManager(
        tmp_path / "ckpt",
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            pipeline.CHECKPOINT_ITEM_NAME: pipeline.grain_checkpoint_handler(),
        },
    )
    restored = mgr2.restore(
        2,
        args=ocp.args.Composite(
            **{
                "state": ocp.args.StandardRestore({"w": np.zeros(3)}),
                pipeline.CHECKPOINT_ITEM_NAME: pipeline.grain_checkpoint_restore_args(it2),
            }
        ),
    )
    np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
    _assert_same(_take(restored[pipeline.CHECKPOINT_ITEM_NAME], 3), expected)
    mgr.close()
    mgr2.close()


def test_process_shards_are_disjoint(indexed_config):
    seen = []
    for p in range(2):
        ds = pipeline.make_train_loader(
            indexed_config, global_batch_size=8, seed=5, process_index=p, process_count=2, num_epochs=1
        )
        labels = np.concatenate([b["label"] for b in ds])
        assert len(labels) == 32 and len(set(labels)) == 32
        seen.append(set(labels.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(64))
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.make_train_loader(indexed_config, global_batch_size=7, seed=0, process_index=0, process_count=2)


def test_eval_loader_padding_and_mask(indexed_config):
    ev = pipeline.make_eval_loader(indexed_config, batch_size=24, process_index=0, process_count=1)
    batches = list(ev)
    assert len(ev) == len(batches) == 3 and ev.num_examples == 64
    assert [int(b["mask"].sum()) for b in batches] == [24, 24, 16]
    assert batches[0]["mask"].dtype == np.bool_
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(64))  # in order, no shuffle
    last = batches[-1]
    assert (last["label"][~last["mask"]] == -1).all() and (last["image"][~last["mask"]] == 0).all()
    _assert_same(list(ev), batches)  # re-iterable and deterministic
    # Two processes: same number of batches each, disjoint rows covering everything once.
    per_process = [
        list(pipeline.make_eval_loader(indexed_config, batch_size=10, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 7  # ceil(32 / 5)
    labels = [np.concatenate([b["label"][b["mask"]] for b in bs]) for bs in per_process]
    assert sorted(np.concatenate(labels).tolist()) == list(range(64))
    # Eval crops are deterministic: the centre crop of the decoded image.
    rec = records.decode_record(records.read_array_records(indexed_config.eval_files)[0])
    want = transforms.eval_transform(rec["image"], 16)
    np.testing.assert_allclose(batches[0]["image"][0], want)


def test_partial_dict_config_gets_defaults(indexed_config):
    ds = pipeline.make_train_loader(
        {"name": "array_record", "train_files": indexed_config.train_files, "image_size": 8, "crop_scale": [0.5, 1.0]},
        global_batch_size=2,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(ds))
    assert batch["image"].shape == (2, 8, 8, 3) and batch["text"].shape == (2, 77)


def test_eval_on_embedded(embedded_config):
    ev = pipeline.make_eval_loader(embedded_config, batch_size=8, process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 20
    assert pipeline.class_names(embedded_config)[0] == "red circle"


def test_mixture_weights(indexed_config, tmp_path):
    cfg = ml_collections.ConfigDict(indexed_config.to_dict())
    _write_indexed(tmp_path / "hi.array_record", 100, offset=1000)  # not tiny: index_shuffle is slow below ~1k
    cfg.sources = [
        {"files": indexed_config.train_files, "weight": 1.0},
        {"files": str(tmp_path / "hi.array_record"), "weight": 3.0},
    ]
    ds = pipeline.make_train_loader(cfg, global_batch_size=40, seed=0, process_index=0, process_count=1)
    labels = np.concatenate([b["label"] for b in _take(iter(ds), 5)])
    frac = (labels >= 1000).mean()
    assert 0.65 < frac < 0.85, frac


def test_config_validation_names_the_field(indexed_config):
    def bad(**kw):
        c = ml_collections.ConfigDict(indexed_config.to_dict())
        for k, v in kw.items():
            c[k] = v
        return c

    cases = [
        (dict(name="imagenet"), "config.data.name"),
        (dict(crop_scale=(0.5, 1.5)), "config.data.crop_scale"),
        (dict(crop_ratio=(2.0, 1.0)), "config.data.crop_ratio"),
        (dict(tokenizer="sentencepiece"), "config.data.tokenizer"),
        (dict(tokenizer="clip_bpe", bpe_path=""), "config.data.bpe_path"),
        (dict(context_length=1), "config.data.context_length"),
        (dict(worker_count=-1), "config.data.worker_count"),
        (dict(train_files="", sources=[]), "config.data.train_files"),
    ]
    for kw, field in cases:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            pipeline.make_train_loader(bad(**kw), global_batch_size=4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['image_szie'\]"):
        pipeline.make_train_loader({"image_szie": 3}, global_batch_size=4, seed=0, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="nope"):
        pipeline.make_train_loader(
            bad(train_files="/nope/*.array_record"), global_batch_size=4, seed=0, process_index=0, process_count=1
        )


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_byte_tokenizer():
    tok = text_tokenizer.build_tokenizer("bytes", context_length=8)
    ids = tok(["ab", "", "héllo world", b"\xff"])
    assert ids.dtype == np.int32 and ids.shape == (4, 8)
    np.testing.assert_array_equal(ids[0], [257, ord("a") + 1, ord("b") + 1, 258, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [257, 258, 0, 0, 0, 0, 0, 0])
    assert ids[2, -1] == 258 and (ids[2] > 0).all()  # truncated, EOT forced last
    assert (ids.argmax(axis=1) == (ids > 0).sum(axis=1) - 1).all()  # argmax is the EOT position
    assert tok.vocab_size == 259 and ids.max() < tok.vocab_size
    assert tok.decode(ids[0]) == "ab" and tok.decode(tok(["héllo"])[0]) == "héllo"
    with pytest.raises(ValueError, match=r"unknown tokenizer 'x'; available: \['bytes', 'clip_bpe'\]"):
        text_tokenizer.build_tokenizer("x")
    with pytest.raises(ValueError, match="bpe_path"):
        text_tokenizer.build_tokenizer("clip_bpe", context_length=77)


# --- transforms -------------------------------------------------------------------------------------------------


def test_random_resized_crop_matches_open_clip_semantics():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    boxes = [
        transforms.random_resized_crop_box(60, 80, np.random.default_rng(i), (0.9, 1.0), (0.75, 4 / 3))
        for i in range(200)
    ]
    for top, left, h, w in boxes:
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        # Either an in-range sample or the documented central fallback.
        ok_sample = 0.9 * 4800 * 0.97 <= h * w <= 4800 and 0.75 * 0.95 <= w / h <= 4 / 3 * 1.05
        assert ok_sample or (h, w) == (60, 80)
    a = transforms.random_resized_crop(image, 32, np.random.default_rng(7))
    b = transforms.random_resized_crop(image, 32, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    full = transforms.resize_center_crop(image, 30)
    ref = np.asarray(Image.fromarray(image).resize((40, 30), Image.Resampling.BICUBIC))[:, 5:35]
    assert np.abs(full.astype(int) - ref.astype(int)).mean() < 2.0  # = torchvision Resize + CenterCrop
    f = transforms.to_float(np.array([0, 255], np.uint8))
    np.testing.assert_allclose(f, [-1.0, 1.0])
