"""Reading the judges' verdicts: lenient parsers for the pointwise, pairwise and listwise answers.

The parsers are lenient in the same way as parsing.py (which they reuse): `<think>` blocks and code fences
are stripped, key spellings vary, embedded and cut-off JSON is read, and a verdict written as plain text
("Score: 7", "Response B is better") is accepted. Each result carries a status from `JUDGE_PARSE_STATUSES`;
an answer with no usable verdict, or one outside what the prompt allows, gives None with `INVALID`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

from flip_ray.engine.judge import SCORE_MAX, SCORE_MIN
from flip_ray.text.parsing import (
    EMPTY,
    FENCE,
    JSON,
    JSON_EMBEDDED,
    PARTIAL_JSON,
    RAW_TEXT,
    SPECIAL_TOKENS,
    json_objects,
    loads_lenient,
    normal_key,
    strip_think,
)

INVALID = "invalid"  # an answer was there, but no verdict the prompt allows could be read from it
JUDGE_PARSE_STATUSES = (JSON, JSON_EMBEDDED, PARTIAL_JSON, RAW_TEXT, EMPTY, INVALID)

_MISSING = object()

# Normalised key spellings (lowercase, no spaces/underscores/hyphens), the prompt's own first.
_SCORE_KEYS = ("score", "rating", "overallscore", "finalscore", "grade")
_CHOICE_KEYS = ("betterresponse", "bestresponse", "better", "preferredresponse", "winner", "choice", "verdict")
_INDEX_KEYS = ("bestresponseindex", "bestindex", "bestresponse", "index", "best")

_NUMBER = r"(?<![\d.\-])(\d+(?:\.\d+)?)"  # not the tail of "-1" or "3.7"
_LABEL = r"(?i:(?:ai\s+)?(?:response|answer|output|assistant|candidate))"  # "AI Response", "Output", ...
# After a number in cut-off JSON. End of text does not count: a cut "10" would otherwise read as 1.
_NUMBER_END = r"(?=\s*[\"'},\]\n])"
# After a closed string in cut-off JSON: a comma, brace or line break, or the end of the text.
_VALUE_END = r"(?=\s*(?:[,}\]\n]|$))"
# What may wrap a bare value: quotes, markdown emphasis, brackets, a full stop. Not "-", so "-1" is no 1.
_OPEN = r"[\s\"'*`\[(]*"
_CLOSE = r"[\s\"'*`\])\.!]*"
# Up to two words before "better"/"best" ("clearly the best"), but no "not".
_PRAISE = r"(?i:(?:(?!not\b)\w+\s+){0,2})"

# A score value: "7", "7.5", "8/10", "8 out of 10", optionally quoted or followed by a full stop.
_SCORE_VALUE = re.compile(rf"{_OPEN}{_NUMBER}(?:\s*(?:/|out\s+of)\s*(\d+))?{_CLOSE}", re.IGNORECASE)
# Cut-off JSON: the SCORE value read by pattern.
_PARTIAL_SCORE = re.compile(
    rf'"\s*(?:score|rating|overall[\s_\-]*score|final[\s_\-]*score)\s*"\s*:\s*"?\s*{_NUMBER}{_NUMBER_END}',
    re.IGNORECASE,
)
# A score in prose: "Score: 7", "I would rate this 8/10", "a rating of **6**", "9 out of 10". A quoted
# key ("SCORE": 1 at the cut) is not prose: it is cut-off JSON, read only with a delimiter above.
_SCORE_CUE = re.compile(
    rf"\b(?:score|rating|rate|rated|grade)\b(?!\s*\")[^\d\n]{{0,30}}?{_NUMBER}(?:\s*(?:/|out\s+of)\s*(\d+))?",
    re.IGNORECASE,
)
_SCORE_OF_TEN = re.compile(rf"{_NUMBER}\s*(?:/|out\s+of)\s*(10)\b", re.IGNORECASE)

# A choice value: "A", "b", "Response B", "AI Response A", "Output (a)", "[[A]]".
_CHOICE_VALUE = re.compile(rf"{_OPEN}(?:{_LABEL}\s*)?\(?([ab])\)?{_CLOSE}", re.IGNORECASE)
_PARTIAL_CHOICE = re.compile(
    rf'"\s*(?:better|best)[\s_\-]*response\s*"\s*:\s*"\s*(?:{_LABEL}\s*)?\(?([ab])\)?\s*"{_VALUE_END}', re.IGNORECASE
)
# A choice in prose. A bare letter must be uppercase, or "a" the article would count as a verdict.
_CHOICE_CUES = (
    re.compile(rf"{_LABEL}\s*\(?([ABab])\)?\s+(?i:is|was)\s+{_PRAISE}(?i:better|superior|preferred|stronger)"),
    re.compile(
        rf"(?i:(?:better|best|preferred)[\s_\-]*(?:response|answer|output))(?!\s*\")\W{{0,5}}(?i:is\W{{1,3}})?"
        rf"(?:(?:{_LABEL}\s*\(?([ABab])\)?)|\(?([AB])\)?)\b"
    ),
    re.compile(r"\[\[([AB])\]\]"),
    re.compile(
        rf"(?i:\b(?:choose|chose|select|pick|prefer|verdict|winner|final\s+answer)\b)\W{{0,5}}(?i:is\W{{1,3}})?"
        rf"(?:(?:{_LABEL}\s*\(?([ABab])\)?)|\(?([AB])\)?)\b"
    ),
)

# An index value: "2", "2.0", "Response 2", "[AI Response 2]", "#2".
_INDEX_VALUE = re.compile(rf"{_OPEN}(?:{_LABEL}\s*)?(?:index\s*)?#?\(?(\d+)\)?{_CLOSE}", re.IGNORECASE)
_PARTIAL_INDEX = re.compile(
    rf'"\s*best[\s_\-]*(?:response[\s_\-]*)?index\s*"\s*:\s*"?\s*(?:{_LABEL}\s*)?#?(\d+){_NUMBER_END}', re.IGNORECASE
)
_INDEX_CUES = (
    re.compile(r"(?i:best[\s_\-]*(?:response[\s_\-]*)?index)(?!\s*\")\W{0,5}(?i:is\W{1,3})?(\d+)\b"),
    re.compile(rf"{_LABEL}\s*#?\(?(\d+)\)?\s+(?i:is)\s+{_PRAISE}(?i:best|strongest|better)"),
    re.compile(rf"(?i:best\s+(?:response|answer|output))\W{{0,5}}(?i:is\W{{1,3}})?(?:{_LABEL}\s*)?#?\(?(\d+)\)?\b"),
    re.compile(rf"(?i:\b(?:choose|chose|select|pick|prefer)\b)\s+{_LABEL}\s*#?\(?(\d+)\)?\b"),
)


def _json_answers(text: str, cleaned: str) -> Iterator[tuple[dict, str]]:
    """Yields the JSON objects of an answer, best-placed first, each with its parse status."""
    whole = loads_lenient(cleaned)
    if isinstance(whole, dict):
        yield whole, JSON if cleaned == text.strip() else JSON_EMBEDDED
    for region in [*(m.group(1) for m in FENCE.finditer(cleaned)), cleaned]:
        obj = loads_lenient(region.strip())
        if isinstance(obj, dict):
            yield obj, JSON_EMBEDDED
        for candidate in json_objects(region):  # also objects nested in one without the key
            yield candidate, JSON_EMBEDDED


def _lookup(obj: dict, keys: tuple[str, ...]):
    by_key = {normal_key(str(k)): v for k, v in obj.items()}
    return next((by_key[key] for key in keys if key in by_key), _MISSING)


def _last_match(patterns: tuple[re.Pattern, ...], text: str) -> re.Match | None:
    """The match that ends last over all `patterns`: the prompt asks for the verdict after the reasoning."""
    matches = [m for pattern in patterns for m in pattern.finditer(text)]
    return max(matches, key=lambda m: (m.end(), m.start()), default=None)


def _parse(
    text: str | None,
    keys: tuple[str, ...],
    convert: Callable[[object], object | None],
    partial: re.Pattern,
    raw: Callable[[str], object | None],
) -> tuple[object | None, str]:
    """Reads one verdict: whole JSON, embedded JSON, cut-off JSON, then prose (`raw`)."""
    if not text or not text.strip():
        return None, EMPTY
    cleaned = strip_think(text).strip()
    if not cleaned:
        return None, EMPTY

    keyed = False
    for obj, status in _json_answers(text, cleaned):
        value = _lookup(obj, keys)
        if value is _MISSING:
            continue
        keyed = True
        verdict = convert(value)
        if verdict is not None:
            return verdict, status
    if keyed:  # the model answered in the asked-for JSON, but with a value the prompt does not allow
        return None, INVALID

    match = partial.search(cleaned)
    if match:
        verdict = convert(next(g for g in match.groups() if g is not None))
        return (verdict, PARTIAL_JSON) if verdict is not None else (None, INVALID)

    prose = SPECIAL_TOKENS.sub(" ", cleaned)
    prose = FENCE.sub(lambda m: m.group(1), prose).replace("```", " ").strip()
    verdict = raw(prose) if prose else None
    return (verdict, RAW_TEXT) if verdict is not None else (None, INVALID)


def _score(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        score = float(value)
    elif isinstance(value, str):
        match = _SCORE_VALUE.fullmatch(value.strip())
        if not match or (match.group(2) is not None and match.group(2) != "10"):
            return None  # another scale ("4/5") is not the prompt's; mapping it would invent a score
        score = float(match.group(1))
    else:
        return None
    if not math.isfinite(score) or not SCORE_MIN <= score <= SCORE_MAX:
        return None
    return score


def _score_in_prose(text: str) -> float | None:
    whole = _score(text)
    if whole is not None:
        return whole
    match = _last_match((_SCORE_CUE, _SCORE_OF_TEN), text)
    if match is None or (match.group(2) is not None and match.group(2) != "10"):
        return None
    return _score(match.group(1))


def _choice(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    match = _CHOICE_VALUE.fullmatch(value.strip())
    return match.group(1).upper() if match else None


def _choice_in_prose(text: str) -> str | None:
    whole = _choice(text)
    if whole is not None:
        return whole
    match = _last_match(_CHOICE_CUES, text)
    if match is None:
        return None
    return next(g for g in match.groups() if g is not None).upper()


def _index(value: object, n: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    if isinstance(value, str):
        match = _INDEX_VALUE.fullmatch(value.strip())
        if not match:
            return None
        value = int(match.group(1))
    if not isinstance(value, int) or not 0 <= value < n:
        return None
    return value


def _index_in_prose(text: str, n: int) -> int | None:
    whole = _index(text, n)
    if whole is not None:
        return whole
    match = _last_match(_INDEX_CUES, text)
    return _index(match.group(1), n) if match else None


def parse_pointwise(text: str | None) -> tuple[float | None, str]:
    """Reads the 1-10 score from a pointwise judge answer.

    Args:
        text: The generated answer to `pointwise_messages`.

    Returns:
        `(score, status)`: the score on the prompt's 1-10 scale (None when there is no usable score;
        out-of-range scores are refused, not clamped) and a status from `JUDGE_PARSE_STATUSES`.
    """
    return _parse(text, _SCORE_KEYS, _score, _PARTIAL_SCORE, _score_in_prose)


def parse_pairwise(text: str | None) -> tuple[str | None, str]:
    """Reads the verdict, "A" or "B", from a pairwise judge answer.

    The authors' prompt allows no tie, so "tie", "C" or "both" is refused with `INVALID`.

    Args:
        text: The generated answer to `pairwise_messages`.

    Returns:
        `(choice, status)`: "A", "B" or None, and a status from `JUDGE_PARSE_STATUSES`.
    """
    return _parse(text, _CHOICE_KEYS, _choice, _PARTIAL_CHOICE, _choice_in_prose)


def parse_listwise(text: str | None, n: int) -> tuple[int | None, str]:
    """Reads the 0-based index of the best of `n` responses from a listwise judge answer.

    The prompt numbers responses from 0 (`[AI Response 0]`), so "Response 2" is index 2.

    Args:
        text: The generated answer to `listwise_messages`.
        n: How many responses the prompt showed.

    Returns:
        `(index, status)`: an index in [0, n-1] or None (out of range counts as `INVALID`), and a status.
    """
    if n < 1:
        raise ValueError(f"listwise judging needs at least one response, got n={n}")
    return _parse(text, _INDEX_KEYS, lambda v: _index(v, n), _PARTIAL_INDEX, lambda prose: _index_in_prose(prose, n))
