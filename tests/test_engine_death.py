"""A dead engine neither hangs the job nor becomes committed error rows: vLLM's EngineCore in its own
process (the GPU layout, `model.engine_multiprocessing=true` on CPU here) is killed mid-run while the
engine actor works on several blocks at once (`resources.max_concurrent_batches`); the engine actor
ends, Ray restarts it and retries its batches, and the run completes with every row."""

import threading

import psutil
import pyarrow.parquet as pq
import pytest
from invariant import assert_output_matches_input
from test_faults import ENGINE, done_files, make_shards, wait_for

from flip_ray.config.base import load_config
from flip_ray.engine.queue import is_fatal_engine_error
from flip_ray.recipe import run_score

pytestmark = pytest.mark.slow


def engine_core_processes() -> list[psutil.Process]:
    """vLLM's EngineCore processes: children of a BackwardInferenceStage actor."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if "BackwardInferenceStage" in " ".join(p.info["cmdline"] or []):
            found += [c for c in p.children(recursive=True) if "EngineCore" in " ".join(c.cmdline() or [c.name()])]
    return found


def test_killed_engine_core_is_restarted_not_recorded(tmp_path, ray_local, embedded_model):
    ids = make_shards(tmp_path / "in", n_shards=6, rows=3)
    out = tmp_path / "out"
    killed = []

    def killer():
        wait_for(lambda: len(done_files(out)) >= 1, 600, "a finished shard")
        wait_for(lambda: bool(engine_core_processes()), 60, "the EngineCore process")
        for p in engine_core_processes():
            p.kill()
            killed.append(p.pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    args = [
        f"input.path={tmp_path / 'in'}",
        f"output.path={out}",
        *ENGINE,
        "model.engine_multiprocessing=true",
        "resources.max_concurrent_batches=4",
    ]
    manifest = run_score(load_config(None, args))
    t.join(timeout=5)
    assert killed, "no EngineCore process was found to kill"
    rows = pq.read_table(out / "data").to_pylist()
    assert not [r["id"] for r in rows if r["error"] is not None], "the kill must not become error rows"
    assert {r["id"] for r in rows} == ids and manifest["complete"]
    assert_output_matches_input(out, tmp_path / "in", id_column="id")
    # Blocks were in flight together: more requests in the engine at once than one block of 2 rows
    # has (a generation and a likelihood each).
    occ = manifest["engine_occupancy"]
    assert occ["max_requests_in_engine"] > 4, occ
    # vLLM's scheduler statistics come through from the engine's own process too.
    assert occ["max_running_requests"] > 4 and occ["mean_running_requests"] > 0, occ


def test_fatal_errors_are_told_from_row_errors():
    from vllm.v1.engine.exceptions import EngineDeadError

    assert is_fatal_engine_error(EngineDeadError())
    assert is_fatal_engine_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal_engine_error(ValueError("The decoder prompt (length 9000) is longer than the maximum"))
