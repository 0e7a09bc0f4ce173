"""Faults with real processes: each test compares id sets, so a lost or doubled row fails it.

1. kill -9 of the driver mid-run, then a rerun;
2. kill -9 of the vLLM engine actor's process mid-run;
3. the S3 server stopped mid-run and started again on the same data;
4. an error rate over `limits.max_error_fraction`.
Plus duplicate ids, refused before any model loads.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from clusters import kill_processes_mentioning
from invariant import assert_output_matches_input

from flip_ray.cli import main as cli_main
from flip_ray.config.base import load_config
from flip_ray.job.pipeline import RunInterrupted
from flip_ray.job.plan import DuplicateIdError
from flip_ray.job.tracker import ErrorBudgetExceeded
from flip_ray.recipe import run_score

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "flip_ray/samples/alpacaeval_sample.jsonl"
ENGINE = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.enforce_eager=true",
    "model.max_model_len=1024",
    "sampling.max_tokens=32",
    "resources.batch_size=2",
    "resources.similarity_batch_size=3",  # small batches so that shards finish one by one
    "input.id_column=id",
]


def records() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def make_shards(directory: Path, n_shards: int, rows: int) -> set[str]:
    directory.mkdir(parents=True)
    data = records()
    ids = set()
    for k in range(n_shards):
        chunk = data[k * rows : (k + 1) * rows]
        (directory / f"part-{k:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
        ids |= {r["id"] for r in chunk}
    return ids


def output_ids(out: Path) -> list[str]:
    return pq.read_table(out / "data", columns=["id"]).column("id").to_pylist()


def score(inp, out, *extra):
    return run_score(load_config(None, [f"input.path={inp}", f"output.path={out}", *ENGINE, *extra]))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def done_files(out: Path) -> dict[str, str]:
    d = out / "_done"
    return {p.name: p.read_text() for p in d.glob("*.json")} if d.is_dir() else {}


def row_bounded_input(directory: Path) -> set[str]:
    """A 240-row JSONL and a 120-row Parquet with row groups of 20: split into 40-row shards."""
    import pyarrow as pa

    directory.mkdir(parents=True)
    rows = [{"id": f"q{i}", "prompt": f"Name the number {i}.", "response": f"It is {i}."} for i in range(360)]
    (directory / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:240]))
    pq.write_table(pa.Table.from_pylist(rows[240:]), directory / "big.parquet", row_group_size=20)
    return {r["id"] for r in rows}


def test_driver_killed_then_rerun_finishes_exactly_once(tmp_path, embedded_model):
    """Resume bounded in rows: files split into shards of 40 rows; the driver killed after two."""
    ids = row_bounded_input(tmp_path / "in")
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="frk-", dir="/tmp")  # short: Ray socket paths have a length limit
    cmd = [
        sys.executable, "jobs/score.py", f"input.path={tmp_path / 'in'}", f"output.path={out}", *ENGINE,
        "input.rows_per_shard=40", "reward.methods=[flip_logprob]", "resources.batch_size=20",
    ]  # fmt: skip
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(done_files(out)) >= 2 or proc.poll() is not None, 600, "two finished shards")
        assert proc.poll() is None, (
            "the run finished before it could be killed: " + (tmp_path / "first.log").read_text()[-2000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_processes_mentioning(ray_tmp)
    before = done_files(out)
    assert 2 <= len(before) < 9
    assert not (out / "manifest.json").exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    kill_processes_mentioning(ray_tmp)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = done_files(out)
    # Shards finished before the kill were not recomputed: their done records (attempt id, part files)
    # are byte-for-byte those of the first run.
    assert {k: after[k] for k in before} == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"]["total"] == 9  # 6 of the JSONL, 3 of the Parquet
    assert manifest["shards"]["skipped_already_done"] == len(before)
    assert manifest["shards"]["scored_this_run"] == 9 - len(before)
    assert all(json.loads(t)["rows"] == 40 for t in after.values())
    got = output_ids(out)
    assert len(got) == len(set(got)) and set(got) == ids
    assert_output_matches_input(out, tmp_path / "in", id_column="id")


def engine_processes():
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "BackwardInferenceStage" in cmd and "MapWorker" in cmd:
            found.append(p)
    return found


def test_engine_actor_killed_mid_run(tmp_path, ray_local, embedded_model):
    ids = make_shards(tmp_path / "in", n_shards=8, rows=3)
    out = tmp_path / "out"
    killed = []

    def killer():
        wait_for(lambda: len(done_files(out)) >= 1, 600, "a finished shard")
        for p in engine_processes():
            p.kill()
            killed.append(p.pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    manifest = score(tmp_path / "in", out)
    t.join(timeout=5)
    assert killed, "no engine actor process was found to kill"
    got = output_ids(out)
    assert len(got) == len(set(got)) and set(got) == ids
    assert manifest["complete"] and manifest["counts"]["rows"] == 24
    assert_output_matches_input(out, tmp_path / "in", id_column="id")


def test_s3_outage_mid_run(tmp_path, ray_local, embedded_model, s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="faults")
    data, ids = records()[:18], set()
    for k in range(6):
        chunk = data[k * 3 : (k + 1) * 3]
        body = "".join(json.dumps(r) + "\n" for r in chunk)
        client.put_object(Bucket="faults", Key=f"in/part-{k}.jsonl", Body=body)
        ids |= {r["id"] for r in chunk}
    outage = {}

    def done_count():
        try:
            return client.list_objects_v2(Bucket="faults", Prefix="out/_done/").get("KeyCount", 0)
        except Exception:
            return 0

    def outage_maker():
        wait_for(lambda: done_count() >= 1, 600, "a finished shard on S3")
        s3_server.stop()
        outage["stopped"] = time.time()
        time.sleep(5)
        s3_server.start()
        outage["restarted"] = time.time()

    t = threading.Thread(target=outage_maker, daemon=True)
    t.start()
    try:
        manifest = score("s3://faults/in/", "s3://faults/out")
        outcome = "completed"
    except RunInterrupted as e:
        assert "rerun with the same config to resume" in str(e)
        t.join(timeout=120)
        manifest = score("s3://faults/in/", "s3://faults/out")
        outcome = "failed clearly, rerun completed"
    t.join(timeout=120)
    assert "restarted" in outage, "the outage never happened"
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    files = fs.glob("faults/out/data/*/*.parquet")
    got = [i for f in files for i in pq.read_table(f, filesystem=fs, columns=["id"]).column("id").to_pylist()]
    assert len(got) == len(set(got)) and set(got) == ids, outcome
    assert manifest["complete"] and manifest["counts"]["rows"] == 18
    assert_output_matches_input("s3://faults/out", "s3://faults/in/", id_column="id")
    print(f"s3 outage outcome: {outcome}")


def test_error_budget_stops_and_keeps_finished_shards(tmp_path, ray_local, embedded_model, capsys, restore_sigterm):
    (tmp_path / "in").mkdir()
    good = records()[:2]
    bad = [{"id": f"empty-{i}", "prompt": "Say something.", "response": "", "model": "m"} for i in range(12)]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "out"
    # One block at a time, so that the good file's rows finish first: with blocks in flight the error
    # rows (never sent to the engine) pass while the good ones still decode, and the budget can stop
    # the run before any shard has finished.
    budget = ["limits.max_error_fraction=0.3", "resources.max_concurrent_batches=1"]
    with pytest.raises(ErrorBudgetExceeded, match=r"rows \(\d+%\) have errors.*'response is empty'.*rerun"):
        score(tmp_path / "in", out, *budget, "limits.min_rows_for_error_check=4")
    # The command line says the same with exit 3 (rerun resumes).
    args = [f"input.path={tmp_path / 'in'}", f"output.path={out}", *ENGINE, *budget]
    assert cli_main(["score", *args, "limits.min_rows_for_error_check=4"]) == 3
    assert "max_error_fraction=0.3" in capsys.readouterr().err
    kept = done_files(out)
    assert kept, "finished shards must be kept"
    for text in kept.values():
        record = json.loads(text)
        files = sorted(p.name for p in (out / "data" / record["shard_id"]).iterdir())
        assert files == record["files"]
        assert pq.read_table(out / "data" / record["shard_id"]).num_rows == record["rows"]
    assert not (out / "manifest.json").exists()


def test_duplicate_ids_are_refused_before_the_model_loads(tmp_path, ray_local, monkeypatch):
    (tmp_path / "in").mkdir()
    rows = records()[:3]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps(rows[1]) + "\n")

    def no_model(*a, **k):
        raise AssertionError("the model must not load when ids repeat")

    monkeypatch.setattr("flip_ray.engine.embedded.prepare_default_model", no_model)
    with pytest.raises(DuplicateIdError, match=rf"{rows[1]['id']!r} x2"):
        score(tmp_path / "in", tmp_path / "out")
