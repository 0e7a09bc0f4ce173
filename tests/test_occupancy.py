"""The engine occupancy figures: vLLM's scheduler statistics read through `SchedulerTap`, summed
over engine actors by `job.occupancy.summarize`, printed on the summary line. The real engine's
figures are checked in test_scorer (in process) and test_engine_death (engine in its own process)."""

from types import SimpleNamespace

import pytest

from flip_ray.engine.queue import Occupancy, SchedulerTap
from flip_ray.job.occupancy import summarize


class _Manager:
    """A stand-in for vLLM's `StatLoggerManager`: what the tap forwards."""

    def __init__(self):
        self.records, self.logged = [], 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        self.records.append((scheduler_stats, iteration_stats))

    def log(self):
        self.logged += 1

    def record_sleep_state(self, *args, **kwargs):
        pass


def _stats(running, waiting=0, queries=0, hits=0):
    cache = SimpleNamespace(queries=queries, hits=hits)
    return SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, prefix_cache_stats=cache)


def test_tap_replaces_the_managers_logging_but_forwards_its_records():
    manager = _Manager()
    engine = SimpleNamespace(log_stats=True, logger_manager=manager)
    tap = SchedulerTap.install(engine)
    assert engine.logger_manager is tap and SchedulerTap.install(engine) is tap  # once per engine
    tap.record(_stats(3, 2, queries=100, hits=40), SimpleNamespace(num_preempted_reqs=1))
    tap.record(_stats(5, queries=10, hits=10), None)
    tap.log()
    assert (tap.steps, tap.running, tap.preempted) == (2, 5, 1)
    assert (tap.prefix_queries, tap.prefix_hits) == (110, 50)
    assert len(manager.records) == 2 and manager.logged == 0  # counted by vLLM, not logged
    # An engine that keeps no statistics (vllm.LLM's default) gets no tap.
    assert SchedulerTap.install(SimpleNamespace(log_stats=False, logger_manager=None)) is None


def test_running_requests_are_time_weighted_and_summed_over_actors():
    tap, occ = SchedulerTap(), Occupancy()
    for running, dt in ((8, 1.0), (4, 3.0)):
        tap.record(_stats(running, queries=10, hits=5), SimpleNamespace(num_preempted_reqs=1))
        occ.count_step(running + 2, dt, tap)
    assert occ.running_seconds == 20.0 and occ.max_running == 8 and occ.preempted == 2
    assert (occ.steps, occ.busy_s, occ.request_seconds, occ.max_requests) == (2, 4.0, 28.0, 10)
    plain = Occupancy(busy_s=6.0, request_seconds=6.0, steps=3)  # an actor without statistics
    got = summarize({"a": {**occ.counts(), "max_blocks_in_flight": 2}, "b": plain.counts()})
    assert got["mean_running_requests"] == 5.0  # 20 request-seconds over the tapped actor's 4 s
    assert got["max_running_requests"] == 8 and got["preempted_requests"] == 2
    assert got["prefix_cache_hit_rate"] == 0.5
    none = summarize({"b": plain.counts()})
    assert none["mean_running_requests"] is None and none["preempted_requests"] is None


@pytest.mark.parametrize("tapped", [True, False])
def test_summary_line_shows_occupancy(tapped):
    from flip_ray.cli import _occupancy_line

    occ = Occupancy(busy_s=4.0, idle_s=1.0, request_seconds=40.0, max_requests=16, steps=4)
    if tapped:
        occ.running_seconds, occ.max_running, occ.preempted = 24.0, 12, 3
        occ.prefix_queries, occ.prefix_hits = 200, 150
    line = _occupancy_line(summarize({"a": occ.counts()}))
    if tapped:
        assert "6.0 requests running per step" in line and "most 12" in line and "3 preempted" in line
        assert "idle 20%" in line and "prefix cache hit 75%" in line
    else:
        assert "10.0 requests in the engine per step" in line and "idle 20%" in line
