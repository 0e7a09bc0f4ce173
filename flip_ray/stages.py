"""The Ray Data stages of the scoring job. Each is a function or callable class on pyarrow batches.

`read_shards` (tasks)
    reads: `uri`, `format`, `key` (one row per input shard)
    writes: `schema.normalized_schema`: `id`, kept input columns, `_flip_instruction`,
    `_flip_response`, `_flip_context`, `error`, and the control columns `_flip_shard`,
    `_flip_shard_total`, `_flip_shard_error` (set on the one end-of-shard marker row)
`BackwardInferenceStage` (engine actors, GPU or CPU)
    reads: `_flip_response`, `_flip_context`, `error`
    writes: `_flip_generations`, `finish_reason`, `n_prompt_tokens`, `n_output_tokens`, `truncated`,
    `error`
`SimilarityStage` (CPU actors)
    reads: `_flip_instruction`, `_flip_generations` and the columns above
    writes: the output schema (`schema.output_schema`) plus the control columns
`write_parts` (tasks)
    reads: the similarity stage's output
    writes: one Parquet part file per shard present in the batch under `data/<shard_id>/`, and
    returns `schema.PART_META` rows (counts per part, and each end-of-shard marker) to the driver

Rows with `error` set, and marker rows, pass through every stage untouched and are never sent to
the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator

import fsspec
import pyarrow as pa

from flip_ray import schema
from flip_ray.io import ColumnMapping, InputError, Shard, read_shard
from flip_ray.store import DATA, parquet_bytes, shard_id, write_bytes_durably

logger = logging.getLogger(__name__)


def _require_columns(stage: str, batch: pa.Table, columns: list[str]) -> None:
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
    _require_columns("read_shards", batch, ["uri", "format", "key"])
    target = schema.normalized_schema(kept)
    for row in batch.to_pylist():
        shard = Shard(uri=row["uri"], format=row["format"], key=row["key"])
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
        shard = Shard(uri=row["uri"], format=row["format"], key=row["key"])
        try:
            for table in read_shard(shard, mapping, batch_rows, limit):
                yield table.select([schema.ID])
        except InputError:
            continue


def _work_rows(batch: pa.Table) -> list[int]:
    """Rows that still need work: no error and not a marker."""
    errors = batch.column("error").to_pylist()
    totals = batch.column(schema.SHARD_TOTAL).to_pylist()
    return [i for i, (e, t) in enumerate(zip(errors, totals, strict=True)) if e is None and t is None]


def row_error(methods: tuple[str, ...], failed: dict[str, str]) -> str | None:
    """A row's `error` from its per-method failures: set only when every requested method failed
    (one method's failure keeps the others' rewards, with the reason in `<method>_error`)."""
    if not methods or any(m not in failed for m in methods):
        return None
    if len(methods) == 1:
        return failed[methods[0]]
    return "; ".join(f"{m}: {failed[m]}" for m in methods)


def _errors(batch: pa.Table) -> list[str | None]:
    return batch.column("error").to_pylist()


class BackwardInferenceStage:
    """Engine actor: one `vllm.LLM` per actor, built once; computes the configured rewards per batch.

    Args:
        model: Checkpoint directory or model name; None prepares and uses the embedded model.
        dtype, max_model_len, tensor_parallel_size, gpu_memory_utilization, enable_prefix_caching,
        enforce_eager, trust_remote_code, load_format: vLLM engine arguments.
        temperature, top_p, max_tokens, seed, n, ignore_eos: Sampling parameters of `flip`.
        methods: Rewards to compute (`config.SCORE_METHODS`).
        prompt_variant, few_shot, guided_json, logprob_format, judge_max_tokens, logprob_distractors: See
            `config.RewardConfig`.
        dedup_cache_size: `flip` answers remembered per actor for identical (response, history) rows;
            0 turns deduplication off.
    """

    def __init__(
        self,
        *,
        model: str | None,
        dtype: str,
        max_model_len: int | None,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        enable_prefix_caching: bool,
        enforce_eager: bool,
        trust_remote_code: bool,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int,
        n: int,
        chat_template_kwargs: dict | None = None,
        dedup_cache_size: int = 0,
        load_format: str = "auto",
        ignore_eos: bool = False,
        methods: tuple[str, ...] = ("flip",),
        prompt_variant: str = "flip",
        few_shot: int = 0,
        guided_json: bool = False,
        logprob_format: str = "plain",
        judge_max_tokens: int = 256,
        logprob_distractors: int = 0,
    ):
        from flip_ray.engine import FlipGenerator, Judge, build_llm
        from flip_ray.likelihood import FlipLikelihood

        self.cache: OrderedDict[str, object] = OrderedDict()
        self.cache_size = dedup_cache_size
        self.methods = tuple(methods)

        if model is None:
            from flip_ray.model import prepare_default_model

            model = str(prepare_default_model())
        llm = build_llm(
            model,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            seed=seed,
            load_format=load_format,
        )
        prompt = dict(chat_template_kwargs=chat_template_kwargs, variant=prompt_variant, few_shot=few_shot)
        self.generator = None
        if "flip" in self.methods:
            self.generator = FlipGenerator(
                llm,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=seed,
                n=n,
                ignore_eos=ignore_eos,
                guided_json=guided_json,
                **prompt,
            )
        self.likelihood = (
            FlipLikelihood(llm, logprob_format=logprob_format, distractors=logprob_distractors, **prompt)
            if "flip_logprob" in self.methods
            else None
        )
        self.judge = None
        if "judge_pointwise" in self.methods:
            self.judge = Judge(
                llm,
                max_tokens=judge_max_tokens,
                seed=seed,
                chat_template_kwargs=chat_template_kwargs,
                guided_json=guided_json,
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require_columns(
            "BackwardInferenceStage",
            batch,
            [schema.INSTRUCTION, schema.RESPONSE, schema.CONTEXT, "error", schema.SHARD_TOTAL],
        )
        errors = _errors(batch)
        todo = _work_rows(batch)
        instructions = batch.column(schema.INSTRUCTION).to_pylist()
        responses = batch.column(schema.RESPONSE).to_pylist()
        contexts = batch.column(schema.CONTEXT).to_pylist()
        n = batch.num_rows
        cols: dict[str, list] = {name: [None] * n for name in schema.ENGINE_COLUMNS.names}
        cols["error"] = list(errors)
        dedup = [None] * n
        row_errors: dict[int, dict[str, str]] = {i: {} for i in todo}
        if self.generator is not None:
            results, reused = self._generate_deduplicated(todo, responses, contexts)
            for i in todo:
                g = results[i]
                cols[schema.GENERATIONS][i] = g.texts
                cols["finish_reason"][i] = g.finish_reason
                cols["n_prompt_tokens"][i] = g.n_prompt_tokens
                cols["n_output_tokens"][i] = 0 if i in reused else g.n_output_tokens
                cols["truncated"][i] = g.truncated
                dedup[i] = i in reused
                if g.error:
                    row_errors[i]["flip"] = g.error
        if self.likelihood is not None or self.judge is not None:
            parsed = [json.loads(contexts[i]) if contexts[i] else None for i in todo]
            rows = ([instructions[i] for i in todo], [responses[i] for i in todo], parsed)
        if self.likelihood is not None:
            for i, lk in zip(todo, self.likelihood.score(*rows), strict=True):
                cols["flip_logprob_mean"][i] = lk.logprob_mean
                cols["flip_logprob_sum"][i] = lk.logprob_sum
                cols["flip_logprob_tokens"][i] = lk.tokens
                cols["flip_logprob_contrast"][i] = lk.contrast
                cols["n_prompt_tokens"][i] = cols["n_prompt_tokens"][i] or lk.n_prompt_tokens
                cols["truncated"][i] = bool(cols["truncated"][i]) or lk.truncated
                if lk.error:
                    row_errors[i]["flip_logprob"] = lk.error
        if self.judge is not None:
            from flip_ray.judge import parse_pointwise

            for i, g in zip(todo, self.judge.pointwise(*rows), strict=True):
                cols["truncated"][i] = bool(cols["truncated"][i]) or g.truncated
                if g.error:
                    row_errors[i]["judge_pointwise"] = g.error
                    continue
                cols["judge_score"][i], cols["judge_parse_status"][i] = parse_pointwise(g.texts[0] if g.texts else "")
        for i, errs in row_errors.items():
            for method, message in errs.items():
                cols[schema.METHOD_ERROR[method]][i] = message
            cols["error"][i] = row_error(self.methods, errs)
        batch = schema.put_column(batch, schema.CONTROL_COLUMNS.field(schema.DEDUP), pa.array(dedup, pa.bool_()))
        for f in schema.ENGINE_COLUMNS:
            batch = schema.put_column(batch, f, pa.array(cols[f.name], f.type))
        return batch

    def _generate_deduplicated(self, todo: list[int], responses: list, contexts: list):
        """Engine answers for rows `todo`; rows whose (response, history) was already answered by
        this actor, or appears earlier in the batch, reuse that answer. Returns (answers by row,
        rows that reused)."""
        keys = {i: hashlib.sha1(f"{contexts[i] or ''}\x1f{responses[i]}".encode()).hexdigest() for i in todo}
        results, reused, first_of = {}, set(), {}
        for i in todo:
            k = keys[i]
            if self.cache_size and k in self.cache:
                self.cache.move_to_end(k)
                results[i] = self.cache[k]
                reused.add(i)
            elif self.cache_size and k in first_of:
                reused.add(i)
            else:
                first_of[k] = i
        fresh = list(first_of.values())
        generations = self.generator.generate(
            [responses[i] for i in fresh], [json.loads(contexts[i]) if contexts[i] else None for i in fresh]
        )
        for i, g in zip(fresh, generations, strict=True):
            results[i] = g
            if self.cache_size and g.error is None:
                self.cache[keys[i]] = g
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        for i in todo:
            if i not in results:
                results[i] = results[first_of[keys[i]]]
        return results, reused


class SimilarityStage:
    """CPU actor: parses each answer, computes word-level F1 against the real instruction, and
    shapes the batch into the declared output schema.

    Args:
        aggregate: How F1 over n samples is combined (`mean` or `max`).
        output_schema: The schema every output block is cast to.
        copy_threshold, min_response_words: Thresholds of the reward-hacking flags (`flags.py`).
        similarity: The `flip_score` metric (`config.SIMILARITIES`).
        methods: The rewards the engine stage computed; without `flip` there is nothing to compare.
    """

    def __init__(
        self,
        *,
        aggregate: str,
        output_schema: pa.Schema,
        copy_threshold: float = 0.6,
        min_response_words: int = 3,
        similarity: str = "f1",
        methods: tuple[str, ...] = ("flip",),
    ):
        self.embedder = None
        if similarity == "embedding" and "flip" in methods:
            from flip_ray.similarity import EmbeddingSimilarity

            self.embedder = EmbeddingSimilarity()
        self.similarity = similarity
        self.methods = tuple(methods)
        self.compare = "flip" in methods
        self.aggregate = aggregate
        self.output_schema = output_schema
        self.copy_threshold = copy_threshold
        self.min_response_words = min_response_words

    def __call__(self, batch: pa.Table) -> pa.Table:
        from flip_ray.flags import Flags, compute_flags
        from flip_ray.scoring import score_batch

        _require_columns(
            "SimilarityStage",
            batch,
            [schema.INSTRUCTION, schema.RESPONSE, schema.GENERATIONS, "error", schema.SHARD_TOTAL],
        )
        n = batch.num_rows
        errors = _errors(batch)
        work = set(_work_rows(batch))
        instructions = batch.column(schema.INSTRUCTION).to_pylist()
        generations = batch.column(schema.GENERATIONS).to_pylist()
        responses = batch.column(schema.RESPONSE).to_pylist()
        flip_errors = batch.column(schema.METHOD_ERROR["flip"]).to_pylist()
        names = ["inferred_instruction", "reasoning", "flip_score", "flip_precision", "flip_recall", "parse_status"]
        cols: dict[str, list] = {name: [None] * n for name in [*names, *Flags._fields]}
        scorable = []
        for i in range(n):
            if instructions[i] is not None and responses[i] is not None:
                flags = compute_flags(
                    instructions[i],
                    responses[i],
                    copy_threshold=self.copy_threshold,
                    min_response_words=self.min_response_words,
                )
                for name, value in zip(Flags._fields, flags, strict=True):
                    cols[name][i] = value
            if i not in work or not self.compare or flip_errors[i] is not None:
                continue
            if not generations[i]:
                flip_errors[i] = "engine returned no output"
                failed = {m: batch.column(schema.METHOD_ERROR[m])[i].as_py() for m in self.methods if m != "flip"}
                errors[i] = row_error(self.methods, {"flip": flip_errors[i], **{m: e for m, e in failed.items() if e}})
                continue
            scorable.append(i)
        scores = score_batch(
            [instructions[i] for i in scorable],
            [generations[i] for i in scorable],
            self.aggregate,
            self.similarity,
            self.embedder,
        )
        for i, s in zip(scorable, scores, strict=True):
            for name, value in zip(names, s, strict=False):
                cols[name][i] = value
        out = {}
        for f in self.output_schema:
            if f.name in cols:
                out[f.name] = pa.array(cols[f.name], f.type)
            elif f.name == "error":
                out[f.name] = pa.array(errors, f.type)
            elif f.name == schema.METHOD_ERROR["flip"]:
                out[f.name] = pa.array(flip_errors, f.type)
            elif f.name in batch.column_names:
                out[f.name] = batch.column(f.name).cast(f.type)
            else:
                out[f.name] = pa.nulls(n, f.type)
        for f in schema.CONTROL_COLUMNS:
            out[f.name] = batch.column(f.name)
        return pa.table(out, schema=pa.schema(list(self.output_schema) + list(schema.CONTROL_COLUMNS)))


_NUMBERS = re.compile(r"\d+")
FLAG_NAMES = ("flag_restates_prompt", "flag_too_short", "flag_language_mismatch")


def error_kind(message: str) -> str:
    """Groups error messages: drops the `<file> line N:` prefix and replaces numbers by N."""
    message = re.sub(r"^\S+ line \d+: ", "", message)
    return _NUMBERS.sub("N", message.split(" (")[0])[:120]


def _counts(values: list) -> str:
    out: dict[str, int] = {}
    for v in values:
        if v is not None:
            out[v] = out.get(v, 0) + 1
    return json.dumps(out, sort_keys=True)


def part_stats(table: pa.Table) -> dict:
    """Counts of one part file, summed by the driver into done records and the manifest."""
    d = table.select(["error", "flip_score", "n_output_tokens", "truncated", "parse_status"]).to_pydict()
    flagged = {f: sum(bool(v) for v in table.column(f).to_pylist()) for f in FLAG_NAMES}
    scores = [s for s, e in zip(d["flip_score"], d["error"], strict=True) if s is not None and e is None]
    return {
        "rows": table.num_rows,
        "scored": sum(e is None for e in d["error"]),
        "errors": sum(e is not None for e in d["error"]),
        "score_sum": float(sum(scores)),
        "flip_scored": len(scores),
        "output_tokens": sum(t or 0 for t in d["n_output_tokens"]),
        "truncated": sum(bool(t) for t in d["truncated"]),
        "flagged": json.dumps(flagged, sort_keys=True),
        "parse_status": _counts(d["parse_status"]),
        "error_kinds": _counts([error_kind(e) if e is not None else None for e in d["error"]]),
        "method_errors": json.dumps(
            {m: n for m, col in schema.METHOD_ERROR.items() if (n := len(table) - table.column(col).null_count)},
            sort_keys=True,
        ),
    }


def write_parts(batch: pa.Table, *, output_uri: str, output_schema: pa.Schema) -> pa.Table:
    """Ray Data map_batches function: writes the batch's rows as one part file per shard and
    returns what it wrote (`schema.PART_META`). The driver turns these into done records."""
    _require_columns("write_parts", batch, list(schema.CONTROL_COLUMNS.names))
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
        saved = sum(bool(batch.column(schema.DEDUP)[i].as_py()) for i in idx)
        meta.append({"shard_id": sid, "file": name, "dedup_saved": saved, **part_stats(part)})
    return pa.Table.from_pylist(meta, schema=schema.PART_META)
