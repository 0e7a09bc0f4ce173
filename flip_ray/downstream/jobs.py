"""Jobs on a scored output: filter (threshold, quantile, top-k, best-of-N) and DPO pairs.

Both read the scored Parquet (local or s3://) with Ray Data and group by prompt with a distributed
group-by, so they scale with the cluster rather than with the driver's memory.

Rows without a prompt (null or blank prompt text, a null or unparseable chat, a null
`columns.prompt_key`) are never grouped: best-of-N, top-k and pairs leave them out as `no_prompt`.
The threshold and quantile filters judge each row alone and keep them eligible.

    flip-ray filter input.path=outputs/sample_scored output.path=outputs/kept filter.mode=best_of_n
    flip-ray pairs  input.path=outputs/sample_scored output.path=outputs/dpo pairs.strategy=all_pairs
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from flip_ray import rewards, schema
from flip_ray.config.jobs import validate_filter_config, validate_pairs_config
from flip_ray.downstream.selection import (
    NO_PROMPT,
    as_messages,
    drop_reason,
    group_key,
    make_dpo_pairs,
    missing_text,
    prompt_key,
    top_k,
)
from flip_ray.input.files import InputError
from flip_ray.job.runtime import init_ray
from flip_ray.job.store import NotAScoredOutput, OutputError, open_scored, overlap, write_bytes_durably

logger = logging.getLogger(__name__)

KEY = "_flip_prompt_key"
DROP = "_flip_drop"  # "" for eligible rows, else the reason


@dataclass(frozen=True)
class Columns:
    prompt: str | None
    response: str | None
    messages: str | None
    id: str
    prompt_key: str | None
    score: str


def resolve_columns(cfg: DictConfig, scoring: dict | None, names: list[str]) -> Columns:
    c = cfg.columns
    s_in = (scoring or {}).get("input", {})
    messages = c.messages or (
        schema.output_column_name(s_in["messages_column"]) if s_in.get("messages_column") else None
    )
    prompt = c.prompt or (None if messages else schema.output_column_name(s_in.get("prompt_column", "prompt")))
    response = c.response or (None if messages else schema.output_column_name(s_in.get("response_column", "response")))
    needed = [x for x in (prompt, response, messages, c.id, c.score, c.prompt_key) if x]
    missing = [x for x in needed if x not in names]
    if missing:
        raise InputError(
            f"the scored output has no column {missing}; columns present: {', '.join(names)}. Keep the prompt and "
            "response columns when scoring (input.keep_columns), or name them with columns.*"
        )
    return Columns(prompt, response, messages, c.id, c.prompt_key, c.score)


def check_score_column(file_schema: pa.Schema, column: str) -> None:
    """Refuses a score column that is not numeric before any work (a string column would fail in a
    worker, a boolean one would rank False below True)."""
    t = file_schema.field(column).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
        raise InputError(
            f"columns.score={column} is a {t} column; the score must be an integer or floating-point column, such as "
            f"{', '.join(dict.fromkeys(rewards.rank_columns().values()))}"
        )


def annotate(
    batch: pa.Table,
    *,
    cols: Columns,
    include_errors: bool,
    exclude_flags: tuple[str, ...],
    grouped: bool = False,
    pairs: bool = False,
) -> pa.Table:
    """Adds the prompt-group key (null without a prompt) and the drop reason ("" when eligible) to
    each row. `grouped`: rows are chosen per prompt, so a row without a prompt is dropped as
    `no_prompt`; `pairs`: a row also needs the prompt and response a DPO row is made of."""
    rows = batch.to_pylist()
    keys, reasons = [], []
    for r in rows:
        prompt, response, messages = (r.get(c) if c else None for c in (cols.prompt, cols.response, cols.messages))
        key = group_key(r[cols.prompt_key]) if cols.prompt_key else prompt_key(prompt, messages)
        reason = drop_reason(r, score_column=cols.score, include_errors=include_errors, exclude_flags=exclude_flags)
        if reason is None and grouped and key is None:
            reason = NO_PROMPT
        if reason is None and pairs:
            reason = missing_text(prompt, response, messages, chat=cols.messages is not None)
        keys.append(key)
        reasons.append(reason or "")
    return batch.append_column(KEY, pa.array(keys, pa.string())).append_column(DROP, pa.array(reasons, pa.string()))


# The files a filter or pairs job wrote, written after them: a hidden file with no data extension,
# so that readers of the directory (globs, pyarrow, Ray Data, `datasets.load_dataset`) never see it.
JOB_RECORD = ".flip_ray_job"


def _prepare_output(cfg: DictConfig, scored_uri: str) -> str:
    """Checks the output location: apart from the scored output (an overwrite would delete the rows
    being read), and new, empty, or the output of an earlier filter/pairs job (`JOB_RECORD`), whose
    files alone are removed with `output.overwrite=true`. Nothing else is ever deleted."""
    out = cfg.output.path.rstrip("/")
    if overlap(out, scored_uri):
        raise OutputError(
            f"output.path {out} overlaps the scored output {scored_uri} (input.path); write to a path outside it"
        )
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache(root)
    if not (fs.exists(root) and fs.ls(root)):
        return out
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    record_path = f"{root}/{JOB_RECORD}"
    record = json.loads(fs.cat_file(record_path)) if JOB_RECORD in names else None
    own = set(record["files"]) | {JOB_RECORD} if record else set()
    foreign = [n for n in names if n not in own]
    if foreign:
        raise OutputError(
            f"output.path {out} holds files that no flip_ray filter or pairs job wrote ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); flip_ray never writes into or clears such a directory. "
            "Choose a new or empty output.path, or move those files out"
        )
    if not cfg.output.overwrite:
        raise OutputError(
            f"output.path {out} holds the output of an earlier flip_ray {record.get('job', 'filter or pairs')} job; "
            "choose another path or pass output.overwrite=true to replace it"
        )
    for name in record["files"]:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    fs.rm(record_path)
    return out


def _record_written(out: str, job: str) -> None:
    """Writes `JOB_RECORD` after the job's files (and after they are counted), listing what this job
    wrote: what a later `output.overwrite=true` may remove."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache(root)
    listing = fs.ls(root, detail=False) if fs.exists(root) else []
    files = sorted(n for p in listing if (n := posixpath.basename(p.rstrip("/"))) != JOB_RECORD)
    fs.makedirs(root, exist_ok=True)
    write_bytes_durably(fs, f"{root}/{JOB_RECORD}", json.dumps({"job": job, "files": files}, indent=2).encode())


