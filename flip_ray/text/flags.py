"""Reward-hacking and weak-spot flags, computed on CPU next to the score.

FLIP's known ways to go wrong: a response that restates the instruction (the model then "infers"
the instruction by copying it back, inflating F1), a response too short to carry information, and a
response in another language or script than the prompt. Each flag is a pure function of the prompt
and the response, with thresholds from config.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import _count_elements
from typing import NamedTuple

from flip_ray.text.metrics import tokens

# Function words that tell common Latin-script languages apart. A text is assigned the language
# whose words make up the largest share of its tokens, if that share is large enough.
_STOPWORDS = {
    "en": set(
        "the a an and of to is in that it for you with on are this be as was have not what how can do does i me my "
        "your who where when why which should will would from about please write give tell".split()
    ),
    "fr": set("le la les et des est un une du que pour dans pas sur vous ce qui au avec sont une il elle".split()),
    "es": set("el la los las y de que en un una es por para con no se del al lo como su más pero".split()),
    "de": set("der die das und ist nicht ein eine zu den mit von sich des auf für im dem sie es ich".split()),
    "it": set("il di che e la per un una non sono del della le gli con si è al da nel anche come".split()),
    "pt": set("o a os as e de que em um uma do da não para com por se no na mais como dos são".split()),
    "nl": set("de het een en van is dat niet op te in voor met zijn er aan ook als maar om dan".split()),
}
_MIN_WORDS_FOR_LANGUAGE = 8
# Letters looked at to decide a script, and words to guess a language: enough for a clear majority,
# and flags stay cheap on long responses.
_SCRIPT_SAMPLE = 2000
_LANGUAGE_SAMPLE = 400
_WORD = re.compile(r"\w+")
_ASCII_LETTER_BYTES = string.ascii_letters.encode()
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_MIN_STOPWORD_SHARE = 0.08


# Reward-hacking and weak-spot flags, one boolean output column each (the output schema takes them from here).
FLAG_NAMES = ("flag_restates_prompt", "flag_too_short", "flag_language_mismatch")
# The output columns `compute_flags` fills, in order.
Flags = NamedTuple(
    "Flags", [("prompt_copy_fraction", float), ("response_words", int), *((name, bool) for name in FLAG_NAMES)]
)


def copied_fraction(prompt_tokens: list[str], response_tokens: list[str], min_run: int = 4) -> float:
    """Share of the prompt's tokens that sit in a run of >= `min_run` consecutive tokens (fewer for
    short prompts) also found verbatim in the response. A copied or quoted instruction scores ~1; an
    answer that merely mentions the prompt's words scores ~0."""
    n = len(prompt_tokens)
    if n == 0 or not response_tokens:
        return 0.0
    run = min(min_run, n)
    grams = {tuple(response_tokens[i : i + run]) for i in range(len(response_tokens) - run + 1)}
    covered = [False] * n
    for i in range(n - run + 1):
        if tuple(prompt_tokens[i : i + run]) in grams:
            for j in range(i, i + run):
                covered[j] = True
    return sum(covered) / n


def script_of(text: str) -> str | None:
    """The dominant Unicode script of the letters in `text` (LATIN, CYRILLIC, CJK, ...), or None."""
    text = text[: _SCRIPT_SAMPLE * 4]
    counts: dict[str, int] = {}
    # ASCII letters, counted at C speed: in UTF-8 their bytes occur only as themselves.
    encoded = text.encode("utf-8", "surrogatepass")
    ascii_letters = len(encoded) - len(encoded.translate(None, _ASCII_LETTER_BYTES))
    if ascii_letters:
        counts["LATIN"] = ascii_letters
    for ch in () if text.isascii() else _NON_ASCII.findall(text):
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = name.split(" ")[0] if name else ""
        if script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"):
            script = "CJK"
        counts[script] = counts.get(script, 0) + 1
    if not counts:
        return None
    return max(counts.items(), key=lambda kv: kv[1])[0]


def language_of(words: list[str]) -> str | None:
    """A guess among a few Latin-script languages from function words; None when unsure (short
    text, few function words, or two languages nearly tied)."""
    if len(words) < _MIN_WORDS_FOR_LANGUAGE:
        return None
    counts: dict[str, int] = {}
    _count_elements(counts, words)
    # one pass over the words, then only the words that are function words of some language
    hit = {lang: sum(counts[w] for w in counts.keys() & stop) for lang, stop in _STOPWORDS.items()}
    hits = sorted(((n, lang) for lang, n in hit.items()), reverse=True)
    (best, lang), (second, _) = hits[0], hits[1]
    if best < 3 or best / len(words) < _MIN_STOPWORD_SHARE or best < 2 * second:
        return None
    return lang


def language_mismatch(prompt: str, response: str) -> bool:
    """True when prompt and response are clearly in different scripts, or (both Latin) different
    languages. Unsure cases (short texts, no letters) are not flagged."""
    ps, rs = script_of(prompt), script_of(response)
    if ps is None or rs is None:
        return False
    if ps != rs:
        return True
    if ps == "LATIN":
        pw = _WORD.findall(prompt.lower())[:_LANGUAGE_SAMPLE]
        rw = _WORD.findall(response[: _LANGUAGE_SAMPLE * 12].lower())[:_LANGUAGE_SAMPLE]
        rl = language_of(rw)
        if rl is None:
            return False
        pl = language_of(pw)
        if pl is not None:
            return pl != rl
        # A prompt too short to classify: a mismatch when it has function words of another
        # language and none of the response's.
        words = set(pw)
        others = any(len(words & stop) >= 2 for lang, stop in _STOPWORDS.items() if lang != rl)
        return others and not (words & _STOPWORDS[rl])
    return False


_CJK = re.compile("[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def word_count(text: str) -> int:
    """Whitespace words, counting two CJK characters as a word (CJK text has no spaces)."""
    cjk = 0 if text.isascii() else len(_CJK.findall(text))
    return max(len(text.split()), cjk // 2)


def compute_flags(prompt: str, response: str, *, copy_threshold: float = 0.6, min_response_words: int = 3) -> Flags:
    """All flags for one row.

    Args:
        prompt: The real instruction.
        response: The scored response.
        copy_threshold: `flag_restates_prompt` when at least this share of the prompt is copied
            verbatim and the copy is at least a third of the response (an answer that merely opens
            by echoing the question is not flagged).
        min_response_words: `flag_too_short` below this many words.
    """
    p, r = tokens(prompt), tokens(response)
    copied = copied_fraction(p, r)
    words = word_count(response)
    restates = copied >= copy_threshold and copied * len(p) >= len(r) / 3
    return Flags(
        prompt_copy_fraction=copied,
        response_words=words,
        flag_restates_prompt=restates,
        flag_too_short=words < min_response_words,
        flag_language_mismatch=language_mismatch(prompt, response),
    )
