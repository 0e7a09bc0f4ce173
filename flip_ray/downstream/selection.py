"""Choosing rows by score: drop reasons, best-of-N and DPO preference pairs. Pure functions on
plain rows (dicts), applied per prompt group by the Ray Data jobs in `downstream.py`."""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

from flip_ray.config.jobs import STRATEGIES

# Drop reasons of rows that cannot be grouped by prompt or turned into a pair.
NO_PROMPT = "no_prompt"
NO_RESPONSE = "no_response"


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


def _blank(text: Any) -> bool:
    return text is None or (isinstance(text, str) and not text.strip())


def chat_prompt(messages: Any) -> list[dict] | None:
    """The turns before the last one of a chat (the prompt of its last answer), or None when the
    chat is null, unparseable, or has nothing but blank text before its last turn."""
    turns = as_messages(messages)
    if not turns or all(_blank(t["content"]) for t in turns[:-1]):
        return None
    return turns[:-1]


def prompt_key(prompt: str | None, messages: Any = None) -> str | None:
    """Groups responses to the same prompt: a hash of the prompt text, or of the chat without its
    last (assistant) turn. None when there is no prompt (null or blank text, a null or unparseable
    chat): such rows must never be grouped together, as if they answered one prompt."""
    if messages is not None:
        turns = chat_prompt(messages)
        if turns is None:
            return None
        payload = json.dumps(turns, sort_keys=True, ensure_ascii=False)
    elif _blank(prompt):
        return None
    else:
        payload = prompt
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def group_key(value: Any) -> str | None:
    """A `columns.prompt_key` value as a group key; None (not groupable) when null or blank."""
    return None if _blank(value) else str(value)


def missing_text(prompt: Any, response: Any, messages: Any, *, chat: bool) -> str | None:
    """Why a row cannot be written as one side of a DPO pair (no prompt or no response), or None."""
    if chat:
        if chat_prompt(messages) is None:
            return NO_PROMPT
        return NO_RESPONSE if _blank(as_messages(messages)[-1]["content"]) else None
    if _blank(prompt):
        return NO_PROMPT
    return NO_RESPONSE if _blank(response) else None


def drop_reason(row: dict, *, score_column: str, include_errors: bool, exclude_flags: tuple[str, ...]) -> str | None:
    """Why a row is not eligible for selection, or None if it is."""
    if row.get("error") is not None and not include_errors:
        return "error"
    score = row.get(score_column)
    if score is None:
        return "no_score"
    # NaN (pandas' missing value) and infinities have no rank: sorting, margins and the quantile's
    # interpolation would all go wrong on them.
    if isinstance(score, float) and not math.isfinite(score):
        return "score_not_finite"
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


def ranks(values: list[float]) -> list[float]:
    """Ranks of `values` (0 = lowest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2
        i = j + 1
    return out
