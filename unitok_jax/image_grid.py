"""Images for people: [-1, 1] float arrays to uint8, and PNG grids of [original | reconstruction] pairs.

Used by the trainer's preview, the evals' reconstruction grid, `reconstruct` and the colabs.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from unitok_jax import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float → uint8 with round((x + 1)·127.5), clamped (the official convention)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_pair_grid(path: str, originals: np.ndarray, reconstructions: np.ndarray) -> str:
    """Write a PNG whose cells are [original | reconstruction] pairs (NHWC in [-1, 1]), near-square; its path."""
    pairs = np.concatenate([to_uint8(originals), to_uint8(reconstructions)], axis=2)  # [b, h, 2w, 3]
    b, h, w2, c = pairs.shape
    cols = max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / cols))
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w2 + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w2 + pad) : pad + col * (w2 + pad) + w2] = (
            pairs[i]
        )
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return paths.write_bytes_atomic(path, buffer.getvalue())
