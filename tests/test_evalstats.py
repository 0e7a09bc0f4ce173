"""Evaluation arithmetic: item outcomes (pairs and best-of-4), picks, agreement, bootstrap summaries, tables."""

import math
import time

import numpy as np
import pytest

from flip_ray.evaluation.stats import (
    agreement,
    markdown_table,
    outcome_from_pick,
    pair_outcome,
    pick_from_scores,
    summarize,
)


def test_pair_outcome_plain_pair():
    assert pair_outcome(2.0, [1.0]) == 1.0
    assert pair_outcome(1.0, [2.0]) == 0.0
    assert pair_outcome(1.5, [1.5]) == 0.5


def test_pair_outcome_best_of_4():
    assert pair_outcome(5.0, [1.0, 2.0, 3.0]) == 1.0
    assert pair_outcome(2.5, [1.0, 2.0, 3.0]) == 0.0
    assert pair_outcome(3.0, [3.0, 2.0, 1.0]) == 0.5
    assert pair_outcome(3.0, [3.0, 3.0, 1.0]) == pytest.approx(1 / 3)
    assert pair_outcome(3.0, [3.0, 3.0, 3.0]) == 0.25
    # A tie with one rejected is not a tie at the top when another rejected is higher.
    assert pair_outcome(3.0, [3.0, 4.0, 1.0]) == 0.0


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [(None, [1.0]), (1.0, [None]), (1.0, [0.0, None, 0.5]), (math.nan, [1.0]), (1.0, [0.0, math.nan])],
)
def test_pair_outcome_missing(chosen, rejected):
    assert pair_outcome(chosen, rejected) is None


def test_pair_outcome_needs_a_rejected_score():
    with pytest.raises(ValueError, match="at least one rejected"):
        pair_outcome(1.0, [])


def test_outcome_from_pick():
    assert outcome_from_pick(0, 2) == 1.0
    assert outcome_from_pick(1, 2) == 0.0
    assert outcome_from_pick(3, 4) == 0.0
    assert outcome_from_pick(None, 2) == 0.5
    assert outcome_from_pick(None, 4) == 0.25
    for pick, n in [(2, 2), (4, 4), (-1, 4)]:
        with pytest.raises(ValueError, match="out of range"):
            outcome_from_pick(pick, n)
    with pytest.raises(ValueError, match="at least 2"):
        outcome_from_pick(0, 1)


def test_pick_from_scores():
    assert pick_from_scores([0.1, 0.9, 0.3]) == 1
    assert pick_from_scores([2.0, 1.0]) == 0
    assert pick_from_scores([1.0, 3.0, 3.0, 0.0]) is None
    assert pick_from_scores([3.0, 3.0, 4.0]) == 2  # a tie below the top does not matter
    assert pick_from_scores([1.0, None]) is None
    assert pick_from_scores([1.0, math.nan]) is None
    assert pick_from_scores([]) is None


def test_pick_from_scores_matches_pair_outcome_on_a_clear_win():
    scores = [4.0, 1.0, 2.0, 3.0]
    assert outcome_from_pick(pick_from_scores(scores), 4) == pair_outcome(scores[0], scores[1:]) == 1.0


def test_agreement():
    assert agreement([0, 1, 2, None, 1], [0, 2, 2, 1, None]) == (pytest.approx(2 / 3), 3)
    assert agreement([0, 1], [0, 1]) == (1.0, 2)
    assert agreement([None, 1], [0, None]) == (None, 0)
    assert agreement([], []) == (None, 0)
    with pytest.raises(ValueError, match="length"):
        agreement([0], [0, 1])


HAND_OUTCOMES = [1.0, 0.0, 0.5, None, 1 / 3, 1.0, None]
HAND_SUBSETS = ["a", "b", "a", None, "b", "a", None]


def test_summarize_hand_example():
    s = summarize(HAND_OUTCOMES)
    assert s["accuracy"] == round((1 + 0 + 0.5 + 1 / 3 + 1) / 5, 4) == 0.5667
    assert (s["n"], s["ties"], s["missing"]) == (5, 2, 2)
    assert "per_subset" not in s
    assert 0.0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1.0


def test_summarize_nan_counts_as_missing():
    s = summarize([1.0, math.nan, 0.0])
    assert (s["accuracy"], s["n"], s["missing"]) == (0.5, 2, 1)


def test_summarize_per_subset():
    per = summarize(HAND_OUTCOMES, HAND_SUBSETS)["per_subset"]
    assert list(per) == ["a", "b", "(none)"]
    assert (per["a"]["accuracy"], per["a"]["n"], per["a"]["ties"], per["a"]["missing"]) == (0.8333, 3, 1, 0)
    assert (per["b"]["accuracy"], per["b"]["n"], per["b"]["ties"], per["b"]["missing"]) == (0.1667, 2, 1, 0)
    assert per["(none)"] == {"accuracy": None, "n": 0, "ties": 0, "missing": 2, "ci_low": None, "ci_high": None}
    # Each subset is bootstrapped on its own with the same seed.
    alone = summarize([1.0, 0.5, 1.0])
    assert {k: per["a"][k] for k in alone} == alone


