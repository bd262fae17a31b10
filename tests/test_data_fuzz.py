"""Fuzz: >= 1000 malformed or unusual samples through decode and the full pipeline. Nothing may crash; bad samples
are counted in num_skipped; good ones come out as valid arrays."""

import io
import struct
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from unitok_jax.data import pipeline, records, text_tokenizer, transforms

GOOD, BAD, ANY = "good", "bad", "any"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _huge_png_header(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height (a decompression-bomb shape), CRC fixed up."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _image_cases(rng):
    """(name, expected, image_bytes) generators, each called with a size."""

    def sz():
        return int(rng.integers(8, 40)), int(rng.integers(8, 40))

    def jpeg(h, w):
        return _encode(Image.fromarray(_rgb(rng, h, w)), "JPEG", quality=int(rng.integers(30, 95)))

    def png(h, w):
        return _encode(Image.fromarray(_rgb(rng, h, w)), "PNG")

    def palette(h, w, transparency=False):
        img = Image.fromarray(_rgb(rng, h, w)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return _encode(img, "PNG", **({"transparency": 0} if transparency else {}))

    def truncated(data):
        return data[: int(len(data) * rng.uniform(0.1, 0.9))]

    def corrupt(data):
        data = bytearray(data)
        for i in rng.integers(len(data) // 4, len(data), size=8):
            data[i] = int(rng.integers(256))
        return bytes(data)

    return [
        ("jpeg", GOOD, lambda: jpeg(*sz())),
        ("png", GOOD, lambda: png(*sz())),
        ("webp", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())), "WEBP")),
        ("webp_rgba", GOOD, lambda: _encode(Image.fromarray(rng.integers(0, 256, (*sz(), 4), dtype=np.uint8)), "WEBP")),
        ("cmyk_jpeg", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())).convert("CMYK"), "JPEG")),
        ("png16_gray", GOOD, lambda: _encode(Image.fromarray(rng.integers(0, 65535, sz(), dtype=np.uint16)), "PNG")),
        ("tiff_float", GOOD, lambda: _encode(Image.fromarray(rng.normal(size=sz()).astype(np.float32)), "TIFF")),
        ("palette", GOOD, lambda: palette(*sz())),
        ("palette_transparent", GOOD, lambda: palette(*sz(), transparency=True)),
        ("rgba_png", GOOD, lambda: _encode(Image.fromarray(rng.integers(0, 256, (*sz(), 4), dtype=np.uint8)), "PNG")),
        ("la_png", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())).convert("LA"), "PNG")),
        ("gray_jpeg", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())).convert("L"), "JPEG")),
        ("bilevel_png", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())).convert("1"), "PNG")),
        ("gif", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())).convert("P"), "GIF")),
        ("bmp", GOOD, lambda: _encode(Image.fromarray(_rgb(rng, *sz())), "BMP")),
        ("extreme_aspect", GOOD, lambda: png(8, int(rng.integers(200, 400)))),
        ("tiny_1x1", BAD, lambda: png(1, 1)),
        ("thin_3px", BAD, lambda: png(3, 30)),
        ("huge_header", BAD, lambda: _huge_png_header(int(rng.integers(9000, 40000)), int(rng.integers(9000, 40000)))),
        ("empty_image", BAD, lambda: b""),
        ("random_bytes", BAD, lambda: rng.bytes(int(rng.integers(1, 300)))),
        ("text_as_image", BAD, lambda: b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"),
        ("png_header_only", BAD, lambda: png(*sz())[:40]),
        ("truncated_jpeg", ANY, lambda: truncated(jpeg(*sz()))),
        ("truncated_png", ANY, lambda: truncated(png(*sz()))),
        ("corrupt_jpeg", ANY, lambda: corrupt(jpeg(*sz()))),
        ("corrupt_png", ANY, lambda: corrupt(png(*sz()))),
    ]


