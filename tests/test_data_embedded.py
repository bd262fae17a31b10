"""Embedded procedural dataset: determinism, caching, caption/label/pixel consistency, generation speed."""

import json
import os
import time

import numpy as np
import pytest

from unitok_jax.data import embedded, records, transforms


def test_render_is_deterministic_and_seeded():
    a = embedded.render_example(0, "train", 5, 32)
    b = embedded.render_example(0, "train", 5, 32)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1:] == b[1:]
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
    others = [
        embedded.render_example(1, "train", 5, 32),
        embedded.render_example(0, "eval", 5, 32),
        embedded.render_example(0, "train", 6, 32),
    ]
    assert all(not np.array_equal(a[0], o[0]) for o in others)


def test_class_names_and_prompts():
    names = embedded.class_names()
    assert len(names) == len(set(names)) == len(embedded.COLORS) * len(embedded.SHAPES) == 48
    prompts = embedded.zero_shot_prompts()
    assert len(prompts) == 48 and prompts[0][0] == f"a {names[0]}."


def test_caption_label_and_pixels_agree():
    names = embedded.class_names()
    sizes = set(embedded.SIZES)
    checked = 0
    for i in range(200):
        image, caption, label = embedded.render_example(3, "train", i, 64)
        rng = np.random.default_rng([3, 0, i])
        scene = embedded._sample_scene(rng)  # pylint: disable=protected-access  # the scene behind the pixels
        main = scene["objects"][0]
        assert names[label] == f"{main['color']} {main['shape']}"
        # The caption starts with the main object, so "a <class name>" prompts match the captions' wording.
        first_words = caption.split(" ")[:4]
        assert first_words[0] == "a" and first_words[1] in sizes
        assert " ".join(first_words[2:4]) == names[label]
        assert caption.endswith("background") and scene["background"] in caption
        assert main["color"] != scene["background"]
        for obj in scene["objects"]:
            assert f"{obj['size']} {obj['color']} {obj['shape']} {obj['position']}" in caption
        if main["shape"] != "ring":  # the centre of every other shape is filled with the object's colour
            cx, cy = (np.asarray(main["center"]) + main["jitter"]) * 64
            pixel = image[int(cy), int(cx)].astype(int)
            assert np.abs(pixel - embedded.COLORS[main["color"]]).max() <= 2, (i, caption)
            checked += 1
    assert checked > 100
    labels = {embedded.render_example(0, "train", i, 16)[2] for i in range(400)}
    assert len(labels) >= 40  # all classes show up quickly


def test_build_is_cached_and_keyed_by_args(tmp_path):
    kw = dict(num_train=40, num_eval=10, image_size=32, seed=0)
    info = embedded.build_embedded_dataset(tmp_path, **kw)
    assert info["class_names"] == embedded.class_names()
    assert sum(records.count_array_records(p) for p in info["train"]) == 40
    assert sum(records.count_array_records(p) for p in info["eval"]) == 10
    manifest = os.path.join(info["dir"], "manifest.json")
    assert json.load(open(manifest))["args"]["num_train"] == 40
    mtimes = {p: os.path.getmtime(p) for p in info["train"] + info["eval"] + [manifest]}
    t = time.time()
    again = embedded.build_embedded_dataset(tmp_path, **kw)
    assert time.time() - t < 0.5
    assert again == info
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes  # nothing rewritten
    other = embedded.build_embedded_dataset(tmp_path, **{**kw, "seed": 1})
    assert other["dir"] != info["dir"] and os.path.exists(info["dir"])
    # No temporary build directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        os.path.basename(d) for d in (info["dir"], other["dir"])
    )
    # Records decode to the PNG images render_example produces, with matching captions/labels.
    rec = records.decode_record(next(records.iter_array_record(info["train"][0])))
    image, caption, label = embedded.render_example(0, "train", 0, 32)
    np.testing.assert_array_equal(transforms.decode_image(rec["image"]), image)
    assert (rec["caption"], rec["label"], rec["id"]) == (caption, label, "embedded-train-0000000")


def test_incomplete_cache_is_rebuilt(tmp_path):
    info = embedded.build_embedded_dataset(tmp_path, num_train=8, num_eval=4, image_size=16)
    os.remove(info["train"][0])
    again = embedded.build_embedded_dataset(tmp_path, num_train=8, num_eval=4, image_size=16)
    assert os.path.exists(again["train"][0]) and again["dir"] == info["dir"]


def test_bad_args():
    with pytest.raises(ValueError, match="num_train"):
        embedded.build_embedded_dataset("/nonexistent", num_train=0)


def test_generation_speed():
    # Budget: 5k 64x64 images in < 30 s on one core, i.e. 6 ms each including PNG encoding.
    t = time.time()
    n = 500
    for i in range(n):
        embedded._encode_png(embedded.render_example(0, "train", i, 64)[0])  # pylint: disable=protected-access
    per_image = (time.time() - t) / n
    assert per_image < 6e-3, f"{per_image * 1e3:.2f} ms per image"


def test_heldout_photos():
    photos = embedded.heldout_photos(32)
    assert isinstance(photos, list)
    for p in photos:  # [] when neither scikit-image nor scikit-learn is installed
        assert p["image"].shape == (32, 32, 3) and p["image"].dtype == np.uint8 and isinstance(p["id"], str)
