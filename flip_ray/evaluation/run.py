"""The evaluation job: how well each reward method ranks responses on preference data.

    flip-ray evaluate input.path=pairs.jsonl output.path=outputs/eval

Input rows are `{id, prompt, chosen, rejected[, subset]}` (`pairs_input.py`); `rejected` is a string
or a list (best-of-N: an item counts as correct only if chosen outscores every rejected response).
`run_evaluate` is a recipe of named steps:

1. `prepare`: check the config and the output, read the pairs on the driver (bad rows go to
   `errors.jsonl` with their reason), write one row per response to `responses/part-*.parquet`;
2. `score_responses`: the scoring job itself, one run per engine method under `scores/<method>/`
   (each method's speed measured alone; a rerun resumes);
3. `judge_pairs`: the per-pair judges (`judge_pairwise` in both orders, `judge_listwise` over a
   seeded shuffle; `pair_judges.py`) through the same engine on Ray Data;
4. `write_summary`: the trivial baselines (`longer`, `shorter`, `prompt_overlap`), then
   `summary.json` (keyed by method: accuracy, n, ties, 95% bootstrap CI, per subset, agreement
   with the length rules, rows/s), `summary.md` and `eval_manifest.json`.

Evaluation sets are small (thousands of pairs): the driver holds one score per response.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from flip_ray import __version__, rewards
from flip_ray.config.base import ScoreConfig, to_dict
from flip_ray.config.jobs import BASELINES, COMBINATIONS, PAIR_JUDGES, EvalJobConfig, validate_eval_config
from flip_ray.downstream.selection import ranks
from flip_ray.evaluation.pair_judges import judge_outcomes, run_pair_judges
from flip_ray.evaluation.pairs_input import Item, load_items, response_id, responses_table
from flip_ray.evaluation.plot import plot_summary
from flip_ray.evaluation.stats import agreement, markdown_table, pair_outcome, pick_from_scores, summarize
from flip_ray.input.files import InputError
from flip_ray.job.runtime import apply_storage_config
from flip_ray.job.store import OutputError, OutputStore, open_scored, parquet_bytes, write_bytes_durably
from flip_ray.recipe import run_score
from flip_ray.text.metrics import f1_score

logger = logging.getLogger(__name__)

RESPONSES = "responses"  # directory of Parquet parts, one scoring shard each
SCORES = "scores"  # one scoring output per engine method: scores/<method>/
RESPONSES_PER_PART = 2000
SUMMARY, SUMMARY_MD, SUMMARY_PNG = "summary.json", "summary.md", "summary.png"
EVAL_MANIFEST, ERRORS = "eval_manifest.json", "errors.jsonl"
_SHARED_SECTIONS = ("model", "sampling", "reward", "resources", "flags", "dedup", "limits", "storage", "ray")


def scoring_config(cfg: DictConfig, method: str, store: OutputStore) -> DictConfig:
    """The scoring-job config of one engine method's pass over `responses/`."""
    sc = OmegaConf.merge(OmegaConf.structured(ScoreConfig), {k: cfg[k] for k in _SHARED_SECTIONS})
    sc.reward.methods = [method]
    sc.input.path = store.uri_of(RESPONSES)
    sc.input.messages_column = "messages"
    sc.input.id_column = "id"
    sc.input.keep_columns = ["pair_id", "candidate", "subset"]
    sc.output.path = store.uri_of(SCORES, method)
    sc.output.overwrite = bool(cfg.output.overwrite)
    sc.output.report = False
    return sc


def read_scores(uri: str, column: str, higher_is_better: bool = True) -> dict[str, tuple[float | None, str | None]]:
    """Response id -> (value of `column`, error) from a finished scoring run's committed rows; the
    value negated for a reward where lower is better, so that higher always wins here."""
    import pyarrow.dataset as pads

    scored = open_scored(uri, key="scores of")
    if not scored.paths:
        return {}
    table = pads.dataset(scored.paths, filesystem=scored.fs, format="parquet").to_table(columns=["id", column, "error"])
    ids, values, errors = (table.column(c).to_pylist() for c in ("id", column, "error"))
    sign = 1 if higher_is_better else -1
    return {
        rid: (value if value is None else sign * value, error)
        for rid, value, error in zip(ids, values, errors, strict=True)
    }