def _write(ds, out: str, fmt: str) -> None:
    if fmt == "jsonl":
        ds.write_json(out, force_ascii=False, double_precision=15)  # pandas defaults to 10 digits
    else:
        ds.write_parquet(out)


def _count_written(out: str, fmt: str) -> int:
    fs, root = fsspec.core.url_to_fs(out)
    if fmt == "parquet":
        return sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in fs.glob(f"{root}/*.parquet"))
    total = 0
    for p in fs.glob(f"{root}/*.json*"):
        if posixpath.basename(p) == JOB_RECORD:
            continue
        with fs.open(p, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _partitions(eligible_rows: int) -> int:
    # Ray's default of 200 shuffle partitions is for big data; small runs would write 200 mostly
    # empty blocks. About 5k rows a partition, at most 200.
    return max(1, min(200, eligible_rows // 5000 + 1))


def _load(cfg: DictConfig, *, grouped: bool, pairs: bool = False):
    """The committed rows of the scored output, annotated; the input is checked (columns, score
    type) and the output prepared before Ray starts. Returns (output, dataset, columns)."""
    import ray

    scored = open_scored(cfg.input.path, allow_incomplete=cfg.input.allow_incomplete)
    if not scored.paths:
        raise NotAScoredOutput(f"input.path {cfg.input.path} holds no scored rows")
    with scored.fs.open(scored.paths[0], "rb") as f:
        file_schema = pq.read_schema(f)
    cols = resolve_columns(cfg, scored.config, file_schema.names)
    check_score_column(file_schema, cols.score)
    out = _prepare_output(cfg, scored.uri)
    init_ray(cfg.ray)
    ds = ray.data.read_parquet(scored.files).map_batches(
        annotate,
        batch_format="pyarrow",
        fn_kwargs=dict(
            cols=cols,
            include_errors=cfg.eligibility.include_errors,
            exclude_flags=tuple(cfg.eligibility.exclude_flags),
            grouped=grouped,
            pairs=pairs,
        ),
    )
    return out, ds, cols


def _reason_counts(ds) -> dict[str, int]:
    # A handful of distinct reasons: one partition is enough (Ray's default is 200).
    grouped = ds.select_columns([DROP]).groupby(DROP, num_partitions=1).count()
    counts = {r[DROP]: r["count()"] for r in grouped.take_all()}
    return dict(sorted(counts.items()))


def _eligible_by_prompt(ds, eligible: int):
    """Eligible rows grouped by prompt key, with a partition count sized to them."""
    return ds.filter(lambda r: r[DROP] == "").groupby(KEY, num_partitions=_partitions(eligible))


def score_quantile(ds, score: str, q: float) -> float:
    """The q-quantile of the eligible rows' scores, linearly interpolated between the two nearest
    (numpy's default): q=0 is the lowest score, q=1 the highest. Needs at least one eligible row."""
    # Ray Data's exact Quantile: each block hands over its score column (Arrow, 8 bytes a row) and
    # one reduce task takes the quantile, never the driver: about 80 MB per 10M eligible rows.
    # Not ApproximateQuantile: it needs the datasketches package and keeps float32 values, so its
    # q=1 could round above the highest score and keep nothing.
    from ray.data.aggregate import Quantile

    eligible = ds.filter(lambda r: r[DROP] == "").select_columns([score])
    return eligible.aggregate(Quantile(on=score, q=q, alias_name="quantile"))["quantile"]


def _start(cfg: DictConfig, validate, *, grouped: bool, pairs: bool = False):
    """The common start of filter and pairs: the config checked, the input checked, the output
    prepared, the committed rows loaded and annotated, and the drop-reason counts. Returns (output,
    dataset, columns, counts)."""
    validate(cfg)
    out, ds, cols = _load(cfg, grouped=grouped, pairs=pairs)
    return out, ds, cols, _reason_counts(ds)


def _strip(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in (KEY, DROP) if c in table.column_names])


def run_filter(cfg: DictConfig) -> dict:
    """Keeps rows by score and writes them; returns counts of kept and dropped rows per reason."""
    f = cfg.filter
    out, ds, cols, reasons = _start(cfg, validate_filter_config, grouped=f.mode in ("top_k", "best_of_n"))
    score = cols.score
    eligible = reasons.pop("", 0)
    summary: dict = {"mode": f.mode}
    if eligible == 0:
        logger.warning("no eligible rows in %s (left out: %s); nothing is kept", cfg.input.path, reasons or "none")
    if f.mode in ("threshold", "quantile"):
        if f.mode == "threshold":
            threshold = f.threshold
        else:  # keeps the rows scored at or above the q-quantile of the eligible scores
            threshold = score_quantile(ds, score, f.quantile) if eligible else None
            logger.info("filter.quantile=%s of %d eligible rows: %s >= %s", f.quantile, eligible, score, threshold)
        summary["threshold"] = threshold
        kept = ds.filter(lambda r: r[DROP] == "" and threshold is not None and r[score] >= threshold)
        below = "below_threshold"
    else:
        k = 1 if f.mode == "best_of_n" else f.top_k
        summary["k"] = k

        def best(group: pa.Table) -> pa.Table:
            rows = top_k(group.to_pylist(), k, score_column=score, id_column=cols.id)
            return pa.Table.from_pylist(rows, schema=group.schema)

        kept = _eligible_by_prompt(ds, eligible).map_groups(best, batch_format="pyarrow")
        below = "not_top_k" if f.mode == "top_k" else "not_best_of_n"
    if eligible:  # else nothing to write (and Ray's group-by fails on an empty dataset)
        _write(kept.map_batches(_strip, batch_format="pyarrow"), out, cfg.output.format)
    n_kept = _count_written(out, cfg.output.format)
    _record_written(out, "filter")
    dropped = {**reasons, below: eligible - n_kept}
    summary.update(rows=eligible + sum(reasons.values()), eligible=eligible, kept=n_kept, dropped=dropped, output=out)
    return summary


PAIR_SCHEMA_TEXT = pa.schema(
    [
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("margin", pa.float64()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("prompt_key", pa.string()),
    ]
)
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIR_SCHEMA_CHAT = pa.schema(
    [pa.field(f.name, _MESSAGES) if f.name in ("prompt", "chosen", "rejected") else f for f in PAIR_SCHEMA_TEXT]
)


def pairs_for_group(
    group: pa.Table, *, cols: Columns, strategy: str, min_margin: float, max_pairs, seed: int
) -> pa.Table:
    """DPO rows (TRL's format) for one prompt group."""
    rows = group.to_pylist()
    chat = cols.messages is not None
    out = []
    for chosen, rejected in make_dpo_pairs(
        rows,
        strategy=strategy,
        score_column=cols.score,
        min_margin=min_margin,
        max_pairs=max_pairs,
        seed=seed,
        id_column=cols.id,
    ):
        if chat:
            turns = as_messages(chosen[cols.messages]) or []
            prompt = turns[:-1]
            chosen_v = [(as_messages(chosen[cols.messages]) or [{}])[-1]]
            rejected_v = [(as_messages(rejected[cols.messages]) or [{}])[-1]]
        else:
            prompt, chosen_v, rejected_v = chosen[cols.prompt], chosen[cols.response], rejected[cols.response]
        out.append(
            {
                "prompt": prompt,
                "chosen": chosen_v,
                "rejected": rejected_v,
                "score_chosen": chosen[cols.score],
                "score_rejected": rejected[cols.score],
                "margin": chosen[cols.score] - rejected[cols.score],
                "chosen_id": str(chosen[cols.id]),
                "rejected_id": str(rejected[cols.id]),
                "prompt_key": chosen[KEY],
            }
        )
    return pa.Table.from_pylist(out, schema=PAIR_SCHEMA_CHAT if chat else PAIR_SCHEMA_TEXT)


def run_pairs(cfg: DictConfig) -> dict:
    """Builds DPO preference pairs per prompt and writes them; returns counts."""
    out, ds, cols, reasons = _start(cfg, validate_pairs_config, grouped=True, pairs=True)
    p = cfg.pairs
    eligible = reasons.pop("", 0)
    if eligible == 0:
        logger.warning("no eligible rows in %s (left out: %s); no pairs are made", cfg.input.path, reasons or "none")
    pairs = _eligible_by_prompt(ds, eligible).map_groups(
        pairs_for_group,
        batch_format="pyarrow",
        fn_kwargs=dict(
            cols=cols, strategy=p.strategy, min_margin=p.min_margin, max_pairs=p.max_pairs_per_prompt, seed=p.seed
        ),
    )
    if eligible:
        _write(pairs, out, cfg.output.format)
    n_pairs = _count_written(out, cfg.output.format)
    _record_written(out, "pairs")
    return {
        "strategy": p.strategy,
        "rows": eligible + sum(reasons.values()),
        "eligible": eligible,
        "dropped": reasons,
        "pairs": n_pairs,
        "output": out,
    }
