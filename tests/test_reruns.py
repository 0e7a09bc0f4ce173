"""Reruns into an existing output, as a user makes them: edited, deleted and moved input files, bad
rows inside good files, unfinished outputs read by the downstream jobs. Real engine, real files;
every run that succeeds is checked against the current input (`invariant.py`)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from invariant import assert_output_matches_input

from flip_ray.cli import main as cli_main
from flip_ray.config.base import load_config
from flip_ray.config.jobs import FilterJobConfig, PairsJobConfig
from flip_ray.downstream.jobs import run_filter, run_pairs
from flip_ray.downstream.report import build_report
from flip_ray.job.plan import OutputExistsError
from flip_ray.job.store import NotAScoredOutput
from flip_ray.recipe import run_score

pytestmark = pytest.mark.slow

SAMPLE = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
ENGINE = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.enforce_eager=true",
    "model.max_model_len=1024",
    "sampling.max_tokens=24",
    "resources.batch_size=8",
]


def score(inp, out, *extra):
    return run_score(load_config(None, [f"input.path={inp}", f"output.path={out}", *ENGINE, *extra]))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_corrupt_parquet(path: Path, rows: list[dict]) -> None:
    """A Parquet file whose footer reads (so the pre-flight passes) but whose data does not."""
    pq.write_table(pa.Table.from_pylist(rows), path)
    column = pq.ParquetFile(path).metadata.row_group(0).column(2)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 12] = b"\xff" * 12  # the page header
    path.write_bytes(bytes(data))


def done_records(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (out / "_done").glob("*.json")}


def test_edited_deleted_and_other_inputs(tmp_path, ray_local, embedded_model):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_jsonl(inp / "a.jsonl", SAMPLE[0:3])
    write_jsonl(inp / "b.jsonl", SAMPLE[3:6])
    pq.write_table(pa.Table.from_pylist(SAMPLE[6:9]), inp / "c.parquet")
    first = score(inp, out)
    assert_output_matches_input(out, inp, id_column="id")
    assert first["counts"]["rows"] == 9

    # Edit a.jsonl in place (one row changed, one appended) and delete b.jsonl.
    edited = [dict(r) for r in SAMPLE[0:3]]
    edited[1]["response"] = "Paris is the capital of France."
    write_jsonl(inp / "a.jsonl", [*edited, SAMPLE[10]])
    (inp / "b.jsonl").unlink()
    before = done_records(out)
    with pytest.raises(OutputExistsError, match=r"1 input file\(s\) changed.*a\.jsonl.*input\.rescore_changed=true"):
        score(inp, out)
    assert done_records(out) == before, "a refused run must change nothing"

    again = score(inp, out, "input.rescore_changed=true")
    assert_output_matches_input(out, inp, id_column="id")
    assert again["counts"]["rows"] == 7
    after = done_records(out)
    unchanged = [name for name in before if name.startswith("c.parquet")]
    assert unchanged and all(after[name] == before[name] for name in unchanged), "c.parquet must not be rescored"
    assert not [name for name in after if name.startswith("b.jsonl")]
    assert {r["key"] for r in again["shards"]["removed"]} == {"a.jsonl", "b.jsonl"}
    paris = [r for r in pq.read_table(out / "data").to_pylist() if r["id"] == SAMPLE[1]["id"]]
    assert paris[0]["response"] == "Paris is the capital of France." and paris[0]["error"] is None

    # The same output.path for another corpus: refused, then replaced on request.
    other = write_jsonl(tmp_path / "other" / "x.jsonl", SAMPLE[12:14])
    with pytest.raises(OutputExistsError, match=r"holds the scores of input\.path .*/in.*output\.overwrite=true"):
        score(other.parent, out)
    score(other.parent, out, "output.overwrite=true")
    assert_output_matches_input(out, other.parent, id_column="id")
    # Spelling out what `auto` resolved to is the same way of scoring: accepted, nothing redone.
    same = score(other.parent, out, "model.dtype=auto", "model.device=auto")
    assert same["shards"]["scored_this_run"] == 0 and same["engine"] == {
        "model.device": "cpu",
        "model.dtype": "float32",
    }

    # A part file damaged after its commit: downstream refuses it, a rerun rescores that shard.
    (sid,) = [name.removesuffix(".json") for name in done_records(out)]
    part = next((out / "data" / sid).glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(NotAScoredOutput, match=r"changed after their commit.*has 100 bytes"):
        run_pairs(load_config(None, [f"input.path={out}", f"output.path={tmp_path / 'p'}"], schema=PairsJobConfig))
    redone = score(other.parent, out)
    assert redone["shards"]["scored_this_run"] == 1
    (removed,) = redone["shards"]["removed"]
    assert f"part file {part.name} has 100 bytes, its commit recorded" in removed["why"]
    assert_output_matches_input(out, other.parent, id_column="id")


def test_a_run_that_scored_nothing_fails_and_downstream_refuses_it(
    tmp_path, ray_local, embedded_model, capsys, restore_sigterm
):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_jsonl(inp / "a.jsonl", SAMPLE[0:6])
    args = [f"input.path={inp}", f"output.path={out}", *ENGINE, "model.max_model_len=100"]
    assert cli_main(["score", *args]) == 3
    err = capsys.readouterr().err
    assert "no row was scored: all 6 rows have errors" in err and "does not fit" in err, err
    assert "output.overwrite=true" in err
    assert not (out / "manifest.json").exists()
    with pytest.raises(NotAScoredOutput, match="failed its checks"):
        run_pairs(load_config(None, [f"input.path={out}", f"output.path={tmp_path / 'p'}"], schema=PairsJobConfig))
    # A rerun with the same config finds every shard done and still refuses to pass the output.
    assert cli_main(["score", *args]) == 3
    # Fixed config, same output: the refusal names the setting, overwrite replaces the rows.
    assert cli_main(["score", *args[:-1], "model.max_model_len=1024"]) == 2
    assert "model.max_model_len: 100 -> 1024" in capsys.readouterr().err
    assert cli_main(["score", *args[:-1], "model.max_model_len=1024", "output.overwrite=true"]) == 0
    assert_output_matches_input(out, inp, id_column="id")


def test_bad_rows_fail_alone_and_methods_fail_alone(tmp_path, ray_local, embedded_model):
    inp, out = tmp_path / "in", tmp_path / "out"
    good = SAMPLE[0:3]
    long_instruction = {**SAMPLE[4], "id": "long-instruction", "prompt": "word " * 20000}
    lines = [json.dumps(r) for r in [good[0], good[1]]]
    lines.append('{"id": "lone-surrogate", "prompt": "Say hi.", "response": "Hi \\ud800 there", "model": "m"}')
    lines += [json.dumps(good[2]), json.dumps(long_instruction)]
    lines.append(json.dumps({"id": "nul-char", "prompt": "Echo this.", "response": "a\u0000b and more", "model": "m"}))
    (inp).mkdir()
    (inp / "rows.jsonl").write_text("\n".join(lines) + "\n")
    # A Parquet file written by another tool with invalid UTF-8 in one response.
    responses = pa.array([SAMPLE[5]["response"].encode(), b"caf\xe9 au lait", SAMPLE[6]["response"].encode()])
    table = pa.table(
        {
            "id": ["pq-0", "pq-1", "pq-2"],
            "prompt": [SAMPLE[5]["prompt"], "Order a drink.", SAMPLE[6]["prompt"]],
            "response": responses.view(pa.string()),
            "model": ["m", "m", "m"],
        }
    )
    pq.write_table(table, inp / "rows.parquet")
    manifest = score(inp, out, "input.id_column=id")
    assert_output_matches_input(out, inp, id_column="id")
    by_id = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    bad = by_id["lone-surrogate"]
    assert "rows.jsonl line 3" in bad["error"] and "surrogate" in bad["error"] and bad["flip_score"] is None
    assert "rows.parquet row 1: response is not valid UTF-8" in by_id["pq-1"]["error"]
    for rid in ("alpacaeval-6-gpt4_1106_preview", "pq-0", "pq-2", "nul-char"):
        assert by_id[rid]["error"] is None and by_id[rid]["flip_score"] is not None, by_id[rid]
    # One method failing keeps the other's reward: the instruction is too long for flip_logprob only.
    long_row = by_id["long-instruction"]
    assert long_row["error"] is None
    assert long_row["flip_score"] is not None and long_row["inferred_instruction"] is not None
    assert long_row["flip_logprob_mean"] is None and "too long" in long_row["flip_logprob_error"]
    assert manifest["counts"]["method_errors"] == {"flip_logprob": 1}
    assert manifest["counts"]["errors"] == 2 and manifest["complete"]


def test_downstream_reads_only_committed_finished_outputs(tmp_path, ray_local, embedded_model, capsys, restore_sigterm):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_jsonl(inp / "a.jsonl", [{**r, "prompt": SAMPLE[0]["prompt"]} for r in SAMPLE[0:4]])
    write_corrupt_parquet(inp / "broken.parquet", SAMPLE[4:8])
    # Through the command line: exit 1, the failed shard named, the way out said.
    assert cli_main(["score", f"input.path={inp}", f"output.path={out}", *ENGINE, "input.id_column=id"]) == 1
    err = capsys.readouterr().err
    assert "1 shard(s) could not be read" in err and "rerun" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [f["key"] for f in manifest["shards"]["failed"]] == ["broken.parquet"]
    assert (out / "report" / "index.html").exists(), "a run reports on its finished shards"
    pairs_out = tmp_path / "pairs"

    def pairs(path, *extra):
        args = [f"input.path={path}", f"output.path={pairs_out}", "output.overwrite=true", *extra]
        return run_pairs(load_config(None, args, schema=PairsJobConfig))

    with pytest.raises(NotAScoredOutput, match=r"incomplete \(1 of 2 shards done; failed: broken\.parquet\)"):
        pairs(out)
    assert pairs(out, "input.allow_incomplete=true")["rows"] == 4
    with pytest.raises(NotAScoredOutput, match="incomplete"):
        build_report(str(out))

    # A stray file under data/ (another tool, an old attempt) is never read.
    stray = out / "data" / "stray" / "part-x.parquet"
    stray.parent.mkdir()
    pq.write_table(pq.read_table(out / "data" / next(iter(done_records(out))).removesuffix(".json")), stray)
    kept = tmp_path / "kept"
    summary = run_filter(
        load_config(
            None,
            [f"input.path={out}", f"output.path={kept}", "filter.threshold=0", "input.allow_incomplete=true"],
            schema=FilterJobConfig,
        )
    )
    assert summary["rows"] == 4

    # Interrupted (no manifest), and not a flip_ray output at all.
    (out / "manifest.json").unlink()
    with pytest.raises(NotAScoredOutput, match="has not finished"):
        pairs(out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("a: 1\n")
    pq.write_table(pa.table({"x": [1]}), foreign / "data.parquet")
    with pytest.raises(NotAScoredOutput, match="is not a flip_ray scoring output"):
        pairs(foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAScoredOutput, match="is not a flip_ray scoring output"):
        build_report(str(empty))
