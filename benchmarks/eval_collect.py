"""Tables for docs/EVAL.md from the runs of benchmarks/eval_table.sh.

    python benchmarks/eval_collect.py [OUT=outputs/eval_table] [--resummarize]

Prints, as markdown:
1. the main run: methods x sets accuracy % [95% CI], the aggregate over the human-labelled sets
   (pooled over pairs, and the mean of the per-set accuracies), agreement with the length rules,
   and rows/s of each engine method;
2. the levers: each lever run against the lever baseline on the same pairs;
3. the similarity-metric lever, recomputed from the baseline's stored inferred instructions
   (greedy decoding: the generations are the same whatever the metric);
4. the likelihood variants (runs variants_*): accuracy per set and pooled, the
   agreement with the length and overlap rules, and each method's paired difference from the
   trivial baselines with a 95% paired-bootstrap interval over items, and the accuracy on the items
   where prompt overlap picks the wrong response (the restating hack) and where it picks the right one;
5. copying and echoing (runs copy_*): flip with and without copy-blocking decoding, its copy and echo
   rates, and its paired difference from the run without blocking.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HUMAN = ("mtbench_human", "llmeval2_human", "pandalm_test", "faireval_human", "ifeval_pairs", "hh_rlhf_harmless_test")


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def cell(s: dict | None) -> str:
    if not s or s.get("accuracy") is None:
        return "n/a"
    return f"{pct(s['accuracy'])} [{pct(s['ci_low'])}, {pct(s['ci_high'])}]"


def human_aggregate(s: dict) -> tuple[float | None, float | None, int]:
    """(pooled accuracy, mean of per-set accuracies, n) over the human-labelled sets."""
    subs = [s["per_subset"][k] for k in HUMAN if k in s.get("per_subset", {}) and s["per_subset"][k]["n"]]
    if not subs:
        return None, None, 0
    n = sum(x["n"] for x in subs)
    pooled = sum(x["accuracy"] * x["n"] for x in subs) / n
    macro = sum(x["accuracy"] for x in subs) / len(subs)
    return pooled, macro, n


def main_table(summary: dict) -> str:
    sets = [k for k in (*HUMAN, "alpacaeval2_gpt4turbo_pairs") if any(k in s["per_subset"] for s in summary.values())]
    head = (
        "| method | "
        + " | ".join(sets)
        + " | human pooled | human mean | agree longer | agree shorter | agree n | rows/s |"
    )
    lines = [head, "|---|" + "---:|" * (len(sets) + 6)]
    for method, s in summary.items():
        pooled, macro, _ = human_aggregate(s)
        row = [cell(s["per_subset"].get(k)) for k in sets]
        lines.append(
            f"| {method} | " + " | ".join(row) + f" | {pct(pooled)} | {pct(macro)} | {pct(s.get('agree_longer'))} | "
            f"{pct(s.get('agree_shorter'))} | {s.get('agree_n', '')} | {s.get('rows_per_s', '')} |"
        )
    return "\n".join(lines)


def metric_lever(run: Path) -> str:
    """flip accuracy per similarity metric, from the run's stored inferred instructions."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from flip_ray.evaluation.stats import pair_outcome, summarize
    from flip_ray.text.similarity import EmbeddingSimilarity, pairwise_metric

    source = run / "responses" if (run / "responses").is_dir() else run / "responses.parquet"
    responses = pq.read_table(source).to_pylist()
    instruction = {r["id"]: r["messages"][-2]["content"] for r in responses}
    scored = pads.dataset(str(run / "scores" / "flip" / "data"), format="parquet").to_table(
        columns=["id", "inferred_instruction", "error"]
    )
    inferred = {
        i: (x if e is None else None)
        for i, x, e in zip(
            *(scored.column(c).to_pylist() for c in ("id", "inferred_instruction", "error")), strict=True
        )
    }
    pairs: dict[str, list[str]] = {}
    subset: dict[str, str] = {}
    for r in responses:
        pairs.setdefault(r["pair_id"], []).append(r["id"])
        subset[r["pair_id"]] = r["subset"]
    ids = [i for i in instruction if inferred.get(i) is not None]
    lines = ["| metric | " + " | ".join(HUMAN) + " | human pooled | human mean |", "|---|" + "---:|" * (len(HUMAN) + 2)]
    embedder = EmbeddingSimilarity()
    for metric in ("f1", "rouge_l", "bleu", "embedding"):
        if metric == "embedding":
            values = dict(zip(ids, embedder([inferred[i] for i in ids], [instruction[i] for i in ids]), strict=True))
        else:
            fn = pairwise_metric(metric)
            values = {i: fn(inferred[i], instruction[i]) for i in ids}
        keys = sorted(pairs)
        outcomes = [pair_outcome(values.get(pairs[k][0]), [values.get(x) for x in pairs[k][1:]]) for k in keys]
        s = summarize(outcomes, [subset[k] for k in keys], n_boot=1000)
        pooled, macro, _ = human_aggregate(s)
        lines.append(
            f"| {metric} | "
            + " | ".join(cell(s["per_subset"].get(k)) for k in HUMAN)
            + f" | {pct(pooled)} | {pct(macro)} |"
        )
    return "\n".join(lines)


