"""How much of an inferred instruction is copied from the response, and whether it echoes the FLIP
prompt's own scaffolding: the two ways a small model fails at backward inference without anyone seeing.

A model that cannot infer an instruction often writes the response's opening again (`flip` then
measures how much the response's first words overlap the prompt), or repeats what the prompt showed
it: a placeholder (`<instruction>`), a section header (`[Response]`, `[Inferred Instruction]`), or
the same few words until `max_tokens`. Each measure is a pure function of the inferred instruction
and the response, on the SQuAD-normalised words that F1 compares (`metrics.tokens`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from flip_ray.text import prompts
from flip_ray.text.flags import copied_fraction
from flip_ray.text.metrics import tokens

# `flag_copied_response`: at least this share of the inferred instruction's words sit in a run of
# >= COPY_RUN words found verbatim in the response, and the longest such run is at least
# COPY_RUN words (an instruction that quotes a title or a term from the response is not flagged).
COPY_FLAG_FRACTION = 0.6
COPY_RUN = 4
# `flag_echoed_template`, loop part: an answer of at least LOOP_MIN_WORDS words in which fewer than
# this share of its word trigrams are distinct (ordinary text: nearly all of them).
LOOP_DISTINCT_SHARE = 0.5
LOOP_MIN_WORDS = 12

COPY_FLAGS = ("flag_copied_response", "flag_echoed_template")


class Copying(NamedTuple):
    copy_span: int  # longest run of the instruction's words found verbatim in the response
    copy_fraction: float  # share of the instruction's words in a run of >= COPY_RUN copied words
    flag_copied_response: bool
    flag_echoed_template: bool


def longest_copied_span(inferred: list[str], response: list[str]) -> int:
    """Length of the longest run of consecutive `inferred` tokens that occurs in `response`.

    Dynamic programming over the matching pairs only (a token's positions in `inferred`), so the
    cost grows with the response's length times a token's repeats in the short instruction, not
    with the product of the two lengths."""
    where: dict[str, list[int]] = {}
    for i, t in enumerate(inferred):
        where.setdefault(t, []).append(i)
    best, previous = 0, {}
    for t in response:
        current = {}
        for i in where.get(t, ()):
            run = previous.get(i - 1, 0) + 1
            current[i] = run
            if run > best:
                best = run
        previous = current
    return best


def _scaffolding() -> re.Pattern:
    """The FLIP prompts' placeholders (`<instruction>`), section headers (`[Response]`, with or
    without their `Your`) and answer keys (`INFERRED INSTRUCTION`), read from the prompt texts
    themselves so that a new prompt variant is covered without a list kept by hand."""
    texts = [
        *prompts._SYSTEM_PROMPTS.values(),
        *prompts._USER_TEMPLATES.values(),
        prompts.HISTORY_HEADER,
    ]
    placeholders, headers, keys = set(), set(), set()
    for text in texts:
        placeholders.update(m.lower() for m in re.findall(r"<([A-Za-z][A-Za-z _-]*)>", text))
        for m in re.findall(r"\[([A-Za-z][A-Za-z ]*)\]", text):
            headers.add(re.sub(r"^your\s+", "", m.lower()))
        # the answer's key, not "REASONING" (an instruction may well ask for "your reasoning:")
        keys.update(m.lower() for m in re.findall(r'"([A-Z][A-Z ]+)"\s*:', text) if "INSTRUCTION" in m)
        headers.update(m.lower() for m in re.findall(r"^###\s*([A-Za-z ]+)$", text, re.MULTILINE))
    alternatives = [rf"<\s*{re.escape(p)}\s*>" for p in sorted(placeholders)]
    alternatives += [rf"\[\s*(?:your\s+)?{re.escape(h)}\s*\]" for h in sorted(headers)]
    alternatives += [rf"###\s*{re.escape(h)}" for h in sorted(headers)]
    alternatives += [rf"\b{re.escape(k)}\b" for k in sorted(keys)]  # the answer's key, named anywhere
    return re.compile("|".join(alternatives), re.IGNORECASE)


SCAFFOLDING = _scaffolding()


# Words of the answer format every FLIP prompt asks for. An inferred instruction that names one the
# response never uses describes the FLIP prompt ("The user requested a JSON object with the requested
# instruction"), not the request behind the response.
FORMAT_WORDS = frozenset({"json"})


def looped(words: list[str]) -> bool:
    """True for a text that repeats itself: few distinct word trigrams among many words."""
    if len(words) < LOOP_MIN_WORDS:
        return False
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(trigrams)) < LOOP_DISTINCT_SHARE * len(trigrams)


def echoes_template(inferred: str, words: list[str] | None = None, response_words: list[str] | None = None) -> bool:
    """True when the inferred instruction holds the FLIP prompt's scaffolding (its placeholders,
    headers and answer key), names its answer format while the response does not (`FORMAT_WORDS`;
    only checked when `response_words` are given), or loops."""
    words = tokens(inferred) if words is None else words
    if SCAFFOLDING.search(inferred) or looped(words):
        return True
    if response_words is None:
        return False
    format_words = FORMAT_WORDS.intersection(words)
    return bool(format_words) and not format_words.intersection(response_words)


def measure_copying(inferred: str, response: str) -> Copying:
    """The copy and echo measures of one inferred instruction against the response it was read from."""
    inferred_words, response_words = tokens(inferred), tokens(response)
    span = longest_copied_span(inferred_words, response_words)
    fraction = copied_fraction(inferred_words, response_words, COPY_RUN) if span >= COPY_RUN else 0.0
    return Copying(
        copy_span=span,
        copy_fraction=fraction,
        flag_copied_response=fraction >= COPY_FLAG_FRACTION,
        flag_echoed_template=echoes_template(inferred, inferred_words, response_words),
    )
