"""From engine answers to a FLIP reward: parse each sampled answer, F1 it against the real
instruction, aggregate over samples. Shared by the similarity stage and the in-process scorer."""

from __future__ import annotations

from typing import NamedTuple

from flip_ray.metrics import f1_from_counts, token_counts
from flip_ray.parsing import parse_inferred_instruction


class FlipScore(NamedTuple):
    inferred_instruction: str
    reasoning: str | None
    flip_score: float
    flip_precision: float
    flip_recall: float
    parse_status: str


def score_generations(instruction: str, generations: list[str], aggregate: str = "mean") -> FlipScore:
    """Scores one row from its sampled answers.

    Args:
        instruction: The real instruction.
        generations: Raw answers to the FLIP prompt (one per sample, at least one).
        aggregate: `mean` averages F1/precision/recall over samples; `max` keeps the best sample.

    Returns:
        The reward and, for reporting, the best sample's instruction, reasoning and parse status.
    """
    if not generations:
        raise ValueError("score_generations needs at least one generation")
    ref = token_counts(instruction)
    parsed = [parse_inferred_instruction(g) for g in generations]
    scores = [f1_from_counts(*token_counts(p.instruction), *ref) for p in parsed]
    best = max(range(len(scores)), key=lambda k: (scores[k].f1, -k))
    if aggregate == "max" or len(scores) == 1:
        f1, precision, recall = scores[best]
    elif aggregate == "mean":
        n = len(scores)
        f1 = sum(s.f1 for s in scores) / n
        precision = sum(s.precision for s in scores) / n
        recall = sum(s.recall for s in scores) / n
    else:
        raise ValueError(f"unknown aggregate {aggregate!r}; expected mean or max")
    p = parsed[best]
    return FlipScore(p.instruction, p.reasoning, f1, precision, recall, p.status)


def score_batch(
    instructions: list[str],
    generations: list[list[str]],
    aggregate: str = "mean",
    similarity: str = "f1",
    embedder=None,
) -> list[FlipScore]:
    """`score_generations` for many rows, with `flip_score` measured by `similarity`.

    Precision and recall stay the word-level ones whatever the metric. With `embedding`, every
    (inferred, real) pair of the batch goes through `embedder` (a `similarity.EmbeddingSimilarity`)
    in one call.
    """
    base = [score_generations(q, g, aggregate) for q, g in zip(instructions, generations, strict=True)]
    if similarity == "f1":
        return base
    parsed = [[parse_inferred_instruction(x).instruction for x in g] for g in generations]
    if similarity == "embedding":
        if embedder is None:
            raise ValueError("similarity 'embedding' needs an embedder")
        flat_pred = [p for ps in parsed for p in ps]
        flat_ref = [q for q, ps in zip(instructions, parsed, strict=True) for _ in ps]
        flat = iter(embedder(flat_pred, flat_ref))
        values = [[next(flat) for _ in ps] for ps in parsed]
    else:
        from flip_ray.similarity import pairwise_metric

        metric = pairwise_metric(similarity)
        values = [[metric(p, q) for p in ps] for q, ps in zip(instructions, parsed, strict=True)]
    out = []
    for s, v in zip(base, values, strict=True):
        score = max(v) if aggregate == "max" else sum(v) / len(v)
        out.append(s._replace(flip_score=float(score)))
    return out
