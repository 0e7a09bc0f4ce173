"""How full the engines were kept over a run, from the engine actors' queues (`engine.queue`).

The driver starts one small Ray actor per run (`OccupancyBoard`, no CPU); each engine actor puts its
queue's counts there after every block, and the driver sums them into the manifest
(`engine_occupancy`) and the summary line: the requests in the engine per step (time-weighted), the
most at once, and the share of engine time with nothing to run; from vLLM's own scheduler statistics,
the running requests per step (time-weighted) and the most, the preempted requests and the prefix
cache's hit rate. A board that cannot be reached never stops the scoring: the figures are then
missing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# The counts each engine actor reports (`engine.queue.Occupancy`), summed over actors.
_SUMMED = ("steps", "requests", "busy_s", "idle_s", "request_seconds", "prefix_held")


class OccupancyBoard:
    """A Ray actor: the latest counts of each engine actor (its counts since it started)."""

    def __init__(self):
        self.by_actor: dict[str, dict] = {}

    def put(self, actor: str, counts: dict) -> None:
        self.by_actor[actor] = counts

    def get(self) -> dict[str, dict]:
        return dict(self.by_actor)


def board_name(attempt: str) -> str:
    return f"flip-ray-occupancy-{attempt}"


def start_board(attempt: str):
    """The run's board, named after the attempt so that engine actors find it."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(OccupancyBoard).options(name=board_name(attempt)).remote()


def summarize(by_actor: dict[str, dict]) -> dict | None:
    """The engines' occupancy over the run: summed over engine actors (a restarted actor counts as
    another), or None when no engine reported."""
    if not by_actor:
        return None
    total = {k: sum(c.get(k, 0) for c in by_actor.values()) for k in _SUMMED}
    busy, idle = total["busy_s"], total["idle_s"]
    return {
        "engine_actors": len(by_actor),
        "steps": total["steps"],
        "requests": total["requests"],
        "mean_requests_in_engine": round(total["request_seconds"] / busy, 2) if busy else 0.0,
        "max_requests_in_engine": max(c.get("max_requests", 0) for c in by_actor.values()),
        "max_blocks_in_flight": max(c.get("max_blocks_in_flight", 0) for c in by_actor.values()),
        "idle_fraction": round(idle / (busy + idle), 4) if busy + idle else 0.0,
        "prefix_held": total["prefix_held"],
        **_scheduler_figures(list(by_actor.values())),
    }


def _scheduler_figures(counts: list[dict]) -> dict:
    """From vLLM's scheduler statistics (`engine.queue.SchedulerTap`), over the engine actors that
    kept them: running requests per step (time-weighted) and the most, preemptions, the prefix
    cache's hit rate (of the prompt tokens looked up). None each when no engine kept statistics."""
    kept = [c for c in counts if c.get("running_seconds") is not None]
    if not kept:
        return dict.fromkeys(
            ("mean_running_requests", "max_running_requests", "preempted_requests", "prefix_cache_hit_rate")
        )
    busy = sum(c["busy_s"] for c in kept)
    queries = sum(c.get("prefix_queries") or 0 for c in kept)
    return {
        "mean_running_requests": round(sum(c["running_seconds"] for c in kept) / busy, 2) if busy else 0.0,
        "max_running_requests": max(c.get("max_running") or 0 for c in kept),
        "preempted_requests": sum(c.get("preempted") or 0 for c in kept),
        "prefix_cache_hit_rate": (
            round(sum(c.get("prefix_hits") or 0 for c in kept) / queries, 4) if queries else None
        ),
    }


def collect(board) -> dict | None:
    """The board's summary at the end of a run (None if it cannot be read)."""
    import ray

    try:
        return summarize(ray.get(board.get.remote(), timeout=30))
    except Exception as e:  # figures, not results: a run never fails on them
        logger.warning("could not read the engines' occupancy: %s", e)
        return None


class Reporter:
    """In an engine actor: puts its queue's counts on the run's board after each block."""

    def __init__(self, name: str | None):
        self.name, self.board, self.actor = name, None, None

    def put(self, counts: dict) -> None:
        if self.name is None:
            return
        try:
            import ray

            if self.board is None:
                self.board = ray.get_actor(self.name)
                self.actor = ray.get_runtime_context().get_actor_id() or "driver"
            self.board.put.remote(self.actor, counts)
        except Exception as e:  # figures, not results
            logger.warning("cannot report the engine's occupancy to %s: %s", self.name, e)
            self.name = None
