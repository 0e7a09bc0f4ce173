"""The Ray Data stages of the scoring job. Each is a function or callable class on pyarrow batches.

`read_shards` (tasks)
    reads: `uri`, `format`, `key` (one row per input shard)
    writes: `schema.normalized_schema`: `id`, kept input columns, `_flip_instruction`,
    `_flip_response`, `_flip_context`, `error`, and the control columns `_flip_shard`,
    `_flip_shard_total`, `_flip_shard_error` (set on the one end-of-shard marker row)
`BackwardInferenceStage` (engine actors, GPU or CPU; `engine_stage.py`)
    reads: `_flip_instruction`, `_flip_response`, `_flip_context`, `error`
    writes: `schema.engine_fields(methods)`: each reward's engine columns (e.g. `flip`'s raw
    `_flip_generations`), `finish_reason`, `n_prompt_tokens`, `n_output_tokens`, `truncated`, the
    `<method>_error` columns and `error`
`SimilarityStage` (CPU actors)
    reads: `_flip_instruction`, `_flip_response` and the columns above
    writes: the output schema (`schema.output_schema`) plus the control columns
`write_parts` (tasks)
    reads: the similarity stage's output
    writes: one Parquet part file per shard present in the batch under `data/<shard_id>/`, and
    returns `schema.PART_META` rows (counts per part, and each end-of-shard marker) to the driver

Rows with `error` set, and marker rows, pass through every stage untouched and are never sent to
the engine.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa

from flip_ray import rewards, schema
from flip_ray.input.files import InputError, Shard
from flip_ray.input.readers import ColumnMapping, read_shard
from flip_ray.job.store import DATA, parquet_bytes, shard_id, write_bytes_durably
from flip_ray.text.flags import Flags, compute_flags

logger = logging.getLogger(__name__)


def require_columns(stage: str, batch: pa.Table, columns: list[str]) -> None:
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise KeyError(f"{stage}: batch lacks column(s) {missing}; it has {batch.column_names}")


def conform(table: pa.Table, target: pa.Schema, sid: str) -> pa.Table:
    """Casts a reader block to the run's normalised schema and tags it with its shard id."""
    n = table.num_rows
    columns = {}
    for f in target:
        if f.name == schema.SHARD:
            columns[f.name] = pa.array([sid] * n, f.type)
        elif f.name in (schema.SHARD_TOTAL, schema.SHARD_ERROR, schema.DEDUP):
            columns[f.name] = pa.nulls(n, f.type)
        elif f.name in table.column_names:
            columns[f.name] = _cast(table.column(f.name), f.type)
        else:  # a kept column this shard lacks
            columns[f.name] = pa.nulls(n, f.type)
    return pa.table(columns, schema=target)


