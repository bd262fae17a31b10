"""An offline, procedural image-text dataset: simple scenes of coloured shapes with captions that describe them.

It exists so that training, evaluation (reconstruction, zero-shot) and the whole data path run with no download:
each image holds 1-3 shapes on a plain or textured background; its caption names the shapes, colours, sizes,
positions and background; its label is (colour, shape) of the main object, the first one the caption mentions.
Images are a pure function of (seed, split, index), so a dataset is reproducible and a bigger one extends a
smaller one. ``build_embedded_dataset`` writes ArrayRecord shards once and reuses them (manifest check).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from unitok_jax import paths
from unitok_jax.data import records

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 220),
}
# Backgrounds are neutral (textures give them variety). With coloured backgrounds a tiny CLIP matched captions by
# background alone (it is the easiest thing to see) and zero-shot classification of the main object stayed at
# chance; with these, telling captions apart needs the objects, which are also what the label names.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond")
SIZES = {"small": 0.10, "medium": 0.14, "large": 0.19}  # radius as a fraction of the image side
TEXTURES = ("plain", "striped", "dotted", "checkered")
# 3x3 grid of named cells: (name, (x, y) centre as a fraction of the image side).
POSITIONS = (
    ("in the top left", (0.2, 0.2)),
    ("at the top", (0.5, 0.2)),
    ("in the top right", (0.8, 0.2)),
    ("on the left", (0.2, 0.5)),
    ("in the center", (0.5, 0.5)),
    ("on the right", (0.8, 0.5)),
    ("in the bottom left", (0.2, 0.8)),
    ("at the bottom", (0.5, 0.8)),
    ("in the bottom right", (0.8, 0.8)),
)
PROMPT_TEMPLATES = ("a {}.", "a picture of a {}.", "a {} on a background.")
_SPLIT_IDS = {"train": 0, "eval": 1}
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing
MANIFEST = "manifest.json"
_FORMAT = "unitok_jax.embedded/2"  # /2: neutral backgrounds
_RECORDS_PER_SHARD = 1024


def class_names() -> list[str]:
    """The 48 class names, ``"<colour> <shape>"``; label = colour_index * len(SHAPES) + shape_index."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def zero_shot_prompts(templates=PROMPT_TEMPLATES) -> list[list[str]]:
    """Per class, the prompts to embed for zero-shot classification (captions start the same way)."""
    return [[t.format(name) for t in templates] for name in class_names()]


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        k, radii = 3, [r]
    elif shape == "star":
        k, radii = 5, [r, 0.45 * r]
    elif shape == "diamond":
        k, radii, angle = 4, [r], 0.0
    else:
        raise ValueError(shape)
    n = k * len(radii)
    pts = []
    for i in range(n):
        theta = angle - np.pi / 2 + 2 * np.pi * i / n
        rad = radii[i % len(radii)]
        pts.append((cx + rad * np.cos(theta), cy + rad * np.sin(theta)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(round(r * 0.4))))
    elif shape == "square":
        s = r * 0.85  # equal visual area to the circle-ish shapes
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=fill)


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Moves a colour towards white (amount > 0) or black (amount < 0); textures use a shade of the background."""
    target = 255 if amount > 0 else 0
    a = abs(amount)
    return tuple(int(round(c + (target - c) * a)) for c in rgb)


def _background(texture: str, rgb: tuple[int, int, int], n: int, rng: np.random.Generator) -> Image.Image:
    base = np.empty((n, n, 3), np.uint8)
    base[:] = rgb
    if texture == "plain":
        return Image.fromarray(base)
    other = np.asarray(_shade(rgb, 0.35 if sum(rgb) < 384 else -0.3), np.uint8)
    period = int(rng.integers(n // 10, n // 5 + 1))
    yy, xx = np.mgrid[0:n, 0:n]
    if texture == "striped":
        coord = xx if rng.integers(2) else yy
        mask = (coord // max(1, period // 2)) % 2 == 1
    elif texture == "checkered":
        mask = ((xx // period) + (yy // period)) % 2 == 1
    elif texture == "dotted":
        cx = (xx % period) - period / 2
        cy = (yy % period) - period / 2
        mask = cx * cx + cy * cy <= (period * 0.22) ** 2
    else:
        raise ValueError(texture)
    base[mask] = other
    return Image.fromarray(base)


def _sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """Draws the scene description (no pixels): background + 1..3 objects in distinct grid cells."""
    color_names = list(COLORS)
    bg_names = list(BACKGROUND_COLORS)
    num_objects = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    background = bg_names[int(rng.integers(len(bg_names)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    cells = rng.permutation(len(POSITIONS))[:num_objects]
    objects = []
    for k in range(num_objects):
        size_names = list(SIZES)
        # The main object is never smaller than the others, so "the main object" is also visually dominant.
        size = size_names[int(rng.integers(1, 3))] if k == 0 else size_names[int(rng.integers(0, 2))]
        objects.append(
            {
                "color": color_names[int(rng.integers(len(color_names)))],  # backgrounds are neutral: never the same
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "size": size,
                "position": POSITIONS[int(cells[k])][0],
                "center": POSITIONS[int(cells[k])][1],
                "jitter": rng.uniform(-0.04, 0.04, size=2),
                "angle": float(rng.uniform(0, 2 * np.pi)),
            }
        )
    return {"background": background, "texture": texture, "objects": objects}


def _caption(scene: dict[str, Any]) -> str:
    parts = [f"a {o['size']} {o['color']} {o['shape']} {o['position']}" for o in scene["objects"]]
    if len(parts) == 1:
        things = parts[0]
    else:
        things = ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = scene["background"] if scene["texture"] == "plain" else f"{scene['texture']} {scene['background']}"
    return f"{things} on a {bg} background"


def _label(scene: dict[str, Any]) -> int:
    main = scene["objects"][0]
    return list(COLORS).index(main["color"]) * len(SHAPES) + SHAPES.index(main["shape"])


def render_example(seed: int, split: str, index: int, image_size: int) -> tuple[np.ndarray, str, int]:
    """The (uint8 [s, s, 3] image, caption, label) of example ``index`` of ``split``; pure function of its args."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    scene = _sample_scene(rng)
    n = image_size * _SUPERSAMPLE
    img = _background(scene["texture"], BACKGROUND_COLORS[scene["background"]], n, rng)
    draw = ImageDraw.Draw(img)
    # Draw secondary objects first so the main object (label) is on top and never occluded.
    for obj in reversed(scene["objects"]):
        cx, cy = (np.asarray(obj["center"]) + obj["jitter"]) * n
        _draw_shape(
            draw, obj["shape"], float(cx), float(cy), SIZES[obj["size"]] * n, obj["angle"], COLORS[obj["color"]]
        )
    img = img.reduce(_SUPERSAMPLE)
    return np.asarray(img), _caption(scene), _label(scene)