def test_summarize_per_subset_only_when_some_subset_is_named():
    assert "per_subset" not in summarize([1.0, 0.0], [None, None])
    assert "per_subset" not in summarize([1.0, 0.0], None)
    with pytest.raises(ValueError, match="subsets"):
        summarize([1.0, 0.0], ["a"])


def test_summarize_empty_and_all_missing():
    for outcomes in ([], [None, None]):
        s = summarize(outcomes)
        assert s["accuracy"] is s["ci_low"] is s["ci_high"] is None
        assert (s["n"], s["missing"]) == (0, len(outcomes))


def test_summarize_all_ones_has_a_point_interval():
    s = summarize([1.0] * 50)
    assert (s["accuracy"], s["ci_low"], s["ci_high"]) == (1.0, 1.0, 1.0)


def _outcomes(n: int, seed: int = 1) -> list[float]:
    return np.random.default_rng(seed).choice([0.0, 1.0, 0.5, 1 / 3], size=n, p=[0.35, 0.6, 0.04, 0.01]).tolist()


def test_summarize_ci_contains_accuracy_and_narrows_with_n():
    widths = []
    for n in (50, 500, 5000):
        s = summarize(_outcomes(n))
        assert 0.0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1.0
        widths.append(s["ci_high"] - s["ci_low"])
    assert widths[0] > widths[1] > widths[2] > 0


def test_summarize_confidence_widens_the_interval():
    outcomes = _outcomes(300)
    narrow, wide = summarize(outcomes, confidence=0.5), summarize(outcomes, confidence=0.99)
    assert wide["ci_low"] < narrow["ci_low"] <= narrow["ci_high"] < wide["ci_high"]


def test_summarize_is_deterministic_per_seed():
    outcomes = _outcomes(200)
    assert summarize(outcomes, seed=7) == summarize(outcomes, seed=7)
    assert summarize(outcomes, seed=7) != summarize(outcomes, seed=8)


def test_bootstrap_matches_literal_index_resampling():
    # The implementation draws multinomial counts per distinct value; resampling item indices with
    # replacement must give the same interval up to Monte-Carlo error.
    outcomes = np.array(_outcomes(1000, seed=3))
    rng = np.random.default_rng(123)
    means = outcomes[rng.integers(0, len(outcomes), size=(20000, len(outcomes)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    s = summarize(outcomes.tolist(), n_boot=20000)
    assert s["ci_low"] == pytest.approx(low, abs=0.003)
    assert s["ci_high"] == pytest.approx(high, abs=0.003)


def test_summarize_bootstrap_is_fast():
    outcomes = _outcomes(10_000)
    start = time.perf_counter()
    summarize(outcomes, n_boot=2000)
    assert time.perf_counter() - start < 1.0


def test_summarize_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        summarize([1.5])
    with pytest.raises(ValueError, match="n_boot"):
        summarize([1.0], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        summarize([1.0], confidence=1.0)


def test_markdown_table_formats_rows():
    table = {
        "flip": {"accuracy": 0.6123, "n": 200, "ties": 3, "missing": 1, "ci_low": 0.55, "ci_high": 0.6712},
        "judge|v2": {"accuracy": None, "n": 0, "ties": 0, "missing": 4, "ci_low": None, "ci_high": None},
    }
    md = markdown_table(table, title="RewardBench-2")
    lines = md.splitlines()
    assert lines[0] == "### RewardBench-2"
    assert "| method | accuracy % [CI] | n | ties | missing |" in lines
    assert "| flip | 61.2 [55.0, 67.1] | 200 | 3 | 1 |" in lines
    assert "| judge\\|v2 | n/a | 0 | 0 | 4 |" in lines
    assert lines.index("| flip | 61.2 [55.0, 67.1] | 200 | 3 | 1 |") < lines.index("| judge\\|v2 | n/a | 0 | 0 | 4 |")
    assert lines[1] == "" and lines[-1].startswith("| judge")  # no subset table without per_subset


def test_markdown_table_subset_table():
    table = {
        "flip": summarize(HAND_OUTCOMES, HAND_SUBSETS),
        "judge": summarize([1.0, 1.0], ["b", "c"]),
        "plain": summarize([0.0]),
    }
    md = markdown_table(table)
    lines = md.splitlines()
    assert lines[0].startswith("| method |")  # no title
    assert lines.count("") == 1
    subset_table = lines[lines.index("") + 1 :]
    assert subset_table[0] == "| method | a | b | (none) | c |"
    assert subset_table[1] == "|---|---:|---:|---:|---:|"
    assert subset_table[2:] == [
        "| flip | 83.3 | 16.7 | n/a | n/a |",
        "| judge | n/a | 100.0 | n/a | 100.0 |",
        "| plain | n/a | n/a | n/a | n/a |",
    ]
    for method in table:
        assert sum(line.startswith(f"| {method} |") for line in lines) == 2
