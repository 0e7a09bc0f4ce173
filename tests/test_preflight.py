"""Bad configs, paths, models and outputs stop the job before any engine or actor starts: exit 2,
one clear message, no traceback. Run through the real `flip-ray` command, as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flip_ray import schema
from flip_ray.config.base import load_config
from flip_ray.input.files import InputError, list_shards
from flip_ray.input.readers import ColumnMapping
from flip_ray.job.plan import plan_run
from flip_ray.job.stages import read_shards

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "flip_ray/samples/alpacaeval_sample.jsonl"
RECORDS = [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def flip_ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flip_ray.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def assert_refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Started a local Ray instance" not in done.stderr, "Ray must not start for a refused run"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flip-ray: error: "), last
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "in" / "a.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]))
    return path


@pytest.mark.parametrize(
    "model,needle",
    [("/nonexistent/model", "model.path /nonexistent/model does not exist"), ("EMPTY", "is not a model checkpoint")],
)
def test_bad_model_path_is_refused_before_any_engine(tmp_path, corpus, model, needle):
    if model == "EMPTY":
        model = str(tmp_path / "not-a-model")
        Path(model).mkdir()
        (Path(model) / "README.md").write_text("no weights here")
    done = flip_ray("score", f"input.path={corpus}", f"output.path={tmp_path / 'out'}", f"model.path={model}")
    assert_refused(done, needle)  # refused before Ray (and so any engine) started
    assert not (tmp_path / "out" / "run.json").exists()


def test_an_unknown_engine_argument_is_refused_before_any_engine(tmp_path, corpus):
    """`model.engine_kwargs` names are checked against vLLM's own EngineArgs, with the close ones."""
    done = flip_ray(
        "score", f"input.path={corpus}", f"output.path={tmp_path / 'out'}", "model.engine_kwargs.max_num_seq=64"
    )
    assert_refused(done, "model.engine_kwargs.max_num_seq", "EngineArgs", "max_num_seqs")
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize("output", ["/proc/flip-ray-out", "FILE/sub"])
def test_unwritable_output_is_refused(tmp_path, corpus, output):
    if output.startswith("FILE"):
        (tmp_path / "file").write_text("x")
        output = str(tmp_path / "file" / "sub")
    done = flip_ray("score", f"input.path={corpus}", f"output.path={output}")
    assert_refused(done, f"output.path {output}")


