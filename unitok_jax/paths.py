"""The one path layer: every user-given or derived path, local or on an object store (``gs://``), goes through here.

Why one layer: ``os.path`` / ``open`` / ``glob`` treat ``gs://bucket/run`` as a relative local path
(``os.path.abspath('gs://b/run')`` is ``<cwd>/gs:/b/run``), so a pod run's checkpoints would land on each host's
local disk and a restart on a fresh VM would start from scratch. ``etils.epath`` speaks local paths and object
stores with one API (``gs://`` through gcsfs when TensorFlow is absent) and Orbax and Grain already use it, so
every other module calls these helpers instead of ``os``/``open``/``glob`` on paths.

What stays local-only, with a clear error (``require_local``): ArrayRecord shards (their reader opens local files;
on a pod mount the bucket with gcsfuse and point ``train_files`` at the mount, see launch/README.md).

Emulators: ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` is the standard variable gcsfs and Google's clients
honour. TensorStore (Orbax's array I/O) reads ``TENSORSTORE_GCS_HTTP_URL`` instead and would otherwise look for
credentials, so ``configure_storage_emulator`` derives both from it; it runs when this module is imported, before
TensorStore opens anything.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any

from etils import epath

PathLike = str | os.PathLike
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_MAGIC = re.compile(r"[*?\[]")


def configure_storage_emulator() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, points every GCS client at the emulator without credentials.

    TensorStore ignores that variable and reads ``TENSORSTORE_GCS_HTTP_URL`` (+ a fixed test token instead of the
    credential search). gcsfs honours it, but would still try real credentials first (``FSSPEC_GCS_TOKEN=anon``,
    read when fsspec is imported) and, from 2026.x, ask a gRPC API that emulators lack for each bucket's layout,
    hanging 60 s per call (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, read when gcsfs is imported). Values the
    user set win. Runs at import of this module, before any of those clients is imported by the package.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    if not _URL.match(host):
        host = "http://" + host
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host.rstrip("/"))
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("NO_GCE_CHECK", "true")


def disable_gcs_listing_cache() -> None:
    """gcsfs caches directory listings forever, but Orbax writes checkpoints through TensorStore, behind gcsfs' back:
    a cached listing would not show a newly committed step (seen in tests/test_gcs_workdir.py). Listings are rare
    here (start-up, step directories), so they are always read fresh. A user's own setting wins."""
    for protocol in ("gs", "gcs"):
        os.environ.setdefault(f"FSSPEC_{protocol.upper()}_USE_LISTINGS_CACHE", "false")
    if "fsspec.config" in sys.modules:  # fsspec reads its environment once, at import
        conf = sys.modules["fsspec.config"].conf
        for protocol in ("gs", "gcs"):
            conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


configure_storage_emulator()
disable_gcs_listing_cache()


def is_url(p: PathLike) -> bool:
    """``gs://…`` and other ``scheme://`` paths (object stores); everything else is a local path."""
    return bool(_URL.match(os.fspath(p)))


def resolve(p: PathLike) -> str:
    """The canonical string for ``p``: URLs unchanged (bar a trailing '/'), local paths absolute with ``~`` expanded."""
    s = os.fspath(p)
    if is_url(s):
        return s.rstrip("/") if not s.endswith("://") else s
    return os.path.abspath(os.path.expanduser(s))


def path(p: PathLike) -> epath.Path:
    return epath.Path(resolve(p))


def join(base: PathLike, *parts: str) -> str:
    return os.fspath(path(base).joinpath(*parts))


def parent(p: PathLike) -> str:
    return os.fspath(path(p).parent)


def basename(p: PathLike) -> str:
    return path(p).name


def stem(p: PathLike) -> str:
    """The file name without its last suffix (``a/b.tar.gz`` -> ``b.tar``), exactly as ``os.path.splitext`` cuts it."""
    return os.path.splitext(basename(p))[0]  # not Path.stem: that keeps the dot of 'a.'


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: PathLike) -> bool:
    return path(p).is_file()


def makedirs(p: PathLike) -> str:
    """Creates ``p`` and its parents (on object stores directories are implicit; this is then cheap)."""
    target = path(p)
    target.mkdir(parents=True, exist_ok=True)
    return os.fspath(target)


def listdir(p: PathLike) -> list[str]:
    """Names (not paths) in directory ``p``, sorted; [] if it does not exist."""
    d = path(p)
    if not d.exists():
        return []
    return sorted(child.name for child in d.iterdir())


