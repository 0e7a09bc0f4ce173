"""The output directory of a run, and the records that make reruns exactly-once.

    output.path/
      run.json                 config fingerprint of the run that owns this directory
      config.yaml              the resolved config
      data/<shard_id>/*.parquet  scored rows, one directory per input shard
      _done/<shard_id>.json    written last for a shard: its part files (with their size and
                               version), row and error counts
      _layout.json, _lock.json how input files are cut into shards; the run that holds the output
      report/, logs/           the run report; the run's log (local outputs)
      manifest.json            written last for the run

Nothing else may be in an output directory: a run refuses a directory that holds anything flip_ray
does not write (`foreign_entries`), so that overwriting or pruning never deletes a user's file.

A shard counts as done only when its done record exists, and the record is written only after its
part files are durably written. A rerun skips done shards, deletes whatever a previous attempt left
under an unfinished shard's directory, and removes part files a done record does not list (a
retried task's orphans), so no row is ever written twice. Reading the done records costs one small
file per shard, never one entry per row. A done record stamps each part file (size, and the mtime_ns
of a local file or the ETag of an object), so that a rerun or a downstream job notices a part file
damaged or replaced after its commit from one listing, without reading the data.
"""

from __future__ import annotations

import contextlib
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

from flip_ray.engine.specs import THROUGHPUT_ONLY
from flip_ray.input.files import InputError, is_local

logger = logging.getLogger(__name__)

RUN = "run.json"
MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"
DATA = "data"
DONE = "_done"
LAYOUT = "_layout.json"  # how each input file is cut into shards (layout.py), by file URI
LOCK = "_lock.json"  # the run that holds the output (lock.py)
REPORT, LOGS = "report", "logs"
# Everything a run writes at the top of output.path; `.tmp-*` and `.flip_ray-probe-*` are transient
# files of an interrupted durable write or writability probe, `_lock.json.*` a lock being taken over.
OWN_ENTRIES = (RUN, MANIFEST, CONFIG_COPY, DATA, DONE, LAYOUT, LOCK, REPORT, LOGS)
_TRANSIENT = re.compile(r"^(\.tmp-[0-9a-f]+|\.flip_ray-probe-[0-9a-f]+|_lock\.json\..+)$")
_SHARD_DIR = re.compile(r"^[A-Za-z0-9._-]*-[0-9a-f]{10}$")  # shard_id()
_PART_FILE = re.compile(r"^(part-[0-9a-f]{32}\.parquet|\.tmp-[0-9a-f]+)$")  # stages.write_parts

