"""The evaluation job: how well each reward method ranks responses on preference data.

    flip-ray evaluate input.path=pairs.jsonl output.path=outputs/eval

Input rows are `{id, prompt, chosen, rejected[, subset]}`; `rejected` is a string or a list
(best-of-N: an item counts as correct only if chosen outscores every rejected response). The job

1. reads and checks the pairs on the driver (bad rows go to `errors.jsonl` with their reason),
2. writes one row per response to `responses/part-*.parquet` (a chat: earlier turns, the
   instruction, the response) and scores it with the scoring job, one run per engine method under
   `scores/<method>/` (so each method's speed is measured alone, and a rerun resumes),
3. runs the per-pair judges (`judge_pairwise` in both orders, `judge_listwise` with a seeded
   shuffle; `flip_ray.pairjudge`) through the same engine on Ray Data,
4. computes the trivial baselines (`longer`, `shorter`, `prompt_overlap`) and writes
   `summary.json` (keyed by method: accuracy, n, ties, 95% bootstrap CI, per subset, agreement
   with the length rules, rows/s), `summary.md` and `eval_manifest.json`.

Evaluation sets are small (thousands of pairs): the driver holds one score per response.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import re
import time
from dataclasses import dataclass, field

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from flip_ray import __version__
from flip_ray.config import ScoreConfig, to_dict, validate_eval_config
from flip_ray.evalstats import agreement, markdown_table, pair_outcome, pick_from_scores, summarize
from flip_ray.io import JSONL, PARQUET, InputError, Shard, _json_lines, _open, list_shards
from flip_ray.metrics import f1_score
from flip_ray.pairjudge import listwise_outcome, pairwise_outcome, run_pair_judges
from flip_ray.records import ROLES, RowError, text_field
from flip_ray.store import OutputError, OutputStore, open_scored, parquet_bytes, write_bytes_durably

logger = logging.getLogger(__name__)

ENGINE_METHODS = ("flip", "flip_logprob", "judge_pointwise")
PAIR_JUDGES = ("judge_pairwise", "judge_listwise")
# The column each per-response engine method ranks by (higher is better).
SCORE_COLUMNS = {"flip": "flip_score", "flip_logprob": "flip_logprob_mean", "judge_pointwise": "judge_score"}
RESPONSES = "responses"  # directory of Parquet parts, one scoring shard each
RESPONSES_PER_PART = 2000
SUMMARY, SUMMARY_MD, EVAL_MANIFEST, ERRORS = "summary.json", "summary.md", "eval_manifest.json", "errors.jsonl"

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ", re.MULTILINE)


@dataclass
class Item:
    """One preference item: candidates[0] is the chosen response, the rest were rejected."""

    id: str
    instruction: str
    context: list[dict]
    candidates: list[str]
    subset: str
    prompt_text: str = ""
    extra: dict = field(default_factory=dict)


def parse_transcript(text: str) -> list[dict] | None:
    """An HH-RLHF style transcript ("Human: ...\\n\\nAssistant: ...") as chat turns, or None if
    `text` is not one."""
    if not text.lstrip().startswith("Human:"):
        return None
    marks = list(_HH_TURN.finditer(text.lstrip()))
    body = text.lstrip()
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(body)
        content = body[m.end() : end].strip()
        turns.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": content})
    if len(turns) < 1 or turns[-1]["role"] != "user":
        return None
    return turns


def prompt_parts(prompt) -> tuple[str, list[dict]]:
    """(instruction, earlier turns) of a pair's prompt: a string, an HH transcript or a chat.

    Raises:
        RowError: An empty prompt, or a chat that does not end with a user turn.
    """
    if isinstance(prompt, str):
        turns = parse_transcript(prompt)
        if turns is None:
            return text_field(prompt, "prompt"), []
        prompt = turns
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RowError(f"prompt is {type(prompt).__name__}, expected a string or a list of {{role, content}}")
    turns = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RowError(f"prompt[{i}] is not a {{role, content}} turn with a role in {ROLES}")
        turns.append({"role": m["role"], "content": text_field(m.get("content"), f"prompt[{i}].content")})
    if turns[-1]["role"] != "user":
        raise RowError(f"prompt ends with a {turns[-1]['role']} turn; the last turn must be the user's instruction")
    return turns[-1]["content"], turns[:-1]


def _records(shard: Shard):
    """(row index, record or None, read error) for every row of a shard."""
    if shard.format == JSONL:
        with _open(shard.uri, compression="infer") as f:
            index = 0
            for lineno, raw in _json_lines(f, shard):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                    yield index, obj, None
                except (ValueError, UnicodeDecodeError) as e:
                    yield index, None, f"{shard.key} line {lineno}: {e}"
                index += 1
        return
    import pyarrow.parquet as pq

    with _open(shard.uri) as f:
        table = pq.read_table(f) if shard.format == PARQUET else pa.ipc.open_stream(f).read_all()
    yield from ((i, r, None) for i, r in enumerate(table.to_pylist()))


def _candidates(row: dict, chosen_col: str, rejected_col: str) -> list[str]:
    chosen = text_field(row.get(chosen_col), chosen_col)
    rejected = row.get(rejected_col)
    if isinstance(rejected, (list, tuple)):
        if not rejected:
            raise RowError(f"{rejected_col} is an empty list")
        rejected = [text_field(r, f"{rejected_col}[{k}]") for k, r in enumerate(rejected)]
    else:
        rejected = [text_field(rejected, rejected_col)]
    if any(r == chosen for r in rejected):
        raise RowError(f"{rejected_col} repeats the chosen response; the pair cannot be ranked")
    return [chosen, *rejected]


def load_items(cfg: DictConfig) -> tuple[list[Item], list[dict]]:
    """Reads and checks every pair. Returns (good items, bad rows with their reason).

    Raises:
        InputError: No input, or a pair id that repeats.
    """
    i = cfg.input
    shards = list_shards(i.path, i.format)
    items: list[Item] = []
    bad: list[dict] = []
    for shard in shards:
        rows = list(_records(shard))
        if i.sample_per_file is not None and len(rows) > i.sample_per_file:
            rows = sorted(random.Random(f"{i.sample_seed}:{shard.key}").sample(rows, i.sample_per_file))
        file_subset = posixpath.basename(shard.key).split(".")[0] if "/" not in shard.key else shard.key.split("/")[0]
        for index, row, error in rows:
            where = f"{shard.key}:{index}"
            if error is not None:
                bad.append({"row": where, "id": None, "error": error})
                continue
            pid = row.get(i.id_column) if i.id_column else where
            try:
                if i.id_column and (pid is None or (isinstance(pid, str) and not pid.strip())):
                    raise RowError(f"{i.id_column} is missing")
                instruction, context = prompt_parts(row.get(i.prompt_column))
                candidates = _candidates(row, i.chosen_column, i.rejected_column)
            except RowError as e:
                bad.append({"row": where, "id": None if pid is None else str(pid), "error": str(e)})
                continue
            column_subset = row.get(i.subset_column)
            how = cfg.evaluation.subset_from
            subset = (
                str(column_subset)
                if how == "column" or (how == "auto" and column_subset not in (None, ""))
                else file_subset
            )
            prompt = row.get(i.prompt_column)
            items.append(
                Item(
                    str(pid),
                    instruction,
                    context,
                    candidates,
                    subset,
                    prompt if isinstance(prompt, str) else instruction,
                )
            )
    seen: dict[str, int] = {}
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
    repeated = [k for k, n in seen.items() if n > 1]
    if repeated:
        raise InputError(
            f"input.id_column {i.id_column!r} repeats ids ({', '.join(map(repr, repeated[:5]))}); "
            "deduplicate the input or set input.id_column=null to use <file>:<row> ids"
        )
    return items, bad


def response_id(item_id: str, candidate: int) -> str:
    return f"{item_id}#{candidate}"


def responses_table(items: list[Item]) -> pa.Table:
    """One row per response: id, pair id, candidate index (0 = chosen), subset, and the chat
    (earlier turns, the instruction, the response) that the scoring job reads."""
    rows = {"id": [], "pair_id": [], "candidate": [], "subset": [], "messages": []}
    for item in items:
        for k, text in enumerate(item.candidates):
            rows["id"].append(response_id(item.id, k))
            rows["pair_id"].append(item.id)
            rows["candidate"].append(k)
            rows["subset"].append(item.subset)
            rows["messages"].append(
                [*item.context, {"role": "user", "content": item.instruction}, {"role": "assistant", "content": text}]
            )
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "pair_id": pa.array(rows["pair_id"], pa.string()),
            "candidate": pa.array(rows["candidate"], pa.int64()),
            "subset": pa.array(rows["subset"], pa.string()),
            "messages": pa.array(rows["messages"], pa.list_(turn)),
        }
    )


def scoring_config(cfg: DictConfig, method: str, store: OutputStore) -> DictConfig:
    """The scoring-job config of one engine method's pass over `responses/`."""
    base = OmegaConf.structured(ScoreConfig)
    shared = {
        k: cfg[k] for k in ("model", "sampling", "reward", "resources", "flags", "dedup", "limits", "storage", "ray")
    }
    sc = OmegaConf.merge(base, shared)
    sc.reward.methods = [method]
    sc.input.path = store.uri_of(RESPONSES)
    sc.input.messages_column = "messages"
    sc.input.id_column = "id"
    sc.input.keep_columns = ["pair_id", "candidate", "subset"]
    sc.output.path = store.uri_of("scores", method)
    sc.output.overwrite = bool(cfg.output.overwrite)
    sc.output.report = False
    return sc


