"""What a user sees: a real `flip-ray score` on the bundled 24-row sample prints flip_ray's own
lines, row progress and the summary, in under 40 lines; vLLM's and Ray's own output goes to the log
file in output.path/logs/."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from clusters import kill_processes_mentioning

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


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
