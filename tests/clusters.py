"""Helpers for tests that start and kill Ray processes of their own."""

from __future__ import annotations

import contextlib
import socket


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