def read_scores(uri: str, column: str) -> dict[str, tuple[float | None, str | None]]:
    """Response id -> (value of `column`, error) from a finished scoring run's committed rows."""
    import pyarrow.dataset as pads

    scored = open_scored(uri, key="scores of")
    if not scored.paths:
        return {}
    table = pads.dataset(scored.paths, filesystem=scored.fs, format="parquet").to_table(columns=["id", column, "error"])
    ids, values, errors = (table.column(c).to_pylist() for c in ("id", column, "error"))
    return {rid: (value, error) for rid, value, error in zip(ids, values, errors, strict=True)}


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
    if method == "flip_logprob" and cfg.reward.logprob_distractors:
        return "flip_logprob_contrast"
    return SCORE_COLUMNS[method]


def baseline_scores(item: Item, method: str) -> list[float]:
    if method == "longer":
        return [float(len(c)) for c in item.candidates]
    if method == "shorter":
        return [-float(len(c)) for c in item.candidates]
    if method == "prompt_overlap":
        return [f1_score(c, item.prompt_text).f1 for c in item.candidates]
    raise ValueError(f"not a baseline: {method}")


def _judge_status(values: dict, method: str) -> dict | None:
    if method != "judge_pointwise":
        return None
    unscored = sum(1 for value, error in values.values() if value is None and error is None)
    return {"scored": sum(1 for value, _ in values.values() if value is not None), "no_verdict": unscored}


