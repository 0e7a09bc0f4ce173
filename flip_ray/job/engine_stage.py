"""The engine stage of the scoring job, and the pure functions it is made of.

`BackwardInferenceStage` (engine actors, GPU or CPU)
    reads: `_flip_instruction`, `_flip_response`, `_flip_context`, `error`, `_flip_shard_total`
    writes: `schema.engine_fields(methods)`: each reward's engine columns (`rewards`), `finish_reason`,
    `n_prompt_tokens`, `n_output_tokens`, `truncated`, the `<method>_error` columns, `error`, and
    `_flip_dedup`

Rows with `error` set, and shard markers, pass through untouched and never reach the engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pyarrow as pa

from flip_ray import rewards, schema
from flip_ray.engine.embedded import check_model_path, prepare_default_model
from flip_ray.engine.generation import EngineWatchdog, exit_for_restart
from flip_ray.engine.queue import EngineQueue, is_fatal_engine_error
from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec
from flip_ray.job.occupancy import Reporter
from flip_ray.job.stages import require_columns, row_error, work_rows


def merge_results(
    n: int,
    todo: list[int],
    methods: Sequence[rewards.RewardMethod],
    errors: list[str | None],
    results: Mapping[str, list[rewards.RowScore]],
) -> dict[str, list]:
    """The engine stage's output columns for a batch of `n` rows (`schema.engine_fields`), from each
    reward's `RowScore`s for rows `todo`. The shared columns take the first reward's value in the
    registry's order (`n_prompt_tokens`) or any (`truncated`); a reward's failure goes to its
    `<method>_error`, and `error` is set only when every reward failed."""
    names = [m.name for m in methods]
    cols: dict[str, list] = {name: [None] * n for name in schema.engine_fields(methods).names}
    cols["error"] = list(errors)
    dedup = [None] * n
    for k, i in enumerate(todo):
        truncated, failed = False, {}
        for m in methods:
            if m.name not in results:
                continue
            r = results[m.name][k]
            for column, value in r.values.items():
                cols[column][i] = value
            if cols["n_prompt_tokens"][i] is None:
                cols["n_prompt_tokens"][i] = r.n_prompt_tokens
            truncated |= r.truncated
            dedup[i] = bool(dedup[i]) or r.reused
            if r.error:
                failed[m.name] = r.error
                cols[m.error_column][i] = r.error
        cols["truncated"][i] = truncated
        cols["error"][i] = row_error(names, failed)
    cols[schema.DEDUP] = dedup
    return cols


def score_together(parts: Sequence[tuple[rewards.RewardMethod, Any]], rows: rewards.EngineRows) -> dict[str, list]:
    """Each reward's engine part on `rows`, all at the same time, one thread each: their requests meet
    in the engine's queue (`engine.queue.EngineQueue`), so a likelihood prefill runs beside the
    decodes instead of after the slowest. A reward that `uses` another starts when that one is done.
    Returns each reward's `RowScore`s by name; the first error of a part is raised."""
    if len(parts) == 1:
        method, part = parts[0]
        return {method.name: part.score(rows, {})}
    futures: dict[str, Future] = {}

    def run(method: rewards.RewardMethod, part) -> list[rewards.RowScore]:
        earlier = {name: futures[name].result() for name in method.uses if name in futures}
        return part.score(rows, earlier)

    with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="flip-ray-reward") as pool:
        for method, part in parts:  # the registry's order: what a reward uses comes before it
            futures[method.name] = pool.submit(run, method, part)
        return {name: f.result() for name, f in futures.items()}


class BackwardInferenceStage:
    """Engine actor: one `vllm.LLM` per actor, built once; each reward's engine part is built on it
    once. The rewards of a block run at the same time (`score_together`), and Ray Data may call the
    actor with several blocks at once (`resources.max_concurrent_batches` threads): every request
    goes to the one engine queue.

    Args:
        engine: The engine (model, dtype, window, ...), built in this actor.
        prompt: The FLIP prompt.
        sampling: Decoding of `flip`.
        methods: The rewards to compute (`rewards.RewardMethod`, resolved on the driver, so that a
            reward registered there runs here too).
        settings: The `reward` config section as plain values (each reward reads its own keys).
        dedup_cache_size: `flip` answers remembered per actor for identical (response, history)
            rows; 0 turns deduplication off.
        occupancy_board: The name of the run's `job.occupancy.OccupancyBoard`, where the engine
            queue's counts go after each block; None: not reported.
        rewards_together: Run the rewards of a block at the same time (their requests batched
            together as they come); False: one after another, so that the batches every answer is
            computed in are the same run to run (`resources.max_concurrent_batches=1`).
    """

    def __init__(
        self,
        *,
        engine: EngineSpec,
        prompt: PromptSpec,
        sampling: SamplingSpec,
        methods: Sequence[rewards.RewardMethod],
        settings: Mapping[str, Any],
        dedup_cache_size: int = 0,
        occupancy_board: str | None = None,
        rewards_together: bool = True,
    ):
        if engine.model is None:  # the embedded model, converted once per node
            engine = replace(engine, model=str(prepare_default_model()))
        check_model_path(engine.model, load_format=engine.load_format)  # here: ModelError, not a vLLM trace
        llm = engine.build()
        if engine.multiprocessing:
            EngineWatchdog(llm)  # a dead EngineCore process ends this actor instead of hanging it
        self.methods = tuple(methods)
        setup = rewards.EngineSetup(prompt, sampling, dict(settings), dedup_cache_size)
        self.parts = [(m, m.engine(llm, setup)) for m in self.methods if m.engine is not None]
        self.rewards_together = rewards_together
        self.queue = EngineQueue.of(llm)
        self.reporter = Reporter(occupancy_board)
        self.in_flight, self.max_in_flight = 0, 0  # blocks this actor works on at once
        self.lock = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._score(batch)
        except Exception as e:
            if is_fatal_engine_error(e):  # a dead engine: never error rows, a restarted actor instead
                exit_for_restart(f"{type(e).__name__}: {e}")
            raise
        finally:
            with self.lock:
                self.in_flight -= 1

    def _score(self, batch: pa.Table) -> pa.Table:
        require_columns(
            "BackwardInferenceStage",
            batch,
            [schema.INSTRUCTION, schema.RESPONSE, schema.CONTEXT, "error", schema.SHARD_TOTAL],
        )
        todo = work_rows(batch)
        instructions, responses, raw_contexts = (
            [column[i] for i in todo]
            for column in (batch.column(c).to_pylist() for c in (schema.INSTRUCTION, schema.RESPONSE, schema.CONTEXT))
        )
        rows = rewards.EngineRows(
            instructions, responses, [json.loads(c) if c else None for c in raw_contexts], raw_contexts
        )
        if self.rewards_together:
            results = score_together(self.parts, rows)
        else:
            results = {}
            for method, part in self.parts:
                results[method.name] = part.score(rows, {u: results[u] for u in method.uses if u in results})
        cols = merge_results(batch.num_rows, todo, self.methods, batch.column("error").to_pylist(), results)
        batch = schema.put_column(
            batch, schema.CONTROL_COLUMNS.field(schema.DEDUP), pa.array(cols.pop(schema.DEDUP), pa.bool_())
        )
        for f in schema.engine_fields(self.methods):
            batch = schema.put_column(batch, f, pa.array(cols[f.name], f.type))
        self.reporter.put({**self.queue.occupancy.counts(), "max_blocks_in_flight": self.max_in_flight})
        return batch
