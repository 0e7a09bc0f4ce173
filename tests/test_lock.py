"""One run per output: the lock on a local directory and on s3:// (SeaweedFS, conditional PUTs),
its lease, and two real `flip-ray score` processes started into one output. A lock that lapses or
is taken while its run works is lost before its lease ends: replaced, deleted, storage down or
hanging."""

import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from clusters import kill_processes_mentioning
from test_faults import ENGINE, make_shards, wait_for

from flip_ray.job.lock import HEARTBEAT_ENV, LEASE_ENV, LOCK, LockLost, OutputLocked, RunLock
from flip_ray.job.store import OutputError, OutputStore, write_bytes_durably

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


def make_bucket(server, name: str) -> None:
    client = server.client()
    if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=name)


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path) -> str:
    """A fresh output directory: local, or under a bucket of the session's S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    make_bucket(request.getfixturevalue("s3_server"), "lock-lost")
    return f"s3://lock-lost/{uuid.uuid4().hex}"


def lock_held(uri: str, heartbeat_s: float, lease_s: float) -> tuple[RunLock, list[str]]:
    """An acquired lock and the threads its `on_lost` was called from (one entry per call)."""
    calls: list[str] = []
    lock = RunLock(
        OutputStore(uri),
        f"a-{uuid.uuid4().hex[:6]}",
        lease_s=lease_s,
        heartbeat_s=heartbeat_s,
        on_lost=lambda: calls.append(threading.current_thread().name),
    )
    lock.acquire()
    return lock, calls


def test_heartbeats_keep_the_lock(output_uri):
    lock, calls = lock_held(output_uri, heartbeat_s=0.2, lease_s=3)
    try:
        seen = set()

        def beats() -> bool:
            seen.add(json.loads(lock.store.fs.cat_file(lock.path))["heartbeat_at"])
            return len(seen) >= 6

        wait_for(beats, 60, "five renewals")
        assert lock.lost is None and calls == []
        lock.check()
        holder = json.loads(lock.store.fs.cat_file(lock.path))
        assert holder["attempt"] == lock.attempt and holder["lease_s"] == 3
        assert RunLock(lock.store, "reader").stale(holder) is None
    finally:
        lock.release()
    assert not lock.store.fs.exists(lock.path)


def test_a_replaced_lock_is_lost_at_once(output_uri):
    # A lease much longer than a heartbeat: the loss must come from the renewal finding the
    # other run, not from the deadline.
    lock, calls = lock_held(output_uri, heartbeat_s=0.3, lease_s=30)
    intruder = {"attempt": "intruder", "host": "elsewhere", "pid": 4242, "started_at": 0, "heartbeat_at": time.time()}
    try:
        write_bytes_durably(lock.store.fs, lock.path, json.dumps(intruder).encode())
        wait_for(lambda: lock.lost is not None, 60, "the lock to be lost")
        assert lock.lost_at < lock.deadline
        with pytest.raises(LockLost) as lost:
            lock.check()
        message = str(lost.value)
        assert "replaced by attempt intruder on host elsewhere, pid 4242" in message
        assert lock.store.uri_of(LOCK) in message and "finished shards are kept" in message
        assert "resume once the other run has ended" in message
        time.sleep(1.0)  # several more heartbeats' time: none renews, on_lost is not called again
        assert calls == ["flip-ray-lock-heartbeat"]
    finally:
        lock.release()
    # Neither the heartbeat nor the release touched the other run's lock.
    assert json.loads(lock.store.fs.cat_file(lock.path)) == intruder


def test_a_deleted_lock_is_lost_at_once(output_uri):
    lock, calls = lock_held(output_uri, heartbeat_s=0.3, lease_s=30)
    try:
        lock.store.fs.rm(lock.path)
        wait_for(lambda: lock.lost is not None, 60, "the lock to be lost")
        assert "the lock was deleted" in lock.lost and lock.lost_at < lock.deadline
        with pytest.raises(LockLost, match="lock was deleted"):
            lock.check()
        time.sleep(1.0)
        assert calls == ["flip-ray-lock-heartbeat"]
        lock.store.fs.invalidate_cache()
        assert not lock.store.fs.exists(lock.path), "a lost lock must not be written again"
    finally:
        lock.release()


def test_s3_outage_loses_the_lock_before_its_lease(s3_server):
    make_bucket(s3_server, "lock-lost")
    lock, calls = lock_held(f"s3://lock-lost/{uuid.uuid4().hex}", heartbeat_s=0.25, lease_s=3)
    try:
        wait_for(lambda: lock.renewed_at > lock.record["started_at"] + 0.5, 60, "a renewal")
        s3_server.stop()
        wait_for(lambda: lock.lost is not None, 60, "the lock to be lost")
        # Lost before another run could take it: within the lease of the last renewal that landed.
        assert lock.lost_at - lock.renewed_at < lock.lease_s
        assert lock.lost_at >= lock.deadline
        assert "no heartbeat has renewed it" in lock.lost and "last error" in lock.lost
        with pytest.raises(LockLost, match=r"resume once the storage answers again"):
            lock.check()
        assert calls == ["flip-ray-lock-watchdog"]
        lock.release()  # storage still down: returns, leaving the lock to its lease
    finally:
        s3_server.start()
    store = OutputStore(lock.store.uri)
    store.fs.invalidate_cache()
    assert json.loads(store.fs.cat_file(lock.path))["attempt"] == lock.attempt
    store.fs.rm(lock.path)


def test_a_hanging_renewal_loses_the_lock_by_its_deadline(tmp_path):
    """A renewal that never returns (here: reading a FIFO nobody writes, as a hung mount would):
    the watchdog still calls on_lost by the deadline."""
    lock, calls = lock_held(str(tmp_path / "out"), heartbeat_s=0.2, lease_s=3)
    beat = next(t for t in threading.enumerate() if t.name == "flip-ray-lock-heartbeat" and t in lock._threads)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.replace(fifo, lock.path)
    try:
        wait_for(lambda: calls, 60, "on_lost")
        assert calls == ["flip-ray-lock-watchdog"] and beat.is_alive()
        assert "a renewal has not returned" in lock.lost
        assert lock.lost_at - lock.renewed_at < lock.lease_s
        with pytest.raises(LockLost, match="no heartbeat has renewed it"):
            lock.check()
    finally:
        # Let the stuck read finish (it finds no lock of this run), then let the release see none.
        def unblocked() -> bool:
            try:
                fd = os.open(lock.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
            else:
                try:
                    os.write(fd, b"{}")
                except BrokenPipeError:  # the reader returned meanwhile
                    pass
                finally:
                    os.close(fd)
            return not beat.is_alive()

        wait_for(unblocked, 60, "the stuck renewal to return")
        os.unlink(lock.path)
        lock.release()
    assert calls == ["flip-ray-lock-watchdog"]


def test_lease_settings(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path / "out"))
    monkeypatch.setenv(HEARTBEAT_ENV, "0.5")
    monkeypatch.setenv(LEASE_ENV, "4")
    lock = RunLock(store, "a")
    assert (lock.heartbeat_s, lock.lease_s, lock.record["lease_s"]) == (0.5, 4.0, 4.0)
    monkeypatch.setenv(LEASE_ENV, "soon")
    with pytest.raises(OutputError, match=f"{LEASE_ENV}='soon' is not a number"):
        RunLock(store, "a")
    monkeypatch.delenv(LEASE_ENV)
    monkeypatch.delenv(HEARTBEAT_ENV)
    with pytest.raises(OutputError, match="must be at least 4 heartbeats"):
        RunLock(store, "a", lease_s=1.5, heartbeat_s=0.5)
    # A holder is judged by its own lease, whatever the reader's.
    reader = RunLock(store, "b", lease_s=4, heartbeat_s=1)
    holder = {"attempt": "a", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 60, "lease_s": 120}
    assert reader.stale(holder) is None
    assert "lease 120 s" in reader.stale({**holder, "heartbeat_at": time.time() - 200})


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


@pytest.mark.slow
def test_a_run_whose_lock_is_replaced_stops_and_a_rerun_resumes(tmp_path, embedded_model, s3_server):
    """A real `flip-ray score` into s3://: its lock overwritten by another attempt after its first
    finished shard. It stops with exit 3 naming the lock, keeps its finished shards, commits none
    after, and leaves the other run's lock alone; once that lock is gone a rerun completes."""
    make_shards(tmp_path / "in", n_shards=6, rows=2)
    make_bucket(s3_server, "lock-e2e")
    prefix = uuid.uuid4().hex
    out = f"s3://lock-e2e/{prefix}"
    client = s3_server.client()
    ray_tmp = tempfile.mkdtemp(prefix="frl-", dir="/tmp")
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "RAY_TMPDIR": ray_tmp,
        HEARTBEAT_ENV: "0.5",
        LEASE_ENV: "6",
    }
    cmd = [sys.executable, "-m", "flip_ray.cli", "score", f"input.path={tmp_path / 'in'}", f"output.path={out}"]
    cmd += ENGINE

    def done_keys() -> list[str]:
        listing = client.list_objects_v2(Bucket="lock-e2e", Prefix=f"{prefix}/_done/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    intruder = {"attempt": "intruder", "host": "elsewhere", "pid": 4242, "started_at": 0, "heartbeat_at": 0}
    try:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: done_keys() or first.poll() is not None, 900, "a finished shard")
        intruder["heartbeat_at"] = time.time()
        client.put_object(Bucket="lock-e2e", Key=f"{prefix}/{LOCK}", Body=json.dumps(intruder).encode())
        log, _ = first.communicate(timeout=900)
        assert first.returncode == 3, log[-3000:]
        assert "lost its lock" in log and "replaced by attempt intruder on host elsewhere" in log, log[-3000:]
        kept = done_keys()
        assert kept and len(kept) < 6, "the run must stop before it finishes every shard"
        store = OutputStore(out)
        store.fs.invalidate_cache()
        for record in store.done_records().values():  # finished shards are whole
            names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path("data", record["shard_id"])))
            assert names == record["files"]
        assert json.loads(client.get_object(Bucket="lock-e2e", Key=f"{prefix}/{LOCK}")["Body"].read()) == intruder
        # The other run ends (its lock goes); a rerun resumes.
        client.delete_object(Bucket="lock-e2e", Key=f"{prefix}/{LOCK}")
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        kill_processes_mentioning(ray_tmp)
    from invariant import assert_output_matches_input

    assert_output_matches_input(out, tmp_path / "in", id_column="id")
