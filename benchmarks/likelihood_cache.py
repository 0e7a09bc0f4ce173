"""The likelihood reward beside generation: rows/s of `flip`, `flip_logprob` and both, with the
`flip_logprob` prefill reading the prefix cache the generation pass left (after) or not (before),
on one engine and the same rows, and vLLM's own prefix-cache counters.

    .venv/bin/python benchmarks/likelihood_cache.py [--n 48] [--max-tokens 128] [--batch 16]

The engine is the job's (the embedded SmolLM2-135M, float32, CPU), in this process; each pass
scores the rows in batches of `--batch` as the engine stage does (generation, then the likelihood
of the same batch), after the prefix cache is reset. Rows: AlpacaEval outputs from ../shared/data
(responses cut to 2000 characters). Target: the pair costs <= 1.15x `flip` alone.
"""

from __future__ import annotations

import argparse
import os
import time

from overhead import CPU_ENV, corpus_rows  # the same engine environment and rows as the overhead benchmark


def cache_counters(llm) -> tuple[float, float]:
    """(queries, hits) of vLLM's prefix cache, in tokens, from its own metrics."""
    queries = hits = 0.0
    for metric in llm.get_metrics():
        if metric.name == "vllm:prefix_cache_queries":
            queries += metric.value
        elif metric.name == "vllm:prefix_cache_hits":
            hits += metric.value
    return queries, hits


def run(llm, data: list[dict], methods: set[str], reuse: bool, max_tokens: int, batch: int) -> dict:
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.likelihood import FlipLikelihood
    from flip_ray.engine.specs import SamplingSpec

    gen = FlipGenerator(llm, sampling=SamplingSpec(max_tokens=max_tokens))
    lk = FlipLikelihood(llm, reuse_prefix=reuse)
    llm.reset_prefix_cache()
    q0, h0 = cache_counters(llm)
    t0 = time.perf_counter()
    logprobs = []
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        if "flip" in methods:
            gen.generate([r["response"] for r in chunk])
        if "flip_logprob" in methods:
            logprobs += [x.logprob_mean for x in lk.score([r["prompt"] for r in chunk], [r["response"] for r in chunk])]
    elapsed = time.perf_counter() - t0
    q1, h1 = cache_counters(llm)
    return {"rows_per_s": len(data) / elapsed, "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0, "lp": logprobs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    os.environ.update(CPU_ENV)
    from flip_ray.engine.embedded import prepare_default_model
    from flip_ray.engine.specs import EngineSpec

    engine = EngineSpec(str(prepare_default_model()), dtype="float32", max_model_len=4096, enforce_eager=True)
    from vllm import LLM

    llm = LLM(**engine.llm_kwargs(), disable_log_stats=False)
    data = corpus_rows(args.n)
    run(llm, data[: args.batch], {"flip", "flip_logprob"}, True, args.max_tokens, args.batch)  # warm-up
    results = {}
    for name, methods, reuse in (
        ("[flip]", {"flip"}, True),
        ("[flip_logprob]", {"flip_logprob"}, True),
        ("[flip, flip_logprob] before (full prefill)", {"flip", "flip_logprob"}, False),
        ("[flip, flip_logprob] after (prefix cache)", {"flip", "flip_logprob"}, True),
    ):
        r = run(llm, data, methods, reuse, args.max_tokens, args.batch)
        results[name] = r
        print(f"{name:<45} {r['rows_per_s']:6.3f} rows/s   prefix-cache hit rate {r['hit_rate']:.1%}", flush=True)
    flip = results["[flip]"]["rows_per_s"]
    for name in ("[flip, flip_logprob] before (full prefill)", "[flip, flip_logprob] after (prefix cache)"):
        print(f"{name}: costs {flip / results[name]['rows_per_s']:.2f}x [flip] alone")
    before = results["[flip, flip_logprob] before (full prefill)"]["lp"]
    after = results["[flip, flip_logprob] after (prefix cache)"]["lp"]
    gap = max(abs(a - b) for a, b in zip(before, after, strict=True))
    print(f"largest |flip_logprob before - after| over {len(after)} rows: {gap:.2e}")


if __name__ == "__main__":
    main()
