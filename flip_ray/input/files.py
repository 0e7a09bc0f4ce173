"""Input shards: finding them (a file, directory or glob; local or s3://; Parquet, JSONL, HF
`save_to_disk`) and telling whether a file changed since it was read (`source_identity`).

A shard is one input file, or a range of its rows when the file is big (`sharding.split`): what is
read, scored and committed as one. File systems go through fsspec (s3fs for s3://), configured by the
standard AWS variables. Reading a shard's rows is `readers.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

from flip_ray.text.rows import InputError  # raised here; importable from here too

PARQUET, JSONL, HF = "parquet", "jsonl", "hf"
_SUFFIXES = (
    (".parquet", PARQUET),
    (".pq", PARQUET),
    (".jsonl.gz", JSONL),
    (".json.gz", JSONL),
    (".ndjson.gz", JSONL),
    (".jsonl", JSONL),
    (".json", JSONL),
    (".ndjson", JSONL),
)
_IDENTITY_BYTES = 64 * 1024
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """A file, or a range of its rows (`sharding.split`): what is read, scored and committed as one."""

    uri: str  # the file's full URI, protocol included for remote files
    format: str  # parquet | jsonl | hf (an Arrow stream file of a saved HF dataset)
    key: str  # the shard's name, stable across runs: the file key, plus "#rows=a-b" when split
    file_key: str = ""  # the file's path relative to the input root, used in derived ids
    first_row: int = 0  # index in the file of the shard's first row
    rows: int | None = None  # rows in the shard when known (None: a JSONL file not counted)
    byte_start: int = 0  # JSONL: the shard's rows are the lines that start in [byte_start, byte_stop)
    byte_stop: int | None = None
    first_line: int = 1  # JSONL: the line number at byte_start, for error messages

    def __post_init__(self):
        if not self.file_key:
            object.__setattr__(self, "file_key", self.key)


def _format_of(path: str) -> str | None:
    lowered = path.lower()
    for suffix, fmt in _SUFFIXES:
        if lowered.endswith(suffix):
            return fmt
    return None


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _hf_shards(fs, root: str) -> list[tuple[str, str]] | None:
    """Arrow files of a `save_to_disk` directory (Dataset or DatasetDict), or None if it is not one."""
    if fs.isfile(posixpath.join(root, "state.json")):
        with fs.open(posixpath.join(root, "state.json"), "r") as f:
            state = json.load(f)
        files = [d["filename"] for d in state.get("_data_files", [])]
        return [(posixpath.join(root, name), name) for name in files]
    if fs.isfile(posixpath.join(root, "dataset_dict.json")):
        with fs.open(posixpath.join(root, "dataset_dict.json"), "r") as f:
            splits = json.load(f).get("splits", [])
        out = []
        for split in splits:
            inner = _hf_shards(fs, posixpath.join(root, split)) or []
            out += [(p, f"{split}/{rel}") for p, rel in inner]
        return out
    return None


def _directory_files(fs, path: str, fmt: str) -> list[tuple[str, str, str]]:
    """(path, format, key) of the data files under a directory. Only files with a data extension are
    shards (READMEs, licenses and the like are skipped); `input.format` only says how to read them."""
    found, skipped = [], []
    for p in sorted(fs.find(path)):
        rel = posixpath.relpath(p, path)
        if _is_hidden(rel):
            continue
        if _format_of(p) is None:
            skipped.append(rel)
            continue
        found.append((p, fmt if fmt not in ("auto", HF) else _format_of(p), rel))
    if skipped:
        logger.warning(
            "input.path %s: skipping %d file(s) without a data extension: %s", path, len(skipped), skipped[:5]
        )
    return found


def list_shards(uri: str, fmt: str = "auto") -> list[Shard]:
    """Resolves `input.path` (file, directory or glob) into shards, sorted by key.

    Raises:
        InputError: The path does not exist or holds no readable file.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open input.path {uri}: {e}") from e
    found: list[tuple[str, str, str]] = []  # (path, format, key)
    try:
        if any(ch in path for ch in "*?["):
            base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
            for p in sorted(fs.glob(path)):
                if fs.isfile(p):
                    found.append((p, fmt if fmt not in ("auto", HF) else _format_of(p), posixpath.relpath(p, base)))
        elif fs.isdir(path):
            hf = _hf_shards(fs, path) if fmt in ("auto", HF) else None
            found = [(p, HF, rel) for p, rel in hf] if hf is not None else _directory_files(fs, path, fmt)
        elif fs.isfile(path):
            found.append((path, fmt if fmt != "auto" else _format_of(path), posixpath.basename(path)))
        else:
            raise InputError(f"input.path {uri} does not exist")
    except (FileNotFoundError, PermissionError, OSError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot list input.path {uri}: {e}") from e
    unknown = [p for p, f, _ in found if f is None]
    if unknown:
        raise InputError(
            f"cannot tell the format of {unknown[0]} (expected .parquet, .jsonl, .jsonl.gz or .json); set input.format"
        )
    if not found:
        raise InputError(f"input.path {uri} holds no .parquet, .jsonl(.gz) or saved HF dataset files")
    return [Shard(uri=fs.unstrip_protocol(p), format=f, key=k) for p, f, k in sorted(found, key=lambda x: x[2])]


def _content_tag(info: dict) -> str | None:
    """The server's content hash or version of an object (S3 ETag, GCS md5/generation), if any."""
    for key in ("ETag", "etag", "md5Hash", "generation", "version_id"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return None


def source_identity(uri: str) -> dict:
    """A cheap identity of an input file's current content, stored in each done record so that a
    rerun can tell a file that changed since it was scored.

    Object stores: size and the server's content tag (S3's ETag changes with every new content; no
    byte is read). Local files: size, mtime in ns and a sha256 of the first and last 64 KiB (two
    small reads), so that an edit is caught even when it keeps the size or the mtime (`cp -p`,
    `rsync -t`). A file that is touched without a change counts as changed: rescoring is the safe side.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    info = fs.info(path)
    size = int(info.get("size") or 0)
    tag = None if is_local(fs) else _content_tag(info)
    if tag is not None:
        return {"size": size, "tag": tag}
    identity: dict = {"size": size}
    if is_local(fs):
        identity["mtime_ns"] = os.stat(path).st_mtime_ns
    else:
        identity["mtime"] = str(info.get("mtime") or info.get("LastModified") or info.get("last_modified"))
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        h.update(f.read(_IDENTITY_BYTES))
        if size > 2 * _IDENTITY_BYTES:
            f.seek(size - _IDENTITY_BYTES)
        h.update(f.read(_IDENTITY_BYTES))
    identity["head_tail_sha256"] = h.hexdigest()
    return identity


def source_identities(uris: list[str]) -> dict[str, dict]:
    """`source_identity` of each file, read in parallel (object stores answer in tens of ms each)."""
    unique = list(dict.fromkeys(uris))
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return dict(zip(unique, pool.map(source_identity, unique), strict=True))
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise InputError(f"cannot read the input files' sizes and dates: {e}") from e


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local one (a path this host sees, maybe on a shared mount)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def open_file(uri: str, mode: str = "rb", **kwargs):
    """Opens a file through its fsspec file system; kwargs (`compression`, `block_size`) go to
    `fs.open` (passed to `fsspec.open` they would configure the file system instead)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.open(path, mode, **kwargs)