def lever_table(out: Path) -> str:
    runs = sorted(p.parent for p in out.glob("lever_*/summary.json") if p.parent.name not in SMALL_RUNS)
    lines = [
        "| run | method | human pooled [CI] | human mean | ties | agree longer | rows/s | parse_status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        for method, s in summary.items():
            if method in ("longer", "shorter", "prompt_overlap") and run.name != "lever_base":
                continue
            pooled, macro, _ = human_aggregate(s)
            agree = pct(s.get("agree_longer"))
            lines.append(
                f"| {run.name} | {method} | {cell(s)} | {pct(macro)} | {s['ties']} | {agree} | "
                f"{s.get('rows_per_s', '')} | {json.dumps(s.get('parse_status', ''))} |"
            )
    return "\n".join(lines)


def restricted(run: Path, method: str, pair_ids: set[str]) -> dict:
    """`method`'s summary in `run`, recomputed from its stored scores on the items `pair_ids` only (to
    compare a lever run on a smaller nested sample with the runs on the larger one)."""
    import pyarrow.parquet as pq

    from flip_ray.evaluation.pairs_input import Item
    from flip_ray.evaluation.run import engine_outcomes, read_scores
    from flip_ray.evaluation.stats import summarize

    source = run / "responses" if (run / "responses").is_dir() else run / "responses.parquet"
    rows = pq.read_table(source, columns=["pair_id", "candidate", "subset"]).to_pylist()
    counts: dict[str, int] = {}
    subset: dict[str, str] = {}
    for r in rows:
        if r["pair_id"] in pair_ids:
            counts[r["pair_id"]] = counts.get(r["pair_id"], 0) + 1
            subset[r["pair_id"]] = r["subset"]
    items = [Item(pid, "", [], [""] * n, subset[pid]) for pid, n in sorted(counts.items())]
    column = {"flip": "flip_score", "flip_logprob": "flip_logprob_mean", "judge_pointwise": "judge_score"}[method]
    outcomes, _ = engine_outcomes(items, read_scores(str(run / "scores" / method), column))
    return summarize(outcomes, [it.subset for it in items], n_boot=1000)


# Runs on 15 items per set, and the larger runs (method, run) they are compared with on the same items.
SMALL_RUNS = {
    "lever_n4": [("flip", "lever_base"), ("flip", "lever_temperature")],
    "lever_judges": [("judge_pointwise", "main"), ("flip_logprob", "lever_base")],
    "lever_judges_guided": [("judge_pointwise", "lever_guided")],
}


def small_lever_table(out: Path) -> str:
    """Levers run on 15 items per set, beside the larger runs restricted to the same items."""
    import pyarrow.parquet as pq

    lines = [
        "| run (items) | method | human pooled [CI] | ties | rows/s | parse_status |",
        "|---|---|---:|---:|---:|---|",
    ]
    for small, references in SMALL_RUNS.items():
        run = out / small
        if not (run / "summary.json").exists():
            continue
        ids = set(pq.read_table(run / "responses", columns=["pair_id"]).column("pair_id").to_pylist())
        for method, s in json.loads((run / "summary.json").read_text()).items():
            status = json.dumps(s.get("parse_status", ""))
            lines.append(
                f"| {small} ({s['n']}) | {method} | {cell(s)} | {s['ties']} | {s.get('rows_per_s', '')} | {status} |"
            )
        for method, ref in references:
            if (out / ref / "scores" / method).exists():
                s = restricted(out / ref, method, ids)
                lines.append(f"| {ref} on the same items ({s['n']}) | {method} | {cell(s)} | {s['ties']} | | |")
    return "\n".join(lines)


def item_outcomes(run: Path) -> tuple[dict[str, list], list[str]]:
    """Per-item outcomes of every method of a finished evaluation, recomputed from its stored scores
    the way `flip_ray.evaluation.run.resummarize` does, and the items' subsets."""
    from omegaconf import OmegaConf

    from flip_ray import rewards
    from flip_ray.config.jobs import COMBINATIONS, EvalJobConfig
    from flip_ray.evaluation.pairs_input import load_items
    from flip_ray.evaluation.run import _add_baselines, combined_outcomes, engine_outcomes, read_scores, score_column

    manifest = json.loads((run / "eval_manifest.json").read_text())
    cfg = OmegaConf.merge(OmegaConf.structured(EvalJobConfig), manifest["config"])
    items, _ = load_items(cfg.input, cfg.evaluation.subset_from)
    outcomes, picks, scores = {}, {}, {}
    for method in [m for m in cfg.evaluation.methods if m in rewards.names()]:
        higher = rewards.get(method).higher_is_better
        scores[method] = read_scores(str(run / "scores" / method), score_column(cfg, method), higher)
        outcomes[method], picks[method] = engine_outcomes(items, scores[method])
    for combo, parts in COMBINATIONS.items():
        if combo in cfg.evaluation.methods:
            outcomes[combo], picks[combo] = combined_outcomes(items, [scores[m] for m in parts])
    _add_baselines(items, outcomes, picks)
    return outcomes, [it.subset for it in items]


def paired_difference(a: list, b: list, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of a - b over the items both have, with a 95% percentile-bootstrap interval (items
    resampled, the two methods' outcomes kept together), and the number of items."""
    import numpy as np

    both = np.array([(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None], dtype=float)
    diff = both[:, 0] - both[:, 1]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high), len(diff)


def subset_accuracy(outcomes: list, keys: list[int]) -> str:
    got = [outcomes[k] for k in keys if outcomes[k] is not None]
    return pct(sum(got) / len(got)) if got else "n/a"


def variants_tables(out: Path) -> str:
    """Accuracy per set and pooled, agreement with the rules, and paired differences from the rules."""
    parts = []
    for run in sorted(p.parent for p in out.glob("variants_*/summary.json")):
        name = run.name
        if not (run / "summary.json").exists():
            continue
        summary = json.loads((run / "summary.json").read_text())
        sets = sorted({k for s in summary.values() for k in s.get("per_subset", {})})
        lines = [
            f"### {name}\n",
            "| method | "
            + " | ".join(sets)
            + " | all [95% CI] | agree longer | agree shorter | agree overlap | rows/s |",
            "|---|" + "---:|" * (len(sets) + 5),
        ]
        for method, s in summary.items():
            row = [pct(s["per_subset"][k]["accuracy"]) if k in s["per_subset"] else "n/a" for k in sets]
            lines.append(
                f"| {method} | " + " | ".join(row) + f" | {cell(s)} | {pct(s.get('agree_longer'))} | "
                f"{pct(s.get('agree_shorter'))} | {pct(s.get('agree_overlap'))} | {s.get('rows_per_s', '')} |"
            )
        outcomes, _ = item_outcomes(run)
        # The restating hack: items where the wrong response shares more words with the instruction
        # (prompt overlap picks it) against items where the right one does.
        wrong = [k for k, o in enumerate(outcomes["prompt_overlap"]) if o == 0.0]
        right = [k for k, o in enumerate(outcomes["prompt_overlap"]) if o == 1.0]

        lines += [
            "",
            f"| method | overlap picks the wrong response ({len(wrong)} items) | overlap picks the right one "
            f"({len(right)} items) |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {m} | {subset_accuracy(outcomes[m], wrong)} | {subset_accuracy(outcomes[m], right)} |" for m in summary
        ]
        rules = ("longer", "shorter", "prompt_overlap")
        head = "| method | " + " | ".join(f"minus {r} [95% CI]" for r in rules) + " | items |"
        lines += ["", head, "|---|---:|---:|---:|---:|"]
        for method in [m for m in summary if m not in rules]:
            cells, n = [], 0
            for rule in rules:
                mean, low, high, n = paired_difference(outcomes[method], outcomes[rule])
                cells.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def copy_tables(out: Path) -> str:
    """Issue 25's runs (copy_*): per set group, flip's pooled accuracy with and without copy-blocking
    decoding, its copy and echo rates, how its answers parsed, its paired difference from the run
    without blocking (same items), and the baselines of that run."""
    parts = []
    for sets in ("human", "bon"):
        base = out / f"copy_base_{sets}"
        if not (base / "summary.json").exists():
            continue
        base_outcomes, _ = item_outcomes(base)
        lines = [
            f"### {sets}\n",
            "| run | method | pooled [95% CI] | minus copy_base flip [95% CI] | copied % | echoed % | ties | "
            "parse_status | rows/s |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        runs = ("copy_block", "copy_few_shot_block", "copy_logprob")
        for run in (base, *(out / f"{name}_{sets}" for name in runs)):
            if not (run / "summary.json").exists():
                continue
            summary = json.loads((run / "summary.json").read_text())
            outcomes, _ = item_outcomes(run)
            for method, s in summary.items():
                diff = ""
                if method == "flip" and run != base:
                    mean, low, high, _ = paired_difference(outcomes["flip"], base_outcomes["flip"])
                    diff = f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
                flags = s.get("flags") or {}
                copied = pct((flags.get("flag_copied_response") or {}).get("rate")) if flags else ""
                echoed = pct((flags.get("flag_echoed_template") or {}).get("rate")) if flags else ""
                status = json.dumps(s.get("parse_status") or "")
                lines.append(
                    f"| {run.name} | {method} | {cell(s)} | {diff} | {copied} | {echoed} | {s['ties']} | {status} | "
                    f"{s.get('rows_per_s', '')} |"
                )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/eval_table")
    if "--resummarize" in sys.argv:  # recompute summaries from stored scores (after a fix in the summary step)
        from flip_ray.evaluation.run import resummarize

        for run in sorted(p.parent for p in out.glob("*/summary.json")):
            resummarize(str(run))
    if list(out.glob("copy_*/summary.json")):
        print("\n## Copying and echoing\n")
        print(copy_tables(out))
    if (out / "main" / "summary.json").exists():
        print("## Main table\n")
        print(main_table(json.loads((out / "main" / "summary.json").read_text())))
    if list(out.glob("lever_*/summary.json")):
        print("\n## Levers\n")
        print(lever_table(out))
    if any((out / run / "summary.json").exists() for run in SMALL_RUNS):
        print("\n## Levers on 15 items per set\n")
        print(small_lever_table(out))
    if (out / "lever_base" / "scores" / "flip" / "data").exists():
        print("\n## Similarity metric (lever_base generations)\n")
        print(metric_lever(out / "lever_base"))
    if list(out.glob("variants_*/summary.json")):
        print("\n## Likelihood variants\n")
        print(variants_tables(out))
    if (out / "walltimes.txt").exists():
        print("\n## Wall times\n")
        print((out / "walltimes.txt").read_text())


if __name__ == "__main__":
    main()
