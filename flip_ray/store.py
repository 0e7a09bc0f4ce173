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
import os
import posixpath
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

RUN = "run.json"
MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"
DATA = "data"
DONE = "_done"

# Config sections and keys that do not change any score: a rerun may change them freely.
_FINGERPRINT_EXCLUDES = {
    "input": {"path", "read_batch_rows", "check_duplicate_ids"},
    "output": None,  # None: the whole section
    "model": {
        "gpu_memory_utilization",
        "cpu_kvcache_space_gib",
        "cpu_threads",
        "tensor_parallel_size",
        "enforce_eager",
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


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def write_bytes_durably(fs, path: str, data: bytes) -> None:
    """Writes `data` so that once this returns it survives a crash, and is never seen half-written.

    Local files: temporary sibling, fsync, rename. Object stores: one PUT, atomic by nature.
    """
    if _is_local(fs):
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
        if not _is_local(self.fs):
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
        for name in (MANIFEST, DATA, DONE, RUN):
            target = self.path(name)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
