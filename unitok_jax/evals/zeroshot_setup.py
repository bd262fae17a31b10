"""The zero-shot classifier a config asks for: class names, prompt templates, text tokenizer, text tower.

`evals/zeroshot.py` holds the model-agnostic maths; this file reads `config.eval.zeroshot` and the dataset to feed it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from unitok_jax import paths
from unitok_jax.data import embedded, pipeline, text_tokenizer
from unitok_jax.evals.config import data_config_for, eval_config
from unitok_jax.evals.forward import encode_text_fn
from unitok_jax.evals.zeroshot import build_classifier, imagenet_classnames, openai_imagenet_templates


def _read_list(spec: str, sep: str) -> list[str]:
    if paths.isfile(spec):
        return [line for line in paths.read_text(spec).splitlines() if line.strip()]
    return [s.strip() for s in spec.split(sep) if s.strip()]


def zero_shot_class_names(config, ec=None) -> list[str] | None:
    """eval.zeroshot.class_names: 'imagenet', a .txt path or 'a,b,c'; '' = the dataset's own class names."""
    ec = ec or eval_config(config)
    spec = str(ec.zeroshot.class_names or "")
    if spec == "imagenet":
        return imagenet_classnames()
    if spec:
        return _read_list(spec, ",")
    return pipeline.class_names(data_config_for(config, ec.zeroshot.data_files))


def zero_shot_templates(config, ec=None, class_names: Sequence[str] | None = None) -> list[str]:
    """eval.zeroshot.templates, or the automatic choice: OpenAI's 80 for ImageNet's classes, the embedded
    dataset's own prompts for it, 'a photo of a {}.' otherwise."""
    ec = ec or eval_config(config)
    spec = str(ec.zeroshot.templates or "")
    if spec == "openai":
        return openai_imagenet_templates()
    if spec == "simple":
        return ["a photo of a {}."]
    if spec == "embedded":
        return list(embedded.PROMPT_TEMPLATES)
    if spec:
        return _read_list(spec, "|")
    if class_names is not None and len(class_names) == 1000 and list(class_names) == imagenet_classnames():
        return openai_imagenet_templates()
    if data_config_for(config, ec.zeroshot.data_files).name == "embedded":
        return list(embedded.PROMPT_TEMPLATES)
    return ["a photo of a {}."]


def build_zero_shot(config, ec, graphdef, params, rest, mesh) -> tuple[Any, int, str | None]:
    """(classifier [d, C] numpy or None, number of classes, reason when classification is skipped)."""
    names = zero_shot_class_names(config, ec)
    if not names:
        return None, 0, "no class names: set eval.zeroshot.class_names (or use a dataset whose manifest has them)"
    templates = zero_shot_templates(config, ec, names)
    data = data_config_for(config, ec.zeroshot.data_files)
    tokenizer = text_tokenizer.build_tokenizer(
        data.tokenizer, context_length=int(data.context_length), bpe_path=data.bpe_path or None
    )
    encode = encode_text_fn(graphdef)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        to_device = lambda ids: jax.device_put(np.asarray(ids), replicated)  # noqa: E731
    else:
        to_device = np.asarray

    def encode_fn(ids):
        return np.asarray(jax.device_get(encode(params, rest, to_device(ids))))

    classifier = build_classifier(encode_fn, tokenizer, names, templates, batch_classes=int(ec.zeroshot.batch_classes))
    return np.asarray(classifier), len(names), None
