"""The Ray Data pipeline of the scoring job, and how its failures are told apart.

    pending shards -> read_shards (tasks) -> BackwardInferenceStage (engine actors)
                   -> SimilarityStage (CPU actors) -> write_parts (tasks) -> driver

The driver receives only small per-part records (`schema.PART_META`) and commits a shard (its done
record, `store.py`) once all its rows are durably written. The run around it is `flip_ray/recipe.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from flip_ray import rewards, schema
from flip_ray.config.base import blocks_in_flight
from flip_ray.engine.embedded import ModelError
from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec
from flip_ray.input.readers import ColumnMapping
from flip_ray.job import console, engine_stage, occupancy
from flip_ray.job.lock import LockLost
from flip_ray.job.plan import RunPlan
from flip_ray.job.progress import Progress
from flip_ray.job.runtime import engine_actor_options, storage_env
from flip_ray.job.stages import SimilarityStage, read_ids, read_shards, write_parts
from flip_ray.job.store import shard_id
from flip_ray.job.tracker import ErrorBudgetExceeded, ShardTracker

logger = logging.getLogger(__name__)


# Reading shards and writing parts wait on storage more than they compute: half a CPU each, so that a
# small cluster whose CPUs the engine and similarity actors hold still has room for them (a node
# lost down to 2 CPUs would otherwise deadlock with both actors placed).
IO_TASK_CPUS = 0.5


class RunInterrupted(RuntimeError):
    """The pipeline stopped on an infrastructure error (storage, cluster); finished shards are kept."""


def engine_stage_args(cfg: DictConfig, engine: EngineSpec, occupancy_board: str | None = None) -> dict:
    """Constructor arguments of `BackwardInferenceStage`."""
    return dict(
        occupancy_board=occupancy_board,
        # One block at a time: its rewards one after another too, so that every answer is computed
        # in the same batches run to run (bitwise-repeatable greedy output on CPU).
        rewards_together=blocks_in_flight(cfg.resources.max_concurrent_batches, engine.device) > 1,
        engine=engine,
        prompt=PromptSpec.from_config(cfg.model, cfg.reward),
        sampling=SamplingSpec.from_config(cfg.sampling),
        methods=rewards.resolve(cfg.reward.methods),
        settings=reward_settings(cfg),
        dedup_cache_size=cfg.dedup.cache_size if cfg.dedup.enabled else 0,
    )


def similarity_stage_args(cfg: DictConfig, output_schema: pa.Schema) -> dict:
    """Constructor arguments of `SimilarityStage`."""
    return dict(
        methods=rewards.resolve(cfg.reward.methods),
        settings=reward_settings(cfg),
        aggregate=cfg.sampling.aggregate,
        output_schema=output_schema,
        copy_threshold=cfg.flags.copy_threshold,
        min_response_words=cfg.flags.min_response_words,
    )


def reward_settings(cfg: DictConfig) -> dict:
    """The `reward` config section as plain values: what each reward reads its settings from."""
    return OmegaConf.to_container(cfg.reward, resolve=True)


def build_dataset(plan: RunPlan, cfg: DictConfig, engine: EngineSpec, occupancy_board: str | None = None):
    """The lazy Ray Dataset of per-part records (nothing runs until it is consumed): the builder
    that turns the config into each stage's constructor arguments and resources. The engine actors
    report their occupancy to the board named `occupancy_board` (`job.occupancy`)."""
    import ray

    # A failing stage raises its own exception (not Ray Data's UserCodeException wrapper), so that the
    # driver can tell a storage or cluster failure from a bug (`is_infrastructure_error`).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    r = cfg.resources
    io_env = {"env_vars": storage_env()}
    batch_rows = cfg.input.read_batch_rows or cfg.resources.batch_size
    shards = ray.data.from_items(
        [asdict(s) for s in plan.pending],
        override_num_blocks=len(plan.pending),
    )
    rows = shards.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=dict(
            mapping=plan.mapping, kept=plan.kept_schema, batch_rows=batch_rows, limit=cfg.input.limit_per_shard
        ),
        num_cpus=IO_TASK_CPUS,
        runtime_env=io_env,
    )
    # Ray Data merges what a task yields into blocks of up to `target_max_block_size` (128 MiB), so a
    # shard of text rows would travel as one block: the engine's results, the part files and the
    # driver's row progress would all wait for the whole shard. Blocks of `batch_rows` rows instead
    # (a shard's rows may then arrive in any order; its done record waits for all of them).
    rows = rows.repartition(target_num_rows_per_block=batch_rows)
    inferred = rows.map_batches(
        engine_stage.BackwardInferenceStage,  # looked up at call time: benchmarks put a stand-in there
        fn_constructor_kwargs=engine_stage_args(cfg, engine, occupancy_board),
        **engine_actor_options(engine, cfg.resources),
    )
    scored = inferred.map_batches(
        SimilarityStage,
        fn_constructor_kwargs=similarity_stage_args(cfg, plan.output_schema),
        batch_size=r.similarity_batch_size,
        batch_format="pyarrow",
        concurrency=r.similarity_concurrency,
        num_cpus=r.similarity_num_cpus,
        runtime_env=io_env,
    )
    return scored.map_batches(
        write_parts,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs=dict(
            output_uri=plan.store.uri,
            output_schema=plan.output_schema,
            methods=rewards.resolve(cfg.reward.methods),
        ),
        num_cpus=IO_TASK_CPUS,
        runtime_env=io_env,
    )


def find_duplicate_ids(plan: RunPlan, cfg: DictConfig, limit: int = 5) -> list[tuple[str, int]]:
    """Ids that occur more than once across all shards: a distributed group-by, nothing per row on
    the driver."""
    import ray

    mapping = ColumnMapping(plan.mapping.prompt, plan.mapping.response, plan.mapping.id, plan.mapping.messages)
    items = [asdict(s) for s in plan.shards]
    ids = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_ids,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=dict(mapping=mapping, batch_rows=cfg.input.read_batch_rows or 8192, limit=cfg.input.limit_per_shard),
        runtime_env={"env_vars": storage_env()},
    )
    repeated = ids.groupby(schema.ID).count().filter(lambda r: r["count()"] > 1)
    return [(r[schema.ID], r["count()"]) for r in repeated.take(limit)]


def is_infrastructure_error(e: BaseException) -> bool:
    """True for failures of the storage, the network or the cluster (a rerun may succeed), False for
    anything else, which is a bug to report. A remote exception arrives as a RayTaskError that is
    also an instance of its cause's class (`raise_original_map_exception`, set in build_dataset)."""
    import ray.exceptions as rex

    cause = e.cause if isinstance(e, rex.RayTaskError) else e
    if isinstance(cause, (OSError, ConnectionError, TimeoutError)):
        return True
    if isinstance(cause, rex.RayError) and not isinstance(cause, (rex.RayTaskError, rex.UserCodeException)):
        return True  # actor, worker or node died, object lost, out of memory
    module = type(cause).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "s3fs")) or type(cause).__name__ == "ExecutionTimeoutError"


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def start_progress(plan: RunPlan, limit: int | None, label: str) -> Progress:
    """Row progress over the pending shards: their known sizes (capped by `input.limit_per_shard`),
    and how many are of unknown size."""
    sizes = [s.rows if limit is None or s.rows is None else min(s.rows, limit) for s in plan.pending]
    known = [n for n in sizes if n is not None]
    stream = console.active().terminal if console.active() else _LogStream(logger)
    return Progress(label, sum(known), len(sizes) - len(known), stream)


