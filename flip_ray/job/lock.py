"""One run per output: a lock in `output.path` taken before a run changes anything there.

A second run started into the same output while the first works is refused, naming the holder
(attempt id, host, pid, start time). The lock is a heartbeat lease: its holder rewrites it every
`HEARTBEAT_S` seconds, and a lock whose last heartbeat is older than its lease (`LEASE_S`, written
in the lock) belongs to a run that died (kill -9, a lost node) and is taken over. A lease works
wherever the output lives, across hosts and on object storage; a check that the holder's process
exists would only work on its own host, so it is used there as a shortcut (a dead pid on this host
frees the lock at once).

Creation is exclusive: `O_CREAT | O_EXCL` on a local or shared file system, a conditional PUT
(`If-None-Match: *`) on s3://. A takeover replaces exactly the stale lock it read (`If-Match` on
its ETag on s3://; an atomic rename aside on a file system), so two runs that find the same stale
lock cannot both win.

The lease never lapses while its run writes. A heartbeat renews only a lock that is still this
run's (`If-Match` on s3://; the holder read back first on a file system), and the lock is *lost*:
- at once, when the lock was replaced by another run or deleted;
- when no renewal has succeeded for `lease_s - 2 * heartbeat_s` seconds (storage down or hanging),
  a watchdog thread says so by then even if a renewal call never returns. The remaining
  `2 * heartbeat_s` cover a commit already under way and clock skew between hosts.
A lost lock calls `on_lost` once (the run interrupts its main thread), and `check()`, called before
each commit, raises `LockLost` from then on, and from the deadline on even before the watchdog
has run. The run stops with exit 3; finished shards are kept and a rerun resumes.

`FLIP_RAY_LOCK_HEARTBEAT_S` and `FLIP_RAY_LOCK_LEASE_S` change the defaults (tests use short ones).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import fsspec.asyn

from flip_ray.input.files import is_local
from flip_ray.job.store import LOCK, OutputError, OutputStore

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
LEASE_S = 120.0
HEARTBEAT_ENV, LEASE_ENV = "FLIP_RAY_LOCK_HEARTBEAT_S", "FLIP_RAY_LOCK_LEASE_S"
# One call on object storage gives up after a heartbeat, within these bounds (a hanging server);
# a renewal is then retried.
MIN_CALL_S, MAX_CALL_S = 2.0, 10.0


class OutputLocked(OutputError):
    """Another run holds output.path."""


class LockLost(RuntimeError):
    """This run's lock lapsed or was taken while it ran; it stops (exit 3) and a rerun resumes."""


class _Taken(Exception):
    """A renewal found that the lock is no longer this run's."""


