"""The arithmetic of evaluating reward methods on preference data.

A preference item has one chosen response and one or more rejected responses (RewardBench-2 keeps
three rejected: best-of-4). A method is correct on an item only if the chosen response beats every
rejected one. Methods that score responses go through `pair_outcome`; methods that pick a response
directly (pairwise or listwise judges) go through `outcome_from_pick`. Either way an item's outcome is
a float in [0, 1], where a tie at the top counts as the expected accuracy of breaking it at random,
or None when the method has no result for that item.

    outcomes = [pair_outcome(s["chosen"], s["rejected"]) for s in scored_items]
    table = {"flip": summarize(outcomes, subsets), "judge": summarize(judge_outcomes, subsets)}
    print(markdown_table(table, title="RewardBench-2"))

`summarize` adds a percentile-bootstrap confidence interval over items; see `_bootstrap_ci` for how it
stays fast (2000 resamples of 10k items take about a millisecond).
"""

from __future__ import annotations

import math

import numpy as np

NONE_SUBSET = "(none)"


def _missing(x: float | None) -> bool:
    return x is None or math.isnan(x)


def pair_outcome(chosen: float | None, rejected: list[float | None]) -> float | None:
    """Outcome of one item from per-response scores (higher is better).

    Args:
        chosen: score of the chosen response.
        rejected: scores of the rejected responses (one for a plain pair, three for best-of-4).

    Returns:
        1.0 if chosen beats every rejected score; 0.0 if some rejected score is higher; on a tie at
        the top with m rejected scores equal to chosen, 1 / (1 + m), the expected accuracy of breaking
        the tie at random (0.5 for a plain pair). None if any score is None or NaN.

    Raises:
        ValueError: if `rejected` is empty.
    """
    if not rejected:
        raise ValueError("pair_outcome needs at least one rejected score")
    if _missing(chosen) or any(_missing(r) for r in rejected):
        return None
    if any(r > chosen for r in rejected):
        return 0.0
    return 1.0 / (1 + sum(r == chosen for r in rejected))


def outcome_from_pick(pick: int | None, n_candidates: int) -> float | None:
    """Outcome of one item for a method that picks a response directly.

    Args:
        pick: index of the picked candidate, with the chosen response at index 0; None when the method
            declined to pick (a tie among all candidates).
        n_candidates: number of candidates shown, chosen included.

    Returns:
        1.0 for pick 0, 0.0 for any other valid index, 1 / n_candidates for None.

    Raises:
        ValueError: if n_candidates < 2 or pick is outside [0, n_candidates).
    """
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be at least 2 (chosen plus one rejected), got {n_candidates}")
    if pick is None:
        return 1.0 / n_candidates
    # Negative picks are refused rather than read as Python's index-from-the-end.
    if not 0 <= pick < n_candidates:
        raise ValueError(f"pick {pick} is out of range for {n_candidates} candidates")
    return 1.0 if pick == 0 else 0.0


def pick_from_scores(scores: list[float | None]) -> int | None:
    """Index of the unique highest score; None on a tie at the top, an empty list or any missing score."""
    if not scores or any(_missing(s) for s in scores):
        return None
    top = max(scores)
    if sum(s == top for s in scores) > 1:
        return None
    return scores.index(top)


def agreement(picks_a: list[int | None], picks_b: list[int | None]) -> tuple[float | None, int]:
    """How often two methods pick the same response.

    Args:
        picks_a: one pick per item for method A (None: no pick).
        picks_b: the same items, in the same order, for method B.

    Returns:
        (fraction of equal picks, number of items where both picks are not None); (None, 0) when no
        item has both.

    Raises:
        ValueError: if the two lists differ in length.
    """
    if len(picks_a) != len(picks_b):
        raise ValueError(f"picks differ in length: {len(picks_a)} vs {len(picks_b)}")
    both = [(a, b) for a, b in zip(picks_a, picks_b, strict=True) if a is not None and b is not None]
    if not both:
        return None, 0
    return sum(a == b for a, b in both) / len(both), len(both)


def _bootstrap_ci(values: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float]:
    # Resampling n items with replacement draws a multinomial(n, 1/n each) count per item, and the
    # resampled mean depends only on how many draws landed on each distinct value. Drawing those counts
    # from multinomial(n, value frequencies) is therefore the same bootstrap distribution, and costs
    # O(n_boot x distinct values) instead of O(n_boot x n): outcomes take only a handful of values
    # (0, 1 and the tie fractions). tests/test_evalstats.py checks it against literal index resampling.
    rng = np.random.Generator(np.random.PCG64(seed))
    distinct, counts = np.unique(values, return_counts=True)
    n = len(values)
    draws = rng.multinomial(n, counts / n, size=n_boot)
    means = draws @ distinct / n
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _stats(outcomes: list[float | None], n_boot: int, confidence: float, seed: int) -> dict:
    present = np.array([o for o in outcomes if not _missing(o)], dtype=float)
    if ((present < 0) | (present > 1)).any():
        raise ValueError("outcomes must lie in [0, 1] (or be None for a missing item)")
    n = len(present)
    out = {
        "accuracy": None,
        "n": n,
        "ties": int(((present > 0) & (present < 1)).sum()),
        "missing": len(outcomes) - n,
        "ci_low": None,
        "ci_high": None,
    }
    if n:
        low, high = _bootstrap_ci(present, n_boot, confidence, seed)
        out.update(accuracy=round(float(present.mean()), 4), ci_low=round(low, 4), ci_high=round(high, 4))
    return out


