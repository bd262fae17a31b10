"""Read PyTorch checkpoint files into {key: numpy array} without making torch a training dependency.

torch is an optional extra (`pip install unitok_jax[torch]`); only this module imports it, lazily.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from unitok_jax import paths


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading a PyTorch .pth/.pt file needs torch, which is an optional extra: "
            "pip install 'torch==2.13.0' (CPU is enough). Alternatively pass a {key: numpy array} dict."
        ) from e
    import torch

    return torch


def load_torch_file(path: str | os.PathLike) -> Any:
    """torch.load on CPU (weights_only where possible); raises a clear error for missing or truncated files."""
    if not paths.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)}")
    path = paths.local_copy(path)  # torch.load reads local files; gs:// weights are fetched once into a cache
    torch = _require_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, wrong format, ...
        raise ValueError(f"could not read PyTorch checkpoint {path}: {type(e).__name__}: {e}") from e


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Convert a state dict of torch tensors (or arrays) into float32/int numpy arrays, keeping key order."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
                value = value.float()
            value = value.numpy()
        out[key] = np.asarray(value)
    return out


def load_state_dict(path_or_state_dict, *, subkeys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Accept a path to a .pth/.pt file or a mapping; descend into `subkeys` (first one present wins at each level).

    Example: subkeys=("model", "ema", "state_dict") picks the first of those present in a TokenFlow checkpoint.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = load_torch_file(path_or_state_dict)
    else:
        obj = path_or_state_dict
    for key in subkeys:
        if isinstance(obj, Mapping) and key in obj:
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (mapping), got {type(obj).__name__}")
    return to_numpy_state_dict(obj)