def _captions(rng):
    return [
        "a normal caption",
        "",
        b"bytes caption \xff\xfe invalid utf-8",
        "x" * int(rng.integers(10_000, 100_000)),
        "emoji 🐱 and 中文 and \x00 nul and \u202e rtl",
        "   lots   of\n\twhitespace  ",
    ]


def _bad_record_payloads(rng):
    return [
        ("record_random_bytes", lambda: rng.bytes(int(rng.integers(0, 200)))),
        ("record_empty", lambda: b""),
        ("record_list", lambda: msgpack.packb([1, 2, 3])),
        ("record_no_image", lambda: msgpack.packb({"caption": "no image", "label": 1})),
        ("record_caption_int", lambda: msgpack.packb({"image": b"x", "caption": 3}, use_bin_type=True)),
        ("record_label_str", lambda: msgpack.packb({"image": b"x", "label": "cat"}, use_bin_type=True)),
        ("record_truncated", lambda: records.encode_record({"image": rng.bytes(50), "caption": "c"})[:-10]),
    ]


def _raw_str_caption_record(image: bytes, label: int) -> bytes:
    """A record whose caption is a msgpack *str* with invalid UTF-8 (encode_record would never write this)."""
    return (
        b"\x84"
        + msgpack.packb("id")
        + msgpack.packb(f"raw{label}")
        + msgpack.packb("image")
        + msgpack.packb(image, use_bin_type=True)
        + msgpack.packb("caption")
        + b"\xa3a\xff\xfe"
        + msgpack.packb("label")
        + msgpack.packb(label)
    )


@pytest.fixture(scope="module")
def fuzz_set(tmp_path_factory):
    rng = np.random.default_rng(1234)
    cases = _image_cases(rng)
    captions = _captions(rng)
    bad_records = _bad_record_payloads(rng)
    payloads, expected, kinds = [], [], []
    label = 0
    for rep in range(34):
        for name, exp, make in cases:
            image = make()
            if rep % 9 == 8 and exp == GOOD:
                payload = _raw_str_caption_record(image, label)
            else:
                payload = records.encode_record(
                    {
                        "id": f"{name}-{rep}",
                        "image": image,
                        "caption": captions[(rep + label) % len(captions)],
                        "label": label,
                    }
                )
            payloads.append(payload)
            expected.append(exp)
            kinds.append(name)
            label += 1
        for name, make in bad_records:
            payloads.append(make())
            expected.append(BAD)
            kinds.append(name)
            label += 1
    assert len(payloads) >= 1000
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.array_record"
    records.write_array_record(path, payloads)
    return {"path": str(path), "payloads": payloads, "expected": expected, "kinds": kinds}


def test_decode_never_crashes(fuzz_set):
    outcome = {}
    for payload, exp, kind in zip(fuzz_set["payloads"], fuzz_set["expected"], fuzz_set["kinds"]):
        try:
            rec = records.decode_record(payload)
            image = transforms.decode_image(rec["image"])
            crop = transforms.random_resized_crop(image, 16, np.random.default_rng(0))
            text = text_tokenizer.ByteTokenizer(16)([transforms.clean_caption(rec["caption"])])
            got = GOOD
        except (ValueError, transforms.BadSample):
            got = BAD
        if got == GOOD:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, kind
            assert crop.shape == (16, 16, 3) and text.shape == (1, 16) and text.max() == 258
        assert exp in (ANY, got), (kind, exp, got)
        outcome.setdefault(kind, set()).add(got)
    # The uncertain cases really did exercise the failure path.
    assert BAD in outcome["truncated_jpeg"] | outcome["truncated_png"]


def _config(path):
    c = pipeline.default_data_config()
    c.name = "array_record"
    c.train_files = path
    c.eval_files = path
    c.image_size = 16
    c.context_length = 24
    c.read_threads = 2
    c.prefetch = 32
    return c


def _check_rows(images, texts):
    if not len(images):
        return
    assert images.dtype == np.float32 and np.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert texts.dtype == np.int32 and (texts.max(axis=1) == 258).all() and (texts[:, 0] == 257).all()