def flag_rates(uri: str, flags: tuple[str, ...]) -> dict[str, dict]:
    """Per flag of a reward (`RewardMethod.flags`): the share of the responses it scored that carry
    the flag, over all of them and per subset. Rates are in [0, 1], rounded to 4 decimals."""
    import pyarrow.dataset as pads

    if not flags:  # most rewards have none: their output is not read again
        return {}
    scored = open_scored(uri, key="scores of")
    if not scored.paths:
        return {}
    dataset = pads.dataset(scored.paths, filesystem=scored.fs, format="parquet")
    present = [f for f in flags if f in dataset.schema.names]
    table = dataset.to_table(columns=[c for c in ("subset", *present) if c in dataset.schema.names]).to_pydict()
    subsets = table.get("subset") or [None] * dataset.count_rows()
    out = {}
    for flag in present:
        counts: dict[str | None, list[int]] = {}
        for subset, value in zip(subsets, table[flag], strict=True):
            if value is None:  # not scored: an error row
                continue
            for key in (None, subset if subset is not None else "(none)"):
                acc = counts.setdefault(key, [0, 0])
                acc[0] += bool(value)
                acc[1] += 1
        n_flagged, n = counts.pop(None, [0, 0])
        out[flag] = {
            "rate": round(n_flagged / n, 4) if n else None,
            "n": n,
            "per_subset": {k: round(f / m, 4) for k, (f, m) in sorted(counts.items())},
        }
    return out


def engine_outcomes(
    items: list[Item], scores: dict[str, tuple[float | None, str | None]]
) -> tuple[list[float | None], list[int | None]]:
    """Outcome and pick per item from per-response scores. A response with an error (or absent)
    makes the item missing; a response the method could not score (a judge verdict that does not
    parse) makes it a tie: the method gave no preference."""
    outcomes, picks = [], []
    for it in items:
        got = [scores.get(response_id(it.id, k), (None, "not scored")) for k in range(len(it.candidates))]
        if any(error is not None for _, error in got):
            outcomes.append(None)
            picks.append(None)
        elif any(value is None for value, _ in got):
            outcomes.append(1.0 / len(it.candidates))
            picks.append(None)
        else:
            values = [value for value, _ in got]
            outcomes.append(pair_outcome(values[0], values[1:]))
            picks.append(pick_from_scores(values))
    return outcomes, picks


def score_column(cfg: DictConfig, method: str) -> str:
    """The column `method` ranks by under the evaluation's reward settings."""
    return rewards.get(method).ranked_by(OmegaConf.to_container(cfg.reward, resolve=True))


def baseline_scores(item: Item, method: str) -> list[float]:
    if method == "longer":
        return [float(len(c)) for c in item.candidates]
    if method == "shorter":
        return [-float(len(c)) for c in item.candidates]
    if method == "prompt_overlap":
        return [f1_score(c, item.prompt_text).f1 for c in item.candidates]
    raise ValueError(f"not a baseline: {method}")


def _scores_of(cfg: DictConfig, store: OutputStore, method: str) -> dict:
    """The per-response values of an engine method's finished scoring run, higher better."""
    return read_scores(store.uri_of(SCORES, method), score_column(cfg, method), rewards.get(method).higher_is_better)


def _add_baselines(items: list[Item], outcomes: dict, picks: dict) -> None:
    """Outcomes and picks of the trivial baselines (the length rules' picks also feed agreement)."""
    for method in BASELINES:
        scores = [baseline_scores(it, method) for it in items]
        outcomes[method] = [pair_outcome(sc[0], sc[1:]) for sc in scores]
        picks[method] = [pick_from_scores(sc) for sc in scores]


