"""Row-bounded shards without Ray: files split by row groups, record batches and byte ranges read
back exactly the rows (ids, text, errors, line numbers) of the whole file."""

import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flip_ray.input.files import list_shards
from flip_ray.input.readers import ColumnMapping, read_shard
from flip_ray.input.sharding import measure, split

SAMPLE = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]


def rows(n: int) -> list[dict]:
    return [{**SAMPLE[i % len(SAMPLE)], "id": f"r{i}"} for i in range(n)]


KEEP_ID = ColumnMapping(id=None, keep=("id",))


def read_all(shards, mapping=KEEP_ID):
    return [r for s in shards for t in read_shard(s, mapping, 7) for r in t.to_pylist()]


def shards_of(path, rows_per_shard):
    out = []
    for shard in list_shards(str(path)):
        out += split(shard, measure(shard, rows_per_shard), rows_per_shard)
    return out


def test_parquet_by_row_groups_and_inside_a_big_one(tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(120)), tmp_path / "a.parquet", row_group_size=20)
    shards = shards_of(tmp_path / "a.parquet", 40)
    assert [(s.first_row, s.rows) for s in shards] == [(0, 40), (40, 40), (80, 40)]
    assert [s.key for s in shards] == ["a.parquet#rows=0-40", "a.parquet#rows=40-80", "a.parquet#rows=80-120"]
    got = read_all(shards)
    assert [r["id"] for r in got] == [f"a.parquet:{i}" for i in range(120)]
    assert [r["input_id"] for r in got] == [f"r{i}" for i in range(120)]
    pq.write_table(pa.Table.from_pylist(rows(100)), tmp_path / "b.parquet", row_group_size=100)
    shards = shards_of(tmp_path / "b.parquet", 40)
    assert [(s.first_row, s.rows) for s in shards] == [(0, 40), (40, 40), (80, 20)]
    assert [r["input_id"] for r in read_all(shards)] == [f"r{i}" for i in range(100)]
    pq.write_table(pa.Table.from_pylist(rows(30)), tmp_path / "c.parquet", row_group_size=20)
    (small,) = shards_of(tmp_path / "c.parquet", 40)
    assert small.key == "c.parquet" and small.rows == 30


def test_jsonl_by_byte_ranges_reads_what_the_whole_file_reads(tmp_path):
    lines = [json.dumps(r) for r in rows(240)]
    lines[57] = "{broken json"
    lines.insert(100, "")  # a blank line is not a row
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    whole = read_all(list_shards(str(path)))
    shards = shards_of(path, 40)
    assert len(shards) == 6 and [s.rows for s in shards] == [40] * 6
    assert all(s.byte_stop is None or s.byte_stop > s.byte_start for s in shards)
    split_rows = read_all(shards)
    assert split_rows == whole
    assert [r["id"] for r in split_rows] == [f"big.jsonl:{i}" for i in range(240)]
    assert split_rows[57]["error"].startswith("big.jsonl line 58: malformed JSON")
    assert split_rows[150]["input_id"] == "r150"  # after the blank line, the line numbers are one more


def test_files_that_stay_whole(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows(200))
    (tmp_path / "b.json").write_text(json.dumps(rows(200)))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(3)))
    shards = shards_of(tmp_path, 40)
    assert [(s.key, s.rows) for s in shards] == [("a.jsonl.gz", None), ("b.json", None), ("c.jsonl", 3)]
    assert len(read_all(shards)) == 403


def test_hf_dataset_by_record_batches(tmp_path):
    ds = datasets.Dataset.from_list(rows(90))
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=1)
    shards = shards_of(tmp_path / "hf", 40)
    assert [(s.first_row, s.rows) for s in shards] == [(0, 40), (40, 40), (80, 10)]
    assert [r["input_id"] for r in read_all(shards)] == [f"r{i}" for i in range(90)]


def test_the_layout_is_a_function_of_the_content(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(100)))
    assert shards_of(path, 30) == shards_of(path, 30)
    with pytest.raises(AssertionError):
        assert shards_of(path, 30) == shards_of(path, 20)
