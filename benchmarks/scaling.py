"""Scaling on this machine: the CPU similarity stage with 1 and 2 actors (engine replaced by the
stand-in), and the whole job with 1 and 2 real engine actors.

    .venv/bin/python benchmarks/scaling.py [--cpu-rows 200000] [--engine-rows 24]

Each configuration runs in a fresh process with its own local Ray. CPU stage: rows/s over the whole
run (read + stand-in + similarity + write). Engine: marginal rows/s, N / (T(2N) - T(N)), which
cancels start-up. On a 2-core machine two engine actors share the same cores, so expect little or
no gain there; on a cluster each actor gets its own GPU.
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

HERE = Path(__file__).resolve().parent


def write_input(path: Path, rows: int, cut: int) -> None:
    with gzip.open(DATA / "alpacaeval_outputs" / "data.jsonl.gz", "rt") as f:
        base = [json.loads(line) for line in f]
    with open(path, "w") as f:
        for i in range(rows):
            r = base[(i * 7) % len(base)]
            f.write(json.dumps({"id": f"r{i}", "prompt": r["prompt"], "response": r["response"][:cut]}) + "\n")


def child(mode: str, input_path: str, output: str, actors: int) -> None:
    if mode == "cpu":
        sys.path.insert(0, str(HERE))
        import standin

        standin.install()
    from flip_ray.config.base import load_config
    from flip_ray.recipe import run_score

    overrides = [
        f"input.path={input_path}",
        f"output.path={output}",
        "input.id_column=id",
        "input.check_duplicate_ids=false",
        "model.device=cpu",
        "model.dtype=float32",
        "model.enforce_eager=true",
        "model.max_model_len=2048",
        "sampling.max_tokens=64",
        "output.report=false",
        "dedup.enabled=false",
    ]
    if mode == "cpu":
        overrides += [f"resources.similarity_concurrency={actors}", "resources.batch_size=4096"]
    else:
        overrides += [f"resources.concurrency={actors}", "resources.batch_size=8", "model.cpu_threads=1"]
    t0 = time.perf_counter()
    manifest = run_score(load_config(None, overrides))
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "rows": manifest["counts"]["rows"]}))


def run(mode: str, rows: int, actors: int, cut: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        write_input(src, rows, cut)
        cmd = [sys.executable, __file__, "--child", mode, str(src), f"{tmp}/out", str(actors)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
        return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-rows", type=int, default=200_000)
    parser.add_argument("--engine-rows", type=int, default=24)
    parser.add_argument("--child", nargs=4)
    parser.add_argument("--parts", default="cpu,engine")
    args = parser.parse_args()
    if args.child:
        mode, src, out, actors = args.child
        child(mode, src, out, int(actors))
        return
    if "cpu" in args.parts:
        for actors in (1, 2):
            r = run("cpu", args.cpu_rows, actors, cut=600)
            print(
                f"CPU stage, {actors} similarity actor(s): {r['rows'] / r['seconds']:,.0f} rows/s "
                f"({r['rows']:,} rows in {r['seconds']:.1f} s)",
                flush=True,
            )
    if "engine" in args.parts:
        n = args.engine_rows
        for actors in (1, 2):
            small, big = run("engine", n, actors, cut=1500), run("engine", 2 * n, actors, cut=1500)
            rate = n / (big["seconds"] - small["seconds"])
            print(
                f"whole job, {actors} engine actor(s): {rate:.2f} rows/s marginal "
                f"(T({n})={small['seconds']:.1f} s, T({2 * n})={big['seconds']:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
