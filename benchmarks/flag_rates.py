"""False-flag rates of the reward-hacking flags on ordinary responses from ../shared/data corpora.

    .venv/bin/python benchmarks/flag_rates.py

These corpora hold real model answers, not hacks, so every flag raised on them is either a false
alarm or a genuine weak spot (a one-word answer, an answer in another language); a few examples of
each are printed to judge which.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter

from datadir import DATA  # benchmarks/datadir.py: $FLIP_RAY_DATA or ../shared/data

from flip_ray.text.flags import compute_flags

FLAGS = ("flag_restates_prompt", "flag_too_short", "flag_language_mismatch")


def main() -> None:
    for name in ("alpacaeval_outputs", "arena_hard_answers"):
        with gzip.open(DATA / name / "data.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        t0 = time.perf_counter()
        counts, examples = Counter(), {}
        for r in rows:
            flags = compute_flags(r["prompt"], r["response"])
            for flag in FLAGS:
                if getattr(flags, flag):
                    counts[flag] += 1
                    examples.setdefault(flag, []).append((r["prompt"][:60], r["response"][:60]))
        rate = len(rows) / (time.perf_counter() - t0)
        print(f"{name}: {len(rows)} rows ({rate:,.0f} rows/s)")
        for flag in FLAGS:
            print(f"  {flag}: {counts[flag]} ({counts[flag] / len(rows):.2%})")
            for prompt, response in examples.get(flag, [])[:2]:
                print(f"      e.g. {prompt!r} -> {response!r}")


if __name__ == "__main__":
    main()