def summarize(
    outcomes: list[float | None],
    subsets: list[str | None] | None = None,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Accuracy of one method over items, with a percentile-bootstrap confidence interval.

    Args:
        outcomes: one outcome per item, from `pair_outcome` or `outcome_from_pick`; None (or NaN) marks
            an item the method has no result for.
        subsets: the subset of each item (e.g. RewardBench-2's Factuality, Math, ...), or None.
        n_boot: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the numpy PCG64 generator; every subset is resampled with the same seed.

    Returns:
        {"accuracy", "n", "ties", "missing", "ci_low", "ci_high", "per_subset"}: accuracy is the mean
        of the present outcomes (a tie counts fractionally), n the number present, ties the number
        strictly between 0 and 1, missing the number of None. accuracy and the CI are None when n is 0,
        and floats are rounded to 4 decimals. per_subset maps each subset name (sorted; a None subset
        is "(none)", last) to the same statistics, and is present only when subsets has a non-None
        entry.

    Raises:
        ValueError: on subsets of another length, an outcome outside [0, 1], n_boot < 1 or confidence
            outside (0, 1).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if subsets is not None and len(subsets) != len(outcomes):
        raise ValueError(f"{len(subsets)} subsets for {len(outcomes)} outcomes")
    summary = _stats(outcomes, n_boot, confidence, seed)
    if subsets is not None and any(s is not None for s in subsets):
        groups: dict[str, list[float | None]] = {}
        for outcome, subset in zip(outcomes, subsets, strict=True):
            groups.setdefault(NONE_SUBSET if subset is None else subset, []).append(outcome)
        names = sorted(groups, key=lambda s: (s == NONE_SUBSET, s))
        summary["per_subset"] = {s: _stats(groups[s], n_boot, confidence, seed) for s in names}
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(summary: dict[str, dict], *, title: str | None = None) -> str:
    """Markdown tables of `summarize` results, one row per method in dict order.

    Args:
        summary: method name -> the dict `summarize` returned for it.
        title: written as a `###` heading above the tables.

    Returns:
        A table method | accuracy % [CI] (as "61.2 [55.0, 67.1]") | n | ties | missing; then, if any
        method has per_subset, a table of accuracy % per method and subset (subsets in order of first
        appearance, "n/a" where a method has no result); then, if any method has `flags` (a reward's
        own flags, `run.flag_rates`), the share of its answers each flag marks, overall and per subset.
    """
    lines = [f"### {title}", ""] if title else []
    lines += ["| method | accuracy % [CI] | n | ties | missing |", "|---|---:|---:|---:|---:|"]
    for method, s in summary.items():
        acc = _pct(s["accuracy"])
        if s["accuracy"] is not None:
            acc += f" [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]"
        lines.append(f"| {_cell(method)} | {acc} | {s['n']} | {s['ties']} | {s['missing']} |")

    subsets: dict[str, None] = {}  # ordered set
    for s in summary.values():
        subsets.update(dict.fromkeys(s.get("per_subset", {})))
    if subsets:
        lines += ["", "| method | " + " | ".join(_cell(name) for name in subsets) + " |"]
        lines.append("|---|" + "---:|" * len(subsets))
        for method, s in summary.items():
            per = s.get("per_subset", {})
            cells = [_pct(per[name]["accuracy"]) if name in per else "n/a" for name in subsets]
            lines.append(f"| {_cell(method)} | " + " | ".join(cells) + " |")

    flagged = [(method, flag, rates) for method, s in summary.items() for flag, rates in (s.get("flags") or {}).items()]
    if flagged:
        names = list(subsets) or list(dict.fromkeys(k for _, _, r in flagged for k in r["per_subset"]))
        lines += ["", "| method | answers flagged % | all | " + " | ".join(_cell(n) for n in names) + " |"]
        lines.append("|---|---|---:|" + "---:|" * len(names))
        for method, flag, rates in flagged:
            per = rates["per_subset"]
            cells = [_pct(rates["rate"])] + [_pct(per[n]) if n in per else "n/a" for n in names]
            lines.append(f"| {_cell(method)} | {flag.removeprefix('flag_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
