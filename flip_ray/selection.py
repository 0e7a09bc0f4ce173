"""Choosing rows by score: drop reasons, best-of-N and DPO preference pairs. Pure functions on
plain rows (dicts), applied per prompt group by the Ray Data jobs in `downstream.py`."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

STRATEGIES = ("best_vs_worst", "all_pairs", "best_vs_random")


def as_messages(value: Any) -> list[dict] | None:
    """A chat column value as a list of {role, content}; JSONL-sourced values arrive as JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    return None


def prompt_key(prompt: str | None, messages: Any = None) -> str:
    """Groups responses to the same prompt: a hash of the prompt text, or of the chat without its
    last (assistant) turn."""
    if messages is not None:
        turns = as_messages(messages) or []
        payload = json.dumps(turns[:-1], sort_keys=True, ensure_ascii=False)
    else:
        payload = prompt or ""
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def drop_reason(row: dict, *, score_column: str, include_errors: bool, exclude_flags: tuple[str, ...]) -> str | None:
    """Why a row is not eligible for selection, or None if it is."""
    if row.get("error") is not None and not include_errors:
        return "error"
    if row.get(score_column) is None:
        return "no_score"
    for flag in exclude_flags:
        if row.get(flag):
            return flag
    return None


def _rank_key(row: dict, score_column: str, id_column: str):
    # Highest score first; ties broken by id, so the choice never depends on row order.
    return (-row[score_column], str(row[id_column]))


def top_k(rows: list[dict], k: int, *, score_column: str, id_column: str = "id") -> list[dict]:
    """The k best rows of one prompt group (k=1 is best-of-N)."""
    return sorted(rows, key=lambda r: _rank_key(r, score_column, id_column))[:k]


def make_dpo_pairs(
    rows: list[dict],
    *,
    strategy: str,
    score_column: str,
    min_margin: float = 0.0,
    max_pairs: int | None = None,
    seed: int = 0,
    id_column: str = "id",
) -> list[tuple[dict, dict]]:
    """(chosen, rejected) pairs from the responses to one prompt.

    Args:
        rows: Eligible rows of one prompt group.
        strategy: `best_vs_worst` (one pair), `all_pairs` (every pair with margin >= min_margin,
            largest margins first), `best_vs_random` (the best against one other row drawn with
            `seed`, reproducibly per group).
        min_margin: Pairs whose score difference is below this are not made (0 still needs a
            strictly higher chosen score: a tie is no preference).
        max_pairs: Keep at most this many pairs per prompt.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; expected one of {STRATEGIES}")
    ranked = sorted(rows, key=lambda r: _rank_key(r, score_column, id_column))
    if len(ranked) < 2:
        return []

    def ok(a: dict, b: dict) -> bool:
        margin = a[score_column] - b[score_column]
        return margin > 0 and margin >= min_margin

    pairs: list[tuple[dict, dict]] = []
    if strategy == "best_vs_worst":
        if ok(ranked[0], ranked[-1]):
            pairs = [(ranked[0], ranked[-1])]
    elif strategy == "all_pairs":
        pairs = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :] if ok(a, b)]
        pairs.sort(
            key=lambda p: (-(p[0][score_column] - p[1][score_column]), str(p[0][id_column]), str(p[1][id_column]))
        )
    else:
        group_seed = f"{seed}:{min(str(r[id_column]) for r in ranked)}"
        candidates = [r for r in ranked[1:] if ok(ranked[0], r)]
        if candidates:
            pairs = [(ranked[0], random.Random(group_seed).choice(candidates))]
    return pairs[:max_pairs] if max_pairs is not None else pairs
