"""Helpers for tests that start and kill Ray processes of their own."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def kill_processes_mentioning(*needles: str, timeout: float = 20) -> int:
    """Kills every process whose command line contains one of `needles`, with its children.

    Used instead of `ray stop`, which would also stop the test session's own cluster.
    """
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in needles):
            roots.append(p)
    procs = {}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return len(procs)


def node_ports() -> list[str]:
    """`ray start` flags that pin a node's own ports to free ones (several nodes on one host)."""
    node, obj, agent_http, agent_grpc, metrics, rt_env = free_ports(6)
    return [
        f"--node-manager-port={node}",
        f"--object-manager-port={obj}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
    ]


class LoopbackCluster:
    """A multi-node Ray cluster of `ray start` processes on 127.0.0.1: a head that runs no work and
    worker nodes (each with its own raylet) that can be lost to kill -9 and started again.

    Every process it starts is found again by its temp dir, GCS port or node manager port, never by
    a broad name: other Ray clusters may run on the same host.
    """

    def __init__(
        self,
        env: dict[str, str],
        workers: int = 2,
        worker_cpus: int = 4,
        worker_gpus: int = 1,
        object_store_bytes: int | None = None,
        worker_port_base: int = 29000,
    ):
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.env = dict(env)
        self.env.pop("RAY_ADDRESS", None)
        self.n_workers, self.worker_cpus, self.worker_gpus = workers, worker_cpus, worker_gpus
        self.object_store = [f"--object-store-memory={object_store_bytes}"] if object_store_bytes else []
        self.port_base = worker_port_base  # worker processes: 500 ports a node, below the ephemeral range
        self.temp_dir = tempfile.mkdtemp(prefix="frc-", dir="/tmp")  # short: socket paths have a length limit
        self.gcs, self.dash, self.client = free_ports(3)
        self.workers: dict[int, int] = {}  # slot -> node manager port of the node now in that slot
        self.node_temp_dirs: dict[int, str] = {}  # slot -> temp dir of the node now in that slot
        self.ever: set[int] = set()  # every node manager port used, for the final clean-up

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[:3])} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )

    def start(self) -> LoopbackCluster:
        b = self.port_base
        self._run([
            self.ray, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={self.gcs}", f"--dashboard-port={self.dash}", f"--ray-client-server-port={self.client}",
            "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
            f"--min-worker-port={b}", f"--max-worker-port={b + 499}", "--disable-usage-stats",
            *self.object_store, *node_ports(),
        ])  # fmt: skip
        for slot in range(self.n_workers):
            self.start_worker(slot)
        return self

    def start_worker(self, slot: int) -> int:
        """Starts (or starts again) the worker node of `slot`; returns its node manager port."""
        ports = node_ports()
        low = self.port_base + 500 * (slot + 1)
        # A temp dir of its own, as on a machine of its own: nodes that share one share the runtime_env
        # directory, and one node's agent then deletes a job's working_dir under another's driver.
        temp_dir = self.node_temp_dirs[slot] = f"{self.temp_dir}/w{slot}-{len(self.ever)}"
        self._run([
            self.ray, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            f"--num-cpus={self.worker_cpus}", f"--num-gpus={self.worker_gpus}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 499}", *self.object_store, *ports,
        ])  # fmt: skip
        port = int(ports[0].split("=")[1])
        self.workers[slot] = port
        self.ever.add(port)
        return port

    def raylet(self, slot: int):
        """The raylet process of the worker node in `slot`, or None if it is gone."""
        import psutil

        needle = f"node_manager_port={self.workers[slot]}"
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if needle in cmd and "raylet" in cmd:
                return p
        return None

    def slot_of(self, pid: int) -> int | None:
        """The worker slot whose raylet is an ancestor of process `pid` (None: the head or not Ray's)."""
        import psutil

        raylets = {}
        for slot in self.workers:
            r = self.raylet(slot)
            if r is not None:
                raylets[r.pid] = slot
        try:
            for parent in psutil.Process(pid).parents():
                if parent.pid in raylets:
                    return raylets[parent.pid]
        except psutil.NoSuchProcess:
            pass
        return None

    def kill_worker(self, slot: int) -> list[int]:
        """kill -9 of the worker node's raylet and everything it started (workers, agents): the
        node is lost as a machine is. Returns the pids killed."""
        import psutil

        raylet = self.raylet(slot)
        if raylet is None:
            return []
        victims = [raylet, *raylet.children(recursive=True)]
        killed = []
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.pid)
        psutil.wait_procs(victims, timeout=10)
        # `ray start` also left processes of this node outside the raylet's tree (the log monitor).
        kill_processes_mentioning(self.node_temp_dirs[slot], timeout=5)
        return killed

    def stop(self) -> None:
        kill_processes_mentioning(self.temp_dir, f":{self.gcs}", *(f"node_manager_port={p}" for p in sorted(self.ever)))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
