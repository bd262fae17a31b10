"""Config helpers: variant parsing, duration units and validation with messages that name the field and the fix.

Validation runs before anything is compiled, so a bad config fails in seconds, not after a 10-minute compile.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import ml_collections

from unitok_jax import paths


class ConfigError(ValueError):
    """A config field is invalid. The message names the field and how to fix it."""

    def __init__(self, field: str, problem: str | None = None, fix: str | None = None):
        if problem is None:  # one finished message: ml_collections re-raises errors as type(e)(message)
            super().__init__(field)
            self.field = ""
            return
        super().__init__(f"config.{field}: {problem}. Fix: {fix}")
        self.field = field


def parse_variant(arg: str | None, variants: Iterable[str], default: str) -> str:
    """`configs/x.py:tiny` → 'tiny', with a clear error for unknown variants."""
    variants = list(variants)
    name = arg or default
    if name not in variants:
        raise ConfigError(
            "<config arg>",
            f"unknown variant {name!r}",
            f"use one of {variants}, e.g. --config=configs/unitok.py:{variants[0]}",
        )
    return name


def resolve_steps(value: float | int, total_steps: int) -> int:
    """Durations: a value <= 1.0 is a fraction of `total_steps`, a larger value is a number of steps."""
    value = float(value)
    if value < 0:
        raise ValueError(f"durations must be >= 0, got {value}")
    return int(round(value * total_steps)) if value <= 1.0 else int(value)


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check(condition: bool, field: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(field, problem, fix)


def check_divisible(numerator: int, denominator: int, field: str, what: str, fix: str) -> None:
    check(
        denominator > 0 and numerator % denominator == 0,
        field,
        f"{what}: {numerator} is not divisible by {denominator}",
        fix,
    )


def check_files(entries: list[tuple[str, str, str]]) -> None:
    """Weight files (path, field, what needs it), checked together: a config that needs several names every missing
    one in one error instead of one per start."""
    problems = []
    for path, field, what in entries:
        if not path:
            problems.append(
                (
                    field,
                    f"{what} is enabled but no weight file is set",
                    f"set --config.{field}=/path/to/file or disable {what}",
                )
            )
        elif not paths.exists(path):
            problems.append(
                (
                    field,
                    f"{what} weight file {path!r} does not exist",
                    f"point --config.{field} at an existing file or disable {what}",
                )
            )
    if len(problems) == 1:
        raise ConfigError(*problems[0])
    if problems:
        raise ConfigError(
            ", ".join(field for field, _, _ in problems),
            f"{len(problems)} weight files are missing: "
            + "; ".join(f"{field}: {problem}" for field, problem, _ in problems),
            "; ".join(fix for _, _, fix in problems),
        )


Validator = Callable[[ml_collections.ConfigDict], None]