def _cast(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """A kept column in the run's type for it. Where shards disagree (plan.unified_columns), values
    Arrow cannot cast (a list in one file, text in another) become JSON text."""
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if not pa.types.is_string(target):
            raise
        values = [
            v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in column.to_pylist()
        ]
        return pa.chunked_array([pa.array(values, target)], target)


def end_marker(target: pa.Schema, sid: str, total: int, error: str | None) -> pa.Table:
    columns = {f.name: pa.nulls(1, f.type) for f in target}
    columns[schema.SHARD] = pa.array([sid], pa.string())
    columns[schema.SHARD_TOTAL] = pa.array([total], pa.int64())
    columns[schema.SHARD_ERROR] = pa.array([error], pa.string())
    return pa.table(columns, schema=target)


def read_shards(
    batch: pa.Table, *, mapping: ColumnMapping, kept: pa.Schema, batch_rows: int, limit: int | None = None
) -> Iterator[pa.Table]:
    """Ray Data map_batches function: streams each shard named in `batch` as normalised blocks,
    then one end-of-shard marker carrying the row count (or the error that stopped the read)."""
    require_columns("read_shards", batch, ["uri", "format", "key"])
    target = schema.normalized_schema(kept)
    for row in batch.to_pylist():
        shard = Shard(**row)
        sid = shard_id(shard.key)
        total, error = 0, None
        try:
            for table in read_shard(shard, mapping, batch_rows, limit):
                block = conform(table, target, sid)
                total += block.num_rows
                yield block
        except (InputError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            error = str(e) if isinstance(e, InputError) else f"cannot read {shard.uri}: {e}"
            logger.error("shard %s failed: %s", shard.key, error)
        yield end_marker(target, sid, total, error)


def read_ids(
    batch: pa.Table, *, mapping: ColumnMapping, batch_rows: int, limit: int | None = None
) -> Iterator[pa.Table]:
    """Ray Data map_batches function: only the `id` column of each shard (for the duplicate check).
    Unreadable shards yield nothing here; the scoring run reports them."""
    for row in batch.to_pylist():
        shard = Shard(**row)
        try:
            for table in read_shard(shard, mapping, batch_rows, limit):
                yield table.select([schema.ID])
        except InputError:
            continue


def work_rows(batch: pa.Table) -> list[int]:
    """Rows that still need work: no error and not a shard marker."""
    errors = batch.column("error").to_pylist()
    totals = batch.column(schema.SHARD_TOTAL).to_pylist()
    return [i for i, (e, t) in enumerate(zip(errors, totals, strict=True)) if e is None and t is None]


def row_error(methods: Sequence[str], failed: dict[str, str]) -> str | None:
    """A row's `error` from its per-method failures: set only when every requested method failed
    (one method's failure keeps the others' rewards, with the reason in `<method>_error`)."""
    if not methods or any(m not in failed for m in methods):
        return None
    if len(methods) == 1:
        return failed[methods[0]]
    return "; ".join(f"{m}: {failed[m]}" for m in methods)


def flag_columns(
    instructions: list[str | None], responses: list[str | None], *, copy_threshold: float, min_response_words: int
) -> dict[str, list]:
    """`prompt_copy_fraction`, `response_words` and the flags of each row with both texts."""
    cols: dict[str, list] = {name: [None] * len(responses) for name in Flags._fields}
    for i, (instruction, response) in enumerate(zip(instructions, responses, strict=True)):
        if instruction is None or response is None:
            continue
        flags = compute_flags(
            instruction, response, copy_threshold=copy_threshold, min_response_words=min_response_words
        )
        for name, value in zip(Flags._fields, flags, strict=True):
            cols[name][i] = value
    return cols


def output_table(batch: pa.Table, computed: dict[str, list], output_schema: pa.Schema) -> pa.Table:
    """The batch in the declared output schema (plus the control columns): `computed` columns
    first, then the batch's own, null for the rest."""
    n = batch.num_rows
    out = {}
    for f in output_schema:
        if f.name in computed:
            out[f.name] = pa.array(computed[f.name], f.type)
        elif f.name in batch.column_names:
            out[f.name] = batch.column(f.name).cast(f.type)
        else:
            out[f.name] = pa.nulls(n, f.type)
    for f in schema.CONTROL_COLUMNS:
        out[f.name] = batch.column(f.name)
    return pa.table(out, schema=pa.schema(list(output_schema) + list(schema.CONTROL_COLUMNS)))


class SimilarityStage:
    """CPU actor: computes the row flags, runs the CPU part of each reward that has one (`flip`: parse
    each answer and compare it with the real instruction), and shapes the batch into the declared
    output schema.

    Args:
        methods: The rewards that ran (`rewards.RewardMethod`), in the registry's order.
        settings: The `reward` config section as plain values.
        aggregate: How the scores of n samples are combined (`mean` or `max`).
        output_schema: The schema every output block is cast to.
        copy_threshold, min_response_words: Thresholds of the reward-hacking flags (`flags.py`).
    """

    def __init__(
        self,
        *,
        methods: Sequence[rewards.RewardMethod],
        settings: dict,
        aggregate: str,
        output_schema: pa.Schema,
        copy_threshold: float = 0.6,
        min_response_words: int = 3,
    ):
        setup = rewards.FinishSetup(settings=settings, aggregate=aggregate)
        self.finishers = [(m, m.finish(setup)) for m in methods if m.finish is not None]
        self.output_schema = output_schema
        self.copy_threshold = copy_threshold
        self.min_response_words = min_response_words

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(
            "SimilarityStage",
            batch,
            [schema.INSTRUCTION, schema.RESPONSE, "error", schema.SHARD_TOTAL]
            + [f.name for m, _ in self.finishers for f in m.engine_columns()],
        )
        instructions = batch.column(schema.INSTRUCTION).to_pylist()
        responses = batch.column(schema.RESPONSE).to_pylist()
        computed = flag_columns(
            instructions, responses, copy_threshold=self.copy_threshold, min_response_words=self.min_response_words
        )
        todo = work_rows(batch)
        for method, finish in self.finishers:
            failed = batch.column(method.error_column).to_pylist() if method.engine is not None else [None] * len(batch)
            computed |= finish(batch, instructions, responses, [i for i in todo if failed[i] is None])
        return output_table(batch, computed, self.output_schema)


_NUMBERS = re.compile(r"\d+")


def error_kind(message: str) -> str:
    """Groups error messages: drops the `<file> line N:` prefix and parenthesised details, and
    replaces numbers by N."""
    message = re.sub(r"^\S+ line \d+: ", "", message)
    while True:  # innermost first, so that nested parentheses go too
        shorter = re.sub(r" ?\([^()]*\)", "", message)
        if shorter == message:
            break
        message = shorter
    return _NUMBERS.sub("N", message)[:160]


def _counts(values: list) -> str:
    out: dict[str, int] = {}
    for v in values:
        if v is not None:
            out[v] = out.get(v, 0) + 1
    return json.dumps(out, sort_keys=True)


def part_stats(
    table: pa.Table, methods: Sequence[rewards.RewardMethod] | None = None, reused: list[bool] | None = None
) -> dict:
    """Counts of one part file, summed by the driver into done records and the manifest. Per reward
    that ran (`methods`; None: the registered ones whose error column the table has): rows it scored,
    its errors, the sum and count of the column it ranks by, and its status column's values. The
    output tokens count the rows whose answer was generated, not `reused` from an identical row."""
    errors = table.column("error").to_pylist()
    d = table.select(["n_output_tokens", "truncated"]).to_pydict()
    ran = [m for m in (rewards.every() if methods is None else methods) if m.error_column in table.column_names]
    flag_columns = [*schema.FLAG_NAMES, *(f for m in ran for f in m.flags if f in table.column_names)]
    flagged = {f: sum(bool(v) for v in table.column(f).to_pylist()) for f in flag_columns}
    method_errors = {m.name: table.column(m.error_column).to_pylist() for m in ran}
    sums, counts, statuses = {}, {}, []
    for m in ran:
        if (column := m.ranked_by()) in table.column_names:
            values = [
                v for v, e in zip(table.column(column).to_pylist(), errors, strict=True) if v is not None and e is None
            ]
            sums[m.name], counts[m.name] = float(sum(values)), len(values)
        if m.status_column in table.column_names:
            statuses += [f"{m.name}: {v}" for v in table.column(m.status_column).to_pylist() if v is not None]
    return {
        "rows": table.num_rows,
        "scored": sum(e is None for e in errors),
        "errors": sum(e is not None for e in errors),
        "output_tokens": sum(
            t or 0 for t, r in zip(d["n_output_tokens"], reused or [False] * table.num_rows, strict=True) if not r
        ),
        "truncated": sum(bool(t) for t in d["truncated"]),
        "flagged": json.dumps(flagged, sort_keys=True),
        "statuses": _counts(statuses),
        "error_kinds": _counts([error_kind(e) if e is not None else None for e in errors]),
        "method_errors": json.dumps(
            {m: n for m, errs in method_errors.items() if (n := sum(e is not None for e in errs))}, sort_keys=True
        ),
        # A method scored a row when neither the row nor the method has an error there.
        "method_scored": json.dumps(
            {
                m: sum(e is None and me is None for e, me in zip(errors, errs, strict=True))
                for m, errs in method_errors.items()
            },
            sort_keys=True,
        ),
        "method_error_kinds": _counts(
            [f"{m}: {error_kind(me)}" for m, errs in method_errors.items() for me in errs if me is not None]
        ),
        "reward_sums": json.dumps(sums, sort_keys=True),
        "reward_counts": json.dumps(counts, sort_keys=True),
    }


def write_parts(
    batch: pa.Table,
    *,
    output_uri: str,
    output_schema: pa.Schema,
    methods: Sequence[rewards.RewardMethod] | None = None,
) -> pa.Table:
    """Ray Data map_batches function: writes the batch's rows as one part file per shard and
    returns what it wrote (`schema.PART_META`), counted per reward of `methods` (`part_stats`). The
    driver turns these into done records."""
    require_columns("write_parts", batch, list(schema.CONTROL_COLUMNS.names))
    fs, root = fsspec.core.url_to_fs(output_uri)
    sids = batch.column(schema.SHARD).to_pylist()
    totals = batch.column(schema.SHARD_TOTAL).to_pylist()
    shard_errors = batch.column(schema.SHARD_ERROR).to_pylist()
    meta: list[dict] = []
    rows_by_shard: dict[str, list[int]] = {}
    for i, (sid, total) in enumerate(zip(sids, totals, strict=True)):
        if total is not None:
            meta.append({"shard_id": sid, "rows": 0, "total": total, "shard_error": shard_errors[i]})
        else:
            rows_by_shard.setdefault(sid, []).append(i)
    for sid, idx in rows_by_shard.items():
        part = batch.take(pa.array(idx)).select(output_schema.names).cast(output_schema)
        name = f"part-{uuid.uuid4().hex}.parquet"
        write_bytes_durably(fs, f"{root.rstrip('/')}/{DATA}/{sid}/{name}", parquet_bytes(part))
        reused = [bool(batch.column(schema.DEDUP)[i].as_py()) for i in idx]
        meta.append({"shard_id": sid, "file": name, "dedup_saved": sum(reused), **part_stats(part, methods, reused)})
    return pa.Table.from_pylist(meta, schema=schema.PART_META)