class _LogStream:
    """Progress lines as log records, when no console owns the terminal (the API, tests)."""

    def __init__(self, log: logging.Logger):
        self.log = log

    def write(self, text: str) -> None:
        if text.strip():
            self.log.info(text.strip())

    def flush(self) -> None:
        pass


def execute(
    plan: RunPlan,
    cfg: DictConfig,
    engine: EngineSpec,
    attempt: str,
    label: str = "scored",
    before_commit: Callable[[], None] | None = None,
) -> ShardTracker:
    """Streams the pending shards through the pipeline and commits each finished shard (done
    record), printing row progress (`label`); returns the tracker with this run's counts and failed
    shards.

    Raises:
        ErrorBudgetExceeded, RunInterrupted (storage or cluster failed), ModelError (an engine's node
        could not load the model), LockLost (from `before_commit`: no shard is committed after it);
        anything else is a bug and propagates as it is.
    """
    tracker = ShardTracker(
        plan.store,
        plan.pending,
        attempt,
        cfg.limits.max_error_fraction,
        cfg.limits.min_rows_for_error_check,
        plan.identities,
        before_commit,
    )
    logger.info("scoring %d pending shard(s) on %s", len(plan.pending), engine.device, extra={"quiet": True})
    progress = start_progress(plan, cfg.input.limit_per_shard, label)
    unknown = {shard_id(s.key) for s in plan.pending if s.rows is None}
    board = occupancy.start_board(attempt)
    dataset = build_dataset(plan, cfg, engine, occupancy.board_name(attempt))
    batches = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for meta in batches:
            tracker.add(meta)
            for m in meta.to_pylist():
                if m["file"]:
                    progress.add(m["rows"], m["errors"])
                elif m["shard_id"] in unknown:
                    progress.add_total(m["total"])
            tracker.check_error_budget()
    except (ErrorBudgetExceeded, LockLost):
        raise
    except Exception as e:
        import ray.exceptions as rex

        cause = e.cause if isinstance(e, rex.RayTaskError) else e
        if isinstance(cause, ModelError):
            raise ModelError(f"the engine could not load the model on its node: {_last_line(e)}") from e
        if not is_infrastructure_error(e):
            raise  # a bug: shown with its traceback
        raise RunInterrupted(
            f"the run stopped before finishing: {_last_line(e)}. {tracker.completed} shard(s) finished in this run "
            f"and are kept in {plan.store.uri}; rerun with the same config to resume"
        ) from e
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    progress.close()
    tracker.occupancy = occupancy.collect(board)
    for sid, entry in tracker.open.items():
        if sid not in tracker.failed:
            tracker.failed[sid] = (
                f"incomplete: {entry['rows']} of {entry['total'] if entry['total'] is not None else '?'} rows "
                "were written when the stream ended"
            )
    for sid in tracker.failed:
        plan.store.clear_shard(sid)  # partial rows of a failed shard: redone on rerun
    return tracker
