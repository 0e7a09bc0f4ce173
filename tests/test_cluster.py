"""A real multi-node Ray cluster on 127.0.0.1: a head that runs no work and two worker nodes, each
with four logical CPUs and one (fake) GPU slot, output on the SeaweedFS S3 server. The engine is forced to
the CPU (`model.device=cpu`); the GPU slots are what `configs/gpu.yaml` asks of a real cluster.

1. a local output.path on a multi-node cluster is refused before any model loads;
2. placement: `resources.concurrency=2 resources.num_gpus=1` gives two engine actors, one GPU slot
   each, and the run completes;
3. node loss: once part files exist, the worker node holding the engine loses its raylet and
   workers to kill -9; the job submitted with `ray job submit` completes, or exits 3 and a rerun
   completes; every id once.
"""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest
from clusters import free_ports, kill_processes_mentioning
from invariant import assert_output_matches_input
from test_faults import make_shards, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
ENGINE = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.enforce_eager=true",
    "model.max_model_len=1024",
    "model.cpu_threads=1",  # two engines on two cores
    "sampling.max_tokens=24",
    "resources.batch_size=2",
    "resources.similarity_batch_size=3",
    "input.id_column=id",
]


def _node_ports() -> list[str]:
    node, obj, agent_http, agent_grpc, metrics, rt_env = free_ports(6)
    return [
        f"--node-manager-port={node}",
        f"--object-manager-port={obj}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
    ]


@pytest.fixture(scope="module")
def cluster(s3_server, embedded_model):
    gcs, dash, client = free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="frc-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    head = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        "--min-worker-port=21000", "--max-worker-port=21999", "--disable-usage-stats", *_node_ports(),
    ]  # fmt: skip
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
    workers = []
    for k in range(2):
        ports = _node_ports()
        cmd = [
            RAY, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
            "--num-gpus=1", f"--min-worker-port={22000 + 1000 * k}", f"--max-worker-port={22999 + 1000 * k}",
            *ports,
        ]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
        workers.append(int(ports[0].split("=")[1]))
    s3_server.client().create_bucket(Bucket="cluster")
    try:
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "workers": workers}
    finally:
        kill_processes_mentioning(temp_dir, f":{gcs}", *(f"node_manager_port={p}" for p in workers))
        shutil.rmtree(temp_dir, ignore_errors=True)


def driver(cluster, *args, timeout=900) -> subprocess.CompletedProcess:
    """`flip-ray score` as a driver that joins the cluster (RAY_ADDRESS)."""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    return subprocess.run(
        [sys.executable, "-m", "flip_ray.cli", "score", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def s3_ids(prefix: str) -> list[str]:
    import fsspec
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return [
        i
        for f in fs.glob(f"cluster/{prefix}/data/*/*.parquet")
        for i in pq.read_table(f, filesystem=fs, columns=["id"]).column("id").to_pylist()
    ]


def test_local_output_on_a_multi_node_cluster_is_refused(cluster, tmp_path):
    make_shards(tmp_path / "in", n_shards=1, rows=2)
    done = driver(cluster, f"input.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", *ENGINE, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "s3://" in last and "shared file system" in last and "Traceback" not in done.stderr
    assert not list((tmp_path / "out").glob("_done/*"))


def test_two_engine_actors_hold_one_gpu_slot_each(cluster, tmp_path):
    ids = make_shards(tmp_path / "in", n_shards=4, rows=3)
    done = driver(
        cluster,
        f"input.path={tmp_path / 'in'}",
        "output.path=s3://cluster/placement",
        *ENGINE,
        "resources.concurrency=2",
        "resources.num_gpus=1",
        "storage.shared_filesystem=true",  # the local input: one machine's disk, seen by every node (checked)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run(
        [RAY, "list", "actors", f"--address={cluster['dashboard']}", "--detail", "--format=json", "--limit=1000"],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    actors = [a for a in json.loads(listed.stdout) if "BackwardInferenceStage" in a["class_name"]]
    assert len(actors) == 2, listed.stdout[-2000:] + listed.stderr[-2000:]
    assert all(a["required_resources"].get("GPU") == 1 for a in actors), [a["required_resources"] for a in actors]
    assert len({a["node_id"] for a in actors}) == 2, "one engine actor on each worker node"
    assert sorted(s3_ids("placement")) == sorted(ids)
    assert_output_matches_input("s3://cluster/placement", tmp_path / "in", id_column="id")


def engine_processes() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "BackwardInferenceStage" in " ".join(p.info["cmdline"] or []) and "MapWorker" in " ".join(p.info["cmdline"])
    ]


def test_node_loss_under_ray_job_submit(cluster, tmp_path, s3_server):
    ids = make_shards(tmp_path / "in", n_shards=8, rows=3)
    for f in sorted((tmp_path / "in").iterdir()):
        s3_server.client().put_object(Bucket="cluster", Key=f"node-loss-in/{f.name}", Body=f.read_bytes())
    killed = []

    def kill_engine_node():
        import fsspec

        fs = fsspec.filesystem("s3")

        def parts():
            fs.invalidate_cache()
            return fs.glob("cluster/node-loss/data/*/*.parquet")

        wait_for(lambda: bool(parts()), 900, "part files on S3")
        for p in engine_processes():
            raylet = psutil.Process(p.ppid())
            if any(f"node_manager_port={port}" in " ".join(raylet.cmdline()) for port in cluster["workers"]):
                for q in [raylet, *raylet.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        q.kill()
                        killed.append(q.pid)

    killer = threading.Thread(target=kill_engine_node, daemon=True)
    killer.start()
    job = [
        RAY, "job", "submit", f"--address={cluster['dashboard']}", "--working-dir", ".", "--",
        sys.executable, "jobs/score.py", "input.path=s3://cluster/node-loss-in/", "output.path=s3://cluster/node-loss",
        *ENGINE,
    ]  # fmt: skip
    first = subprocess.run(job, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=1200)
    killer.join(timeout=30)
    assert killed, "no worker node held the engine to be killed: " + first.stdout[-2000:]
    outcome = "completed"
    if first.returncode != 0:
        assert "rerun with the same config to resume" in first.stdout, first.stdout[-4000:]
        rerun = subprocess.run(job, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=1200)
        assert rerun.returncode == 0, rerun.stdout[-4000:]
        outcome = "failed clearly, rerun completed"
    got = s3_ids("node-loss")
    assert len(got) == len(set(got)) and set(got) == ids, outcome
    assert_output_matches_input("s3://cluster/node-loss", "s3://cluster/node-loss-in/", id_column="id")
    print(f"node loss outcome: {outcome}")
