"""Jobs on a scored output: filter (threshold, quantile, top-k, best-of-N) and DPO pairs.

Both read the scored Parquet (local or s3://) with Ray Data and group by prompt with a distributed
group-by, so they scale with the cluster rather than with the driver's memory.

    flip-ray filter input.path=outputs/sample_scored output.path=outputs/kept filter.mode=best_of_n
    flip-ray pairs  input.path=outputs/sample_scored output.path=outputs/dpo pairs.strategy=all_pairs
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from flip_ray import schema
from flip_ray.config_jobs import validate_filter_config, validate_pairs_config
from flip_ray.runtime import init_ray
from flip_ray.selection import as_messages, drop_reason, make_dpo_pairs, prompt_key, top_k
from flip_ray.shards import InputError
from flip_ray.store import NotAScoredOutput, OutputError, open_scored

logger = logging.getLogger(__name__)

KEY = "_flip_prompt_key"
DROP = "_flip_drop"  # "" for eligible rows, else the reason
_QUANTILE_BINS = 10_000


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


def annotate(batch: pa.Table, *, cols: Columns, include_errors: bool, exclude_flags: tuple[str, ...]) -> pa.Table:
    """Adds the prompt-group key and the drop reason ("" when eligible) to each row."""
    rows = batch.to_pylist()
    keys, reasons = [], []
    for r in rows:
        if cols.prompt_key:
            keys.append(str(r[cols.prompt_key]))
        else:
            keys.append(
                prompt_key(r.get(cols.prompt) if cols.prompt else None, r.get(cols.messages) if cols.messages else None)
            )
        reasons.append(
            drop_reason(r, score_column=cols.score, include_errors=include_errors, exclude_flags=exclude_flags) or ""
        )
    return batch.append_column(KEY, pa.array(keys, pa.string())).append_column(DROP, pa.array(reasons, pa.string()))


def _prepare_output(cfg: DictConfig) -> str:
    out = cfg.output.path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    if fs.exists(root) and fs.ls(root):
        if not cfg.output.overwrite:
            raise OutputError(f"output.path {out} is not empty; choose another path or pass output.overwrite=true")
        fs.rm(root, recursive=True)
    return out


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
        with fs.open(p, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _partitions(eligible_rows: int) -> int:
    # Ray's default of 200 shuffle partitions is for big data; small runs would write 200 mostly
    # empty blocks. About 5k rows a partition, at most 200.
    return max(1, min(200, eligible_rows // 5000 + 1))


def _load(cfg: DictConfig):
    import ray

    scored = open_scored(cfg.input.path, allow_incomplete=cfg.input.allow_incomplete)
    if not scored.paths:
        raise NotAScoredOutput(f"input.path {cfg.input.path} holds no scored rows")
    init_ray(cfg.ray)
    with scored.fs.open(scored.paths[0], "rb") as f:
        names = pq.read_schema(f).names
    cols = resolve_columns(cfg, scored.config, names)
    ds = ray.data.read_parquet(scored.files).map_batches(
        annotate,
        batch_format="pyarrow",
        fn_kwargs=dict(
            cols=cols,
            include_errors=cfg.eligibility.include_errors,
            exclude_flags=tuple(cfg.eligibility.exclude_flags),
        ),
    )
    return ds, cols


def _reason_counts(ds) -> dict[str, int]:
    # A handful of distinct reasons: one partition is enough (Ray's default is 200).
    grouped = ds.select_columns([DROP]).groupby(DROP, num_partitions=1).count()
    counts = {r[DROP]: r["count()"] for r in grouped.take_all()}
    return dict(sorted(counts.items()))


def _eligible_by_prompt(ds, reasons: dict[str, int]):
    """Eligible rows grouped by prompt key, with a partition count sized to them."""
    return ds.filter(lambda r: r[DROP] == "").groupby(KEY, num_partitions=_partitions(reasons.get("", 0)))


def score_quantile(ds, cols: Columns, q: float) -> float:
    """The score at global quantile q over eligible rows, from a streamed histogram (the driver
    holds 10k counters, not the scores)."""
    hist = [0] * _QUANTILE_BINS
    total = 0
    eligible = ds.filter(lambda r: r[DROP] == "").select_columns([cols.score])
    for b in eligible.iter_batches(batch_format="pyarrow"):
        for s in b.column(cols.score).to_pylist():
            hist[min(int(s * _QUANTILE_BINS), _QUANTILE_BINS - 1)] += 1
            total += 1
    if total == 0:
        return 1.0
    below_needed, seen = q * total, 0
    for i, h in enumerate(hist):
        if seen + h > below_needed:
            return i / _QUANTILE_BINS
        seen += h
    return 1.0


def _start(cfg: DictConfig, validate) -> tuple[str, object, Columns, dict[str, int]]:
    """The common start of filter and pairs: the config checked, the output prepared, the committed
    rows loaded and annotated, and the drop-reason counts. Returns (output, dataset, columns, counts)."""
    validate(cfg)
    out = _prepare_output(cfg)
    ds, cols = _load(cfg)
    return out, ds, cols, _reason_counts(ds)


def _strip(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in (KEY, DROP) if c in table.column_names])


def run_filter(cfg: DictConfig) -> dict:
    """Keeps rows by score and writes them; returns counts of kept and dropped rows per reason."""
    out, ds, cols, reasons = _start(cfg, validate_filter_config)
    f = cfg.filter
    score = cols.score
    summary: dict = {"mode": f.mode}
    if f.mode in ("threshold", "quantile"):
        threshold = f.threshold if f.mode == "threshold" else score_quantile(ds, cols, f.quantile)
        summary["threshold"] = threshold
        kept = ds.filter(lambda r: r[DROP] == "" and r[score] >= threshold)
        below = "below_threshold"
    else:
        k = 1 if f.mode == "best_of_n" else f.top_k
        summary["k"] = k

        def best(group: pa.Table) -> pa.Table:
            rows = top_k(group.to_pylist(), k, score_column=score, id_column=cols.id)
            return pa.Table.from_pylist(rows, schema=group.schema)

        kept = _eligible_by_prompt(ds, reasons).map_groups(best, batch_format="pyarrow")
        below = "not_top_k" if f.mode == "top_k" else "not_best_of_n"
    _write(kept.map_batches(_strip, batch_format="pyarrow"), out, cfg.output.format)
    n_kept = _count_written(out, cfg.output.format)
    eligible = reasons.pop("", 0)
    dropped = {**reasons, below: eligible - n_kept}
    summary.update(rows=eligible + sum(reasons.values()), kept=n_kept, dropped=dropped, output=out)
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
    out, ds, cols, reasons = _start(cfg, validate_pairs_config)
    p = cfg.pairs
    pairs = _eligible_by_prompt(ds, reasons).map_groups(
        pairs_for_group,
        batch_format="pyarrow",
        fn_kwargs=dict(
            cols=cols, strategy=p.strategy, min_margin=p.min_margin, max_pairs=p.max_pairs_per_prompt, seed=p.seed
        ),
    )
    _write(pairs, out, cfg.output.format)
    eligible = reasons.pop("", 0)
    return {
        "strategy": p.strategy,
        "rows": eligible + sum(reasons.values()),
        "eligible": eligible,
        "dropped": reasons,
        "pairs": _count_written(out, cfg.output.format),
        "output": out,
    }
