"""Keeping the engine full, measured where users meet it: `flip-ray score` runs side by side on the
same rows and engine settings, each in a fresh process.

    .venv/bin/python benchmarks/engine_queue.py [--rows 128] [--batch-size 16] [--max-tokens 64] \
        [--before /tmp/flip_ray_before] [--runs before,sync,inflight,inflight_flip,before_flip,bare]
    # at the job's defaults (64-row blocks, 256 tokens, [flip, flip_logprob]), 8 blocks:
    .venv/bin/python benchmarks/engine_queue.py --rows 512 --batch-size 64 --max-tokens 256 \
        --before /tmp/before --runs bare,before,default,default_flip,before_flip,inflight

Runs (rows/s over the pipeline, engine start included, from each run's manifest):

- `before`: the code before the engine queue (a checkout given by `--before`, e.g. a git worktree
  of the commit before it), one synchronous `LLM.generate` per reward per block;
- `sync`: today's code with `resources.max_concurrent_batches=1` (one block at a time, its rewards
  together in the engine queue);
- `inflight`: today's code with `resources.max_concurrent_batches=8` (the default on GPU);
- `default`: today's defaults (`max_concurrent_batches: auto`: 1 on CPU, 8 on GPU);
- `inflight_flip`, `default_flip`, `before_flip`: the same with `reward.methods=[flip]` (the cost of
  flip_logprob);
- `bare`: the practical limit, no Ray: the same FLIP generations in one `LLM.generate` call, then
  the same likelihood requests in one call, on one engine in this process's child; its rows/s
  counts the engine start, as a run's pipeline time does (and is printed without it too);
- `bare_sync`: the design before the engine queue without Ray: per block, one `LLM.generate` for
  its generations, then one for its likelihoods (its occupancy is what `before` cannot report).

Each run of today's code also prints its engine occupancy from the manifest (vLLM's scheduler
statistics: running requests per step, time-weighted, and the most; preemptions; idle share).

Input: AlpacaEval outputs of many models (../shared/data), responses cut to `--cut` characters, so
lengths vary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scaling import write_input  # the same AlpacaEval rows, cut to a length

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def score(code: Path, input_path: Path, out: Path, overrides: list[str]) -> dict:
    """One `flip-ray score` run of the code at `code`; its manifest's timings and counts."""
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "flip_ray.cli", "score", f"input.path={input_path}", f"output.path={out}", *overrides]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "wall_s": wall,
        **manifest["timings"],
        "output_tokens": manifest["counts"]["output_tokens"],
        "occupancy": manifest.get("engine_occupancy"),
    }


BARE = r"""
import json, sys, time
from vllm.inputs import TokensPrompt
from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec
from flip_ray.engine.generation import FlipGenerator
from flip_ray.engine.likelihood import FlipLikelihood
from flip_ray.engine.embedded import prepare_default_model
from flip_ray.engine.queue import Occupancy, SchedulerTap
from flip_ray.job.occupancy import summarize

rows = [json.loads(l) for l in open(sys.argv[1])]
max_tokens, block = int(sys.argv[2]), int(sys.argv[3])  # block 0: one call for all rows
started = time.time()
llm = EngineSpec(str(prepare_default_model()), dtype="float32", max_model_len=4096, enforce_eager=True).build()
gen = FlipGenerator(llm, PromptSpec(), SamplingSpec(max_tokens=max_tokens))
lk = FlipLikelihood(llm, PromptSpec())

# vLLM's scheduler statistics per step, as the engine queue reads them, around LLM.generate's steps.
engine, occ = llm.llm_engine, Occupancy()
tap, step = SchedulerTap.install(engine), engine.step
def timed_step():
    n = engine.get_num_unfinished_requests()
    t = time.monotonic()
    out = step()
    occ.count_step(n, time.monotonic() - t, tap)
    return out
engine.step = timed_step

t0 = time.time()
tokens = 0
for k in range(0, len(rows), block or len(rows)):
    part = rows[k : k + (block or len(rows))]
    prompts = [TokensPrompt(prompt_token_ids=gen.render(r["response"])[0]) for r in part]
    outs = llm.generate(prompts, gen.params.clone(), use_tqdm=False)
    tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    likelihood_prompts = []
    for r in part:
        ids, target, _ = lk._render(r["prompt"], r["response"], None)
        likelihood_prompts.append(TokensPrompt(prompt_token_ids=ids + target))
    llm.generate(likelihood_prompts, lk.params.clone(), use_tqdm=False)
wall = time.time() - t0
with_start = time.time() - started
print(json.dumps({
    "pipeline_s": with_start, "rows_per_s": len(rows) / with_start, "output_tokens": tokens,
    "calls_s": wall, "calls_rows_per_s": len(rows) / wall, "occupancy": summarize({"bare": occ.counts()}),
}))
"""


