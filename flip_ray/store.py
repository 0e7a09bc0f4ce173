"""The output directory of a run, and the records that make reruns exactly-once.

    output.path/
      run.json                 config fingerprint of the run that owns this directory
      config.yaml              the resolved config
      data/<shard_id>/*.parquet  scored rows, one directory per input shard
      _done/<shard_id>.json    written last for a shard: its part files, row and error counts
      manifest.json            written last for the run

A shard counts as done only when its done record exists, and the record is written only after its
part files are durably written. A rerun skips done shards, deletes whatever a previous attempt left
under an unfinished shard's directory, and removes part files a done record does not list (a
retried task's orphans), so no row is ever written twice. Reading the done records costs one small
file per shard, never one entry per row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from flip_ray.shards import InputError, is_local

logger = logging.getLogger(__name__)

RUN = "run.json"
MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"
DATA = "data"
DONE = "_done"
LAYOUT = "_layout.json"  # how each input file is cut into shards (layout.py), by file URI

# Config sections and keys that do not change any score: a rerun may change them freely.
_FINGERPRINT_EXCLUDES = {
    "input": {"path", "read_batch_rows", "check_duplicate_ids", "rescore_changed"},
    "output": None,  # None: the whole section
    "model": {
        "gpu_memory_utilization",
        "cpu_kvcache_space_gib",
        "cpu_threads",
        "tensor_parallel_size",
        "enforce_eager",
        "engine_multiprocessing",
    },
    "resources": None,
    "ray": None,
    "storage": None,
    "limits": None,
    "dedup": None,
}


class OutputError(RuntimeError):
    """The output location cannot be used as asked; the message says why and what to do."""


def shard_id(key: str) -> str:
    """A file-system-safe, stable directory name for a shard key (readable prefix + hash)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "shard"
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def config_fingerprint(config: dict, prompt_version: str = "") -> str:
    """sha256 of the resolved config without paths, resources and other keys that cannot change a
    score, plus the prompt template version (new prompt text = different scores)."""
    trimmed: dict = {"prompt_template_version": prompt_version}
    for section, values in config.items():
        excluded = _FINGERPRINT_EXCLUDES.get(section, set())
        if excluded is None:
            continue
        trimmed[section] = (
            {k: v for k, v in values.items() if k not in excluded} if isinstance(values, dict) else values
        )
    return hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()


def write_bytes_durably(fs, path: str, data: bytes) -> None:
    """Writes `data` so that once this returns it survives a crash, and is never seen half-written.

    Local files: temporary sibling, fsync, rename. Object stores: one PUT, atomic by nature.
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class OutputStore:
    """Reads and writes the bookkeeping of one output directory (local or object storage)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts))

    def check_writable_location(self) -> None:
        """Refuses a missing bucket (never created silently) or a path that is a file."""
        if not is_local(self.fs):
            bucket = self.root.split("/", 1)[0]
            try:
                exists = self.fs.exists(bucket)
            except PermissionError as e:
                raise OutputError(f"output.path {self.uri}: access to bucket {bucket!r} refused ({e})") from e
            if not exists:
                raise OutputError(
                    f"output.path {self.uri}: bucket {bucket!r} does not exist; create it first "
                    "(flip_ray never creates buckets)"
                )
        elif self.fs.isfile(self.root):
            raise OutputError(f"output.path {self.uri} is a file, not a directory")

    def probe_writable(self) -> None:
        """Creates and removes a probe file, so that an output location that cannot be written
        (read-only, no permission, not a file system) stops the job before any model loads."""
        probe = self.path(f".flip_ray-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm(probe)
        except (OSError, PermissionError, ValueError, NotImplementedError) as e:
            raise OutputError(f"output.path {self.uri} is not writable ({type(e).__name__}: {e})") from e

    def has_run(self) -> bool:
        return any(self.fs.exists(self.path(name)) for name in (RUN, MANIFEST, DATA, DONE))

    def read_json(self, *parts: str) -> dict | None:
        path = self.path(*parts)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, record: dict, *parts: str) -> None:
        write_bytes_durably(self.fs, self.path(*parts), json.dumps(record, indent=2).encode())

    def write_text(self, text: str, *parts: str) -> None:
        write_bytes_durably(self.fs, self.path(*parts), text.encode())

    def done_records(self) -> dict[str, dict]:
        """Done records by shard id: one small file per finished shard."""
        pattern = self.path(DONE, "*.json")
        self.fs.invalidate_cache(self.path(DONE))  # listings may be cached; workers and reruns write here
        out = {}
        for p in self.fs.glob(pattern):
            with self.fs.open(p, "rb") as f:
                record = json.loads(f.read())
            out[record["shard_id"]] = record
        return out

    def write_done(self, record: dict) -> None:
        self.write_json(record, DONE, f"{record['shard_id']}.json")

    def remove_shard(self, sid: str) -> None:
        """Removes a finished shard: its rows, then its done record."""
        self.clear_shard(sid)
        record = self.path(DONE, f"{sid}.json")
        if self.fs.exists(record):
            self.fs.rm(record)

    def prune_uncommitted(self, committed: set[str]) -> list[str]:
        """Deletes every shard directory under data/ without a done record in `committed` (what an
        interrupted attempt left); one listing, not one call per shard. Returns the shard ids."""
        data = self.path(DATA)
        self.fs.invalidate_cache(data)
        if not self.fs.exists(data):
            return []
        stale = [p for p in self.fs.ls(data, detail=False) if posixpath.basename(p.rstrip("/")) not in committed]
        for p in stale:
            self.fs.rm(p, recursive=True)
        return [posixpath.basename(p.rstrip("/")) for p in stale]

    def clear_shard(self, sid: str) -> None:
        """Deletes what an unfinished attempt left for a shard."""
        target = self.path(DATA, sid)
        self.fs.invalidate_cache(target)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def prune_parts(self, sid: str, keep: list[str]) -> list[str]:
        """Removes part files of a shard that its done record does not list; returns them."""
        keep_names = {posixpath.basename(k) for k in keep}
        self.fs.invalidate_cache(self.path(DATA, sid))  # parts were written by other processes
        stray = [p for p in self.fs.glob(self.path(DATA, sid, "*")) if posixpath.basename(p) not in keep_names]
        for p in stray:
            self.fs.rm(p)
        return stray

    def clear_all(self) -> None:
        for name in (MANIFEST, DATA, DONE, RUN, LAYOUT):
            target = self.path(name)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)