def test_every_shard_is_checked_jsonl_included(tmp_path, corpus):
    (corpus.parent / "b.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    done = flip_ray("score", f"input.path={corpus.parent}", f"output.path={tmp_path / 'out'}")
    assert_refused(done, "b.jsonl has no column 'prompt', 'response'", "columns present: question, answer")


def test_mixed_formats_with_different_columns(tmp_path, corpus):
    # A Parquet file without the JSONL's `model` column but with a `score` of its own: both are read,
    # each missing column null in the other file.
    rows = [{"prompt": r["prompt"], "response": r["response"], "score": i} for i, r in enumerate(RECORDS[3:5])]
    pq.write_table(pa.Table.from_pylist(rows), corpus.parent / "b.parquet")
    cfg = load_config(None, [f"input.path={corpus.parent}", f"output.path={tmp_path / 'out'}"])
    plan = plan_run(cfg)
    assert {"model", "score", "prompt", "response"} <= set(plan.kept_schema.names)
    assert any("'score' is missing from 1 shard(s)" in note for note in plan.notes)
    items = pa.Table.from_pylist([{"uri": s.uri, "format": s.format, "key": s.key} for s in plan.shards])
    blocks = list(read_shards(items, mapping=plan.mapping, kept=plan.kept_schema, batch_rows=10))
    data = [r for b in blocks for r in b.to_pylist() if r[schema.SHARD_TOTAL] is None]
    assert len(data) == 5 and all(r["error"] is None for r in data)
    assert {r["model"] for r in data if r["id"].startswith("b.parquet")} == {None}
    # A file that lacks a required column is refused by name.
    pq.write_table(pa.table({"prompt": ["p"]}), corpus.parent / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet has no column 'response'"):
        plan_run(cfg)


def test_downstream_commands_refuse_what_is_not_a_finished_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(flip_ray("report", str(empty)), "is not a flip_ray scoring output")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("a: 1\n")
    for command in ("filter", "pairs"):
        done = flip_ray(command, f"input.path={foreign}", f"output.path={tmp_path / command}")
        assert_refused(done, "is not a flip_ray scoring output")
    unfinished = tmp_path / "unfinished"
    (unfinished / "_done").mkdir(parents=True)
    (unfinished / "run.json").write_text("{}")
    done = flip_ray("pairs", f"input.path={unfinished}", f"output.path={tmp_path / 'pairs'}")
    assert_refused(done, "has not finished", "input.allow_incomplete=true")


def test_shard_listing_ignores_nothing_it_should_read(tmp_path):
    # A kept-column mapping over a shard that lacks the column gives nulls, not a failed read.
    pq.write_table(pa.table({"prompt": ["p"], "response": ["r"]}), tmp_path / "x.parquet")
    shard = list_shards(str(tmp_path / "x.parquet"))[0]
    items = pa.Table.from_pylist([{"uri": shard.uri, "format": shard.format, "key": shard.key}])
    kept = pa.schema([("prompt", pa.string()), ("model", pa.string())])
    mapping = ColumnMapping(keep=("prompt", "model"))
    blocks = list(read_shards(items, mapping=mapping, kept=kept, batch_rows=10))
    data = [r for b in blocks for r in b.to_pylist() if r[schema.SHARD_TOTAL] is None]
    assert data[0]["model"] is None and data[0]["error"] is None


def test_id_column_auto_uses_the_id_column_when_every_file_has_it(tmp_path, corpus):
    cfg = load_config(None, [f"input.path={corpus.parent}", f"output.path={tmp_path / 'out'}"])
    assert cfg.input.id_column == "auto"
    plan = plan_run(cfg)
    assert plan.mapping.id == "id" and cfg.input.id_column == "id"  # resolved before the fingerprint
    (corpus.parent / "b.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    cfg = load_config(None, [f"input.path={corpus.parent}", f"output.path={tmp_path / 'out2'}"])
    assert plan_run(cfg).mapping.id is None  # one file without ids: derived ids for all


def test_an_object_store_that_does_not_answer_is_exit_3_and_not_a_bug(tmp_path):
    """Storage down while the run plans (found by the chaos run: a run started while the S3 server was
    stopped said "internal error ... a bug in flip_ray", exit 4): exit 3, rerun, no traceback."""
    import os
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "flip_ray.cli", "score", "input.path=s3://nobody/in/", f"output.path={tmp_path / 'o'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flip-ray: the storage could not be reached (") and "Rerun with the same config" in last
    written = {p.name for p in (tmp_path / "o").iterdir()} if (tmp_path / "o").exists() else set()
    assert written <= {"logs"}, written  # flip_ray's own log of the attempt, nothing else


def test_storage_unreachable_tells_the_network_from_a_bug():
    import errno

    from flip_ray.cli import storage_unreachable

    class EndpointConnectionError(Exception):  # botocore's, by name
        pass

    try:
        try:
            raise EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:1/b"')
        except EndpointConnectionError as inner:
            raise RuntimeError("listing failed") from inner
    except RuntimeError as e:
        assert storage_unreachable(e) == 'Could not connect to the endpoint URL: "http://127.0.0.1:1/b"'
    assert storage_unreachable(OSError(errno.ECONNREFUSED, "Connection refused")) is not None
    assert storage_unreachable(ConnectionResetError("peer")) == "peer"
    assert storage_unreachable(FileNotFoundError(errno.ENOENT, "no such file")) is None
    assert storage_unreachable(AttributeError("a bug")) is None