def _add_baselines(items: list[Item], outcomes: dict, picks: dict) -> None:
    """Outcomes and picks of the trivial baselines (the length rules' picks also feed agreement)."""
    for method in ("longer", "shorter", "prompt_overlap"):
        scores = [baseline_scores(it, method) for it in items]
        outcomes[method] = [pair_outcome(sc[0], sc[1:]) for sc in scores]
        picks[method] = [pick_from_scores(sc) for sc in scores]


def _method_summary(cfg: DictConfig, outcomes: list, picks: list, length_picks: dict, subsets: list) -> dict:
    """`evalstats.summarize` of one method plus its agreement with the length rules."""
    s = summarize(outcomes, subsets, n_boot=cfg.evaluation.bootstrap, seed=cfg.evaluation.seed)
    for rule in ("longer", "shorter"):
        value, n = agreement(picks, length_picks[rule])
        s[f"agree_{rule}"] = None if value is None else round(value, 4)
    s["agree_n"] = n  # items where both the method and the length rules pick one response
    return s


def resummarize(output_path: str) -> dict:
    """Recomputes summary.json of a finished evaluation from its stored per-response scores (engine
    methods and baselines; per-pair judges keep their stored entries). Returns the new summary."""
    from omegaconf import OmegaConf

    from flip_ray.config import EvalJobConfig

    store = OutputStore(output_path)
    manifest = store.read_json(EVAL_MANIFEST)
    old = store.read_json(SUMMARY)
    if manifest is None or old is None:
        raise OutputError(f"{output_path} holds no finished evaluation")
    cfg = OmegaConf.merge(OmegaConf.structured(EvalJobConfig), manifest["config"])
    items, _ = load_items(cfg)
    outcomes, picks = {}, {}
    for method in [m for m in old if m in ENGINE_METHODS]:
        values = read_scores(store.uri_of("scores", method), score_column(cfg, method))
        outcomes[method], picks[method] = engine_outcomes(items, values)
        if method == "judge_pointwise":
            old[method]["parse_status"] = _judge_status(values, method)
    _add_baselines(items, outcomes, picks)
    subsets = [it.subset for it in items]
    summary = {}
    for method, entry in old.items():
        if method not in outcomes:
            summary[method] = entry
            continue
        s = _method_summary(cfg, outcomes[method], picks[method], picks, subsets)
        s.update({k: v for k, v in entry.items() if k in ("rows_per_s", "pipeline_s", "parse_status", "errors")})
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


