"""Row-bounded shards: an input file split into shards of at most `input.rows_per_shard` rows, so that
resume and reading are bounded in rows, not files (a crash 90% through a 1M-row file redoes one
shard, and many tasks read the file).

- Parquet: by row groups, from the footer (no data read); a row group larger than the bound is
  split into row ranges inside it.
- HF `save_to_disk` Arrow files: by record batches, counted from the stream.
- JSONL: by byte ranges aligned to line starts. The file's rows are counted once, in a streaming
  pass that reads bytes and looks at no JSON (it costs a read of the file, in the driver, beside
  the scoring's), and the byte offset of every `rows_per_shard`-th row is kept; a reader seeks to
  its range and never parses the lines before it. Compressed files and JSON-array files cannot
  be cut and stay whole, their rows unknown until read.

The row counts also give the run's progress an exact total.

Derived ids stay `<file>:<row index in the file>`, the same whatever the shard size. A layout
depends only on the file's content and the bound; it is cached in the output directory
(`_layout.json`, by file, with the file's identity) so that a rerun does not count again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from flip_ray.input.files import HF, JSONL, PARQUET, Shard, open_file


def parquet_row_groups(uri: str) -> list[int]:
    with open_file(uri) as f:
        md = pq.ParquetFile(f).metadata
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def hf_batches(uri: str) -> list[int]:
    with open_file(uri) as f:
        return [batch.num_rows for batch in pa.ipc.open_stream(f)]


def jsonl_cuts(uri: str, rows_per_shard: int) -> tuple[int, list[list[int]]]:
    """The rows of a JSONL file (non-blank lines, as the reader counts them) and, for every
    `rows_per_shard`-th row, `[row, byte offset of its line, line number]`."""
    rows, pos, cuts = 0, 0, []
    with open_file(uri, block_size=1 << 22) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                if rows % rows_per_shard == 0:
                    cuts.append([rows, pos, lineno])
                rows += 1
            pos += len(line)
    return rows, cuts


def _countable_jsonl(uri: str) -> bool:
    if uri.lower().endswith(".gz"):
        return False
    with open_file(uri) as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf").lstrip()
    return not head.startswith(b"[")  # a JSON array is parsed whole


def measure(shard: Shard, rows_per_shard: int) -> dict | None:
    """A file's layout record (what `split` needs), or None for a file that is read whole, its rows
    unknown until then."""
    if shard.format == PARQUET:
        return {"units": parquet_row_groups(shard.uri)}
    if shard.format == HF:
        return {"units": hf_batches(shard.uri)}
    if shard.format == JSONL and _countable_jsonl(shard.uri):
        rows, cuts = jsonl_cuts(shard.uri, rows_per_shard)
        return {"rows": rows, "cuts": cuts}
    return None


def _ranges(units: list[int], rows_per_shard: int) -> list[tuple[int, int]]:
    """(first row, rows) of the shards of a file made of `units` (row groups, record batches):
    whole units grouped up to the bound, a unit above it cut into ranges inside it."""
    out, start, count = [], 0, 0
    for n in units:
        if count and count + n > rows_per_shard:
            out.append((start, count))
            start, count = start + count, 0
        if n > rows_per_shard:
            for k in range(0, n, rows_per_shard):
                out.append((start + k, min(rows_per_shard, n - k)))
            start += n
            continue
        count += n
    if count or not out:
        out.append((start, count))
    return out


def split(shard: Shard, record: dict | None, rows_per_shard: int) -> list[Shard]:
    """The shards of one file from its layout record (`measure`); a file within the bound stays one
    shard, with its file's name as its key (so small files keep the keys they always had)."""
    if record is None:
        return [shard]
    if "units" in record:
        ranges = _ranges(record["units"], rows_per_shard)
        if len(ranges) == 1:
            return [replace(shard, rows=ranges[0][1])]
        return [replace(shard, key=f"{shard.file_key}#rows={a}-{a + n}", first_row=a, rows=n) for a, n in ranges]
    cuts, total = record["cuts"], record["rows"]
    if len(cuts) <= 1:
        return [replace(shard, rows=total)]
    out = []
    for k, (row, offset, lineno) in enumerate(cuts):
        stop_row, stop_byte = (cuts[k + 1][0], cuts[k + 1][1]) if k + 1 < len(cuts) else (total, None)
        out.append(
            replace(
                shard,
                key=f"{shard.file_key}#rows={row}-{stop_row}",
                first_row=row,
                rows=stop_row - row,
                byte_start=0 if k == 0 else offset,  # the first shard keeps the file's start (BOM)
                byte_stop=stop_byte,
                first_line=1 if k == 0 else lineno,
            )
        )
    return out


def split_files(
    files: list[Shard], identities: dict[str, dict], rows_per_shard: int, cached: dict[str, dict]
) -> tuple[list[Shard], dict[str, dict]]:
    """The shards of `files`, and the layout records of all of them (`cached` entries reused where
    the file's identity and the bound are unchanged, the others measured in parallel)."""

    def record(f: Shard) -> dict:
        entry = cached.get(f.uri)
        if entry and entry["identity"] == identities[f.uri] and entry["rows_per_shard"] == rows_per_shard:
            return entry
        layout = measure(f, rows_per_shard)
        return {"identity": identities[f.uri], "rows_per_shard": rows_per_shard, "layout": layout}

    with ThreadPoolExecutor(max_workers=8) as pool:
        records = dict(zip([f.uri for f in files], pool.map(record, files), strict=True))
    shards = [s for f in files for s in split(f, records[f.uri]["layout"], rows_per_shard)]
    return shards, records