def _method_summary(cfg: DictConfig, outcomes: list, picks: list, rule_picks: dict, subsets: list) -> dict:
    """`stats.summarize` of one method plus its agreement with the length rules and with prompt
    overlap (a method that only tracks length, or restating, shows there)."""
    s = summarize(outcomes, subsets, n_boot=cfg.evaluation.bootstrap, seed=cfg.evaluation.seed)
    for rule in ("longer", "shorter", "prompt_overlap"):
        value, n = agreement(picks, rule_picks[rule])
        key = "agree_overlap" if rule == "prompt_overlap" else f"agree_{rule}"
        s[key] = None if value is None else round(value, 4)
        if rule == "longer":
            s["agree_n"] = n  # items where both the method and the length rules pick one response
    return s


def combined_outcomes(items: list[Item], scores: list[dict]) -> tuple[list[float | None], list[int | None]]:
    """Outcome and pick per item of the mean rank of its candidates under several rewards (per-response
    `scores` of each, as `read_scores` gives them). No weight is fitted: each reward counts the same."""
    outcomes, picks = [], []
    for it in items:
        per_method = []
        for values in scores:
            got = [values.get(response_id(it.id, k), (None, "not scored")) for k in range(len(it.candidates))]
            if any(error is not None or value is None for value, error in got):
                break
            per_method.append(ranks([value for value, _ in got]))
        if len(per_method) < len(scores):
            outcomes.append(None)
            picks.append(None)
            continue
        mean_rank = [sum(r[k] for r in per_method) / len(per_method) for k in range(len(it.candidates))]
        outcomes.append(pair_outcome(mean_rank[0], mean_rank[1:]))
        picks.append(pick_from_scores(mean_rank))
    return outcomes, picks


def resummarize(output_path: str) -> dict:
    """Recomputes summary.json of a finished evaluation from its stored per-response scores (engine
    methods and baselines; per-pair judges keep their stored entries). Returns the new summary."""
    store = OutputStore(output_path)
    manifest = store.read_json(EVAL_MANIFEST)
    old = store.read_json(SUMMARY)
    if manifest is None or old is None:
        raise OutputError(f"{output_path} holds no finished evaluation")
    cfg = OmegaConf.merge(OmegaConf.structured(EvalJobConfig), manifest["config"])
    items, _ = load_items(cfg.input, cfg.evaluation.subset_from)
    outcomes, picks = {}, {}
    scores = {}
    for method in [m for m in old if m in rewards.names()]:
        values = scores[method] = _scores_of(cfg, store, method)
        outcomes[method], picks[method] = engine_outcomes(items, values)
    for combo, parts in COMBINATIONS.items():
        if combo in old and all(m in scores for m in parts):
            outcomes[combo], picks[combo] = combined_outcomes(items, [scores[m] for m in parts])
    _add_baselines(items, outcomes, picks)
    subsets = [it.subset for it in items]
    summary = {}
    for method, entry in old.items():
        if method not in outcomes:
            summary[method] = entry
            continue
        s = _method_summary(cfg, outcomes[method], picks[method], picks, subsets)
        s.update(
            {
                k: v
                for k, v in entry.items()
                if k in ("rows_per_s", "pipeline_s", "parse_status", "no_value", "errors", "flags")
            }
        )
        summary[method] = s
    write_bytes_durably(store.fs, store.path(SUMMARY), json.dumps(summary, indent=2).encode())
    return summary