# Config sections and keys that do not change any score: a rerun may change them freely.
# model.device and model.dtype are left out as written (`auto`) and fingerprinted resolved instead
# (`resolved_settings`), once the cluster says which device the engines run on.
_FINGERPRINT_EXCLUDES = {
    "input": {"path", "read_batch_rows", "check_duplicate_ids", "rescore_changed"},
    "output": None,  # None: the whole section
    "model": {
        "device",
        "dtype",
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


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out: dict = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def scoring_settings(config: dict, extra: dict | None = None) -> dict:
    """Everything that decides a row's scores, as flat `section.key` -> value: the resolved config
    without paths, resources and other keys that cannot change a score (the throughput-only
    `model.engine_kwargs` among them), plus `extra` (prompt
    template versions, the weights' hash, the engine's version)."""
    trimmed: dict = {}
    for section, values in config.items():
        excluded = _FINGERPRINT_EXCLUDES.get(section, set())
        if excluded is None:
            continue
        trimmed[section] = (
            {k: v for k, v in values.items() if k not in excluded} if isinstance(values, dict) else values
        )
    model = trimmed.get("model")
    if isinstance(model, dict) and "engine_kwargs" in model:  # only what can change what a request computes
        scoring = {k: v for k, v in (model.pop("engine_kwargs") or {}).items() if k not in THROUGHPUT_ONLY}
        if scoring:  # none: the fingerprint of a run without engine_kwargs
            model["engine_kwargs"] = scoring
    return {**_flatten(trimmed), **(extra or {})}


def fingerprint(settings: dict) -> str:
    """sha256 of `scoring_settings`: equal fingerprints, equal ways of scoring."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def settings_diff(before: dict, now: dict, limit: int = 6) -> str:
    """`key: old -> new` for the settings that differ (at most `limit`), for a refusal message."""
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:limit])
    return shown + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def resolved_location(uri: str) -> tuple[str, str]:
    """(protocol, path) of `uri` with `..`, `.`, repeated slashes and (locally) symlinks resolved;
    a glob is cut at its first wildcard, to the directory it searches."""
    fs, path = fsspec.core.url_to_fs(uri)
    wild = min((i for i in (path.find(c) for c in "*?[") if i >= 0), default=-1)
    if wild >= 0:
        path = posixpath.dirname(path[:wild])
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if is_local(fs):
        return "file", os.path.realpath(path)
    return protocol, posixpath.normpath("/" + path.lstrip("/"))


def overlap(a: str, b: str) -> bool:
    """Whether one of the two locations is, or is inside, the other (after resolving both)."""
    (pa_, xa), (pb, xb) = resolved_location(a), resolved_location(b)
    if pa_ != pb:
        return False
    xa, xb = xa.rstrip("/") + "/", xb.rstrip("/") + "/"
    return xa.startswith(xb) or xb.startswith(xa)


def write_bytes_durably(fs, path: str, data: bytes) -> None:
    """Writes `data` so that once this returns it survives a crash, and is never seen half-written.

    Local files: temporary sibling, fsync, rename. Object stores: one PUT, atomic by nature.
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, a stop: leave no half-written sibling behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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


def file_stamp(fs, info: dict) -> dict:
    """What identifies one written version of a file, from its listing entry: size, plus mtime_ns
    (local) or the ETag (object storage). Damage or replacement after a commit changes it."""
    stamp = {"size": int(info["size"])}
    if is_local(fs):
        stamp["mtime_ns"] = os.stat(info["name"]).st_mtime_ns
    else:
        etag = info.get("ETag") or info.get("etag")
        if etag:
            stamp["etag"] = str(etag).strip('"')
    return stamp


def stamp_problem(name: str, recorded: dict | None, found: dict | None) -> str | None:
    """Why part file `name` is not what its commit recorded, or None. Done records written before
    stamps existed (`recorded` None) only need the file to be there."""
    if found is None:
        return f"part file {name} is missing"
    if recorded is None:
        return None
    if recorded.get("size") != found.get("size"):
        return f"part file {name} has {found.get('size')} bytes, its commit recorded {recorded.get('size')}"
    for key in ("mtime_ns", "etag"):
        if key in recorded and key in found and recorded[key] != found[key]:
            return f"part file {name} was rewritten after its commit ({key} changed)"
    return None


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
            with contextlib.suppress(OSError, ValueError, NotImplementedError):
                if self.fs.exists(probe):
                    self.fs.rm(probe)
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

    def prune_parts(self, sid: str, keep: list[str]) -> tuple[dict[str, dict], list[str]]:
        """Removes part files of a shard that `keep` does not list (a retried task's orphans).

        Returns:
            (stamps of the kept part files, for its done record; names in `keep` not found).
        """
        keep_names = {posixpath.basename(k) for k in keep}
        found = self.part_stamps(sid).get(sid, {})
        for name in set(found) - keep_names:
            self.fs.rm(self.path(DATA, sid, name))
        stamps = {name: found[name] for name in sorted(keep_names) if name in found}
        return stamps, sorted(keep_names - set(found))

    def foreign_entries(self, limit: int = 5) -> list[str]:
        """Up to `limit` paths (relative to output.path) of entries that no flip_ray run writes: an
        output directory holding any of them is refused, never cleared or pruned."""
        self.fs.invalidate_cache(self.root)
        if not self.fs.isdir(self.root):
            return []
        found: list[str] = []

        def names(*parts: str) -> list[tuple[str, bool]]:
            # An object store may list a directory's own marker inside it (seen on SeaweedFS after a
            # write cut short): that entry is the directory, not a file in it.
            here = self.path(*parts).rstrip("/")
            listing = [e for e in self.fs.ls(here, detail=True) if e["name"].rstrip("/") != here]
            return [(posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in listing]

        for name, is_dir in names():
            if name in (DATA, DONE) and is_dir:
                continue
            if name in OWN_ENTRIES or _TRANSIENT.match(name):
                continue
            found.append(name)
        if self.fs.isdir(self.path(DONE)):
            found += [f"{DONE}/{n}" for n, d in names(DONE) if d or not (n.endswith(".json") or _TRANSIENT.match(n))]
        if self.fs.isdir(self.path(DATA)):
            for sid, is_dir in names(DATA):
                if not (is_dir and _SHARD_DIR.match(sid)):
                    found.append(f"{DATA}/{sid}")
                    continue
                found += [f"{DATA}/{sid}/{n}" for n, d in names(DATA, sid) if d or not _PART_FILE.match(n)]
                if len(found) >= limit:
                    break
        return found[:limit]

    def refuse_foreign(self, why: str) -> None:
        """Raises OutputError if output.path holds anything flip_ray does not write."""
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign) + (", ..." if len(foreign) >= 5 else "")
            raise OutputError(
                f"output.path {self.uri} holds files that flip_ray did not write ({shown}); flip_ray never "
                f"{why} a directory that holds other files. Choose a new or empty output.path, or move those "
                "files out"
            )

    def part_stamps(self, sid: str | None = None) -> dict[str, dict[str, dict]]:
        """Shard id -> part file name -> stamp (`file_stamp`), for one shard or for all of data/:
        one listing either way."""
        top = self.path(DATA) if sid is None else self.path(DATA, sid)
        self.fs.invalidate_cache(top)
        if not self.fs.exists(top):
            return {}
        root = self.path(DATA).rstrip("/") + "/"
        out: dict[str, dict[str, dict]] = {}
        for p, info in self.fs.find(top, detail=True).items():
            rel = p[len(root) :] if p.startswith(root) else posixpath.relpath(p, root)
            if "/" in rel:
                shard, name = rel.split("/", 1)
                out.setdefault(shard, {})[name] = file_stamp(self.fs, {**info, "name": p})
        return out

    def clear_all(self) -> None:
        """Removes every run entry (`output.overwrite=true`); refuses if anything else is there."""
        self.refuse_foreign("clears")
        for name in (MANIFEST, DATA, DONE, RUN, LAYOUT, CONFIG_COPY, REPORT):
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

    Only part files listed in done records are read, never a stray file under data/, and each is
    checked against the size and version its commit recorded. An output whose run has not finished
    (no manifest: also a run that failed its checks, `tracker.check_output`), is incomplete (failed
    or missing shards) or has part files changed since their commit is refused unless
    `allow_incomplete`, naming what is wrong; with it, the intact finished shards are used.

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
    stamps = store.part_stamps()
    damaged = {}
    for sid, record in done.items():
        recorded, found = record.get("parts") or {}, stamps.get(sid, {})
        for name in record["files"]:
            why = stamp_problem(name, recorded.get(name), found.get(name))
            if why:
                damaged[sid] = f"shard {record.get('key', sid)}: {why}"
                break
    done = {sid: r for sid, r in done.items() if sid not in damaged}
    problem = None
    if damaged:
        problem = (
            f"{len(damaged)} committed shard(s) changed after their commit ({next(iter(damaged.values()))}); "
            "a rerun of the scoring command rescores them"
        )
    elif manifest is None:
        problem = (
            f"its scoring run has not finished, or failed its checks (no manifest.json; {len(done)} shard(s) done "
            "so far)"
        )
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
