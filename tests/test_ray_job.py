"""`ray job submit` against a real local Ray head (127.0.0.1, token auth), as on a cluster."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from clusters import free_ports, kill_processes_mentioning

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(embedded_model):
    gcs, dash, client, agent_http, agent_grpc, metrics, node_mgr, obj_mgr, rt_env = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="frh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--runtime-env-agent-port={rt_env}",
        "--min-worker-port=20000",
        "--max-worker-port=20999",
        "--num-cpus=4",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_processes_mentioning(temp_dir, f":{gcs}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_scores_the_sample(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "scored"
    job_id = f"flip-ray-test-{secrets.token_hex(4)}"
    entrypoint = [
        sys.executable,
        "jobs/score.py",
        "--config",
        "configs/local.yaml",
        f"output.path={out}",
        "input.limit_per_shard=6",
        "sampling.max_tokens=32",
        "model.max_model_len=1024",
    ]
    # Blocks until the job ends, streaming its logs, as a user would run it.
    done = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            ".",
            f"--submission-id={job_id}",
            "--",
            *entrypoint,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    logs = done.stdout
    assert done.returncode == 0 and f"Job '{job_id}' succeeded" in logs, logs[-4000:]
    assert "flip_ray: scored 6/6 rows" in logs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 6 and manifest["counts"]["errors"] == 0
