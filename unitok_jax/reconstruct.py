"""Tokenize and reconstruct your own images: writes `[input | reconstruction]` PNGs and the codes.

    python -m unitok_jax.reconstruct --checkpoint=runs/tiny --images='photos/*.jpg' --output=recon/
    python -m unitok_jax.reconstruct --checkpoint=unitok_tokenizer.pth --images=cat.png --output=recon/   # official

--checkpoint: one of our run dirs / step dirs (params only are read) or an official UniTok .pth / .npz.
Images are decoded robustly (any PIL format), resized on the shorter side (bicubic) and center-cropped to the
model's image size; unreadable files are reported and skipped.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from unitok_jax import paths as _paths  # not `paths`: the functions below use that name for lists of images

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """CLI flags, defined only when run as a program (importing this module defines none, so its functions can be
    used next to other CLIs' flags, e.g. from a notebook or a test)."""
    config_flags.DEFINE_config_file("config", None, "Training config (only needed when the checkpoint has none).")
    flags.DEFINE_string("checkpoint", None, "Run dir, step dir, or official .pth/.npz file.", required=True)
    flags.DEFINE_list("images", None, "Image files, globs or directories (local or gs://).", required=True)
    flags.DEFINE_string("output", "reconstructions", "Output directory (local or gs://).")
    flags.DEFINE_integer("image_size", None, "Input size (default: the model's image_size, else 256).")
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
    flags.DEFINE_string(
        "model_preset", None, "For official .pth/.npz files: vitamin_large | vitamin_base | tiny (default: inferred)."
    )


def expand_image_paths(specs: list[str]) -> list[str]:
    paths: list[str] = []
    for spec in specs:
        if _paths.isdir(spec):
            paths += [_paths.join(spec, f) for f in _paths.listdir(spec) if not f.startswith(".")]
        else:
            # An unmatched spec is kept so load_images reports it as unreadable instead of it vanishing silently.
            paths += _paths.glob(spec) or [spec]
    return paths


def load_images(paths: list[str], size: int) -> tuple[list[str], np.ndarray]:
    from unitok_jax.data.transforms import BadSample, eval_transform

    kept, images = [], []
    for path in paths:
        try:
            images.append(eval_transform(_paths.read_bytes(path), size))
            kept.append(path)
        except (OSError, BadSample) as e:
            logging.warning("skipping %s: %s", path, e)
    if not images:
        raise ValueError(f"none of the {len(paths)} input images could be read")
    return kept, np.stack(images)


def reconstruct(model, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(codes, reconstructions in [-1, 1]) through the discrete path: img_to_idx → idx_to_img."""
    encode = jax.jit(lambda x: model.img_to_idx(x))
    decode = jax.jit(lambda i: model.idx_to_img(i))
    codes, recs = [], []
    for start in range(0, len(images), batch_size):
        idx = encode(jnp.asarray(images[start : start + batch_size]))
        codes.append(np.asarray(idx))
        recs.append(np.asarray(decode(idx)))
    return np.concatenate(codes), np.concatenate(recs)


def main(argv):
    del argv
    if not FLAGS[
        "verbosity"
    ].present:  # Orbax logs every restore at INFO; keep the console to the result, like evaluate
        logging.set_verbosity(logging.WARNING)
    from unitok_jax.load import load_tokenizer
    from unitok_jax.image_grid import to_uint8
    from PIL import Image

    if FLAGS.model_preset and _paths.isfile(FLAGS.checkpoint):
        from unitok_jax.convert.official import load_unitok
        from unitok_jax.torch_io import load_state_dict

        path = FLAGS.checkpoint
        if path.endswith(".npz"):
            with np.load(_paths.local_copy(path)) as z:  # np.load needs a local file; gs:// is fetched once
                source = {k.removeprefix("param/"): z[k] for k in z.files if not k.startswith(("in/", "out/", "grad/"))}
        else:
            source = load_state_dict(path, subkeys=("trainer", "unitok"))
        model, step = load_unitok(source, FLAGS.model_preset), None
    else:
        model, step = load_tokenizer(FLAGS.checkpoint, FLAGS.config)
    size = FLAGS.image_size or int(getattr(model, "config", {}).get("image_size", 256) or 256)
    paths, images = load_images(expand_image_paths(FLAGS.images), size)
    codes, recs = reconstruct(model, images, FLAGS.batch_size)
    _paths.makedirs(FLAGS.output)
    # Encoded in memory and written whole: --output may be an object store, where files cannot be written in place.
    for path, image, rec in zip(paths, images, recs):
        pair = np.concatenate([to_uint8(image), to_uint8(rec)], axis=1)
        buf = io.BytesIO()
        Image.fromarray(pair).save(buf, format="PNG")
        _paths.write_bytes_atomic(_paths.join(FLAGS.output, f"{_paths.stem(path)}_recon.png"), buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, codes=codes, files=np.array(paths))
    _paths.write_bytes_atomic(_paths.join(FLAGS.output, "codes.npz"), buf.getvalue())
    psnr = [float(10 * np.log10(4.0 / max(np.mean((a - b) ** 2), 1e-12))) for a, b in zip(images, np.clip(recs, -1, 1))]
    print(
        f"reconstructed {len(paths)} images (checkpoint step {step}); codes {codes.shape}; "
        f"mean PSNR {np.mean(psnr):.2f} dB; written to {FLAGS.output}"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
