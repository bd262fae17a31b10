"""Regex parameter groups: every parameter path ('encoder/blocks/0/attn/qkv/kernel') gets the settings of the
first matching rule. Used for weight-decay masks, freezing and learning-rate multipliers."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax


def path_string(path) -> str:
    """'/'-joined parameter path from a jax tree path, skipping the `.value` attribute of nnx Variables."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def match_groups(params, rules: Sequence[tuple[str, Any]]) -> Any:
    """Tree of the same structure as `params` holding, per leaf, the value of the first rule whose regex matches
    (re.search) the leaf path. Raises with the unmatched paths if a parameter matches no rule."""
    compiled = [(re.compile(pattern), value) for pattern, value in rules]
    unmatched = []

    def pick(path, _leaf):
        name = path_string(path)
        for regex, value in compiled:
            if regex.search(name):
                return value
        unmatched.append(name)
        return None

    tree = jax.tree_util.tree_map_with_path(pick, params)
    if unmatched:
        raise ValueError(f"parameters not covered by any group rule (add a catch-all '.*' rule): {unmatched[:10]}")
    return tree