def _write_responses(store: OutputStore, table: pa.Table) -> None:
    """Writes the responses as Parquet parts, leaving a part that already holds the same bytes
    untouched: the scoring runs under scores/ would otherwise see changed input files on resume."""
    store.fs.makedirs(store.path(RESPONSES), exist_ok=True)
    store.fs.invalidate_cache(store.path(RESPONSES))
    existing = set(store.fs.ls(store.path(RESPONSES), detail=False))
    wanted = set()
    for k, start in enumerate(range(0, table.num_rows, RESPONSES_PER_PART)):
        path = store.path(RESPONSES, f"part-{k:05d}.parquet")
        wanted.add(path)
        part = parquet_bytes(table.slice(start, RESPONSES_PER_PART))
        if path in existing and store.fs.cat_file(path) == part:
            continue
        write_bytes_durably(store.fs, path, part)
    for path in existing - wanted:
        store.fs.rm(path)


_OWN = {RESPONSES, SCORES, SUMMARY, SUMMARY_MD, SUMMARY_PNG, EVAL_MANIFEST, ERRORS, "logs"}
_OWN_PART = re.compile(r"^(part-\d{5}\.parquet|\.tmp-[0-9a-f]+)$")


def _refuse_foreign(store: OutputStore) -> None:
    """Refuses an output.path holding files an evaluation does not write: `_write_responses`
    replaces what is under responses/, and flip_ray never deletes a file it did not write. (Each
    scoring output under scores/ is checked by its own run.)"""
    if not store.fs.isdir(store.root):
        return
    store.fs.invalidate_cache(store.root)
    foreign = [n for p in store.fs.ls(store.root, detail=False) if (n := posixpath.basename(p.rstrip("/"))) not in _OWN]
    if store.fs.isdir(store.path(RESPONSES)):
        foreign += [
            f"{RESPONSES}/{n}"
            for p in store.fs.ls(store.path(RESPONSES), detail=False)
            if not _OWN_PART.match(n := posixpath.basename(p.rstrip("/")))
        ]
    if foreign:
        raise OutputError(
            f"output.path {store.uri} holds files that an evaluation did not write ({', '.join(foreign[:5])}); "
            "flip_ray never writes into or clears a directory that holds other files. Choose a new or empty "
            "output.path, or move those files out"
        )


def _write_errors(store: OutputStore, bad: list[dict]) -> None:
    text = "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad)
    write_bytes_durably(store.fs, store.path(ERRORS), text.encode())


def prepare(cfg: DictConfig) -> tuple[OutputStore, list[Item], int]:
    """Checks the config and the output location, reads the pairs, and writes `errors.jsonl` and
    the responses the scoring runs read. Raises ConfigError, InputError or OutputError."""
    validate_eval_config(cfg)
    apply_storage_config(cfg.storage)
    store = OutputStore(cfg.output.path)
    store.check_writable_location()
    _refuse_foreign(store)
    if store.fs.exists(store.path(SUMMARY)) and not cfg.output.overwrite:
        raise OutputError(
            f"output.path {store.uri} holds a finished evaluation; choose another output.path or pass "
            "output.overwrite=true"
        )
    store.probe_writable()
    items, bad = load_items(cfg.input, cfg.evaluation.subset_from)
    if not items:
        raise InputError(f"input.path {cfg.input.path} holds no usable pairs ({len(bad)} bad row(s))")
    logger.info("%d pairs (%d responses), %d bad row(s)", len(items), sum(len(x.candidates) for x in items), len(bad))
    _write_errors(store, bad)
    _write_responses(store, responses_table(items))
    return store, items, len(bad)


def score_responses(cfg: DictConfig, store: OutputStore, items: list[Item], outcomes: dict, picks: dict) -> dict:
    """One scoring run per engine method; fills `outcomes` and `picks`, returns per-method extras."""
    extra, scores = {}, {}
    for method in [m for m in cfg.evaluation.methods if m in rewards.names()]:
        manifest = run_score(scoring_config(cfg, method, store), label=method)
        values = scores[method] = _scores_of(cfg, store, method)
        outcomes[method], picks[method] = engine_outcomes(items, values)
        t, reward = manifest["timings"], manifest["counts"]["rewards"].get(method, {})
        extra[method] = {
            "rows_per_s": t["rows_per_s"],
            "pipeline_s": t["pipeline_s"],
            # how the reward's answers were read (its status column), and responses it gave no value
            "parse_status": reward.get("status"),
            "no_value": sum(1 for value, error in values.values() if value is None and error is None),
            "errors": manifest["counts"]["errors"],
            # the share of its answers each of its flags marks (flip: copied the response, echoed the prompt)
            "flags": flag_rates(store.uri_of(SCORES, method), rewards.get(method).flags) or None,
        }
    for combo, parts in COMBINATIONS.items():
        if combo in cfg.evaluation.methods:
            outcomes[combo], picks[combo] = combined_outcomes(items, [scores[m] for m in parts])
    return extra


