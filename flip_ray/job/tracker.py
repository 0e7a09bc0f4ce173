"""Driver-side bookkeeping of a scoring run: per-shard sums of the part records the writer reports,
commits of finished shards (done records), the error budget, and run-wide counts.

Memory is one small entry per shard in flight, never one per row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pyarrow as pa

from flip_ray import rewards
from flip_ray.input.files import Shard
from flip_ray.job.store import OutputStore, shard_id
from flip_ray.schema import PART_COUNTS, PART_SUMS


class ErrorBudgetExceeded(RuntimeError):
    """Too many rows failed; finished shards are kept and a rerun resumes."""


_SUMMED, _COUNTED = PART_SUMS, PART_COUNTS


def _merge_counts(into: dict, encoded: str | dict | None) -> None:
    counts = json.loads(encoded) if isinstance(encoded, str) else (encoded or {})
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


class ShardTracker:
    """Sums part records per shard and commits a shard (its done record) once all its rows are in."""

    def __init__(
        self,
        store: OutputStore,
        pending: list[Shard],
        attempt: str,
        max_error_fraction: float,
        min_rows: int,
        identities: dict[str, dict] | None = None,
        before_commit: Callable[[], None] | None = None,
    ):
        self.store = store
        # Raises when this run may no longer commit (its output lock is lost: `RunLock.check`).
        self.before_commit = before_commit
        self.identities = identities or {}
        self.shards = {shard_id(s.key): s for s in pending}
        self.attempt = attempt
        self.max_error_fraction = max_error_fraction
        self.min_rows = min_rows
        self.open: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.completed = 0
        self.rows = self.errors = self.output_tokens = 0
        self.occupancy: dict | None = None  # the engines' occupancy over the run (`job.occupancy`)
        self.error_kinds: dict[str, int] = {}

    def _entry(self, sid: str) -> dict:
        if sid not in self.open:
            self.open[sid] = {k: 0 for k in _SUMMED} | {k: {} for k in _COUNTED} | {"files": [], "total": None}
        return self.open[sid]

    def add(self, meta: pa.Table) -> None:
        for m in meta.to_pylist():
            sid = m["shard_id"]
            entry = self._entry(sid)
            if m["total"] is not None:
                entry["total"] = m["total"]
                if m["shard_error"]:
                    self.failed[sid] = m["shard_error"]
            if m["file"]:
                entry["files"].append(m["file"])
                for k in _SUMMED:
                    entry[k] += m[k]
                for k in _COUNTED:
                    _merge_counts(entry[k], m[k])
                _merge_counts(self.error_kinds, m["error_kinds"])
                self.rows += m["rows"]
                self.errors += m["errors"]
                self.output_tokens += m["output_tokens"]
            if sid not in self.failed and entry["total"] is not None and entry["rows"] == entry["total"]:
                self._commit(sid, self.open.pop(sid))

    def _commit(self, sid: str, entry: dict) -> None:
        if self.before_commit is not None:
            self.before_commit()
        shard = self.shards[sid]
        stamps, missing = self.store.prune_parts(sid, entry["files"])
        if missing:  # reported written but not there: never commit a shard without its rows
            self.failed[sid] = f"part file(s) {', '.join(missing)} were written but are not in the output"
            return
        record = {
            "shard_id": sid,
            "key": shard.key,
            "uri": shard.uri,
            # What the file was when this run read it; a rerun compares (plan.reconcile).
            "source": self.identities.get(shard.uri),
            **{k: entry[k] for k in _SUMMED},
            **{k: entry[k] for k in _COUNTED},
            "files": sorted(entry["files"]),
            # Size and version of each part file: a rerun or a downstream job checks them.
            "parts": stamps,
            "attempt": self.attempt,
            "finished_at": time.time(),
        }
        self.store.write_done(record)
        self.completed += 1

    def check_error_budget(self) -> None:
        check_error_budget(
            self.rows, self.errors, self.error_kinds, self.max_error_fraction, self.min_rows, self.store.uri
        )


def check_error_budget(
    rows: int, errors: int, kinds: dict[str, int], max_fraction: float, min_rows: int, where: str
) -> None:
    """Raises ErrorBudgetExceeded when more than `max_fraction` of at least `min_rows` rows have errors.

    Checked as parts arrive (this run's rows) and once more over the whole output at the end, so
    that a rerun that finds every shard done does not pass an output over the limit as complete.
    """
    if rows < min_rows or errors <= max_fraction * rows:
        return
    top = ", ".join(f"{k!r} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
    raise ErrorBudgetExceeded(
        f"stopped: {errors} of {rows} rows ({errors / rows:.0%}) have errors, above "
        f"limits.max_error_fraction={max_fraction}; most common: {top}. Finished shards are kept in {where}; "
        "fix the input or raise the limit, then rerun with the same config to resume"
    )


def _top(kinds: dict[str, int], n: int = 3) -> str:
    return ", ".join(f"{k!r} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:n]) or "none recorded"


def check_output(counts: dict, methods: list[str], max_fraction: float, min_rows: int, where: str) -> None:
    """The checks a finished output must pass before its run exits 0 (and its manifest is written):
    some row scored, every reward that ran scored some row, and the error rate within the budget.

    Raises:
        ErrorBudgetExceeded: Naming what failed and the commonest errors.
    """
    rows, scored = counts["rows"], counts["scored"]
    fix = (
        f"Finished shards are kept in {where}. Fix the cause, then rerun: with the same config to resume after "
        "fixing input files (input.rescore_changed=true), or with output.overwrite=true after changing the config"
    )
    if rows and not scored:
        raise ErrorBudgetExceeded(
            f"no row was scored: all {rows} rows have errors; most common: {_top(counts['error_kinds'])}. {fix}"
        )
    per_method = counts.get("method_scored")
    if rows and per_method is not None:
        for method in methods:
            if not per_method.get(method):
                kinds = {
                    k.split(": ", 1)[1]: v
                    for k, v in counts.get("method_error_kinds", {}).items()
                    if k.startswith(f"{method}: ")
                }
                raise ErrorBudgetExceeded(
                    f"reward {method} scored no row: it failed on all {rows - counts['errors']} rows that reached "
                    f"the engine; most common: {_top(kinds)}. {fix}"
                )
    check_error_budget(rows, counts["errors"], counts["error_kinds"], max_fraction, min_rows, where)


def summarize(done: dict[str, dict]) -> dict:
    """Run-wide counts from the done records (one per shard; no data is re-read)."""
    totals = {k: 0 for k in _SUMMED}
    counted: dict[str, dict[str, int]] = {k: {} for k in _COUNTED}
    for record in done.values():
        for k in _SUMMED:
            totals[k] += record.get(k, 0)
        for k in _COUNTED:
            _merge_counts(counted[k], record.get(k))
    return {
        **totals,
        "error_kinds": dict(sorted(counted["error_kinds"].items(), key=lambda kv: -kv[1])),
        "method_errors": dict(sorted(counted["method_errors"].items())),
        # None for outputs whose done records predate the count (nothing to check there).
        "method_scored": dict(sorted(counted["method_scored"].items()))
        if all("method_scored" in r for r in done.values())
        else None,
        "method_error_kinds": dict(sorted(counted["method_error_kinds"].items(), key=lambda kv: -kv[1])),
        "flagged": dict(sorted(counted["flagged"].items())),
        "rewards": reward_summary(
            counted["reward_sums"], counted["reward_counts"], counted["statuses"], counted["flagged"]
        ),
    }


def reward_summary(sums: dict, counts: dict, statuses: dict, flagged: dict | None = None) -> dict:
    """Per reward that ran: rows with a value of the column it ranks by, their mean, (for a reward
    with a status column) how its answers were read, and (for one with flags) the rows of each flag."""
    out: dict[str, dict] = {}
    for method in rewards.names():
        if method not in counts:
            continue
        n = counts[method]
        entry = {"column": rewards.get(method).ranked_by(), "scored": n, "mean": sums[method] / n if n else None}
        prefix = f"{method}: "
        status = {k[len(prefix) :]: v for k, v in statuses.items() if k.startswith(prefix)}
        if rewards.get(method).status_column is not None:
            entry["status"] = dict(sorted(status.items()))
        if rewards.get(method).flags:
            entry["flags"] = {f: (flagged or {}).get(f, 0) for f in rewards.get(method).flags}
        out[method] = entry
    return out
