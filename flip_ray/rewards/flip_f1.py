"""From engine answers to a FLIP reward: parse each sampled answer, F1 it against the real
instruction, aggregate over samples. Shared by the similarity stage and the in-process scorer."""

from __future__ import annotations

from typing import NamedTuple

from flip_ray.text.metrics import f1_from_counts, token_counts
from flip_ray.text.parsing import ParsedAnswer, parse_inferred_instruction
from flip_ray.text.similarity import pairwise_metric


class FlipScore(NamedTuple):
    inferred_instruction: str
    reasoning: str | None
    flip_score: float
    flip_precision: float
    flip_recall: float
    parse_status: str


def _combine(f1s: list, values: list[float], aggregate: str) -> tuple[int, float, float, float]:
    """(best sample, score, precision, recall) of one row: the best sample by `values` (the first on
    ties); the score is its value (`max`) or the mean value (`mean`), and precision/recall follow."""
    best = max(range(len(values)), key=lambda k: (values[k], -k))
    if aggregate == "max" or len(values) == 1:
        return best, values[best], f1s[best].precision, f1s[best].recall
    if aggregate == "mean":
        n = len(values)
        return best, sum(values) / n, sum(f.precision for f in f1s) / n, sum(f.recall for f in f1s) / n
    raise ValueError(f"unknown aggregate {aggregate!r}; expected mean or max")


def score_generations(instruction: str, generations: list[str], aggregate: str = "mean") -> FlipScore:
    """Scores one row from its sampled answers (word-level F1).

    Args:
        instruction: The real instruction.
        generations: Raw answers to the FLIP prompt (one per sample, at least one).
        aggregate: `mean` averages over samples; `max` keeps the best sample.

    Returns:
        The reward and, for reporting, the best sample's instruction, reasoning and parse status.
    """
    return score_parsed(instruction, [parse_inferred_instruction(g) for g in generations], aggregate)


def score_parsed(
    instruction: str, parsed: list[ParsedAnswer], aggregate: str = "mean", values: list[float] | None = None
) -> FlipScore:
    """`score_generations` on answers already parsed; `values` are the samples' similarity to the
    real instruction when the metric is not F1 (None: F1). Precision and recall are word-level."""
    if not parsed:
        raise ValueError("scoring needs at least one generation")
    ref = token_counts(instruction)
    f1s = [f1_from_counts(*token_counts(p.instruction), *ref) for p in parsed]
    best, score, precision, recall = _combine(f1s, [f.f1 for f in f1s] if values is None else values, aggregate)
    p = parsed[best]
    return FlipScore(p.instruction, p.reasoning, float(score), precision, recall, p.status)


def score_batch(
    instructions: list[str],
    generations: list[list[str]],
    aggregate: str = "mean",
    similarity: str = "f1",
    embedder=None,
) -> list[FlipScore]:
    """`score_generations` for many rows, with `flip_score` measured by `similarity`.

    Each answer is parsed once. Precision and recall stay the word-level ones whatever the metric;
    the best sample (the reported instruction, and the `max` score) is the best by the metric. With
    `embedding`, every (inferred, real) pair of the batch goes through `embedder` (a
    `similarity.EmbeddingSimilarity`) in one call.
    """
    parsed = [[parse_inferred_instruction(x) for x in g] for g in generations]
    if similarity == "f1":
        return [score_parsed(q, ps, aggregate) for q, ps in zip(instructions, parsed, strict=True)]
    texts = [[p.instruction for p in ps] for ps in parsed]
    if similarity == "embedding":
        if embedder is None:
            raise ValueError("similarity 'embedding' needs an embedder")
        flat_pred = [t for ts in texts for t in ts]
        flat_ref = [q for q, ts in zip(instructions, texts, strict=True) for _ in ts]
        flat = iter(embedder(flat_pred, flat_ref))
        values = [[float(next(flat)) for _ in ts] for ts in texts]
    else:
        metric = pairwise_metric(similarity)
        values = [[metric(t, q) for t in ts] for q, ts in zip(instructions, texts, strict=True)]
    return [score_parsed(q, ps, aggregate, v) for q, ps, v in zip(instructions, parsed, values, strict=True)]
