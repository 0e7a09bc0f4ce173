"""Where jobs run: starting or joining Ray, choosing the device, the storage settings workers get,
and the `map_batches` options of an engine stage. Shared by every job that uses the cluster
(score, evaluate, the per-pair judges, filter, pairs)."""

from __future__ import annotations

import contextlib
import os
import signal
from functools import partial

import fsspec
from omegaconf import DictConfig

from flip_ray.config.base import blocks_in_flight, engine_pool
from flip_ray.engine.specs import EngineSpec
from flip_ray.input.files import is_local
from flip_ray.job import console
from flip_ray.job.store import OutputError

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


# Restarts of one engine actor over a run (node losses, dead engines), and retries of one batch.
ENGINE_MAX_RESTARTS = 8
ENGINE_MAX_TASK_RETRIES = 3


def apply_storage_config(storage: DictConfig) -> None:
    """Exports `storage.*` as the standard AWS variables for this process (and, through
    `storage_env`, its workers). Only non-secret settings live in the config."""
    for key, var in (("endpoint_url", "AWS_ENDPOINT_URL"), ("profile", "AWS_PROFILE"), ("region", "AWS_REGION")):
        value = storage[key]
        if value:
            os.environ[var] = str(value)


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if k in os.environ}


def on_cluster(ray_cfg: DictConfig) -> bool:
    """Whether the job joins an existing cluster (`ray.address` or `RAY_ADDRESS`) rather than
    starting a local Ray."""
    return bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def init_ray(ray_cfg: DictConfig):
    """Joins the cluster at `ray.address` (else `RAY_ADDRESS`), or starts a local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the SIGTERM handler with sys.exit, which tears the process down mid-run with
    # a C++ stack dump; the CLI's handler (a clean stop, exit 143) is put back.
    handler = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=ray_cfg.local_num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
    if callable(handler) and handler is not signal.getsignal(signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: Ray's handler stays
            signal.signal(signal.SIGTERM, handler)
    if console.active() is not None:
        console.active().quiet_libraries()
        console.active().capture_process_output()
    return ray


def resolve_device(requested: str, cluster_gpus: float) -> str:
    """`model.device`, with `auto` resolved: GPU when the cluster has GPUs."""
    if requested != "auto":
        return requested
    return "gpu" if cluster_gpus > 0 else "cpu"


def engine_actor_options(engine: EngineSpec, resources: DictConfig) -> dict:
    """`map_batches` options of an engine stage: batch size, the actor pool (its size, or min and max
    to autoscale, and the blocks each actor works on at once), GPUs and CPUs per actor, and the
    engine's environment (plus the storage settings)."""
    import ray

    num_gpus = resources.num_gpus
    if num_gpus is None:
        num_gpus = engine.tensor_parallel_size if engine.device == "gpu" else 0
    pool = engine_pool(resources.concurrency)
    size = {"size": pool} if isinstance(pool, int) else {"min_size": pool[0], "max_size": pool[1]}
    return dict(
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        # Blocks in flight per engine actor: Ray Data calls it from this many threads at once (its
        # UDF really runs concurrently only with enable_true_multi_threading), and their requests
        # share the actor's one engine queue (`engine.queue`).
        compute=ray.data.ActorPoolStrategy(
            **size,
            max_concurrent_calls_per_actor=blocks_in_flight(resources.max_concurrent_batches, engine.device),
            enable_true_multi_threading=True,
        ),
        num_gpus=num_gpus,
        num_cpus=resources.num_cpus,
        runtime_env={"env_vars": {**engine.env(), **storage_env()}},
        # An engine actor that dies (its EngineCore process killed, a GPU fault, its node lost) is
        # restarted and its batch retried elsewhere. Ray Data's default is -1 for both (forever): a
        # batch that kills every engine it meets would then loop for good, so retries are bounded;
        # past them the run stops with exit 3 and a rerun resumes.
        ray_remote_args_fn=partial(dict, max_restarts=ENGINE_MAX_RESTARTS, max_task_retries=ENGINE_MAX_TASK_RETRIES),
    )


def _sees(paths: list[str]) -> bool:
    return all(os.path.exists(p) for p in paths)


def _local(uri: str) -> bool:
    return is_local(fsspec.core.url_to_fs(uri)[0])


def check_paths_on_cluster(ray, plan, shared_filesystem: bool) -> None:
    """Refuses local paths that the nodes of a multi-node cluster would not share, before any model
    loads: every node reads input shards and writes part files. With `shared_filesystem`, a probe
    file in the output directory must be visible from every node.

    Raises:
        OutputError: Naming the path, s3:// and `storage.shared_filesystem`.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = [uri for uri in (plan.store.uri, plan.files[0].uri) if _local(uri)]
    if len(nodes) <= 1 or not local:
        return
    if not shared_filesystem:
        raise OutputError(
            f"{' and '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}, but the Ray "
            f"cluster has {len(nodes)} nodes and every node reads shards and writes part files: use s3:// (or "
            "another object store), or a shared file system mounted at the same path on every node and then "
            "storage.shared_filesystem=true"
        )
    # What every node must see: a probe file written in a local output, the first local input file.
    paths = [fsspec.core.url_to_fs(plan.files[0].uri)[1]] if _local(plan.files[0].uri) else []
    probe = None
    if _local(plan.store.uri):
        probe = plan.store.path(f".flip_ray-node-probe-{os.getpid()}")
        plan.store.fs.makedirs(plan.store.root, exist_ok=True)
        plan.store.fs.pipe_file(probe, b"probe")
        paths.append(probe)
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        checks = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes
        ]
        seen = ray.get(checks)
        blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen, strict=True) if not ok]
    finally:
        if probe is not None:
            plan.store.fs.rm(probe)
    if blind:
        raise OutputError(
            f"storage.shared_filesystem=true, but node(s) {', '.join(blind)} cannot see {', '.join(local)}: mount "
            "the shared file system at the same path on every node, or use s3://"
        )
