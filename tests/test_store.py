"""Exactly-once bookkeeping without Ray or a model: shard ids, fingerprints, done records, the
driver's tracker, and shard-level read errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flip_ray import schema
from flip_ray.input.files import Shard
from flip_ray.input.readers import ColumnMapping
from flip_ray.job.stages import read_shards, write_parts
from flip_ray.job.store import OutputError, OutputStore, fingerprint, scoring_settings, settings_diff, shard_id
from flip_ray.job.tracker import ErrorBudgetExceeded, ShardTracker, check_output, summarize


def test_shard_id_is_stable_safe_and_distinct():
    assert shard_id("a/b c.jsonl") == shard_id("a/b c.jsonl")
    assert shard_id("a/b c.jsonl") != shard_id("a_b c.jsonl")
    assert "/" not in shard_id("dir/x.parquet") and " " not in shard_id("x y.jsonl")


def config_fingerprint(config: dict) -> str:
    return fingerprint(scoring_settings(config))


def test_fingerprint_ignores_paths_and_resources_only():
    base = {
        "input": {"path": "a", "prompt_column": "prompt", "read_batch_rows": 8},
        "output": {"path": "o"},
        "sampling": {"max_tokens": 10},
        "resources": {"concurrency": 1},
        "ray": {"address": None},
        "model": {"path": None, "device": "auto", "dtype": "auto", "max_model_len": None},
    }
    moved = json.loads(json.dumps(base))
    moved["input"]["path"], moved["output"]["path"], moved["resources"]["concurrency"] = "s3://b/a", "o2", 8
    assert config_fingerprint(base) == config_fingerprint(moved)
    # The device and dtype as written do not count: they are fingerprinted once resolved.
    spelled = json.loads(json.dumps(base))
    spelled["model"].update(device="cpu", dtype="float32")
    assert config_fingerprint(base) == config_fingerprint(spelled)
    changed = json.loads(json.dumps(base))
    changed["sampling"]["max_tokens"] = 11
    assert config_fingerprint(base) != config_fingerprint(changed)
    # What the weights are is part of it.
    assert fingerprint(scoring_settings(base, {"model.weights_sha256": "a"})) != fingerprint(
        scoring_settings(base, {"model.weights_sha256": "b"})
    )
    diff = settings_diff(scoring_settings(base), scoring_settings(changed))
    assert diff == "sampling.max_tokens: 10 -> 11"


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OutputStore(str(tmp_path / "f")).check_writable_location()


def output_schema(methods=("flip",)):
    return schema.output_schema(pa.schema([("prompt", pa.string())]), methods)


def scored_batch(sid, n, total=None, errors=0, methods=("flip",)):
    sch = output_schema(methods)
    rows = []
    for i in range(n):
        row = {f.name: None for f in sch}
        row.update(
            id=f"{sid}:{i}", prompt="p", flip_score=0.5, parse_status="raw_text", n_output_tokens=3, truncated=False
        )
        if i < errors:
            row.update(flip_score=None, parse_status=None, error="response is empty")
        rows.append(row | {schema.SHARD: sid, schema.SHARD_TOTAL: None, schema.SHARD_ERROR: None})
    if total is not None:
        rows.append(
            {f.name: None for f in sch} | {schema.SHARD: sid, schema.SHARD_TOTAL: total, schema.SHARD_ERROR: None}
        )
    full = pa.schema(list(sch) + list(schema.CONTROL_COLUMNS))
    return pa.Table.from_pylist(rows, schema=full)


def test_tracker_commits_only_complete_shards_and_prunes_orphans(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    shards = [Shard("file:///a", "jsonl", "a.jsonl"), Shard("file:///b", "jsonl", "b.jsonl")]
    sa, sb = (shard_id(s.key) for s in shards)
    tracker = ShardTracker(store, shards, "attempt1", max_error_fraction=1.0, min_rows=1)
    # A retried task's orphan part: written, never reported.
    write_parts(scored_batch(sa, 2), output_uri=store.uri, output_schema=output_schema())
    # The end marker can arrive before the last rows.
    tracker.add(write_parts(scored_batch(sa, 3, total=5), output_uri=store.uri, output_schema=output_schema()))
    assert store.done_records() == {}
    tracker.add(write_parts(scored_batch(sa, 2, errors=1), output_uri=store.uri, output_schema=output_schema()))
    tracker.add(write_parts(scored_batch(sb, 1), output_uri=store.uri, output_schema=output_schema()))
    done = store.done_records()
    assert list(done) == [sa]
    assert done[sa]["rows"] == 5 and done[sa]["errors"] == 1 and done[sa]["attempt"] == "attempt1"
    files = sorted(p.name for p in (tmp_path / "out" / "data" / sa).iterdir())
    assert files == done[sa]["files"] and len(files) == 2  # the orphan is gone
    assert pq.read_table(tmp_path / "out" / "data" / sa).num_rows == 5
    counts = summarize(done)
    assert counts["rows"] == 5 and counts["scored"] == 4
    flags = {"flag_copied_response": 0, "flag_echoed_template": 0}  # the batch's flags are null
    assert counts["rewards"] == {
        "flip": {"column": "flip_score", "scored": 4, "mean": 0.5, "status": {"raw_text": 4}, "flags": flags}
    }
    assert counts["error_kinds"] == {"response is empty": 1}


def test_error_budget_stops_with_a_clear_message(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    shards = [Shard("file:///a", "jsonl", "a.jsonl")]
    tracker = ShardTracker(store, shards, "x", max_error_fraction=0.2, min_rows=4)
    tracker.add(
        write_parts(scored_batch(shard_id("a.jsonl"), 3, errors=3), output_uri=store.uri, output_schema=output_schema())
    )
    tracker.check_error_budget()  # under min_rows: no verdict yet
    tracker.add(
        write_parts(scored_batch(shard_id("a.jsonl"), 2, errors=1), output_uri=store.uri, output_schema=output_schema())
    )
    with pytest.raises(ErrorBudgetExceeded, match=r"4 of 5 rows \(80%\).*max_error_fraction=0.2.*'response is empty'"):
        tracker.check_error_budget()


def test_corrupt_parquet_is_a_shard_error_and_other_shards_go_on(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "response": ["r1", "r2"]}), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated file
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    batch = pa.Table.from_pylist(
        [
            {"uri": str(p), "format": f, "key": p.name}
            for p, f in ((bad, "parquet"), (empty, "jsonl"), (good, "parquet"))
        ]
    )
    kept = pa.schema([("prompt", pa.string())])
    blocks = list(read_shards(batch, mapping=ColumnMapping(keep=("prompt",)), kept=kept, batch_rows=10))
    markers = [b.to_pylist()[0] for b in blocks if b.column(schema.SHARD_TOTAL).to_pylist()[0] is not None]
    by_shard = {m[schema.SHARD]: m for m in markers}
    assert "bad.parquet" in by_shard[shard_id("bad.parquet")][schema.SHARD_ERROR]
    assert by_shard[shard_id("empty.jsonl")][schema.SHARD_TOTAL] == 0
    assert by_shard[shard_id("good.parquet")][schema.SHARD_TOTAL] == 2
    assert by_shard[shard_id("good.parquet")][schema.SHARD_ERROR] is None
    data = [r for b in blocks for r in b.to_pylist() if r[schema.SHARD_TOTAL] is None]
    assert [r["id"] for r in data] == ["good.parquet:0", "good.parquet:1"]


def test_check_output_refuses_a_run_that_scored_nothing(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    shards = [Shard("file:///a", "jsonl", "a.jsonl")]
    tracker = ShardTracker(store, shards, "x", max_error_fraction=1.0, min_rows=100)
    sid = shard_id("a.jsonl")
    tracker.add(
        write_parts(scored_batch(sid, 6, total=6, errors=6), output_uri=store.uri, output_schema=output_schema())
    )
    counts = summarize(store.done_records())
    # A fraction of 1.0 never stops for the rate, and 6 rows are under min_rows: still refused.
    with pytest.raises(ErrorBudgetExceeded, match=r"no row was scored: all 6 rows have errors.*'response is empty' x6"):
        check_output(counts, ["flip"], 1.0, 100, store.uri)


def test_check_output_refuses_a_reward_that_scored_no_row(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    sid = shard_id("a.jsonl")
    both = ("flip", "flip_logprob")
    batch = scored_batch(sid, 4, total=4, methods=both)
    failed = pa.array(["the instruction does not fit in model.max_model_len=N"] * 4 + [None])
    batch = batch.set_column(batch.schema.get_field_index("flip_logprob_error"), "flip_logprob_error", failed)
    tracker = ShardTracker(store, [Shard("file:///a", "jsonl", "a.jsonl")], "x", max_error_fraction=1.0, min_rows=1)
    tracker.add(write_parts(batch, output_uri=store.uri, output_schema=output_schema(both)))
    counts = summarize(store.done_records())
    assert (
        counts["scored"] == 4 and counts["method_scored"]["flip"] == 4 and counts["method_scored"]["flip_logprob"] == 0
    )
    check_output(counts, ["flip"], 1.0, 1, store.uri)  # flip alone: fine
    with pytest.raises(
        ErrorBudgetExceeded, match=r"reward flip_logprob scored no row.*does not fit in model.max_model_len=N' x4"
    ):
        check_output(counts, ["flip", "flip_logprob"], 1.0, 1, store.uri)
