"""What a user sees: a real `flip-ray score` on the bundled 24-row sample prints flip_ray's own
lines, row progress and the summary, in under 40 lines; vLLM's and Ray's own output goes to the log
file in output.path/logs/. An output on a full disk still says so on the terminal."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from clusters import kill_processes_mentioning
from invariant import assert_output_matches_input

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "flip_ray/samples/alpacaeval_sample.jsonl"
SMALL_ENGINE = [
    "model.device=cpu", "model.dtype=float32", "model.enforce_eager=true", "model.max_model_len=1024",
    "sampling.max_tokens=32", "resources.batch_size=2", "input.id_column=id",
]  # fmt: skip


@pytest.mark.slow
def test_a_real_run_prints_progress_and_summary_in_few_lines(tmp_path, embedded_model):
    out = tmp_path / "scored"
    ray_tmp = tempfile.mkdtemp(prefix="frt-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    cmd = [
        sys.executable, "-m", "flip_ray.cli", "score", "--config", "configs/local.yaml", f"output.path={out}",
        "sampling.max_tokens=48", "model.max_model_len=1024", "resources.batch_size=8",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        kill_processes_mentioning(ray_tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    terminal = (done.stdout + done.stderr).strip().splitlines()
    assert len(terminal) < 40, "\n".join(terminal)
    assert any(line.startswith("scored 24/24 rows (100%)") for line in terminal), terminal
    assert any(line.startswith("flip_ray: scored 24/24 rows") for line in terminal), terminal
    assert not [line for line in terminal if "vLLM" in line and "logs:" not in line], terminal
    # Rows travel in blocks of resources.batch_size, not one block per shard: results are written (and
    # progress moves) every 8 rows instead of once at the end.
    assert len(list((out / "data").rglob("*.parquet"))) >= 3
    logs = list((out / "logs").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "Initializing a V1 LLM engine" in text  # the engine dump, in the log
    assert f"logs: {logs[0]}" in "\n".join(terminal)


@pytest.mark.slow
def test_a_full_output_disk_is_said_on_the_terminal_and_the_rerun_resumes(tmp_path, embedded_model):
    """output.path on a real 1 MiB file system with 32 KiB left: the log file (vLLM's engine dump)
    fills it before the first part file is written. The terminal still gets flip_ray's lines, the
    log's failure once, and the stop with exit 3 (rerun resumes); once space is freed, the same
    command finishes with the output equal to the input."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system needs mount (root): {mounted.stderr.decode().strip()}")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(line + "\n" for line in SAMPLE.read_text().splitlines()[:6]))
    ray_tmp = tempfile.mkdtemp(prefix="frdisk-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "flip_ray.cli", "score", f"input.path={inp}", f"output.path={disk / 'out'}"]
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (1024 - 32) * 1024)
        try:
            full = subprocess.run(cmd + SMALL_ENGINE, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        finally:
            kill_processes_mentioning(ray_tmp)
        terminal = (full.stdout + full.stderr).strip().splitlines()
        assert full.returncode == 3, "\n".join(terminal)
        warned = [line for line in terminal if "cannot write the log file" in line]
        assert len(warned) == 1 and "No space left on device" in warned[0], terminal
        assert any(line.startswith("flip-ray: ") and "1 to score (6 rows)" in line for line in terminal), terminal
        assert "No space left on device" in terminal[-1] and "rerun with the same config to resume" in terminal[-1]
        assert "Traceback" not in full.stderr
        filler.unlink()
        try:
            rerun = subprocess.run(cmd + SMALL_ENGINE, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        finally:
            kill_processes_mentioning(ray_tmp)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        assert "cannot write the log file" not in rerun.stdout + rerun.stderr
        assert_output_matches_input(disk / "out", inp, id_column="id")
        assert json.loads((disk / "out" / "manifest.json").read_text())["complete"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