class NotAScoredOutput(InputError):
    """A downstream job was pointed at something that is not a usable scoring output."""


@dataclass(frozen=True)
class ScoredOutput:
    """The committed part of a scoring run's output: what downstream jobs read."""

    uri: str
    fs: object  # the fsspec file system of the output
    paths: list[str]  # the part files listed in done records (paths on `fs`), sorted
    manifest: dict | None
    rows: int

    @property
    def files(self) -> list[str]:
        """The part files as URIs (protocol included), e.g. for `ray.data.read_parquet`."""
        return [self.fs.unstrip_protocol(p) for p in self.paths]

    @property
    def config(self) -> dict | None:
        return (self.manifest or {}).get("config")


def open_scored(uri: str, *, allow_incomplete: bool = False, key: str = "input.path") -> ScoredOutput:
    """The committed rows of a scoring output (its root, or its data/ directory).

    Only part files listed in done records are read, never a stray file under data/. An output
    whose run has not finished (no manifest) or is incomplete (failed or missing shards) is refused
    unless `allow_incomplete`, naming what is missing.

    Raises:
        NotAScoredOutput: With one sentence saying what is wrong and what to do.
    """
    uri = uri.rstrip("/")
    store = OutputStore(uri)
    if not store.fs.exists(store.root):
        raise NotAScoredOutput(f"{key} {uri} does not exist")
    if posixpath.basename(store.root) == DATA and not store.has_run():
        store = OutputStore(uri[: -len(DATA)].rstrip("/"))
    if not any(store.fs.exists(store.path(name)) for name in (RUN, MANIFEST, DONE)):
        raise NotAScoredOutput(
            f"{key} {uri} is not a flip_ray scoring output (no manifest.json, run.json or _done/); "
            "pass the output.path of a `flip-ray score` run"
        )
    manifest = store.read_json(MANIFEST)
    done = store.done_records()
    problem = None
    if manifest is None:
        problem = f"its scoring run has not finished (no manifest.json; {len(done)} shard(s) done so far)"
    elif not manifest.get("complete"):
        sh = manifest["shards"]
        failed = ", ".join(f["key"] for f in sh.get("failed", [])[:3])
        problem = f"its scoring run is incomplete ({sh['done']} of {sh['total']} shards done" + (
            f"; failed: {failed})" if failed else ")"
        )
    if problem:
        if not allow_incomplete:
            raise NotAScoredOutput(
                f"{key} {uri}: {problem}. Rerun the scoring command to finish it, or pass "
                f"{'input.allow_incomplete=true' if key == 'input.path' else '--allow-incomplete'} "
                f"to use the {len(done)} finished shard(s)"
            )
        logger.warning("%s %s: %s; using the %d finished shard(s)", key, uri, problem, len(done))
    paths = sorted(store.path(DATA, sid, name) for sid, record in done.items() for name in record["files"])
    return ScoredOutput(store.uri, store.fs, paths, manifest, sum(r["rows"] for r in done.values()))
