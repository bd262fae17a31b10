"""Optimizers: AdamW with the official warm-up + cosine schedule, global-norm clipping, regex weight-decay masks,
frozen groups and per-group learning-rate multipliers (optax.multi_transform)."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unitok_jax.config_lib import resolve_steps
from unitok_jax.train import param_groups


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, end_ratio: float) -> optax.Schedule:
    """UniTok's per-iteration schedule: linear 0→peak over `warmup_steps`, then
    mult = end + (1 − end)·(½ + ½cos(π·p)), p = (it − wp)/(max_it − wp − 1)."""
    decay_len = max(total_steps - warmup_steps - 1, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(warmup_steps, 1)
        progress = jnp.clip((count - warmup_steps) / decay_len, 0.0, 1.0)
        cosine = end_ratio + (1.0 - end_ratio) * (0.5 + 0.5 * jnp.cos(math.pi * progress))
        return peak_lr * jnp.where(count < warmup_steps, warm, cosine)

    return schedule


def _decay_mask(params, exclude_regex: str):
    """Weight decay on every parameter with ndim >= 2 whose path does not match `exclude_regex`."""
    pattern = re.compile(exclude_regex) if exclude_regex else None

    def decide(path, leaf):
        name = param_groups.path_string(path)
        return leaf.ndim >= 2 and not (pattern and pattern.search(name))

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(opt: ml_collections.ConfigDict, params, total_steps: int) -> optax.GradientTransformation:
    """Build the optimizer for `params` from an `optimizer` config block.

    Fields: lr, b1, b2, eps, weight_decay, wd_exclude (regex), warmup (steps or fraction), end_lr_ratio, clip_norm,
    groups: list of (regex, {'lr_mult': float, 'frozen': bool}) — first match wins; a final catch-all is implied.
    """
    warmup = resolve_steps(opt.warmup, total_steps)
    schedule = warmup_cosine(opt.lr, total_steps, warmup, opt.end_lr_ratio)
    rules = [(pattern, dict(settings)) for pattern, settings in (opt.get("groups") or [])] + [(".*", {})]
    labelled = [(pattern, f"g{i}") for i, (pattern, _) in enumerate(rules)]
    labels = param_groups.match_groups(params, labelled)
    wd_exclude = opt.get("wd_exclude", "")
    # A callable mask: inside multi_transform each group sees a tree with other groups' leaves masked out.
    mask = lambda tree: _decay_mask(tree, wd_exclude)  # noqa: E731

    transforms = {}
    for i, (_, settings) in enumerate(rules):
        if settings.get("frozen", False):
            transforms[f"g{i}"] = optax.set_to_zero()
            continue
        lr_mult = float(settings.get("lr_mult", 1.0))
        transforms[f"g{i}"] = optax.adamw(
            lambda count, m=lr_mult: m * schedule(count),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=mask,
        )
    tx = optax.multi_transform(transforms, labels)
    if opt.get("clip_norm", 0.0):
        tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
    return tx


def learning_rate(opt: ml_collections.ConfigDict, total_steps: int, step) -> Any:
    """The scheduled learning rate at `step` (for logging)."""
    warmup = resolve_steps(opt.warmup, total_steps)
    return warmup_cosine(opt.lr, total_steps, warmup, opt.end_lr_ratio)(step)
