"""Copying and echoing of the embedded model on the bundled sample, lever by lever, through the job.

    .venv/bin/python benchmarks/copy_levers.py [--out outputs/copy_levers] [--only base,block_copy4]

Each lever is one `flip-ray score` of flip_ray/samples/alpacaeval_sample.jsonl (24 rows, 4 models) at
the job's defaults plus the lever's overrides, run one after another on the same machine. Printed per
lever, as markdown: rows whose inferred instruction copies the response (`flag_copied_response`),
echoes the prompt's scaffolding or loops (`flag_echoed_template`), either; answers read as raw text;
mean `flip_score` (all rows, and gpt4_1106_preview vs falcon-7b-instruct: the strongest and the
weakest model of the sample); the job's rows/s and pipeline seconds (engine start excluded).

`--recount` reads the outputs of an earlier call instead of scoring again, and measures copying and
echoing with today's `text.copying` (what the job would write now for the same answers).

`cut_opening` is tried on the input itself: each response without its first sentence (a copy of the
sample under the output directory), the rest as the base.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "flip_ray" / "samples" / "alpacaeval_sample.jsonl"
LEVERS = {
    "base": [],
    "block_copy4": ["reward.block_copy=4"],
    "block_copy3": ["reward.block_copy=3"],
    "no_repeat4": ["reward.no_repeat_ngram=4"],
    "no_placeholder": ["reward.prompt=no_placeholder"],
    "own_words": ["reward.prompt=own_words"],
    "max_tokens48": ["sampling.max_tokens=48"],
    "cut_opening": [],
    "own_words+block_copy4+no_repeat4": [
        "reward.prompt=own_words",
        "reward.block_copy=4",
        "reward.no_repeat_ngram=4",
    ],
    "block_copy4+no_repeat4": ["reward.block_copy=4", "reward.no_repeat_ngram=4"],
    "few_shot3": ["reward.few_shot=3"],
    "few_shot3+block_copy4+no_repeat4": ["reward.few_shot=3", "reward.block_copy=4", "reward.no_repeat_ngram=4"],
}
_FIRST_SENTENCE = re.compile(r"^.*?(?:[.!?:](?:\s+|$)|\n+)", re.DOTALL)


def cut_sample(path: Path) -> Path:
    """The sample with each response's first sentence removed (kept whole when it is one sentence)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    for r in rows:
        rest = _FIRST_SENTENCE.sub("", r["response"], count=1).strip()
        r["response"] = rest or r["response"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(name: str, overrides: list[str], out: Path, recount: bool = False) -> dict:
    source = cut_sample(out / "inputs" / "cut_opening.jsonl") if name == "cut_opening" else SAMPLE
    target = out / name
    if not recount:
        score(name, source, target, overrides)
    rows = pq.read_table(target / "data").to_pylist()
    if recount:
        from flip_ray.text.copying import measure_copying

        for r in rows:
            if r.get("flip_score") is not None:
                r.update(measure_copying(r["inferred_instruction"], r["response"])._asdict())
    return summary(name, rows, json.loads((target / "manifest.json").read_text()))


def score(name: str, source: Path, target: Path, overrides: list[str]) -> None:
    cmd = [
        str(ROOT / ".venv" / "bin" / "flip-ray"),
        "score",
        f"input.path={source}",
        f"output.path={target}",
        "output.overwrite=true",
        "output.report=false",
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")


def summary(name: str, rows: list[dict], manifest: dict) -> dict:
    scored = [r for r in rows if r.get("flip_score") is not None]

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    def model_mean(model):
        return mean(r["flip_score"] for r in scored if r.get("model") == model)

    return {
        "lever": name,
        "copied": sum(bool(r["flag_copied_response"]) for r in scored),
        "echoed": sum(bool(r["flag_echoed_template"]) for r in scored),
        "either": sum(bool(r["flag_copied_response"] or r["flag_echoed_template"]) for r in scored),
        "raw_text": sum(r["parse_status"] == "raw_text" for r in scored),
        "rows": len(rows),
        "flip": mean(r["flip_score"] for r in scored),
        "gpt4": model_mean("gpt4_1106_preview"),
        "falcon": model_mean("falcon-7b-instruct"),
        "rows_per_s": manifest["timings"]["rows_per_s"],
        "pipeline_s": manifest["timings"]["pipeline_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/copy_levers")
    parser.add_argument("--only", default=None, help="comma-separated lever names")
    parser.add_argument("--recount", action="store_true", help="measure the outputs of an earlier call again")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    names = args.only.split(",") if args.only else list(LEVERS)
    results = []
    print("| lever | copied | echoed | either | raw_text | mean flip_score | gpt4 | falcon | rows/s | pipeline s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        r = run(name, LEVERS[name], out, args.recount)
        results.append(r)
        print(
            f"| {name} | {r['copied']}/{r['rows']} | {r['echoed']}/{r['rows']} | {r['either']}/{r['rows']} | "
            f"{r['raw_text']} | {r['flip']:.4f} | {r['gpt4']:.4f} | {r['falcon']:.4f} | {r['rows_per_s']} | "
            f"{r['pipeline_s']} |",
            flush=True,
        )
    (out / ("recount.json" if args.recount else "results.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
