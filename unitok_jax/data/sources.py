"""Resolves data-config file specs (globs, directories, ingest manifests, mixtures) into shard lists and weights.

Only paths and numbers here: opening the files is ``records.read_array_records``' job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from unitok_jax import paths
from unitok_jax.data import records

MANIFEST = "manifest.json"


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a ``manifest.json`` written by ``ingest.py`` or ``embedded.py``."""
    return paths.read_json(path)


def manifest_files(path: str | os.PathLike, split: str = "train") -> list[str]:
    """The shard paths a manifest lists as complete and non-empty (``split`` applies to embedded manifests)."""
    path = paths.resolve(path)
    root = paths.parent(path)
    manifest = read_manifest(path)
    if "shards" in manifest:  # ingest manifest
        names = [s["output"] for s in manifest["shards"] if s.get("complete") and s.get("written", 0) > 0]
    elif split in manifest:  # embedded manifest
        names = list(manifest[split])
    else:
        raise ValueError(f"{path} is neither an ingest manifest (no 'shards') nor has a {split!r} split")
    return [n if paths.is_url(n) or n.startswith("/") else paths.join(root, n) for n in names]


def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike], *, split: str = "train") -> list[str]:
    """Files named by ``spec``: a glob, a file, a directory (its ``*.array_record``), a ``manifest.json``, or a
    comma-separated string / sequence of those. Raises ``FileNotFoundError`` naming the part that matched nothing."""
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in os.fspath(spec).split(",") if p.strip()]
    else:
        parts = [os.fspath(p) for p in spec]
    if not parts:
        raise FileNotFoundError("empty file spec")
    files: list[str] = []
    for part in parts:
        part = paths.resolve(part) if not paths.has_magic(part) else part
        if paths.isdir(part):
            manifest = paths.join(part, MANIFEST)
            if paths.exists(manifest):
                files.extend(manifest_files(manifest, split))
            else:
                files.extend(records.expand_paths(paths.join(part, "*" + records.ARRAY_RECORD_SUFFIX)))
        elif paths.basename(part) == MANIFEST and paths.exists(part):
            files.extend(manifest_files(part, split))
        else:
            files.extend(records.expand_paths(part))
    if not files:
        raise FileNotFoundError(f"{spec!r} names no files")
    return files


def resolve_mixture(sources: Sequence[Mapping[str, Any]], *, split: str = "train") -> list[tuple[list[str], float]]:
    """``[{files, weight}, ...]`` -> ``[(file_list, normalised_weight), ...]`` (weights sum to 1)."""
    if not sources:
        raise ValueError("data.sources is empty")
    out = []
    for i, src in enumerate(sources):
        if not isinstance(src, Mapping) or "files" not in src:
            raise ValueError(f"data.sources[{i}] must be a dict with 'files' (and optional 'weight'), got {src!r}")
        weight = float(src.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.sources[{i}].weight must be > 0, got {weight}")
        out.append((resolve_files(src["files"], split=split), weight))
    total = sum(w for _, w in out)
    return [(f, w / total) for f, w in out]