def _precondition_failed(e: BaseException) -> bool:
    """An exclusive create or a conditional replace that lost (s3fs maps HTTP 412 to OSError)."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412")


def _seconds(value: float | None, env: str, default: float) -> float:
    if value is not None:
        return float(value)
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        raise OutputError(f"{env}={raw!r} is not a number of seconds; unset it or give one") from None
    if not seconds > 0:
        raise OutputError(f"{env}={raw!r} must be a positive number of seconds")
    return seconds


def describe(holder: dict) -> str:
    """`attempt A on host H, pid P`: who holds (or took) a lock."""
    return f"attempt {holder.get('attempt')} on host {holder.get('host')}, pid {holder.get('pid')}"


class RunLock:
    """The lock of one run on one output directory; `acquire`, then `release` (or use `with`).

    Args:
        store: The output directory.
        attempt: This run's attempt id, written in the lock.
        lease_s: How long after its last heartbeat the lock counts as abandoned (default:
            `FLIP_RAY_LOCK_LEASE_S`, else `LEASE_S`). At least 4 heartbeats, so that the run
            rides out a missed beat or two and still stops `2 * heartbeat_s` before the lease ends.
        heartbeat_s: Seconds between renewals (default: `FLIP_RAY_LOCK_HEARTBEAT_S`, else
            `HEARTBEAT_S`).
        on_lost: Called once, from a lock thread, when the lock is lost; it must return quickly
            (e.g. `_thread.interrupt_main`).
    """

    def __init__(
        self,
        store: OutputStore,
        attempt: str,
        lease_s: float | None = None,
        heartbeat_s: float | None = None,
        on_lost: Callable[[], object] | None = None,
    ):
        self.store, self.attempt = store, attempt
        self.path = store.path(LOCK)
        self.lease_s = _seconds(lease_s, LEASE_ENV, LEASE_S)
        self.heartbeat_s = _seconds(heartbeat_s, HEARTBEAT_ENV, HEARTBEAT_S)
        if not self.lease_s >= 4 * self.heartbeat_s > 0:
            raise OutputError(
                f"the output lock's lease ({self.lease_s:g} s, {LEASE_ENV}) must be at least 4 heartbeats "
                f"({self.heartbeat_s:g} s, {HEARTBEAT_ENV})"
            )
        self.io_timeout = min(max(self.heartbeat_s, MIN_CALL_S), MAX_CALL_S)
        self.on_lost = on_lost
        self.record = {
            "attempt": attempt,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
            "heartbeat_at": time.time(),
            "lease_s": self.lease_s,
        }
        self._stop = threading.Event()
        self._state = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._etag: str | None = None
        self.held = False
        self.renewed_at = 0.0  # the `heartbeat_at` of the last write that succeeded
        self.lost: str | None = None  # why the lock was lost; None while it holds
        self.lost_at: float | None = None
        self._lost_because_taken = False
        self._last_error: str | None = None
        self._renewing_since: float | None = None

    # -- storage -------------------------------------------------------------------------------------

    def _io(self, method: str, *args, **kwargs):
        """Calls `fs.<method>`; on an async file system (s3://) it gives up after `io_timeout`.

        A local call is not bounded (a hung mount hangs it); the watchdog covers that."""
        fs = self.store.fs
        if isinstance(fs, fsspec.asyn.AsyncFileSystem) and not fs.asynchronous:
            return fsspec.asyn.sync(fs.loop, getattr(fs, f"_{method}"), *args, timeout=self.io_timeout, **kwargs)
        return getattr(fs, method)(*args, **kwargs)

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

    def _read(self, bounded: bool = False) -> tuple[dict | None, str | None]:
        """The current lock and its version (ETag on s3://), or (None, None) if there is none."""
        fs = self.store.fs
        fs.invalidate_cache(self.path)
        call = self._io if bounded else lambda method, *a: getattr(fs, method)(*a)
        try:
            data = call("cat_file", self.path)
            etag = None if is_local(fs) else call("info", self.path).get("ETag")
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
        """Why `holder` no longer holds the lock, or None while it does. Its own lease counts (a
        lock written before leases were recorded: this run's)."""
        now = time.time() if now is None else now
        lease = float(holder.get("lease_s") or self.lease_s)
        age = now - float(holder.get("heartbeat_at", 0))
        if age > lease:
            return f"its last heartbeat was {age:.0f} s ago (lease {lease:.0f} s)"
        if holder.get("host") == socket.gethostname() and holder.get("pid") not in (None, os.getpid()):
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return f"its process {holder['pid']} on this host is gone"
            except (PermissionError, ValueError, OverflowError):
                pass
        return None

    def acquire(self) -> None:
        """Takes the lock (a stale one is taken over) and starts the heartbeat and its watchdog.

        Raises:
            OutputLocked: A live run holds the output; the message names it.
        """
        for _ in range(3):
            self.record["heartbeat_at"] = time.time()
            if self._create(self.record):
                break
            holder, etag = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            why = self.stale(holder)
            if why is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
                lease = float(holder.get("lease_s") or self.lease_s)
                raise OutputLocked(
                    f"output.path {self.store.uri} is in use by another run ({describe(holder)}, started "
                    f"{started}); wait for it to end or stop it. A lock left by a killed run expires "
                    f"{lease:.0f} s after its last heartbeat"
                )
            logger.warning(
                "output.path %s: taking over the lock of run %s: %s", self.store.uri, holder.get("attempt"), why
            )
            self.record["heartbeat_at"] = time.time()
            if self._replace(holder, etag):
                break
        else:
            raise OutputLocked(f"output.path {self.store.uri}: could not take the lock; another run is starting")
        self.renewed_at = self.record["heartbeat_at"]
        self.held = True
        self._threads = [
            threading.Thread(target=self._beat, name="flip-ray-lock-heartbeat", daemon=True),
            threading.Thread(target=self._watch, name="flip-ray-lock-watchdog", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def deadline(self) -> float:
        """When the lock counts as lost unless renewed before: `2 * heartbeat_s` before its lease ends."""
        return self.renewed_at + self.lease_s - 2 * self.heartbeat_s

    def _renew(self) -> None:
        """Rewrites the lock with a new heartbeat if it is still this run's.

        Raises:
            _Taken: Another run replaced it, or it was deleted.
        """
        at = time.time()
        data = json.dumps({**self.record, "heartbeat_at": at}, indent=2).encode()
        if is_local(self.store.fs) or self._etag is None:
            # Read, then replace: a run that takes the lock between the two is overwritten. It takes
            # a lock only past its lease, which this run never lets happen (it stops earlier) unless
            # its process stalls for longer than `2 * heartbeat_s`; the overwritten run then finds
            # this run's attempt at its next heartbeat and stops.
            holder, _ = self._read(bounded=True)
            if holder is None:
                raise _Taken("the lock was deleted")
            if holder.get("attempt") != self.attempt:
                raise _Taken(f"it was replaced by {describe(holder)}")
            if is_local(self.store.fs):
                tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            else:
                out = self._io("pipe_file", self.path, data)
                self._etag = (out or {}).get("ETag")
        else:
            try:
                out = self._io("pipe_file", self.path, data, IfMatch=self._etag)
            except OSError as e:
                if not (_precondition_failed(e) or isinstance(e, FileNotFoundError)):
                    raise
                holder, etag = self._read(bounded=True)
                if holder is None:
                    raise _Taken("the lock was deleted") from None
                if holder.get("attempt") != self.attempt:
                    raise _Taken(f"it was replaced by {describe(holder)}") from None
                # Still this run's: an earlier renewal landed after its call gave up. Renew that one.
                self._etag = etag
                raise
            self._etag = (out or {}).get("ETag", self._etag)
        with self._state:
            # A renewal that returns after the deadline does not revive the lock: from the deadline
            # on, `check()` has been refusing commits.
            if self.lost is None and time.time() <= self.deadline:
                self.renewed_at = at
                self.record["heartbeat_at"] = at
                self._last_error = None

    def _beat(self) -> None:
        wait = self.heartbeat_s
        while not self._stop.wait(wait):
            self._renewing_since = time.time()
            try:
                self._renew()
                wait = self.heartbeat_s
            except _Taken as e:
                self._lose(str(e), taken=True)
            # Any failure to renew (storage down, a timeout) is retried sooner; the watchdog ends
            # the retries at the deadline, so this loop cannot outlive the lease.
            except Exception as e:
                self._last_error = (
                    f"no answer in {self.io_timeout:g} s" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                )
                logger.warning("could not renew the lock on %s: %s", self.store.uri, self._last_error)
                wait = self.heartbeat_s / 4
            finally:
                self._renewing_since = None

    def _watch(self) -> None:
        """Declares the lock lost at its deadline, even while a renewal call hangs."""
        while not self._stop.is_set():
            left = self.deadline - time.time()
            if left <= 0:
                self._lose(self._overdue())
                return
            self._stop.wait(left)

    def _overdue(self) -> str:
        why = f"no heartbeat has renewed it for {time.time() - self.renewed_at:.1f} s"
        since = self._renewing_since
        if self._last_error:
            return f"{why} (storage unreachable? last error: {self._last_error})"
        if since is not None:
            return f"{why} (a renewal has not returned for {time.time() - since:.1f} s: storage hanging?)"
        return f"{why} (this process stalled?)"

    def _lose(self, why: str, taken: bool = False, notify: bool = True) -> None:
        with self._state:
            if self.lost is not None or not self.held or self._stop.is_set():  # lost, or being released
                return
            self.lost, self.lost_at, self._lost_because_taken = why, time.time(), taken
            self._stop.set()
        logger.error("output.path %s: lost the lock: %s; stopping", self.store.uri, why)
        if notify and self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:  # the run still finds out through check()
                logger.exception("the lock's on_lost callback failed")

    def message(self) -> str:
        """What a lost lock means and what to do; the text of `LockLost`."""
        then = (
            "once the other run has ended (or after stopping it)"
            if self._lost_because_taken
            else "once the storage answers again"
        )
        return (
            f"output.path {self.store.uri}: this run lost its lock {self.store.uri_of(LOCK)}: {self.lost}. It "
            f"stopped before its {self.lease_s:.0f} s lease could lapse, so that no other run writes beside it; "
            f"finished shards are kept. Rerun with the same config to resume {then}"
        )

    def check(self) -> None:
        """Raises `LockLost` once the lock is lost or past its deadline; call it before each commit.

        Raises:
            LockLost: The message names the lock, why, and how to resume.
        """
        if self.held and self.lost is None and time.time() > self.deadline:
            self._lose(self._overdue(), notify=False)  # the caller learns it from the exception
        if self.lost is not None:
            raise LockLost(self.message())

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this run's (a no-op if not held).

        Never raises and does not hang on unreachable object storage: a lock left behind expires
        after its lease."""
        if not self.held:
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.io_timeout + 1)
        self.held = False
        if any(t.is_alive() for t in self._threads):  # a renewal stuck on a hung mount: leave the lock
            logger.warning("output.path %s: the lock is left in place (storage hangs)", self.store.uri)
            return
        try:
            holder, _ = self._read(bounded=True)
            if holder is not None and holder.get("attempt") == self.attempt:
                self._io("rm", self.path)
        except FileNotFoundError:
            pass
        except Exception as e:  # removal is a courtesy; the lease frees the output anyway
            logger.warning(
                "output.path %s: could not remove the lock (%s: %s); it expires %.0f s after its last heartbeat",
                self.store.uri,
                type(e).__name__,
                e,
                self.lease_s,
            )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