def bare(code: Path, input_path: Path, max_tokens: int, block: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1"})
    t0 = time.time()
    cmd = [sys.executable, "-c", BARE, str(input_path), str(max_tokens), str(block)]
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bare run exited {done.returncode}:\n{done.stderr[-3000:]}")
    return {"wall_s": time.time() - t0, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cut", type=int, default=2000, help="responses cut to this many characters")
    ap.add_argument("--before", type=Path, default=None, help="a checkout of the code before the engine queue")
    ap.add_argument("--runs", default="before,sync,inflight,inflight_flip,before_flip,bare")
    args = ap.parse_args()
    runs = args.runs.split(",")
    if any(r.startswith("before") for r in runs) and args.before is None:
        ap.error("the `before` runs need --before (a checkout of the code before the engine queue)")
    work = Path(tempfile.mkdtemp(prefix="frq-"))
    input_path = work / "rows.jsonl"
    write_input(input_path, args.rows, args.cut)
    common = [
        "input.id_column=id",
        f"resources.batch_size={args.batch_size}",
        f"sampling.max_tokens={args.max_tokens}",
        "model.device=cpu",
    ]
    plans = {
        "before": (args.before, []),
        "before_flip": (args.before, ["reward.methods=[flip]"]),
        "sync": (REPO, ["resources.max_concurrent_batches=1"]),
        "inflight": (REPO, ["resources.max_concurrent_batches=8"]),
        "inflight_flip": (REPO, ["resources.max_concurrent_batches=8", "reward.methods=[flip]"]),
        "default": (REPO, []),
        "default_flip": (REPO, ["reward.methods=[flip]"]),
    }
    results = {}
    record = work / "results.json"
    print(f"input {input_path}; results in {record}", flush=True)
    for name in runs:
        if name == "bare":
            results[name] = bare(REPO, input_path, args.max_tokens)
        elif name == "bare_sync":
            results[name] = bare(REPO, input_path, args.max_tokens, block=args.batch_size)
        else:
            code, extra = plans[name]
            results[name] = score(code, input_path, work / name, [*common, *extra])
        r = results[name]
        record.write_text(json.dumps(results, indent=1))
        print(
            f"{name:14s} pipeline {r['pipeline_s']:7.1f} s  {r['rows_per_s']:.3f} rows/s  "
            f"{r['output_tokens']} output tokens  (process {r['wall_s']:.0f} s)",
            flush=True,
        )
        if "calls_s" in r:
            print(f"{'':14s} without the engine start: {r['calls_s']:.1f} s, {r['calls_rows_per_s']:.3f} rows/s")
        if r.get("occupancy"):
            o = r["occupancy"]
            print(
                f"{'':14s} engine: {o.get('mean_running_requests')} running per step (most "
                f"{o.get('max_running_requests')}), {o.get('mean_requests_in_engine')} in the engine, "
                f"{o.get('preempted_requests')} preempted, idle {o.get('idle_fraction')}",
                flush=True,
            )
    print(f"\n{args.rows} rows, blocks of {args.batch_size}, max_tokens {args.max_tokens}, responses cut at {args.cut}")
    pairs = [("inflight", "before"), ("inflight", "sync"), ("inflight", "bare"), ("sync", "before")]
    pairs += [("default", "bare"), ("before", "bare"), ("default", "before"), ("inflight", "default")]
    for a, b in pairs:
        if a in results and b in results:
            print(f"rows/s {a} / {b}: {results[a]['rows_per_s'] / results[b]['rows_per_s']:.3f}")
    for both, one in [("inflight", "inflight_flip"), ("default", "default_flip"), ("before", "before_flip")]:
        if both in results and one in results:
            ratio = results[both]["pipeline_s"] / results[one]["pipeline_s"]
            print(f"pipeline time [flip, flip_logprob] / [flip], {both}: {ratio:.3f}")


if __name__ == "__main__":
    main()
