"""Word-level F1 between an inferred and a real instruction, as in the FLIP authors' `metrics.py`.

SQuAD-style normalisation: lowercase, delete ASCII punctuation, replace the articles a/an/the with a
space, collapse whitespace. Precision and recall count shared tokens with multiplicity; with no
shared token all three are 0. The implementation is the same algorithm with the per-character
generator replaced by a byte-level deletion and a precompiled regex (same output, several times
faster);
`tests/test_metrics.py` checks parity against a direct, unoptimised implementation of that algorithm.
"""

from __future__ import annotations

import re
import string
from collections import _count_elements
from typing import NamedTuple

_PUNCT_BYTES = string.punctuation.encode()
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class F1(NamedTuple):
    f1: float
    precision: float
    recall: float


ZERO = F1(0.0, 0.0, 0.0)


def _strip_punctuation(lowered: str) -> str:
    # ASCII punctuation bytes never occur inside a multi-byte UTF-8 sequence, so deleting them from
    # the encoded bytes equals deleting the characters, and bytes.translate runs at C speed
    # (str.translate with deletions does not).
    return lowered.encode("utf-8", "surrogatepass").translate(None, _PUNCT_BYTES).decode("utf-8", "surrogatepass")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation, drop articles and collapse whitespace (SQuAD normalisation)."""
    return " ".join(_ARTICLES.sub(" ", _strip_punctuation(text.lower())).split())


_ARTICLE_WORDS = frozenset(("a", "an", "the"))


def _words(text: str) -> tuple[list[str], bool]:
    """The whitespace-split words after lowercasing and punctuation removal, and whether they are
    all plain (`str.isalnum`, which is what the regex's `\\w` means once `_` is gone). A plain word
    can hold an article only as the whole word."""
    words = _strip_punctuation(text.lower()).split()
    return words, not words or "".join(words).isalnum()


def _tokens_of_words(words: list[str]) -> list[str]:
    # Words with a non-word character inside (an em dash, say) go through the reference regex.
    out: list[str] = []
    for w in words:
        if w.isalnum():
            if w not in _ARTICLE_WORDS:
                out.append(w)
        else:
            out.extend(_ARTICLES.sub(" ", w).split())
    return out


def tokens(text: str) -> list[str]:
    """`normalize_answer(text).split()`, computed per word without rebuilding the string."""
    words, plain = _words(text)
    if plain:
        return [w for w in words if w not in _ARTICLE_WORDS]
    return _tokens_of_words(words)


def token_counts(text: str) -> tuple[dict[str, int], int]:
    """`Counter(tokens(text))` and `len(tokens(text))`. For plain words the articles are taken out
    of the counts instead of out of a token list."""
    words, plain = _words(text)
    if not plain:
        words = _tokens_of_words(words)
    counts: dict[str, int] = {}
    _count_elements(counts, words)  # what Counter(words) runs, without its Python-level wrapper
    n = len(words)
    if plain:
        for article in ("a", "an", "the"):
            if article in counts:
                n -= counts.pop(article)
    return counts, n


def f1_from_counts(pred_counts: dict[str, int], n_pred: int, ref_counts: dict[str, int], n_ref: int) -> F1:
    """F1 from two `token_counts` results."""
    if not n_pred or not n_ref:
        return ZERO
    # Loop over the shared words only (a C-level key intersection), not over every word.
    num_same = 0
    for w in pred_counts.keys() & ref_counts.keys():
        a, b = pred_counts[w], ref_counts[w]
        num_same += a if a < b else b
    if num_same == 0:
        return ZERO
    precision = num_same / n_pred
    recall = num_same / n_ref
    return F1(2 * precision * recall / (precision + recall), precision, recall)


def f1_score(prediction: str, ground_truth: str) -> F1:
    """F1, precision and recall of `prediction` against `ground_truth` over normalised words."""
    pred_counts, n_pred = token_counts(prediction)
    if not n_pred:
        return ZERO
    return f1_from_counts(pred_counts, n_pred, *token_counts(ground_truth))
