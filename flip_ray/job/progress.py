"""Row progress of a scoring run, from the per-part records the driver receives.

    scored 120/838 rows (14%) · 0.98 rows/s · 3 errors · ETA 12 min

On a terminal (TTY) one line is rewritten in place as parts arrive; otherwise (a log, `ray job
submit`) a line is printed at most every `interval` seconds, and once at the end. The total is
exact where the shard sizes are known (Parquet and HF footers, JSONL rows counted while planning);
a shard of unknown size (a compressed JSONL file) shows as `?` until it has been read.
"""

from __future__ import annotations

import time
from typing import TextIO


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(label: str, done: int, total: int, unknown: int, errors: int, elapsed: float) -> str:
    """`label done/total rows (pct) · rate · errors · ETA` (pure, for tests). With `unknown` shards of
    unknown size left, the total is a lower bound (`total+`) and there is no percentage or ETA."""
    rate = done / elapsed if elapsed > 0 else 0.0
    exact = unknown == 0
    parts = [f"{label} {done}/{total}{'' if exact else '+'} rows"]
    if exact and total:
        parts[0] += f" ({100 * done / total:.0f}%)"
    parts.append(f"{rate:.2f} rows/s")
    parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if exact and total and rate > 0 and done < total:
        parts.append(f"ETA {_duration((total - done) / rate)}")
    return " · ".join(parts)


class Progress:
    """Counts rows as part records arrive and prints progress lines.

    Args:
        label: What is counted ("scored", or the evaluated method's name).
        total: Rows of the shards of known size.
        unknown: Shards of unknown size (`add_total` as each ends).
        stream: Where to print (the terminal).
        interval: Seconds between lines when `stream` is not a TTY.
    """

    def __init__(self, label: str, total: int, unknown: int, stream: TextIO, interval: float = 10.0):
        self.label, self.total, self.unknown, self.stream, self.interval = label, total, unknown, stream, interval
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.done = self.errors = 0
        self.started = self.last = time.monotonic()
        self.printed: tuple[int, int] | None = None  # (done, total) of the last line printed

    def add(self, rows: int, errors: int) -> None:
        self.done += rows
        self.errors += errors
        now = time.monotonic()
        if self.tty:
            self._print(end="\r")
        elif now - self.last >= self.interval:
            self._print()
            self.last = now

    def add_total(self, rows: int) -> None:
        """A shard of unknown size turned out to hold `rows` rows."""
        self.total += rows
        self.unknown -= 1

    def _print(self, end: str = "\n") -> None:
        self.printed = (self.done, self.total)
        elapsed = time.monotonic() - self.started
        line = progress_line(self.label, self.done, self.total, self.unknown, self.errors, elapsed)
        self.stream.write(line + (" " * 8 if end == "\r" else "") + end)
        self.stream.flush()

    def close(self) -> None:
        """The final line (on a TTY, the bar's last state, ended), unless it was just printed."""
        if self.tty or self.printed != (self.done, self.total):
            self._print()
