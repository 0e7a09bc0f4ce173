"""Nothing flip_ray did not write is deleted, and nothing it skips is trusted blindly: overwrite into
a directory of someone else's files, input and output that overlap however the paths are spelled,
part files damaged after their commit, new weights under the same `model.path`, and the resolved
device and dtype in the fingerprint. Real files and the real `flip-ray` command; no engine starts
(every case is decided before one would)."""

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_preflight import RECORDS, assert_refused, flip_ray

from flip_ray.config.base import load_config
from flip_ray.job.plan import OutputExistsError, check_same_engine, plan_run
from flip_ray.job.stages import write_parts
from flip_ray.job.store import OutputError, OutputStore, shard_id
from flip_ray.job.tracker import ShardTracker
from flip_ray.recipe import prepare_output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_a_directory_of_someone_elses_files(tmp_path):
    inp = write_jsonl(tmp_path / "in" / "a.jsonl", RECORDS[:2])
    theirs = tmp_path / "theirs"
    (theirs / "data").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), theirs / "data" / "train.parquet")
    (theirs / "manifest.json").write_text('{"their": "manifest"}')
    before = snapshot(theirs)
    for extra in ([], ["output.overwrite=true"]):
        done = flip_ray("score", f"input.path={inp}", f"output.path={theirs}", *extra)
        assert_refused(done, "holds files that flip_ray did not write", "data/train.parquet", "new or empty")
        assert "output.overwrite" not in done.stderr.strip().splitlines()[-1], "never suggest overwriting their files"
    assert snapshot(theirs) == before


def test_input_inside_the_output_is_refused_however_spelled(tmp_path):
    out = tmp_path / "out"
    inp = write_jsonl(out / "corpus.jsonl", RECORDS[:2])
    (tmp_path / "link").symlink_to(out)
    before = snapshot(out)
    spellings = [f"{out}/../{out.name}", str(out).replace("/", "//"), str(tmp_path / "link"), f"{tmp_path}/./out/"]
    for spelled in spellings:
        cfg = load_config(None, [f"input.path={inp}", f"output.path={spelled}", "output.overwrite=true"])
        with pytest.raises(OutputError, match="overlap.*neither holds nor lies inside the input"):
            plan_run(cfg)
    done = flip_ray("score", f"input.path={inp}", f"output.path={out}", "output.overwrite=true")
    assert_refused(done, "overlap", "neither holds nor lies inside the input")
    assert snapshot(out) == before, "the input must be untouched"


def test_output_inside_the_input_through_a_symlink_is_refused(tmp_path):
    inp = write_jsonl(tmp_path / "in" / "a.jsonl", RECORDS[:2]).parent
    (tmp_path / "elsewhere").symlink_to(inp)
    done = flip_ray("score", f"input.path={inp}", f"output.path={tmp_path / 'elsewhere' / 'out'}")
    assert_refused(done, "is inside input.path")


def fake_checkpoint(directory: Path) -> Path:
    """A directory that passes the checkpoint pre-flight (config, weights, tokenizer)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (directory / "tokenizer.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"weights-v1" * 100)
    return directory


def committed_run(tmp_path: Path, *overrides: str):
    """A plan and an output with one committed shard, as a finished run leaves them."""
    inp = write_jsonl(tmp_path / "in" / "a.jsonl", RECORDS[:2])
    cfg = load_config(None, [f"input.path={inp}", f"output.path={tmp_path / 'out'}", *overrides])
    plan = plan_run(cfg)
    prepare_output(plan, cfg, {"model.device": "cpu", "model.dtype": "float32"})
    (shard,) = plan.shards
    tracker = ShardTracker(plan.store, [shard], "a1", 1.0, 1, plan.identities)
    sid = shard_id(shard.key)
    rows = [{f.name: None for f in plan.output_schema} | {"id": r["id"]} for r in RECORDS[:2]]
    table = pa.Table.from_pylist(rows, schema=plan.output_schema)
    from flip_ray import schema

    control = {schema.SHARD: [sid] * 3, schema.SHARD_TOTAL: [None, None, 2], schema.SHARD_ERROR: [None] * 3}
    batch = pa.concat_tables([table, pa.Table.from_pylist([{}], schema=plan.output_schema)])
    for f in schema.CONTROL_COLUMNS:
        batch = batch.append_column(f, pa.array(control.get(f.name, [None] * 3), f.type))
    tracker.add(write_parts(batch, output_uri=plan.store.uri, output_schema=plan.output_schema))
    assert tracker.completed == 1
    return cfg, sid


def test_new_weights_under_the_same_path_are_a_different_way_of_scoring(tmp_path):
    model = fake_checkpoint(tmp_path / "checkpoints" / "latest")
    cfg, _ = committed_run(tmp_path, f"model.path={model}")
    assert plan_run(cfg).done, "same weights: the finished shard is kept"
    (model / "model.safetensors").write_bytes(b"weights-v2" * 100)
    with pytest.raises(OutputExistsError, match=r"scored another way.*model\.weights_sha256: '[0-9a-f]{12}"):
        plan_run(cfg)
    # The command line says the same, exit 2, and names the setting.
    done = flip_ray("score", f"input.path={cfg.input.path}", f"output.path={cfg.output.path}", f"model.path={model}")
    assert_refused(done, "model.weights_sha256", "output.overwrite=true")


def test_the_resolved_device_and_dtype_are_what_is_compared(tmp_path):
    cfg, _ = committed_run(tmp_path)
    # Spelling out the dtype and device the first run resolved to is the same way of scoring.
    spelled = load_config(
        None, [f"input.path={cfg.input.path}", f"output.path={cfg.output.path}", "model.dtype=float32"]
    )
    plan = plan_run(spelled)
    assert plan.done
    check_same_engine(plan, {"model.device": "cpu", "model.dtype": "float32"})
    # A GPU bf16 rerun would mix rows of two numerics: refused, naming both settings.
    with pytest.raises(
        OutputExistsError, match=r"model\.device: 'cpu' -> 'gpu'; model\.dtype: 'float32' -> 'bfloat16'"
    ):
        check_same_engine(plan, {"model.device": "gpu", "model.dtype": "bfloat16"})


def test_a_damaged_part_file_is_rescored_not_skipped(tmp_path):
    cfg, sid = committed_run(tmp_path)
    part = next((tmp_path / "out" / "data" / sid).glob("*.parquet"))
    assert plan_run(cfg).done
    data = part.read_bytes()
    part.write_bytes(data[:-10] + b"\x00" * 10)  # same size, other bytes: a rewrite after the commit
    os.utime(part, ns=(1, 1))
    plan = plan_run(cfg)
    assert not plan.done and [s.key for s in plan.pending] == ["a.jsonl"]
    assert "was rewritten after its commit (mtime_ns changed)" in plan.remove[sid][1]
    part.unlink()
    assert "is missing" in plan_run(cfg).remove[sid][1]


def test_overwrite_removes_only_what_flip_ray_wrote(tmp_path):
    cfg, sid = committed_run(tmp_path)
    out = Path(cfg.output.path)
    (out / "notes.md").write_text("mine")
    done = flip_ray("score", f"input.path={cfg.input.path}", f"output.path={out}", "output.overwrite=true")
    assert_refused(done, "notes.md")
    assert (out / "notes.md").read_text() == "mine" and (out / "data" / sid).is_dir()
    (out / "notes.md").unlink()
    OutputStore(str(out)).clear_all()
    assert sorted(p.name for p in out.iterdir()) == [], "a flip_ray output is cleared whole"
    shutil.rmtree(out)
