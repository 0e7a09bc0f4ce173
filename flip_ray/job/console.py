"""What a job prints: flip_ray's own lines, progress, real warnings and the summary on the terminal;
everything else (vLLM's engine dumps, Ray's and Ray Data's INFO/WARNING lines, executor tables,
library warnings) in a log file.

    with Console(log_dir, verbose=False) as console:
        console.say("...")          # to the terminal (and the log)

Under `Console`, `sys.stdout` and `sys.stderr` point at the log file: Ray prints worker logs and its
own driver logs to whatever they point at when it writes, so they land there; the terminal is the
stream saved on entry. `verbose` keeps today's everything-on-the-terminal. Under `ray job submit`
the terminal is the job's driver log, which stays as quiet.

A log file that cannot be created or written (a full disk, an I/O error) is said once on the
terminal and dropped from then on; flip_ray's own lines and the final error never depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec

from flip_ray.input.files import is_local

_ACTIVE: Console | None = None


class _TerminalFilter(logging.Filter):
    """flip_ray's own records (but those marked `extra={"quiet": True}`: log file only), and errors
    from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "quiet", False):
            return False
        return record.name.startswith("flip_ray") or record.levelno >= logging.ERROR


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"flip-ray: {level}{record.getMessage()}"


def log_dir_for(output_uri: str) -> Path:
    """`output.path/logs/` for a local output; the local run directory's `flip_ray_logs/` otherwise."""
    fs, root = fsspec.core.url_to_fs(output_uri)
    return Path(root) / "logs" if is_local(fs) else Path.cwd() / "flip_ray_logs"


