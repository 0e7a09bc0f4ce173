"""One run per output: a lock in `output.path` taken before a run changes anything there.

A second run started into the same output while the first works is refused, naming the holder
(attempt id, host, pid, start time). The lock is a heartbeat lease: its holder rewrites it every
`HEARTBEAT_S` seconds, and a lock whose last heartbeat is older than `LEASE_S` belongs to a run that
died (kill -9, a lost node) and is taken over. A lease works wherever the output lives, across
hosts and on object storage; a check that the holder's process exists would only work on its own
host, so it is used there as a shortcut (a dead pid on this host frees the lock at once).

Creation is exclusive: `O_CREAT | O_EXCL` on a local or shared file system, a conditional PUT
(`If-None-Match: *`) on s3://. A takeover replaces exactly the stale lock it read (`If-Match` on
its ETag on s3://; an atomic rename aside on a file system), so two runs that find the same stale
lock cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from flip_ray.shards import is_local
from flip_ray.store import OutputError, OutputStore

logger = logging.getLogger(__name__)

LOCK = "_lock.json"
HEARTBEAT_S = 30.0
LEASE_S = 120.0


class OutputLocked(OutputError):
    """Another run holds output.path."""


def _precondition_failed(e: BaseException) -> bool:
    """An exclusive create or a conditional replace that lost (s3fs maps HTTP 412 to OSError)."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412")


class RunLock:
    """The lock of one run on one output directory; `acquire`, then `release` (or use `with`)."""

    def __init__(self, store: OutputStore, attempt: str, lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S):
        self.store, self.attempt = store, attempt
        self.path = store.path(LOCK)
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        self.record = {
            "attempt": attempt,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
            "heartbeat_at": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._etag: str | None = None
        self.held = False

    # -- storage -------------------------------------------------------------------------------------

    def _create(self, record: dict) -> bool:
        """Writes the lock if none exists; False if one does."""
        data = json.dumps(record, indent=2).encode()
        if is_local(self.store.fs):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            out = self.store.fs.pipe_file(self.path, data, mode="create")
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        self._etag = (out or {}).get("ETag")
        return True

    def _read(self) -> tuple[dict | None, str | None]:
        """The current lock and its version (ETag on s3://), or (None, None) if there is none."""
        fs = self.store.fs
        fs.invalidate_cache(self.path)
        try:
            data = fs.cat_file(self.path)
            etag = None if is_local(fs) else fs.info(self.path).get("ETag")
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), etag
        except ValueError:  # a half-written lock (a local write cut short): treat as stale
            return {"attempt": "?", "host": "?", "pid": -1, "started_at": 0, "heartbeat_at": 0}, etag

    def _replace(self, stale: dict, etag: str | None) -> bool:
        """Takes over a stale lock if it is still the one read; False if another run got there first."""
        if is_local(self.store.fs):
            aside = f"{self.path}.stale-{uuid.uuid4().hex}"
            try:
                os.rename(self.path, aside)  # atomic: of two runs taking over, one renames
            except FileNotFoundError:
                return False
            with open(aside, "rb") as f:
                taken = json.loads(f.read() or b"{}")
            os.unlink(aside)
            if taken.get("attempt") != stale.get("attempt"):  # not the lock read: another run's live lock
                self._create(taken)
                return False
            return self._create(self.record)
        data = json.dumps(self.record, indent=2).encode()
        try:
            out = self.store.fs.pipe_file(self.path, data, IfMatch=etag) if etag else None
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        if out is None:
            return False
        self._etag = out.get("ETag")
        return True

    # -- the lease -------------------------------------------------------------------------------------

    def stale(self, holder: dict, now: float | None = None) -> str | None:
        """Why `holder` no longer holds the lock, or None while it does."""
        now = time.time() if now is None else now
        age = now - float(holder.get("heartbeat_at", 0))
        if age > self.lease_s:
            return f"its last heartbeat was {age:.0f} s ago (lease {self.lease_s:.0f} s)"
        if holder.get("host") == socket.gethostname() and holder.get("pid") not in (None, os.getpid()):
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return f"its process {holder['pid']} on this host is gone"
            except (PermissionError, ValueError, OverflowError):
                pass
        return None

    def acquire(self) -> None:
        """Takes the lock (a stale one is taken over) and starts the heartbeat.

        Raises:
            OutputLocked: A live run holds the output; the message names it.
        """
        for _ in range(3):
            if self._create(self.record):
                break
            holder, etag = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            why = self.stale(holder)
            if why is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
                raise OutputLocked(
                    f"output.path {self.store.uri} is in use by another run (attempt {holder.get('attempt')} on "
                    f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}); wait for it to end "
                    f"or stop it. A lock left by a killed run expires {self.lease_s:.0f} s after its last heartbeat"
                )
            logger.warning(
                "output.path %s: taking over the lock of run %s: %s", self.store.uri, holder.get("attempt"), why
            )
            if self._replace(holder, etag):
                break
        else:
            raise OutputLocked(f"output.path {self.store.uri}: could not take the lock; another run is starting")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="flip-ray-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.record["heartbeat_at"] = time.time()
            try:
                data = json.dumps(self.record, indent=2).encode()
                if is_local(self.store.fs):
                    tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, self.path)
                else:
                    out = self.store.fs.pipe_file(self.path, data, **({"IfMatch": self._etag} if self._etag else {}))
                    self._etag = (out or {}).get("ETag", self._etag)
            except Exception as e:  # a missed heartbeat is retried; the lease allows several
                logger.warning("could not renew the lock on %s: %s", self.store.uri, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this run's (a no-op if not held)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, _ = self._read()
        if holder is not None and holder.get("attempt") == self.attempt:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
