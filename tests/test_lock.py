"""One run per output: the lock on a local directory and on s3:// (SeaweedFS, conditional PUTs),
its lease, and two real `flip-ray score` processes started into one output."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from clusters import kill_processes_mentioning
from test_faults import ENGINE, make_shards, wait_for

from flip_ray.lock import LOCK, OutputLocked, RunLock
from flip_ray.store import OutputStore

REPO = Path(__file__).resolve().parents[1]


def check_lock_rules(uri: str) -> None:
    store = OutputStore(uri)
    first = RunLock(store, "attempt-a", heartbeat_s=0.2)
    first.acquire()
    try:
        with pytest.raises(OutputLocked, match=r"in use by another run \(attempt attempt-a on host .*pid \d+"):
            RunLock(store, "attempt-b").acquire()
        time.sleep(0.6)  # heartbeats keep it fresh
        assert RunLock(store, "x").stale(json.loads(store.fs.cat_file(store.path(LOCK)))) is None
    finally:
        first.release()
    assert not store.fs.exists(store.path(LOCK))
    # A lock left by a run that died (no heartbeat for longer than the lease) is taken over, once.
    dead = {"attempt": "dead", "host": "elsewhere", "pid": 1, "started_at": 0, "heartbeat_at": time.time() - 600}
    store.fs.pipe_file(store.path(LOCK), json.dumps(dead).encode())
    taker = RunLock(store, "attempt-c")
    taker.acquire()
    assert json.loads(store.fs.cat_file(store.path(LOCK)))["attempt"] == "attempt-c"
    with pytest.raises(OutputLocked, match="attempt-c"):
        RunLock(store, "attempt-d").acquire()
    taker.release()


def test_local_lock(tmp_path):
    check_lock_rules(str(tmp_path / "out"))
    # On this host, a holder whose process is gone frees the lock at once.
    store = OutputStore(str(tmp_path / "out2"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = RunLock(store, "gone").record | {"pid": int(gone.stdout)}
    store.fs.makedirs(store.root, exist_ok=True)
    store.fs.pipe_file(store.path(LOCK), json.dumps(holder).encode())
    lock = RunLock(store, "next")
    lock.acquire()
    lock.release()


def test_s3_lock(s3_server):
    s3_server.client().create_bucket(Bucket="locked-out")
    check_lock_rules("s3://locked-out/out")


@pytest.mark.slow
def test_a_second_run_into_the_same_output_is_refused(tmp_path, embedded_model):
    make_shards(tmp_path / "in", n_shards=4, rows=3)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="frl-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    cmd = [
        sys.executable,
        "-m",
        "flip_ray.cli",
        "score",
        f"input.path={tmp_path / 'in'}",
        f"output.path={out}",
        *ENGINE,
    ]
    try:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: (out / LOCK).exists() or first.poll() is not None, 120, "the first run's lock")
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        holder = json.loads((out / LOCK).read_text())
        assert f"attempt {holder['attempt']}" in second.stderr and f"pid {first.pid}" in second.stderr
        log, _ = first.communicate(timeout=900)
        assert first.returncode == 0, log[-3000:]
    finally:
        kill_processes_mentioning(ray_tmp)
    assert not (out / LOCK).exists()
    from invariant import assert_output_matches_input

    assert_output_matches_input(out, tmp_path / "in", id_column="id")
