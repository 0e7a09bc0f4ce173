"""Pipeline overhead: the same FLIP prompts through (a) a bare `vllm.LLM.generate` loop, (b) the full
flip_ray pipeline (Ray Data: read -> engine actor -> CPU similarity -> Parquet) and (c) Ray's own
`ray.data.llm` processor, with the same engine arguments, in one run.

    .venv/bin/python benchmarks/overhead.py [--n 48] [--max-tokens 64] [--methods bare,pipeline,...]

Two more methods split the gap between (a) and (b) (`--methods bare,bare_ray_node,bare_actor,pipeline`):
`bare_ray_node` is (a) with an idle local Ray node running, `bare_actor` is (a) inside one Ray actor.

Each method runs in its own process, on N and on 2N rows. Steady-state throughput is the marginal
rate N / (T(2N) - T(N)), which cancels engine start, actor start and Ray start-up; engine start is
reported separately (time to build the engine in the bare run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datadir import DATA  # benchmarks/datadir.py: $FLIP_RAY_DATA or ../shared/data

REPO = Path(__file__).resolve().parents[1]
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": str(os.cpu_count() or 2),
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


def corpus_rows(n: int) -> list[dict]:
    with gzip.open(DATA / "alpacaeval_outputs" / "data.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    # Every 7th row: a spread of models and lengths; responses cut to 2000 chars as in the sample.
    picked = [r for i, r in enumerate(rows) if i % 7 == 0][:n]
    return [{"id": r["id"], "prompt": r["prompt"], "response": r["response"][:2000]} for r in picked]


def run_bare(rows: list[dict], max_tokens: int) -> dict:
    from flip_ray.engine.embedded import prepare_default_model
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec

    t0 = time.perf_counter()
    llm = EngineSpec(str(prepare_default_model()), **ENGINE).build()
    start = time.perf_counter() - t0
    # The authors' prompt, as the pipeline run below (reward.prompt=flip): the same work on both sides.
    gen = FlipGenerator(llm, PromptSpec("flip"), SamplingSpec(max_tokens=max_tokens))
    from vllm.inputs import TokensPrompt

    # Rendering (chat template + tokenisation) is timed too: a hand-written loop has to do it as well.
    t0 = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=gen.render(r["response"])[0]) for r in rows]
    outs = llm.generate(prompts, gen.params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return {
        "engine_start_s": start,
        "total_s": start + elapsed,
        "gen_s": elapsed,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
    }


def run_bare_ray_node(rows: list[dict], max_tokens: int) -> dict:
    """(a) with a local Ray node running next to it, idle: the background CPU of Ray alone."""
    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    return run_bare(rows, max_tokens)


def run_bare_actor(rows: list[dict], max_tokens: int) -> dict:
    """(a) inside one Ray actor (the process an engine stage runs in), without Ray Data."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": CPU_ENV})(_BareActor).remote()
    result = ray.get(actor.run.remote(rows, max_tokens))
    result["total_s"] = time.perf_counter() - t0
    return result


class _BareActor:
    def run(self, rows: list[dict], max_tokens: int) -> dict:
        return run_bare(rows, max_tokens)


def run_pipeline(rows: list[dict], max_tokens: int) -> dict:
    from flip_ray.config.base import load_config
    from flip_ray.recipe import run_score

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = load_config(
            None,
            [
                f"input.path={src}",
                f"output.path={tmp}/out",
                "input.id_column=id",
                "model.device=cpu",
                "model.dtype=float32",
                "model.enforce_eager=true",
                "model.max_model_len=2048",
                f"sampling.max_tokens={max_tokens}",
                # the same work as (a) and (c): the authors' prompt, one generation per row
                "reward.methods=[flip]",
                "reward.prompt=flip",
                f"resources.batch_size={len(rows)}",
                "output.report=false",
            ],
        )
        t0 = time.perf_counter()
        manifest = run_score(cfg)
        return {"total_s": time.perf_counter() - t0, "output_tokens": manifest["counts"]["output_tokens"]}


def run_ray_data_llm(rows: list[dict], max_tokens: int) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from flip_ray.engine.embedded import prepare_default_model
    from flip_ray.text.prompts import build_flip_messages

    t0 = time.perf_counter()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env={"env_vars": CPU_ENV})
    config = vLLMEngineProcessorConfig(
        model_source=str(prepare_default_model()),
        engine_kwargs=dict(ENGINE),
        batch_size=len(rows),
        concurrency=1,
        placement_group_config={"bundles": [{"CPU": 1}]},
        log_engine_metrics=False,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=build_flip_messages(row["response"], variant="flip"),
            sampling_params=dict(temperature=0.0, max_tokens=max_tokens),
        ),
        postprocess=lambda row: dict(id=row["id"], text=row["generated_text"], n=row["num_generated_tokens"]),
    )
    out = processor(ray.data.from_items(rows)).take_all()
    return {"total_s": time.perf_counter() - t0, "output_tokens": sum(r["n"] for r in out)}


METHODS = {
    "bare": run_bare,
    "bare_ray_node": run_bare_ray_node,
    "bare_actor": run_bare_actor,
    "pipeline": run_pipeline,
    "ray_data_llm": run_ray_data_llm,
}


def child(method: str, n: int, max_tokens: int) -> None:
    result = METHODS[method](corpus_rows(n), max_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def measure(method: str, n: int, max_tokens: int) -> dict:
    env = {**os.environ, **CPU_ENV}
    cmd = [sys.executable, __file__, "--child", method, "--n", str(n), "--max-tokens", str(max_tokens)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{method} n={n} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--child", choices=list(METHODS))
    parser.add_argument("--methods", default="bare,pipeline,ray_data_llm")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.max_tokens)
        return
    results = {}
    for method in args.methods.split(","):
        small, big = measure(method, args.n, args.max_tokens), measure(method, 2 * args.n, args.max_tokens)
        dt = big["total_s"] - small["total_s"]
        results[method] = {
            "rows_per_s": args.n / dt,
            "output_tokens_per_s": (big["output_tokens"] - small["output_tokens"]) / dt,
            "t_n_s": small["total_s"],
            "t_2n_s": big["total_s"],
            "engine_start_s": small.get("engine_start_s"),
        }
        if "gen_s" in small:  # the engine call alone, marginal: no start-up, no rendering outside it
            results[method]["gen_rows_per_s"] = args.n / (big["gen_s"] - small["gen_s"])
        print(method, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[method].items()}))
    if "bare" in results:
        for method in results:
            if method != "bare":
                print(f"{method} / bare (rows/s): {results[method]['rows_per_s'] / results['bare']['rows_per_s']:.3f}")
    if "pipeline" in results and "ray_data_llm" in results:
        ratio = results["pipeline"]["rows_per_s"] / results["ray_data_llm"]["rows_per_s"]
        print(f"pipeline / ray_data_llm (rows/s): {ratio:.3f}")


if __name__ == "__main__":
    main()