class _LazyLog:
    """A line-buffered log file created at its first write (a run refused before it starts leaves
    none); in `directory`, else in ./flip_ray_logs/ when that cannot be written.

    Writing to it never raises: `sys.stdout` and `sys.stderr` point here, and a full disk must not
    turn every library's print into an error. The first failure goes to `warn` (the terminal), and
    the log is dropped from then on.
    """

    def __init__(self, directory: Path | None, warn: Callable[[str], None]):
        self.directory = directory
        self.warn = warn
        self.name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.log"
        self.path: Path | None = None
        self._file = None
        self._lock = threading.Lock()
        self._broken = self._closed = False

    def _open(self):
        tried = []
        for directory in (self.directory, Path.cwd() / "flip_ray_logs"):
            if directory is None:
                continue
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self._file = open(directory / self.name, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
                self.path = directory / self.name
                return
            except OSError as e:
                tried.append(f"{directory}: {e.strerror or e}")
        self.warn(
            f"cannot create a log file ({'; '.join(tried)}); vLLM's and Ray's own lines are not kept "
            "(--verbose shows them on the terminal)"
        )
        self._file = open(os.devnull, "w")  # noqa: SIM115

    def _failed(self, e: Exception) -> None:
        """Said once; the file is closed (what it still buffers is lost) and writes go nowhere."""
        with self._lock:
            if self._broken:  # another thread's write failed first, or wrote to the file it closed
                return
            self._broken = True
            broken, self._file = self._file, open(os.devnull, "w")  # noqa: SIM115
        self.warn(
            f"cannot write the log file {self.path}: {getattr(e, 'strerror', None) or e}; vLLM's and Ray's own "
            "lines are not kept from here on (--verbose shows them on the terminal)"
        )
        with contextlib.suppress(OSError):
            broken.close()

    def write(self, text: str) -> int:
        if self._closed:  # a late write through a stream saved while the console was on
            return len(text)
        if self._file is None:
            self._open()
        try:
            self._file.write(text)
        except (OSError, ValueError) as e:  # ValueError: written to the file another thread closed
            self._failed(e)
        return len(text)

    def flush(self) -> None:
        if self._file is not None and not self._closed:  # logging flushes every handler at exit
            try:
                self._file.flush()
            except (OSError, ValueError) as e:
                self._failed(e)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self._file is None:
            self._open()
        return self._file.fileno()

    def close(self) -> None:
        if self._file is not None and not self._closed:
            try:
                self._file.close()  # flushes what it buffers
            except OSError as e:
                self._failed(e)
                self._file.close()
        self._closed = True


class Console:
    def __init__(self, log_dir: Path | None, verbose: bool = False):
        self.verbose = verbose
        self.log_dir = log_dir
        self.terminal = sys.stdout
        self.log: _LazyLog | None = None
        self._saved: tuple | None = None
        self._saved_fds: tuple[int, int] | None = None
        self._handlers: list[logging.Handler] = []

    def _terminal_stream(self):
        """The terminal as a stream that survives `capture_process_output` (a copy of fd 1)."""
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # not a file (a test's capture): keep it
            return sys.stdout
        sys.stdout.flush()
        return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")

    def capture_process_output(self) -> None:
        """Points this process's fd 1 and 2 at the log, so that what Ray's and vLLM's native code
        writes (bypassing Python's streams) lands there too. Called when Ray starts: a run refused
        before that leaves no log file."""
        if self.verbose or self._saved_fds is not None:
            return
        try:
            fds = (sys.__stdout__.fileno(), sys.__stderr__.fileno())
        except (AttributeError, OSError, ValueError):
            return
        log_fd = self.log.fileno()
        for stream in (sys.__stdout__, sys.__stderr__):
            stream.flush()
        self._saved_fds = (os.dup(fds[0]), os.dup(fds[1]))
        os.dup2(log_fd, fds[0])
        os.dup2(log_fd, fds[1])

    @property
    def path(self) -> Path | None:
        """The log file (None until something was written to it, or in verbose mode)."""
        if self.log is None:
            return None
        if self.log.path is None:
            self.log.write("")
        return self.log.path

    def __enter__(self) -> Console:
        global _ACTIVE
        root = logging.getLogger()
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._saved = (sys.stdout, sys.stderr, root.level, list(root.handlers))
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(logging.INFO)
        terminal = logging.StreamHandler(self.terminal)
        terminal.setFormatter(fmt if self.verbose else _TerminalFormatter())
        if not self.verbose:
            self.terminal = self._terminal_stream()
            terminal.setStream(self.terminal)
            terminal.addFilter(_TerminalFilter())
            terminal.setLevel(logging.INFO)
            self.log = _LazyLog(self.log_dir, self._warn)
            to_file = logging.StreamHandler(self.log)
            to_file.setFormatter(fmt)
            self._handlers = [terminal, to_file]
            sys.stdout = sys.stderr = self.log
        else:
            self.log = None
            self._handlers = [terminal]
        for h in self._handlers:
            root.addHandler(h)
        _ACTIVE = self
        self.quiet_libraries()
        return self

    def quiet_libraries(self) -> None:
        """Turns off what writes around the log: Ray Data's progress bars and executor tables (the
        job prints row progress itself). Called again after Ray starts, which may reset them."""
        if self.verbose or "ray.data" not in sys.modules:
            return
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False

    def say(self, message: str) -> None:
        """A line on the terminal (and in the log)."""
        logging.getLogger("flip_ray").info(message)

    def _warn(self, message: str) -> None:
        """A warning on the terminal only: what the log file itself cannot hold."""
        with contextlib.suppress(OSError, ValueError):
            self.terminal.write(f"flip-ray: warning: {message}\n")
            self.terminal.flush()

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        stdout, stderr, level, handlers = self._saved
        sys.stdout, sys.stderr = stdout, stderr
        if self._saved_fds is not None:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(OSError):  # they write to the log: a full disk must not keep the fds there
                    stream.flush()
            for fd, saved in zip((sys.__stdout__.fileno(), sys.__stderr__.fileno()), self._saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            self._saved_fds = None
        if self.terminal is not stdout:
            self.terminal.close()  # the copy of fd 1 made on entry
            self.terminal = stdout
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        if self.log is not None:
            self.log.close()


def active() -> Console | None:
    """The console of the running job, if any (quiet mode needs a word after Ray starts)."""
    return _ACTIVE