def open_file(p: PathLike, mode: str = "r", **kwargs) -> Any:
    return path(p).open(mode, **kwargs)


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def write_bytes_atomic(p: PathLike, data: bytes) -> str:
    """Writes ``p`` so readers see the old or the new content, never a torn file.

    Local: a temporary sibling renamed over the target. Object stores: a single object upload is already atomic.
    """
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(target):
        target.write_bytes(data)
        return os.fspath(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return os.fspath(target)


def write_text_atomic(p: PathLike, text: str) -> str:
    return write_bytes_atomic(p, text.encode("utf-8"))


def write_json_atomic(p: PathLike, obj: Any, **dumps_kwargs) -> str:
    return write_text_atomic(p, json.dumps(obj, **dumps_kwargs))


def append_text(p: PathLike, text: str) -> None:
    """Appends to a local file; on object stores (no appends) the object is rewritten whole.

    Fine for small, infrequently written files such as metrics.jsonl (one line per logged step).
    """
    target = path(p)
    if is_url(target):
        old = target.read_bytes() if target.exists() else b""
        target.write_bytes(old + text.encode("utf-8"))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as f:
        f.write(text)


def rename(src: PathLike, dst: PathLike) -> None:
    path(src).rename(path(dst))


def rmtree(p: PathLike) -> None:
    target = path(p)
    if target.exists():
        target.rmtree()


def glob(pattern: PathLike) -> list[str]:
    """Sorted matches of a glob (``*``, ``?``, ``[...]``), local or on an object store (``**`` recurses locally
    only: epath refuses it on gs://)."""
    s = resolve(pattern)
    if not is_url(s):
        return sorted(_glob.glob(s, recursive=True))
    scheme, rest = s.split("://", 1)
    parts = rest.split("/")
    first_magic = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    if first_magic == len(parts):
        return [s] if exists(s) else []
    root = epath.Path(f"{scheme}://" + "/".join(parts[:first_magic]))
    if not root.exists():
        return []
    return sorted(os.fspath(m) for m in root.glob("/".join(parts[first_magic:])))


def has_magic(pattern: PathLike) -> bool:
    return bool(_MAGIC.search(os.fspath(pattern)))


def require_local(p: PathLike, what: str) -> str:
    """``p`` resolved, or a ValueError saying how to make an object-store path readable (gcsfuse)."""
    if is_url(p):
        raise ValueError(
            f"{what}: {os.fspath(p)!r} is on an object store, but this reader opens local files only. Mount the "
            f"bucket on every host (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, see launch/README.md) and "
            f"use the mounted path, or copy the files to a local/shared disk."
        )
    return resolve(p)


def local_copy(p: PathLike, cache_dir: PathLike | None = None) -> str:
    """A local file with ``p``'s content: ``p`` itself when local, else a cached download (weights, tokenizers).

    Downloads go to ``cache_dir`` (default ``$UNITOK_JAX_CACHE`` or ``~/.cache/unitok_jax/remote``) under a
    name derived from the URL, written atomically; a second call reuses the copy.
    """
    if not is_url(p):
        return resolve(p)
    url = resolve(p)
    root = resolve(cache_dir or os.environ.get("UNITOK_JAX_CACHE") or "~/.cache/unitok_jax/remote")
    local = os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:16], basename(url))
    if not os.path.exists(local):
        src = path(url)
        if not src.exists():
            raise FileNotFoundError(f"{url} does not exist")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with src.open("rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return local


def free_bytes(p: PathLike) -> int | None:
    """Free space on the local file system holding ``p`` (or its nearest existing parent); None for object stores."""
    if is_url(p):
        return None
    d = resolve(p)
    while not os.path.exists(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    return shutil.disk_usage(d).free


def check_writable(p: PathLike) -> None:
    """Creates directory ``p`` and writes, reads back and deletes a probe file there.

    Raises ``OSError`` naming the directory and the cause (read-only file system, permission, missing bucket,
    no credentials, ...), so a run fails before compiling anything instead of at its first checkpoint.
    """
    where = resolve(p)
    probe = None
    try:
        makedirs(where)
        probe = path(where) / f".unitok_jax_write_probe-{uuid.uuid4().hex[:12]}"
        probe.write_text("ok")
        if probe.read_text() != "ok":
            raise OSError("the probe file read back different content")
    except Exception as e:  # noqa: BLE001 — every backend raises its own type; report them all the same way
        raise OSError(f"{where} is not writable ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
    finally:
        if probe is not None:
            with contextlib.suppress(Exception):
                probe.unlink()
