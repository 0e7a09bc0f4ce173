"""CPU similarity stage speed: word-F1 pairs per second on one core, on real text.

    .venv/bin/python benchmarks/similarity.py [--pairs 200000]

Pairs are (FLIP-style inferred instruction, real instruction) made from ../shared/data corpora: the
inferred side is the first 40 words of a real response (what small models mostly produce), the
reference is the real prompt. Prints pairs/s for the bare metric and for the whole per-row work of
the SimilarityStage (parse + F1 + flags), single process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

from datadir import DATA  # benchmarks/datadir.py: $FLIP_RAY_DATA or ../shared/data

from flip_ray.rewards.flip_f1 import score_generations
from flip_ray.text.flags import compute_flags
from flip_ray.text.metrics import f1_score


def load_pairs(limit: int) -> list[tuple[str, str, str]]:
    rows = []
    for name in ("alpacaeval_outputs", "arena_hard_answers"):
        with gzip.open(DATA / name / "data.jsonl.gz", "rt") as f:
            rows += [json.loads(line) for line in f]
    out = []
    while len(out) < limit:
        for r in rows:
            inferred = " ".join(r["response"].split()[:40])
            out.append((inferred, r["prompt"], r["response"]))
            if len(out) >= limit:
                break
    return out


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(*item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200_000)
    args = parser.parse_args()
    pairs = load_pairs(args.pairs)
    mean_words = sum(len(p[0].split()) + len(p[1].split()) for p in pairs) / len(pairs)
    print(f"{len(pairs)} pairs, mean {mean_words:.0f} words per pair (inferred + reference)")
    f1 = rate(lambda a, b, _: f1_score(a, b), pairs)
    print(f"word F1 (flip_ray.text.metrics.f1_score): {f1:,.0f} pairs/s on one core")
    json_answers = [(json.dumps({"REASONING": "r", "INFERRED INSTRUCTION": a}), b, c) for a, b, c in pairs[:50_000]]
    stage = rate(lambda ans, ref, _: score_generations(ref, [ans]), json_answers)
    print(f"parse + F1 (score_generations, JSON answer): {stage:,.0f} rows/s on one core")
    flags = rate(lambda _, ref, resp: compute_flags(ref, resp), pairs[:20_000])
    print(f"flags (compute_flags on full responses): {flags:,.0f} rows/s on one core")


if __name__ == "__main__":
    main()