def _encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _split_records(seed: int, split: str, start: int, stop: int, image_size: int):
    for i in range(start, stop):
        image, caption, label = render_example(seed, split, i, image_size)
        yield {"id": f"embedded-{split}-{i:07d}", "image": _encode_png(image), "caption": caption, "label": label}


def _write_split(tmp_dir: str, seed: int, split: str, num: int, image_size: int) -> list[str]:
    num_shards = max(1, -(-num // _RECORDS_PER_SHARD))
    names = []
    for s in range(num_shards):
        start, stop = s * num // num_shards, (s + 1) * num // num_shards
        name = f"{split}-{s:05d}-of-{num_shards:05d}{records.ARRAY_RECORD_SUFFIX}"
        records.write_array_record(paths.join(tmp_dir, name), _split_records(seed, split, start, stop, image_size))
        names.append(name)
    return names


def build_embedded_dataset(
    data_dir: str | os.PathLike,
    *,
    num_train: int = 5000,
    num_eval: int = 500,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes (or reuses) the embedded dataset under ``data_dir/embedded-<hash of args>/``.

    Returns ``dict(train=[paths], eval=[paths], class_names=[...], dir=str, num_train=..., num_eval=...)``.
    A second call with the same arguments only reads the manifest. The build goes to a temporary directory that is
    renamed into place, so concurrent builders (several hosts on a shared disk) never see a partial dataset.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"embedded dataset needs num_train >= 1 and num_eval >= 1, got {num_train}, {num_eval}")
    if image_size < 16:
        raise ValueError(f"embedded image_size must be >= 16, got {image_size}")
    args = {
        "format": _FORMAT,
        "num_train": int(num_train),
        "num_eval": int(num_eval),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    data_dir = paths.require_local(data_dir, "the embedded dataset's data_dir")  # ArrayRecord shards are local files
    out_dir = paths.join(data_dir, f"embedded-{key}")
    manifest = _read_manifest(out_dir, args)
    if manifest is None:
        paths.makedirs(data_dir)
        tmp_dir = tempfile.mkdtemp(prefix=f".embedded-{key}-", dir=data_dir)
        try:
            manifest = {
                "args": args,
                "train": _write_split(tmp_dir, seed, "train", num_train, image_size),
                "eval": _write_split(tmp_dir, seed, "eval", num_eval, image_size),
                "class_names": class_names(),
            }
            paths.write_json_atomic(paths.join(tmp_dir, MANIFEST), manifest, indent=1)
            if _read_manifest(out_dir, args) is None:  # else a concurrent builder finished first: use theirs
                if paths.isdir(out_dir):  # an incomplete leftover (no valid manifest): replace it
                    with contextlib.suppress(OSError):
                        paths.rmtree(out_dir)
                try:
                    paths.rename(tmp_dir, out_dir)
                except OSError:
                    if (
                        _read_manifest(out_dir, args) is None
                    ):  # losing a rename race is fine only if the winner is complete
                        raise
        finally:
            with contextlib.suppress(OSError):
                paths.rmtree(tmp_dir)
        manifest = _read_manifest(out_dir, args)
    return {
        "train": [paths.join(out_dir, n) for n in manifest["train"]],
        "eval": [paths.join(out_dir, n) for n in manifest["eval"]],
        "class_names": list(manifest["class_names"]),
        "dir": out_dir,
        "num_train": num_train,
        "num_eval": num_eval,
    }


def _read_manifest(out_dir: str, args: dict[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = paths.read_json(paths.join(out_dir, MANIFEST))
    except (OSError, ValueError):
        return None
    if manifest.get("args") != args:
        return None
    if not all(paths.exists(paths.join(out_dir, n)) for n in manifest["train"] + manifest["eval"]):
        return None
    return manifest


def heldout_photos(image_size: int) -> list[dict[str, Any]]:
    """Real photographs shipped inside installed PyPI packages, for a held-out reconstruction set.

    Uses scikit-image's ``skimage.data`` (astronaut, coffee, chelsea, ...) and scikit-learn's sample images when
    importable; returns ``[]`` when neither is installed. Each item is ``{"id": name, "image": uint8 [s, s, 3]}``
    after the eval transform (shorter-side resize + center crop).
    """
    from unitok_jax.data import transforms  # pylint: disable=g-import-not-at-top

    photos: list[tuple[str, np.ndarray]] = []
    try:
        from skimage import data as skdata  # pylint: disable=g-import-not-at-top

        for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "retina", "immunohistochemistry"):
            loader = getattr(skdata, name, None)
            if loader is None:
                continue
            try:
                photos.append((f"skimage/{name}", np.asarray(loader())))
            except Exception:  # pylint: disable=broad-except  # some need pooch/network in some versions
                continue
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top

        bunch = load_sample_images()
        for fname, img in zip(bunch.filenames, bunch.images):
            photos.append((f"sklearn/{paths.basename(fname)}", np.asarray(img)))
    except Exception:  # pylint: disable=broad-except  # ImportError, or a build without the sample files
        pass
    out = []
    for name, arr in photos:
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            continue
        arr = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
        out.append({"id": name, "image": transforms.resize_center_crop(arr, image_size)})
    return out
