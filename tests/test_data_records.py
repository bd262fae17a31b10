"""Records: msgpack round trip, clear errors on garbage, ArrayRecord write/read, path resolution."""

import json
import os

import msgpack
import pytest

from unitok_jax.data import records, sources


def test_round_trip_defaults_and_bytes_caption():
    rec = {"id": "x/1", "image": b"\x89PNG...", "caption": "a red circle", "label": 7}
    assert records.decode_record(records.encode_record(rec)) == rec
    out = records.decode_record(records.encode_record({"image": b"abc"}))
    assert out == {"id": "", "image": b"abc", "caption": "", "label": -1}
    # Invalid UTF-8 in a caption survives as replacement characters, not an exception.
    out = records.decode_record(records.encode_record({"image": b"abc", "caption": b"caf\xe9 \xff"}))
    assert out["caption"].startswith("caf") and "\ufffd" in out["caption"]
    raw_str = msgpack.packb({"image": b"abc", "caption": b"\xff\xfe"}, use_bin_type=False)  # str type, bad UTF-8
    with pytest.raises(ValueError):  # use_bin_type=False also makes "image" a str: not image bytes
        records.decode_record(raw_str)
    # A 2-entry map whose caption is a msgpack *str* holding invalid UTF-8 (fixstr of length 2: ff fe).
    raw = (
        b"\x82"
        + msgpack.packb("image")
        + msgpack.packb(b"abc", use_bin_type=True)
        + msgpack.packb("caption")
        + b"\xa2\xff\xfe"
    )
    out = records.decode_record(raw)
    assert out["image"] == b"abc" and "\ufffd" in out["caption"]


def test_encode_rejects_missing_image():
    with pytest.raises(TypeError, match="image"):
        records.encode_record({"id": "a", "caption": "x"})


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1",  # reserved msgpack byte
        b"\xff" * 10,  # trailing data
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"caption": "no image"}),
        msgpack.packb({"image": "not bytes"}, use_bin_type=True),
        msgpack.packb({"image": b"x", "label": "seven"}, use_bin_type=True),
        msgpack.packb({"image": b"x", "label": 2**40}, use_bin_type=True),
        msgpack.packb({"image": b"x", "caption": 5}, use_bin_type=True),
        msgpack.packb({"image": b"x"}, use_bin_type=True)[:-1],  # truncated
        b"\xdd\xff\xff\xff\xff",  # claims a 4G-entry array
        "not bytes",
    ],
)
def test_decode_garbage_raises_value_error(garbage):
    with pytest.raises(ValueError):
        records.decode_record(garbage)


def test_write_read_array_record(tmp_path):
    recs = [{"id": str(i), "image": bytes([i]) * (i + 1), "caption": f"c{i}", "label": i} for i in range(10)]
    path = tmp_path / "a" / "x.array_record"
    assert records.write_array_record(path, recs[:6]) == 6
    assert (
        records.write_array_record(tmp_path / "a" / "y.array_record", [records.encode_record(r) for r in recs[6:]]) == 4
    )
    assert not list((tmp_path / "a").glob("*.tmp"))
    assert records.count_array_records(path) == 6
    assert [records.decode_record(b) for b in records.iter_array_record(path)] == recs[:6]
    src = records.read_array_records(str(tmp_path / "a" / "*.array_record"))
    assert len(src) == 10
    assert [records.decode_record(src[i]) for i in range(10)] == recs
    src2 = records.read_array_records([str(path), str(tmp_path / "a" / "y.array_record")])
    assert records.decode_record(src2[7]) == recs[7]


def test_path_resolution_errors_and_manifests(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing|no files"):
        records.expand_paths(str(tmp_path / "*.array_record"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        records.expand_paths(str(tmp_path / "missing.array_record"))
    for name in ("s0.array_record", "s1.array_record"):
        records.write_array_record(tmp_path / name, [{"image": b"x"}])
    assert sources.resolve_files(str(tmp_path)) == [
        str(tmp_path / "s0.array_record"),
        str(tmp_path / "s1.array_record"),
    ]
    manifest = {
        "shards": [
            {"output": "s0.array_record", "written": 1, "complete": True},
            {"output": "s1.array_record", "written": 0, "complete": True},
        ]
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # A directory with a manifest means "the complete, non-empty shards it lists".
    assert sources.resolve_files(str(tmp_path)) == [os.path.join(str(tmp_path), "s0.array_record")]
    assert sources.resolve_files(str(tmp_path / "manifest.json")) == [os.path.join(str(tmp_path), "s0.array_record")]
    mix = sources.resolve_mixture([{"files": str(tmp_path / "s0*"), "weight": 3}, {"files": str(tmp_path / "s1*")}])
    assert [w for _, w in mix] == [0.75, 0.25]
    with pytest.raises(ValueError, match="weight"):
        sources.resolve_mixture([{"files": str(tmp_path / "s0*"), "weight": 0}])
    with pytest.raises(ValueError, match="files"):
        sources.resolve_mixture([{"weight": 1}])


def test_a_file_that_is_not_array_record_is_named(tmp_path):
    """ArrayRecord's own error ('should be at least 64KB big') does not say which of the shards is bad."""
    good = tmp_path / "good.array_record"
    records.write_array_record(good, [records.encode_record({"id": "a", "image": b"x", "caption": "c", "label": 0})])
    bad = tmp_path / "notes.array_record"
    bad.write_text("not an ArrayRecord file")
    with pytest.raises(ValueError, match=r"notes\.array_record' is not a readable ArrayRecord file"):
        records.read_array_records(str(tmp_path / "*.array_record"))