def test_eval_pipeline_accounts_for_every_record(fuzz_set):
    n = len(fuzz_set["payloads"])
    ev = pipeline.make_eval_loader(_config(fuzz_set["path"]), batch_size=64, process_index=0, process_count=1)
    kept, skipped, total_rows = [], 0, 0
    for b in ev:
        total_rows += len(b["mask"])
        m = b["mask"]
        _check_rows(b["image"][m], b["text"][m])
        kept.extend(b["label"][m].tolist())
        skipped += int(b["num_skipped"].sum())
        assert (b["num_skipped"][m] == 0).all()
    assert total_rows == len(ev) * 64
    assert len(kept) + skipped == n
    kept = set(kept)
    expected = fuzz_set["expected"]
    good = {i for i, e in enumerate(expected) if e == GOOD}
    bad = {i for i, e in enumerate(expected) if e == BAD}
    assert good <= kept, sorted(fuzz_set["kinds"][i] for i in good - kept)[:10]
    assert not bad & kept
    assert skipped >= len(bad)


def test_train_pipeline_skips_and_counts(fuzz_set):
    n = len(fuzz_set["payloads"])
    ds = pipeline.make_train_loader(
        _config(fuzz_set["path"]), global_batch_size=32, seed=0, process_index=0, process_count=1, num_epochs=1
    )
    rows, skipped, labels = 0, 0, []
    for b in ds:
        _check_rows(b["image"], b["text"])
        rows += len(b["label"])
        skipped += int(b["num_skipped"].sum())
        labels.extend(b["label"].tolist())
    bad = {i for i, e in enumerate(fuzz_set["expected"]) if e == BAD}
    assert not bad & set(labels)
    assert len(set(labels)) == rows
    # Everything is either emitted, counted as skipped, or in the dropped remainder / trailing bad run.
    assert rows + skipped <= n
    assert rows + skipped >= n - 31 - 20
    assert skipped >= len(bad) - 20


def test_odd_modes_convert_sensibly():
    white16 = _encode(Image.fromarray(np.full((9, 9), 65535, np.uint16)), "PNG")
    np.testing.assert_array_equal(transforms.decode_image(white16), 255)
    mid16 = _encode(Image.fromarray(np.full((9, 9), 257 * 100, np.uint16)), "PNG")
    np.testing.assert_array_equal(transforms.decode_image(mid16), 100)
    clear = np.zeros((9, 9, 4), np.uint8)  # fully transparent black -> white background
    np.testing.assert_array_equal(transforms.decode_image(_encode(Image.fromarray(clear), "PNG")), 255)
    opaque = np.concatenate([np.full((9, 9, 3), 10, np.uint8), np.full((9, 9, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(transforms.decode_image(_encode(Image.fromarray(opaque), "PNG")), 10)
    gray = _encode(Image.fromarray(np.full((9, 9), 77, np.uint8)), "PNG")
    np.testing.assert_array_equal(transforms.decode_image(gray), 77)
    cmyk = transforms.decode_image(_encode(Image.new("CMYK", (9, 9), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # pure red survives CMYK JPEG
    with pytest.raises(transforms.BadSample, match="image too large"):
        transforms.decode_image(_huge_png_header(8193, 8193))
    assert transforms.clean_caption(b"\xff ok  \n x") == "\ufffd ok x"
    assert len(transforms.clean_caption("y" * 10**6)) == transforms.MAX_CAPTION_CHARS


@pytest.mark.parametrize("poison", [np.inf, -np.inf, np.nan])
def test_float_images_with_non_finite_pixels_are_skipped_not_blackened(poison):
    """A 32-bit float TIFF with one inf/nan used to set the rescaling range and decode to a near-black image."""
    arr = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    assert transforms.decode_image(buf.getvalue()).max() > 200  # a finite float image still decodes, rescaled
    arr[3, 5] = poison
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    with pytest.raises(transforms.BadSample, match="non-finite pixels: 1 of 4096"):
        transforms.decode_image(buf.getvalue())
