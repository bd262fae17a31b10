"""The frozen networks the evals run besides the tokenizer: InceptionV3 (FID/IS) and VGG LPIPS.

Both are loaded from user paths once per process and kept (periodic evals reuse them, compiled); a missing path is
not an error but a reason, reported as `<eval>/skipped` or `recon/lpips_skipped`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from unitok_jax import paths
from unitok_jax.evals import fid
from unitok_jax.models.lpips import load_lpips

_CACHE: dict[tuple, Any] = {}


def fid_evaluator(config, ec, data_files: Sequence[str], num_batches: int, batch_size: int):
    """(a reset `fid.FidEvaluator`, None) or (None, why FID is skipped). The reference statistics are keyed by a
    fingerprint of the eval data so a cached .npz from other data is refused, not silently reused."""
    fc = ec.fid
    path = str(fc.inception_path or "")
    if not path:
        return None, fid.SKIP_NO_WEIGHTS
    if not paths.exists(path):
        return None, f"InceptionV3 weights {path!r} do not exist (eval.fid.inception_path)"
    fingerprint = fid.source_fingerprint(
        files=[paths.basename(f) for f in data_files],
        image_size=int(config.data.image_size),
        num_batches=num_batches,
        batch_size=batch_size,
        resize_mode=fc.resize_mode,
    )
    ref_path = paths.resolve(fc.reference_stats) if fc.reference_stats else None
    expected = fingerprint
    if ref_path and paths.exists(ref_path):
        with np.load(paths.local_copy(ref_path), allow_pickle=False) as z:
            if "fingerprint" not in z or not str(z["fingerprint"]):
                expected = None  # external statistics (pytorch-fid / ADM .npz): used as given
    key = ("fid", paths.resolve(path), fc.resize_mode, ref_path, expected, bool(fc.compute_is), int(fc.is_splits))
    ev = _CACHE.get(key)
    if ev is None:
        try:
            ev = fid.FidEvaluator(
                paths.local_copy(path),
                ref_path,
                resize_mode=fc.resize_mode,
                compute_is=bool(fc.compute_is),
                is_splits=int(fc.is_splits),
                reference_fingerprint=expected,
            )
        except ValueError as e:  # stale cache (fingerprint mismatch), bad file
            return None, str(e)
        _CACHE[key] = ev
    ev.reset()
    return ev, None


def lpips_network(config, ec, mesh):
    """(graphdef, state, None) of VGG LPIPS (state replicated over `mesh` when given), or (None, None, why)."""
    path = str(ec.recon.lpips_path or "") or str(config.get("loss", {}).get("lpips_path", "") or "")
    if not path:
        return None, None, "no LPIPS weights: set eval.recon.lpips_path (or loss.lpips_path) to lpips_with_vgg.pth"
    if not paths.exists(path):
        return None, None, f"LPIPS weights {path!r} do not exist"
    key = ("lpips", paths.resolve(path))
    if key not in _CACHE:
        _CACHE[key] = nnx.split(load_lpips(paths.local_copy(path)))
    graphdef, state = _CACHE[key]
    if mesh is not None:
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return graphdef, state, None
