"""Reading shards and applying row rules, without Ray or a model."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flip_ray import schema
from flip_ray.input.files import InputError, list_shards
from flip_ray.input.readers import ColumnMapping, check_columns, read_shard
from flip_ray.text.rows import RowError, conversation_parts, derive_id

SAMPLE = "flip_ray/samples/alpacaeval_sample.jsonl"


DEFAULT_MAPPING = ColumnMapping()


def rows_of(path, mapping=DEFAULT_MAPPING, fmt="auto", batch_rows=7):
    out = []
    for shard in list_shards(str(path), fmt):
        for t in read_shard(shard, mapping, batch_rows):
            out += t.to_pylist()
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_ids_are_stable_and_unique(tmp_path):
    a = rows_of(SAMPLE)
    b = rows_of(SAMPLE, batch_rows=5)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == len(a) == 24
    assert a[0]["id"] == derive_id("alpacaeval_sample.jsonl", 0) == "alpacaeval_sample.jsonl:0"


def test_id_column_is_used(tmp_path):
    rows = rows_of(SAMPLE, ColumnMapping(id="id", keep=("model",)))
    assert rows[0]["id"] == "alpacaeval-6-gpt4_1106_preview" and rows[0]["model"] == "gpt4_1106_preview"


def test_kept_column_clashing_with_output_is_renamed():
    rows = rows_of(SAMPLE, ColumnMapping(keep=("id",)))
    assert rows[0]["input_id"] == "alpacaeval-6-gpt4_1106_preview"


def test_jsonl_gz_parquet_and_directory(tmp_path):
    records = [json.loads(line) for line in Path(SAMPLE).read_text().splitlines()]
    gz = tmp_path / "d" / "part-0.jsonl.gz"
    gz.parent.mkdir()
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:10])
    pq.write_table(pa.Table.from_pylist(records[10:]), tmp_path / "d" / "part-1.parquet")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    shards = list_shards(str(tmp_path / "d"))
    assert [(s.key, s.format) for s in shards] == [("part-0.jsonl.gz", "jsonl"), ("part-1.parquet", "parquet")]
    rows = rows_of(tmp_path / "d")
    assert len(rows) == 24 and all(r["error"] is None for r in rows)
    assert rows_of(str(tmp_path / "d" / "*.parquet"))[0]["id"] == "part-1.parquet:0"


def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in Path(SAMPLE).read_text().splitlines()]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    shards = list_shards(str(tmp_path / "hf"))
    assert len(shards) == 2 and all(s.format == "hf" for s in shards)
    rows = rows_of(tmp_path / "hf", ColumnMapping(id="id"))
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in records)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records[:5]), "test": datasets.Dataset.from_list(records[5:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(rows_of(tmp_path / "dd")) == 24


def test_bad_rows_are_kept_with_reasons(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "Say hi.", "response": "Hi!"}),
        json.dumps({"prompt": None, "response": "x"}),
        json.dumps({"prompt": "p", "response": ""}),
        json.dumps({"prompt": "p", "response": "   "}),
        json.dumps({"prompt": 5, "response": "x"}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
    ]
    p.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "response": "x"}\n')
    rows = rows_of(p)
    errors = [r["error"] for r in rows]
    assert errors[0] is None
    assert errors[1] == "prompt is null"
    assert errors[2] == "response is empty"
    assert errors[3] == "response is whitespace only"
    assert errors[4] == "prompt is int, expected a string"
    assert errors[5].startswith("bad.jsonl line 6: malformed JSON")
    assert errors[6] == "bad.jsonl line 8: expected a JSON object, got list"
    assert errors[7].startswith("bad.jsonl line 9: not valid UTF-8")
    assert len(rows) == 8  # the blank line is not a row
    assert all(r[schema.RESPONSE] is None for r in rows[1:])


def test_missing_column_lists_present_ones(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    shard = list_shards(str(p))[0]
    with pytest.raises(InputError, match=r"no column 'prompt', 'response'.*columns present: question, answer"):
        check_columns(shard, ColumnMapping())
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="columns present: question"):
        check_columns(list_shards(str(tmp_path / "x.parquet"))[0], ColumnMapping())


def test_wrong_parquet_column_type(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2], "response": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="'prompt' has type int64, expected string"):
        check_columns(list_shards(str(tmp_path / "x.parquet"))[0], ColumnMapping())


def test_missing_path():
    with pytest.raises(InputError, match="does not exist"):
        list_shards("/nonexistent/flip_ray/input.jsonl")


def test_directory_without_data(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="holds no"):
        list_shards(str(tmp_path))


def test_messages_rows(tmp_path):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one, please.\nMake it red."},
        {"role": "assistant", "content": "Cherry."},
    ]
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}, {"messages": conv[:2]}, {"messages": "nope"}])
    rows = rows_of(p, ColumnMapping(messages="messages"))
    assert rows[0][schema.INSTRUCTION] == "Another one, please.\nMake it red."  # the whole last user turn
    assert rows[0][schema.RESPONSE] == "Cherry."
    assert json.loads(rows[0][schema.CONTEXT]) == conv[:3]
    assert rows[1]["error"] == "messages has no assistant turn"
    assert rows[2]["error"].startswith("messages is a string that is not JSON")
    pq.write_table(pa.Table.from_pylist([{"messages": conv}]), tmp_path / "m.parquet")
    prow = rows_of(tmp_path / "m.parquet", ColumnMapping(messages="messages"))[0]
    assert prow[schema.RESPONSE] == "Cherry." and prow["error"] is None


@pytest.mark.parametrize(
    "messages,error",
    [
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        ([{"role": "assistant", "content": "a"}], "no user turn"),
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "role 'bot'"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
            ],
            "ends with a user turn",
        ),
        (
            [
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "b"},
            ],
            "does not follow a user turn",
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], r"messages\[0\] is not"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}], "whitespace only"),
        (None, "messages is null"),
    ],
)
def test_malformed_messages(messages, error):
    with pytest.raises(RowError, match=error):
        conversation_parts(messages)


def test_bom_json_array_and_non_data_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n")
    (d / "b.json").write_text(json.dumps([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]))
    (d / "README.md").write_text("# a dataset card")
    rows = rows_of(d)
    assert [r["id"] for r in rows] == ["a.jsonl:0", "b.json:0", "b.json:1"]
    assert all(r["error"] is None for r in rows)
    (d / "c.json").write_text("[{broken")
    with pytest.raises(InputError, match="not a valid JSON array"):
        rows_of(d / "c.json")


def test_a_surrogate_escape_inside_a_messages_string_is_a_row_error(tmp_path):
    """`messages` given as JSON text whose content escapes an unpaired surrogate ("\\ud800") decodes
    to a str that no Parquet writer or tokenizer takes: that row's error, the file's other rows read."""
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = '[{"role": "user", "content": "q \\ud800"}, {"role": "assistant", "content": "a"}]'
    paired = '[{"role": "user", "content": "q \\ud83d\\ude00"}, {"role": "assistant", "content": "a"}]'
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": json.dumps(good)}, {"messages": bad}, {"messages": paired}])
    rows = rows_of(p, ColumnMapping(messages="messages"))
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[2][schema.INSTRUCTION] == "q \U0001f600"  # a valid pair is one character
    assert rows[1]["error"] == "messages holds an unpaired UTF-16 surrogate (\\ud800), which is not valid Unicode text"


def corrupt_files(d: Path) -> dict[str, bytes]:
    """A good file of each format, and damaged copies of it, as (name, bytes)."""
    records = [{"prompt": f"p{i} " * 20, "response": f"r{i} " * 20} for i in range(400)]
    table = pa.Table.from_pylist(records)
    pq.write_table(table, d / "good.parquet", row_group_size=100)
    parquet = (d / "good.parquet").read_bytes()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=100)
    stream = sink.getvalue().to_pybytes()
    gz = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    flipped = bytearray(stream)
    for k in range(400, len(flipped), 11):  # offsets and text of the record batches, not the schema
        flipped[k] ^= 0xFF
    return {
        "cut.parquet": parquet[: len(parquet) // 2],
        "empty.parquet": b"",
        "cut.jsonl.gz": gz[: len(gz) // 2],
        "plain.jsonl.gz": b'{"prompt": "p", "response": "r"}\n',
        "damaged/data-00000-of-00001.arrow": bytes(flipped),
        "cut/data-00000-of-00001.arrow": stream[: len(stream) // 2],
    }


CORRUPT = (
    "cut.parquet",
    "empty.parquet",
    "cut.jsonl.gz",
    "plain.jsonl.gz",
    "damaged/data-00000-of-00001.arrow",
    "cut/data-00000-of-00001.arrow",
)


@pytest.mark.parametrize("name", CORRUPT)
def test_a_corrupt_file_is_an_input_error_naming_it(tmp_path, name):
    """Truncated Parquet, a cut or fake .gz, a damaged or cut Arrow stream (HF save_to_disk): the
    shard fails with InputError ("cannot read <file>"), the run goes on. A damaged Arrow stream is
    read in a child process: reading a value through a damaged offset would crash the process."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(corrupt_files(tmp_path)[name])
    fmt = "hf" if name.endswith(".arrow") else "auto"
    code = (
        "import sys\n"
        "from flip_ray.input.readers import ColumnMapping, read_shard\n"
        "from flip_ray.input.files import InputError, list_shards\n"
        f"shard = list_shards({str(path)!r}, {fmt!r})[0]\n"
        "try:\n"
        "    for _ in read_shard(shard, ColumnMapping(), 64):\n"
        "        pass\n"
        "except InputError as e:\n"
        "    print(e)\n"
        "    sys.exit(0)\n"
        "sys.exit(5)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout.startswith(f"cannot read file://{path}: "), done.stdout


def test_kept_columns_that_would_share_an_output_column_are_refused(tmp_path):
    """An input holding `error` and `input_error`: kept as they are, `error` would be written as
    `input_error` over the other (the reader's columns are a dict) and the stages would meet two
    columns of one name. Refused up front, naming both."""
    p = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "r", "error": "e", "input_error": "i"}])
    present = check_columns(list_shards(str(p))[0], ColumnMapping()).names
    with pytest.raises(InputError, match="'error' and 'input_error' would both be written as 'input_error'"):
        schema.check_output_names(present)
    schema.check_output_names(["prompt", "error", "id", "model"])  # renamed apart: input_error, input_id
    with pytest.raises(InputError, match="'prompt' is kept twice"):
        schema.check_output_names(["prompt", "model", "prompt"])
    for internal in (schema.RESPONSE, schema.SHARD_TOTAL, "_flip_generations"):
        with pytest.raises(InputError, match=f"'{internal}' is named like flip_ray's internal columns"):
            schema.check_output_names(["prompt", internal])
