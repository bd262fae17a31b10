"""The on-disk training record: one msgpack dict per ArrayRecord entry, plus writers/readers for shards.

A record is ``{"id": str, "image": bytes, "caption": str, "label": int}``; ``image`` holds the encoded file exactly
as found (JPEG/PNG/WEBP...), ``label`` is -1 when the source has no class. Decoding pixels is *not* done here
(see ``transforms.py``): this module only (de)serialises and moves bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgpack

from unitok_jax import paths as _paths  # not `paths`: the functions below take a `paths` argument

RECORD_KEYS = ("id", "image", "caption", "label")
# group_size:1 makes every record individually addressable: Grain's random access reads one record per lookup.
ARRAY_RECORD_WRITER_OPTIONS = "group_size:1"
ARRAY_RECORD_SUFFIX = ".array_record"


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialises ``{"id", "image", "caption", "label"}`` to msgpack bytes (missing caption -> "", label -> -1)."""
    if not isinstance(record, Mapping):
        raise TypeError(f"encode_record expects a mapping, got {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"record['image'] must be encoded image bytes, got {type(image).__name__}")
    caption = record.get("caption", "")
    if caption is None:
        caption = ""
    if isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    label = record.get("label", -1)
    label = -1 if label is None else int(label)
    return msgpack.packb(
        {"id": str(record.get("id", "")), "image": bytes(image), "caption": str(caption), "label": label},
        use_bin_type=True,
    )


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses msgpack bytes back into a record dict; raises ``ValueError`` on anything that is not a record.

    Lenient where leniency is harmless: a caption stored as bytes or with invalid UTF-8 is decoded with
    replacement characters, a missing caption becomes "" and a missing label -1. An absent/non-bytes image is an
    error, because nothing downstream could use the record.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"record must be bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, unicode_errors="replace", strict_map_key=False)
    except Exception as e:  # msgpack raises a zoo of types (ExtraData, FormatError, StackError, ValueError...)
        raise ValueError(f"record is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"record must be a msgpack map, got {type(obj).__name__}")
    image = obj.get("image")
    if not isinstance(image, (bytes, bytearray)):
        raise ValueError(f"record has no image bytes (keys: {sorted(map(str, obj))})")
    caption = obj.get("caption", "")
    if caption is None:
        caption = ""
    elif isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    elif not isinstance(caption, str):
        raise ValueError(f"record caption must be a string, got {type(caption).__name__}")
    label = obj.get("label", -1)
    if label is None:
        label = -1
    if isinstance(label, bool) or not isinstance(label, int) or not -(2**31) <= label < 2**31:
        raise ValueError(f"record label must be an int32, got {label!r}")
    rid = obj.get("id", "")
    if isinstance(rid, (bytes, bytearray)):
        rid = bytes(rid).decode("utf-8", errors="replace")
    return {"id": str(rid), "image": bytes(image), "caption": caption, "label": label}


def _array_record_module():
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    return array_record_module


def write_array_record(path: str | os.PathLike, records: Iterable[Mapping[str, Any] | bytes]) -> int:
    """Writes records (dicts, or bytes already made by ``encode_record``) to one ArrayRecord file; returns the count.

    The file is written to ``path + '.tmp'`` and renamed, so a reader never sees a half-written shard.
    """
    path = _paths.require_local(path, "writing an ArrayRecord shard")
    _paths.makedirs(_paths.parent(path))
    tmp = path + ".tmp"
    writer = _array_record_module().ArrayRecordWriter(tmp, ARRAY_RECORD_WRITER_OPTIONS)
    count = 0
    try:
        for record in records:
            writer.write(record if isinstance(record, bytes) else encode_record(record))
            count += 1
    finally:
        writer.close()
    _paths.rename(tmp, path)
    return count


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands a path, glob, comma-separated list of them, or a sequence of them into a sorted file list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in os.fspath(paths).split(",") if p.strip()]
    files: list[str] = []
    for pattern in paths:
        pattern = os.fspath(pattern).strip()
        if _paths.has_magic(pattern):
            matched = _paths.glob(pattern)
            if not matched:
                raise FileNotFoundError(f"no files match {pattern!r}")
            files.extend(matched)
        else:
            if not _paths.exists(pattern):
                raise FileNotFoundError(f"no such file {pattern!r}")
            files.append(pattern)
    if not files:
        raise FileNotFoundError(f"no files given ({paths!r})")
    return files


def read_array_records(paths: str | os.PathLike | Sequence[str | os.PathLike]):
    """Returns a random-access source (``grain.sources.ArrayRecordDataSource``) over the given files/globs.

    ``source[i]`` is the raw bytes of record ``i`` (pass them to ``decode_record``); ``len(source)`` is the total.
    """
    import grain  # pylint: disable=g-import-not-at-top

    files = [_local_shard(f) for f in expand_paths(paths)]
    try:
        return grain.sources.ArrayRecordDataSource(files)
    except Exception as e:  # the reader's message ("... at least 64KB big") does not say which file
        bad = next((f for f in files if not _readable(f)), None)
        raise ValueError(
            f"{bad or files!r} is not a readable ArrayRecord file ({type(e).__name__}: {e}); "
            "write shards with `python -m unitok_jax.data.ingest` or remove the file from the data glob"
        ) from e


def _readable(path: str) -> bool:
    try:
        _array_record_module().ArrayRecordReader(path).close()
        return True
    except Exception:  # noqa: BLE001 - any failure to open means unreadable here
        return False


def _local_shard(path: str) -> str:
    """ArrayRecord's reader opens local files only (a gcsfuse mount counts as local); say so for gs:// shards."""
    return _paths.require_local(path, "reading ArrayRecord shards")


def iter_array_record(path: str | os.PathLike) -> Iterator[bytes]:
    """Sequentially yields the raw records of one file (for tools and tests; training uses the random-access source)."""
    reader = _array_record_module().ArrayRecordReader(_local_shard(os.fspath(path)))
    try:
        n = reader.num_records()
        for start in range(0, n, 256):
            yield from reader.read(list(range(start, min(n, start + 256))))
    finally:
        reader.close()


def count_array_records(path: str | os.PathLike) -> int:
    reader = _array_record_module().ArrayRecordReader(_local_shard(os.fspath(path)))
    try:
        return int(reader.num_records())
    finally:
        reader.close()