def judge_pairs(cfg: DictConfig, items: list[Item], outcomes: dict, picks: dict) -> dict:
    """The per-pair judges; fills `outcomes` and `picks`, returns per-method extras."""
    judges = [m for m in cfg.evaluation.methods if m in PAIR_JUDGES]
    if not judges:
        return {}
    results, wall = run_pair_judges(cfg, items, judges)
    extra = {}
    for method in judges:
        outcomes[method], picks[method], statuses = judge_outcomes(method, items, results, cfg.evaluation.seed)
        extra[method] = {"pipeline_s": round(wall, 3), "parse_status": statuses}
    return extra


def write_summary(
    cfg: DictConfig, store: OutputStore, items: list[Item], n_bad: int, outcomes: dict, picks: dict, extra: dict
) -> dict:
    """Adds the baselines, writes summary.json, summary.md and eval_manifest.json; returns them."""
    _add_baselines(items, outcomes, picks)
    subsets = [it.subset for it in items]
    summary = {}
    for method in cfg.evaluation.methods:
        s = _method_summary(cfg, outcomes[method], picks[method], picks, subsets)
        s.update({k: v for k, v in extra.get(method, {}).items() if v is not None})
        summary[method] = s
    write_bytes_durably(store.fs, store.path(SUMMARY), json.dumps(summary, indent=2).encode())
    table = markdown_table(summary, title=f"flip_ray evaluation of {cfg.input.path}")
    write_bytes_durably(store.fs, store.path(SUMMARY_MD), table.encode())
    plot = plot_summary(summary, f"flip_ray evaluation of {cfg.input.path}")
    write_bytes_durably(store.fs, store.path(SUMMARY_PNG), plot)
    manifest = {
        "flip_ray_version": __version__,
        "config": to_dict(cfg),
        "pairs": len(items),
        "responses": sum(len(x.candidates) for x in items),
        "bad_rows": n_bad,
        "best_of_n_items": sum(len(x.candidates) > 2 for x in items),
        "output": {
            "summary": store.uri_of(SUMMARY),
            "table": store.uri_of(SUMMARY_MD),
            "plot": store.uri_of(SUMMARY_PNG),
            "errors": store.uri_of(ERRORS),
        },
    }
    write_bytes_durably(store.fs, store.path(EVAL_MANIFEST), json.dumps(manifest, indent=2).encode())
    return {"summary": summary, "manifest": manifest, "table": table}


def run_evaluate(cfg: DictConfig) -> dict:
    """Runs the evaluation described by `cfg`: prepare, score the responses, judge the pairs, write
    the summary. Returns `{summary, manifest, table}` (also written to output.path).

    Raises:
        ConfigError, InputError, OutputError: Before any model loads.
    """
    started = time.time()
    store, items, n_bad = prepare(cfg)
    outcomes: dict[str, list[float | None]] = {}
    picks: dict[str, list[int | None]] = {}
    extra = score_responses(cfg, store, items, outcomes, picks)
    extra |= judge_pairs(cfg, items, outcomes, picks)
    result = write_summary(cfg, store, items, n_bad, outcomes, picks, extra)
    result["manifest"]["total_s"] = round(time.time() - started, 3)
    write_bytes_durably(store.fs, store.path(EVAL_MANIFEST), json.dumps(result["manifest"], indent=2).encode())
    return result
