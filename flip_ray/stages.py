"""The Ray Data stages of the scoring job. Each is a function or callable class on pyarrow batches.

`read_shards` (tasks)
    reads: `uri`, `format`, `key` (one row per input shard)
    writes: `id`, kept input columns, `_flip_instruction`, `_flip_response`, `_flip_context`, `error`
`BackwardInferenceStage` (engine actors, GPU or CPU)
    reads: `_flip_response`, `_flip_context`, `error`
    writes: `_flip_generations`, `finish_reason`, `n_prompt_tokens`, `n_output_tokens`, `truncated`,
    `error`
`SimilarityStage` (CPU actors)
    reads: `_flip_instruction`, `_flip_generations` and the columns above
    writes: the output schema (`schema.output_schema`): FLIP columns added, internal columns dropped

Rows with `error` set pass through every stage untouched and are never sent to the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pyarrow as pa

from flip_ray import schema
from flip_ray.io import ColumnMapping, Shard, read_shard

logger = logging.getLogger(__name__)


def _require_columns(stage: str, batch: pa.Table, columns: list[str]) -> None:
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise KeyError(f"{stage}: batch lacks column(s) {missing}; it has {batch.column_names}")


def read_shards(
    batch: pa.Table, *, mapping: ColumnMapping, batch_rows: int, limit: int | None = None
) -> Iterator[pa.Table]:
    """Ray Data map_batches function: streams each shard named in `batch` as normalised blocks."""
    _require_columns("read_shards", batch, ["uri", "format", "key"])
    for row in batch.to_pylist():
        shard = Shard(uri=row["uri"], format=row["format"], key=row["key"])
        yield from read_shard(shard, mapping, batch_rows, limit)


def _errors(batch: pa.Table) -> list[str | None]:
    return batch.column("error").to_pylist()


class BackwardInferenceStage:
    """Engine actor: one `vllm.LLM` per actor, built once; generates FLIP answers per batch.

    Args:
        model: Checkpoint directory or model name; None prepares and uses the embedded model.
        dtype, max_model_len, tensor_parallel_size, gpu_memory_utilization, enable_prefix_caching,
        enforce_eager, trust_remote_code: vLLM engine arguments.
        temperature, top_p, max_tokens, seed, n: Sampling parameters.
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
    ):
        from flip_ray.engine import FlipGenerator, build_llm

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
        )
        self.generator = FlipGenerator(llm, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, n=n)

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require_columns("BackwardInferenceStage", batch, [schema.RESPONSE, schema.CONTEXT, "error"])
        errors = _errors(batch)
        todo = [i for i, e in enumerate(errors) if e is None]
        responses = batch.column(schema.RESPONSE).to_pylist()
        contexts = batch.column(schema.CONTEXT).to_pylist()
        generations = self.generator.generate(
            [responses[i] for i in todo], [json.loads(contexts[i]) if contexts[i] else None for i in todo]
        )
        n = batch.num_rows
        cols: dict[str, list] = {name: [None] * n for name in schema.ENGINE_COLUMNS.names}
        cols["error"] = list(errors)
        for i, g in zip(todo, generations, strict=False):
            cols[schema.GENERATIONS][i] = g.texts
            cols["finish_reason"][i] = g.finish_reason
            cols["n_prompt_tokens"][i] = g.n_prompt_tokens
            cols["n_output_tokens"][i] = g.n_output_tokens
            cols["truncated"][i] = g.truncated
            cols["error"][i] = g.error
        for f in schema.ENGINE_COLUMNS:
            array = pa.array(cols[f.name], f.type)
            if f.name in batch.column_names:
                batch = batch.set_column(batch.schema.get_field_index(f.name), f, array)
            else:
                batch = batch.append_column(f, array)
        return batch


class SimilarityStage:
    """CPU actor: parses each answer, computes word-level F1 against the real instruction, and
    shapes the batch into the declared output schema.

    Args:
        aggregate: How F1 over n samples is combined (`mean` or `max`).
        output_schema: The schema every output block is cast to.
    """

    def __init__(self, *, aggregate: str, output_schema: pa.Schema):
        self.aggregate = aggregate
        self.output_schema = output_schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        from flip_ray.scoring import score_generations

        _require_columns("SimilarityStage", batch, [schema.INSTRUCTION, schema.GENERATIONS, "error"])
        n = batch.num_rows
        errors = _errors(batch)
        instructions = batch.column(schema.INSTRUCTION).to_pylist()
        generations = batch.column(schema.GENERATIONS).to_pylist()
        names = ["inferred_instruction", "reasoning", "flip_score", "flip_precision", "flip_recall", "parse_status"]
        cols: dict[str, list] = {name: [None] * n for name in names}
        for i in range(n):
            if errors[i] is not None or not generations[i]:
                if errors[i] is None:
                    errors[i] = "engine returned no output"
                continue
            s = score_generations(instructions[i], generations[i], self.aggregate)
            for name, value in zip(names, s, strict=False):
                cols[name][i] = value
        out = {}
        for f in self.output_schema:
            if f.name in cols:
                out[f.name] = pa.array(cols[f.name], f.type)
            elif f.name == "error":
                out[f.name] = pa.array(errors, f.type)
            elif f.name in batch.column_names:
                out[f.name] = batch.column(f.name).cast(f.type)
            else:
                out[f.name] = pa.nulls(n, f.type)
        return pa.table(out, schema=self.output_schema)
