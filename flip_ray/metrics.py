"""Word-level F1 between an inferred and a real instruction, as in the FLIP authors' `metrics.py`.

SQuAD-style normalisation: lowercase, delete ASCII punctuation, replace the articles a/an/the with a
space, collapse whitespace. Precision and recall count shared tokens with multiplicity; with no
shared token all three are 0. The implementation is the same algorithm with the per-character
generator replaced by `str.translate` and a precompiled regex (same output, several times faster);
`tests/test_metrics.py` checks parity against a direct, unoptimised implementation of that algorithm.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import NamedTuple

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class F1(NamedTuple):
    f1: float
    precision: float
    recall: float


ZERO = F1(0.0, 0.0, 0.0)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation, drop articles and collapse whitespace (SQuAD normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT_TABLE)).split())


def tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def f1_from_tokens(pred: list[str], ref: list[str]) -> F1:
    if not pred or not ref:
        return ZERO
    common = Counter(pred) & Counter(ref)
    num_same = sum(common.values())
    if num_same == 0:
        return ZERO
    precision = num_same / len(pred)
    recall = num_same / len(ref)
    return F1(2 * precision * recall / (precision + recall), precision, recall)


def f1_score(prediction: str, ground_truth: str) -> F1:
    """F1, precision and recall of `prediction` against `ground_truth` over normalised words."""
    return f1_from_tokens(tokens(prediction), tokens(ground_truth))
