"""Lenient extraction of the inferred instruction from a model's FLIP answer.

Small models rarely produce clean JSON. Following the authors' parser, this strips `<think>` blocks
and code fences, tolerates key spelling variants, and falls back to the raw text when no JSON can be
read. Each result says which path was taken (`parse_status`), so a user can see how much of a run
rests on fallbacks.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

# parse_status values, from most to least trustworthy.
JSON = "json"  # the whole answer is one JSON object with an instruction key
JSON_EMBEDDED = "json_embedded"  # a JSON object found inside fences, <think> or other text
PARTIAL_JSON = "partial_json"  # broken or cut-off JSON; the instruction value read by pattern
RAW_TEXT = "raw_text"  # no usable JSON: the cleaned answer itself is the instruction
EMPTY = "empty"  # nothing left after cleaning
PARSE_STATUSES = (JSON, JSON_EMBEDDED, PARTIAL_JSON, RAW_TEXT, EMPTY)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
SPECIAL_TOKENS = re.compile(r"<\|[^|>]{1,40}\|>|</?think>", re.IGNORECASE)
_KEY_CHARS = re.compile(r"[\s_\-]+")

# Normalised key spellings (lowercase, no spaces/underscores/hyphens), including the authors' typo.
_INSTRUCTION_KEYS = (
    "inferredinstruction",
    "inferredinstructcion",
    "inferredprompt",
    "instruction",
    "prompt",
)
_REASONING_KEYS = ("reasoning", "explanation", "reason", "rationale")
_PARTIAL_VALUE = re.compile(
    r'"\s*(?:inferred[\s_\-]*instruct(?:c)?ion|instruction)\s*"\s*:\s*"((?:[^"\\]|\\.)*)("?)',
    re.IGNORECASE | re.DOTALL,
)
_PARTIAL_REASONING = re.compile(r'"\s*reasoning\s*"\s*:\s*"((?:[^"\\]|\\.)*)', re.IGNORECASE | re.DOTALL)


class ParsedAnswer(NamedTuple):
    instruction: str
    reasoning: str | None
    status: str


def strip_think(text: str) -> str:
    """Removes `<think>...</think>` blocks. Text before a dangling `</think>` is reasoning too, and so
    is everything after a `<think>` that never closes (a thinking model cut off by max_tokens)."""
    text = _THINK_BLOCK.sub("", text)
    lowered = text.lower()
    end = lowered.rfind("</think>")
    if end != -1:
        text = text[end + len("</think>") :]
        lowered = text.lower()
    start = lowered.find("<think>")
    if start != -1:
        text = text[:start]
    return text


def normal_key(key: str) -> str:
    return _KEY_CHARS.sub("", key).lower()


def _pick(obj: dict, keys: tuple[str, ...]) -> str | None:
    by_key = {normal_key(str(k)): v for k, v in obj.items()}
    for key in keys:
        value = by_key.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            value = json.dumps(value, ensure_ascii=False)
        return value
    return None


def json_objects(text: str):
    """Yields every JSON object that decodes from a `{` in `text`, in order."""
    decoder = json.JSONDecoder(strict=False)
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            yield obj
        start = text.find("{", start + 1)


def loads_lenient(text: str):
    """json.loads, then once more with raw newlines escaped (models often emit them in strings)."""
    for candidate in (text, text.replace("\r\n", "\n").replace("\n", "\\n")):
        try:
            return json.loads(candidate, strict=False)
        except json.JSONDecodeError:
            continue
    return None


def _unescape(value: str) -> str:
    try:
        return json.loads(f'"{value}"')
    except json.JSONDecodeError:
        return value.replace('\\"', '"').replace("\\n", "\n")


def parse_inferred_instruction(text: str | None) -> ParsedAnswer:
    """Extracts the inferred instruction (and reasoning) from a model answer.

    Args:
        text: The generated answer to the FLIP prompt.

    Returns:
        The instruction, the reasoning (None when absent) and the parse status, one of
        `PARSE_STATUSES`.
    """
    if not text or not text.strip():
        return ParsedAnswer("", None, EMPTY)
    cleaned = strip_think(text).strip()
    if not cleaned:
        return ParsedAnswer("", None, EMPTY)

    whole = loads_lenient(cleaned)
    if isinstance(whole, dict):
        instruction = _pick(whole, _INSTRUCTION_KEYS)
        if instruction is not None:
            status = JSON if cleaned == text.strip() else JSON_EMBEDDED
            return ParsedAnswer(instruction.strip(), _pick(whole, _REASONING_KEYS), status)

    fenced = [m.group(1) for m in FENCE.finditer(cleaned)]
    for region in [*fenced, cleaned]:
        obj = loads_lenient(region.strip())
        candidates = [obj] if isinstance(obj, dict) else list(json_objects(region))
        for candidate in candidates:
            instruction = _pick(candidate, _INSTRUCTION_KEYS)
            if instruction is not None:
                return ParsedAnswer(instruction.strip(), _pick(candidate, _REASONING_KEYS), JSON_EMBEDDED)

    partial = _PARTIAL_VALUE.search(cleaned)
    if partial and partial.group(1).strip():
        reasoning = _PARTIAL_REASONING.search(cleaned)
        return ParsedAnswer(
            _unescape(partial.group(1)).strip(),
            _unescape(reasoning.group(1)).strip() if reasoning else None,
            PARTIAL_JSON,
        )

    raw = SPECIAL_TOKENS.sub(" ", cleaned)
    raw = FENCE.sub(lambda m: m.group(1), raw).replace("```", " ").strip()
    if not raw:
        return ParsedAnswer("", None, EMPTY)
    return ParsedAnswer(raw, None, RAW_TEXT)
