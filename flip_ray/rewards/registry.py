"""The reward registry: every reward the scoring job can compute, by name, in the order the engine
stage runs them (a reward that `uses` another comes after it).

Adding a reward is one module declaring a `RewardMethod` and one line in `_BUILTIN` below (or, for a
reward of your own outside the package, `register(...)` before the run is planned; see
docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from flip_ray.rewards.base import RewardMethod
from flip_ray.rewards.flip import FLIP
from flip_ray.rewards.flip_logprob import FLIP_LOGPROB
from flip_ray.rewards.flip_logprob_lexical import FLIP_LOGPROB_LEXICAL
from flip_ray.rewards.judge_pointwise import JUDGE_POINTWISE
from flip_ray.rewards.pmi_forward import PMI_FORWARD

_BUILTIN = (FLIP, FLIP_LOGPROB, FLIP_LOGPROB_LEXICAL, PMI_FORWARD, JUDGE_POINTWISE)
_REGISTRY: dict[str, RewardMethod] = {m.name: m for m in _BUILTIN}


def register(method: RewardMethod) -> RewardMethod:
    """Adds a reward (after the built-in ones). Its name and columns must be new.

    Raises:
        ValueError: The name or a column is taken, or it uses a reward not registered before it.
    """
    if method.name in _REGISTRY:
        raise ValueError(f"a reward named {method.name!r} is registered already")
    taken = {f.name: m.name for m in _REGISTRY.values() for f in (*m.fields, *m.engine_columns())}
    clash = [n for n in dict.fromkeys(f.name for f in (*method.fields, *method.engine_columns())) if n in taken]
    if clash:
        raise ValueError(f"reward {method.name!r}: column(s) {clash} belong to another reward")
    missing = [u for u in method.uses if u not in _REGISTRY]
    if missing:
        raise ValueError(f"reward {method.name!r} uses {missing}, which are not registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes a reward added by `register` (tests); the built-in ones stay."""
    if name in {m.name for m in _BUILTIN}:
        raise ValueError(f"{name!r} is built in")
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> RewardMethod:
    """The reward named `name`.

    Raises:
        KeyError: No such reward; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no reward named {name!r}; known: {', '.join(_REGISTRY)}") from None


def resolve(selected: Iterable[str]) -> tuple[RewardMethod, ...]:
    """The rewards named in `selected`, in the registry's order (the order they are computed in)."""
    wanted = set(selected)
    for name in wanted:
        get(name)
    return tuple(m for m in _REGISTRY.values() if m.name in wanted)


def every() -> tuple[RewardMethod, ...]:
    return tuple(_REGISTRY.values())


def output_fields(methods: Iterable[RewardMethod]) -> list[pa.Field]:
    """The output columns of `methods`: each one's fields, then the error columns."""
    methods = list(methods)
    return [f for m in methods for f in m.fields] + [pa.field(m.error_column, pa.string()) for m in methods]


def rank_columns(settings: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Reward name -> the column it ranks by."""
    return {m.name: m.ranked_by(settings) for m in _REGISTRY.values()}


def owner_of(column: str) -> RewardMethod | None:
    """The reward that writes output column `column`, if any."""
    for m in _REGISTRY.values():
        if column in {f.name for f in m.fields} or column == m.error_column:
            return m
    return None


def validate(selected: Iterable[str], settings: Mapping[str, Any]) -> list[str]:
    """The problems of the settings of the rewards in `selected` (unknown names are the caller's)."""
    problems: list[str] = []
    for m in resolve(n for n in selected if n in _REGISTRY):
        if m.validate is not None:
            problems += [p for p in m.validate(settings) if p not in problems]
    return problems
