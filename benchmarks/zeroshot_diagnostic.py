"""Where does a tiny checkpoint's zero-shot accuracy on the embedded dataset go? Colour vs shape, prompts vs captions.

    python benchmarks/zeroshot_diagnostic.py RUN/checkpoints/STEP [--num_images=300]

Prints, over the first N eval images of the embedded dataset the checkpoint was trained on:
  * prompt zero-shot ("a <colour> <shape>." per class): top-1, and how often the predicted class has the right
    colour / the right shape;
  * the same on single-object images only;
  * an in-context probe: the image's own eval caption with the main object's "<colour> <shape>" replaced by each of
    the 48 classes, scored against the image — the wording is then that of the training captions, so a gap between
    the two says whether the prompts or the features limit zero-shot.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.data import embedded, text_tokenizer
from unitok_jax.load import load_tokenizer
from unitok_jax.train.checkpointing import checkpoint_config


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a step directory of a tiny UniTok run on the embedded dataset")
    parser.add_argument("--num_images", type=int, default=300)
    args = parser.parse_args()

    config = checkpoint_config(args.checkpoint)
    if config is None or config.data.name != "embedded":
        raise SystemExit(f"{args.checkpoint}: needs a checkpoint with a saved config trained on the embedded dataset")
    model, step = load_tokenizer(args.checkpoint, config)
    tokenizer = text_tokenizer.build_tokenizer(
        config.data.tokenizer,
        context_length=int(config.data.context_length),
        bpe_path=config.data.get("bpe_path") or None,
    )
    seed, size = int(config.data.embedded.get("seed", 0)), int(config.data.image_size)
    examples = [embedded.render_example(seed, "eval", i, size) for i in range(args.num_images)]
    images = jnp.asarray(np.stack([e[0] for e in examples]).astype(np.float32) / 127.5 - 1.0)
    captions = [e[1] for e in examples]
    labels = np.array([e[2] for e in examples])
    names = embedded.class_names()
    n_shapes = len(embedded.SHAPES)

    image_features = _unit(np.asarray(jax.jit(lambda x: model(x)[1]["clip_image_features"])(images)))
    encode = jax.jit(model.encode_text)

    def text_features(texts: list[str]) -> np.ndarray:
        return _unit(np.asarray(encode(jnp.asarray(tokenizer(texts))), np.float32))

    def report(name: str, predicted: np.ndarray, mask=slice(None)) -> None:
        p, y = predicted[mask], labels[mask]
        print(
            f"{name}: top-1 {np.mean(p == y):.3f} | colour right {np.mean(p // n_shapes == y // n_shapes):.3f} "
            f"(chance {1 / len(embedded.COLORS):.3f}) | shape right {np.mean(p % n_shapes == y % n_shapes):.3f} "
            f"(chance {1 / n_shapes:.3f}) | {len(y)} images"
        )

    prompts = text_features([f"a {n}." for n in names])
    predicted = (image_features @ prompts.T).argmax(axis=1)
    print(f"checkpoint {args.checkpoint} (step {step}); class chance {1 / len(names):.4f}")
    report("prompt zero-shot", predicted)
    report("prompt zero-shot, single-object images", predicted, np.array([" and " not in c for c in captions]))
    in_context = np.array(
        [
            int((image_features[i] @ text_features([c.replace(names[y], n, 1) for n in names]).T).argmax())
            for i, (c, y) in enumerate(zip(captions, labels))
        ]
    )
    report("in-context caption swap", in_context)


if __name__ == "__main__":
    main()
