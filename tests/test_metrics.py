"""F1 parity with the FLIP authors' metric (SQuAD normalisation, Counter overlap, 0 with no overlap)."""

import random
import re
import string
from collections import Counter

import pytest

from flip_ray.text.metrics import F1, f1_score, normalize_answer


def reference_normalize(s: str) -> str:
    # The published algorithm, step by step and unoptimised: lower, drop each punctuation
    # character, articles to spaces, split/join.
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def reference_f1(prediction: str, truth: str) -> tuple[float, float, float]:
    p, t = reference_normalize(prediction).split(), reference_normalize(truth).split()
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall), precision, recall


EDGE_CASES = [
    ("", ""),
    ("", "Write a poem."),
    ("Write a poem.", ""),
    ("!!! ... ???", "Write a poem."),
    ("a an the", "the a an"),
    ("The the THE", "the"),
    ("Write a poem about the sea.", "write poem about sea"),
    ("poem poem poem", "poem"),
    ("Écris un poème sur la mer", "écris un poème"),
    ("Напиши стихотворение о море", "напиши стихотворение"),
    ("写一首关于大海的诗", "写一首关于大海的诗"),
    ("don't stop-believing", "dont stopbelieving"),
    ("Tab\tand\nnewline", "tab and newline"),
    ("an apple a day", "apple day"),
    ("théâtre — the “quoted” text", "theatre quoted text"),
    ("x" * 1000, "x" * 1000),
]


@pytest.mark.parametrize("pred,truth", EDGE_CASES)
def test_edge_cases_match_reference(pred, truth):
    assert tuple(f1_score(pred, truth)) == pytest.approx(reference_f1(pred, truth), abs=0, rel=0)


def test_no_common_token_is_zero():
    assert f1_score("alpha beta", "gamma delta") == F1(0.0, 0.0, 0.0)
    assert f1_score("the", "a") == F1(0.0, 0.0, 0.0)  # articles only: both normalise to nothing


def test_known_values():
    # pred tokens [write, poem, about, cats], truth [write, poem] -> p=0.5, r=1, f1=2/3
    s = f1_score("Write a poem about cats!", "Write a poem.")
    assert s.precision == 0.5 and s.recall == 1.0 and s.f1 == pytest.approx(2 / 3)


def test_repeated_tokens_count_with_multiplicity():
    s = f1_score("go go go", "go")
    assert s.precision == pytest.approx(1 / 3) and s.recall == 1.0


def test_random_pairs_match_reference():
    rng = random.Random(1234)
    vocab = [
        "the",
        "a",
        "an",
        "Write",
        "poem",
        "poem,",
        "ABOUT",
        "sea.",
        "don't",
        "x-y",
        "É",
        "наш",
        "—",
        "!!",
        "42",
        " ",
    ]
    for _ in range(3000):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        truth = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        assert normalize_answer(pred) == reference_normalize(pred)
        assert tuple(f1_score(pred, truth)) == pytest.approx(reference_f1(pred, truth), abs=1e-15)


def test_real_text_pairs_match_reference():
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
    for r in rows:
        for a, b in ((r["response"], r["prompt"]), (r["prompt"], r["response"][:200])):
            assert tuple(f1_score(a, b)) == pytest.approx(reference_f1(a, b), abs=1e-15)


def test_fast_tokens_equal_the_normalised_split():
    from flip_ray.text.metrics import tokens

    rng = random.Random(99)
    alphabet = list("aAnNtThHeE _-—–“”…’'.,!?0123456789 ") + ["é", "ß", "İ", "ǅ", "\u0301", "汉", "字", "©", "\u00a0"]
    cases = ["the—end", "a“quote”", "x_the", "the", "An", "THE_A", "théâtre", "a\u0301", "ǅthe", "the…an a"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(20000)]
    for text in cases:
        assert tokens(text) == reference_normalize(text).split(), repr(text)


def test_token_counts_equal_the_counted_normalised_split():
    from flip_ray.text.metrics import token_counts

    rng = random.Random(7)
    alphabet = list("aAnNtThHeE _-—’.,0123456789 \t\n\x1c\x00") + ["é", "İ", "\u0301", "汉", "\u00a0", "\u2003"]
    cases = ["", "the a an", "A man, a plan", "the—the", "an\u00a0apple"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    for text in cases:
        words = reference_normalize(text).split()
        assert token_counts(text) == (dict(Counter(words)), len(words)), repr(text)