def _write_errors(store: OutputStore, bad: list[dict]) -> None:
    text = "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad)
    write_bytes_durably(store.fs, store.path(ERRORS), text.encode())


def run_evaluate(cfg: DictConfig) -> dict:
    """Runs the evaluation described by `cfg`; returns the summary (also written as summary.json).

    Raises:
        ConfigError, InputError, OutputError: Before any model loads.
    """
    from flip_ray.pipeline import run_score
    from flip_ray.plan import apply_storage_config

    started = time.time()
    validate_eval_config(cfg)
    apply_storage_config(cfg)
    methods = list(cfg.evaluation.methods)
    store = OutputStore(cfg.output.path)
    store.check_writable_location()
    if store.fs.exists(store.path(SUMMARY)) and not cfg.output.overwrite:
        raise OutputError(
            f"output.path {store.uri} holds a finished evaluation; choose another output.path or pass "
            "output.overwrite=true"
        )
    items, bad = load_items(cfg)
    if not items:
        raise InputError(f"input.path {cfg.input.path} holds no usable pairs ({len(bad)} bad row(s))")
    logger.info("%d pairs (%d responses), %d bad row(s)", len(items), sum(len(x.candidates) for x in items), len(bad))
    store.fs.makedirs(store.root, exist_ok=True)
    _write_errors(store, bad)
    table = responses_table(items)
    _write_responses(store, table)

    outcomes: dict[str, list[float | None]] = {}
    picks: dict[str, list[int | None]] = {}
    extra: dict[str, dict] = {m: {} for m in methods}
    for method in [m for m in methods if m in ENGINE_METHODS]:
        manifest = run_score(scoring_config(cfg, method, store))
        values = read_scores(store.uri_of("scores", method), score_column(cfg, method))
        outcomes[method], picks[method] = engine_outcomes(items, values)
        t = manifest["timings"]
        extra[method] = {
            "rows_per_s": t["rows_per_s"],
            "pipeline_s": t["pipeline_s"],
            "parse_status": manifest["counts"]["parse_status"] if method == "flip" else _judge_status(values, method),
            "errors": manifest["counts"]["errors"],
        }
    judges = [m for m in methods if m in PAIR_JUDGES]
    if judges:
        results, wall = run_pair_judges(cfg, items, judges)
        for method in judges:
            pairs = [
                pairwise_outcome(n, it, results)
                if method == "judge_pairwise"
                else listwise_outcome(n, it, results, cfg.evaluation.seed)
                for n, it in enumerate(items)
            ]
            outcomes[method] = [o for o, _ in pairs]
            picks[method] = [p for _, p in pairs]
            statuses: dict[str, int] = {}
            for job, res in results.items():
                if job.startswith("p:" if method == "judge_pairwise" else "l:") and res["status"]:
                    statuses[res["status"]] = statuses.get(res["status"], 0) + 1
            extra[method] = {"pipeline_s": round(wall, 3), "parse_status": statuses}
    _add_baselines(items, outcomes, picks)

    subsets = [it.subset for it in items]
    summary = {}
    for method in methods:
        s = _method_summary(cfg, outcomes[method], picks[method], picks, subsets)
        s.update({k: v for k, v in extra[method].items() if v is not None})
        summary[method] = s
    write_bytes_durably(store.fs, store.path(SUMMARY), json.dumps(summary, indent=2).encode())
    table = markdown_table(summary, title=f"flip_ray evaluation of {cfg.input.path}")
    write_bytes_durably(store.fs, store.path(SUMMARY_MD), table.encode())
    manifest = {
        "flip_ray_version": __version__,
        "config": to_dict(cfg),
        "pairs": len(items),
        "responses": sum(len(x.candidates) for x in items),
        "bad_rows": len(bad),
        "best_of_n_items": sum(len(x.candidates) > 2 for x in items),
        "total_s": round(time.time() - started, 3),
        "output": {"summary": store.uri_of(SUMMARY), "table": store.uri_of(SUMMARY_MD), "errors": store.uri_of(ERRORS)},
    }
    write_bytes_durably(store.fs, store.path(EVAL_MANIFEST), json.dumps(manifest, indent=2).encode())
    return {"summary": summary, "manifest": manifest, "table": table}
