"""The rule above all, checked from outside: after a run that exits 0, the output holds exactly one
row per row of the *current* input, from its current text, and the manifest counts what is there.

The input is read here with plain json/pyarrow, not with flip_ray's reader, so that a reader bug
cannot hide itself. Local or s3:// outputs (through fsspec).
"""

from __future__ import annotations

import json
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq")


def _input_files(fs, root: str) -> list[tuple[str, str]]:
    """(path, key relative to the input) of the data files under `root`, as flip_ray lists them."""
    if fs.isfile(root):
        return [(root, posixpath.basename(root))]
    out = []
    for p in sorted(fs.find(root)):
        rel = posixpath.relpath(p, root)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if p.lower().endswith(_DATA_SUFFIXES):
            out.append((p, rel))
    return out


def input_rows(uri: str, *, id_column: str | None = None, text_column: str = "response") -> dict[str, str | None]:
    """Expected output id -> the row's current text in `text_column` (None when absent or not text)."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    rows: dict[str, str | None] = {}
    for path, key in sorted(_input_files(fs, root.rstrip("/")), key=lambda x: x[1]):
        if path.lower().endswith((".parquet", ".pq")):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            # Text as bytes, decoded leniently: a file may hold invalid UTF-8 (that row is an error row).
            columns = {
                name: [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                    for v in (col.cast(pa.binary()) if pa.types.is_string(col.type) else col).to_pylist()
                ]
                for name, col in zip(table.column_names, table.columns, strict=True)
            }
            records = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        else:
            with fs.open(path, "rb") as f:
                lines = [line for line in f.read().split(b"\n") if line.strip()]
            records = []
            for line in lines:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                records.append(obj if isinstance(obj, dict) else {})
        for index, record in enumerate(records):
            rid = str(record[id_column]) if id_column and record.get(id_column) is not None else f"{key}:{index}"
            assert rid not in rows, f"the test input repeats id {rid}"
            text = record.get(text_column)
            rows[rid] = text if isinstance(text, str) else None
    return rows


def assert_output_matches_input(
    out, inp, *, id_column: str | None = None, text_column: str = "response", complete: bool = True
) -> None:
    """Asserts the invariant for output directory `out` made from input `inp`."""
    expected = input_rows(inp, id_column=id_column, text_column=text_column)
    fs, root = fsspec.core.url_to_fs(str(out))
    root = root.rstrip("/")
    fs.invalidate_cache()
    # Every file under data/ is read, as `pq.read_table("out/data")` would: a stray file shows up.
    on_disk = sorted(p for p in fs.find(f"{root}/data") if p.endswith(".parquet"))
    done = {}
    for p in fs.glob(f"{root}/_done/*.json"):
        record = json.loads(fs.cat_file(p))
        done[record["shard_id"]] = record
    listed = sorted(f"{root}/data/{sid}/{name}" for sid, r in done.items() for name in r["files"])
    assert on_disk == listed, f"part files on disk differ from those the done records list: {on_disk} vs {listed}"
    rows = []
    for p in on_disk:
        with fs.open(p, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"ids written twice: {sorted({i for i in ids if ids.count(i) > 1})[:5]}"
    assert set(ids) == set(expected), (
        f"output ids differ from the current input: missing {sorted(set(expected) - set(ids))[:5]}, "
        f"stale {sorted(set(ids) - set(expected))[:5]}"
    )
    column = text_column if rows and text_column in rows[0] else f"input_{text_column}"
    if rows and column in rows[0]:
        stale = [
            r["id"]
            for r in rows
            if r["error"] is None and expected[r["id"]] is not None and r[column] != expected[r["id"]]
        ]
        assert not stale, f"rows scored from old text: {stale[:5]}"
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    assert manifest["counts"]["rows"] == len(rows), (manifest["counts"]["rows"], len(rows))
    assert manifest["shards"]["done"] == len(done)
    if complete:
        assert manifest["complete"] is True
        assert manifest["shards"]["done"] == manifest["shards"]["total"]
