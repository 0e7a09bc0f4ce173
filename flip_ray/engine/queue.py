"""One engine queue per engine: every request of every caller in the same vLLM scheduler.

`LLM.generate` runs the engine until the requests of that call are done: the engine drains at the
end of every call (its running requests fall towards 0 while the slowest finishes) and idles between
calls. `EngineQueue` drives the engine itself instead: callers in any thread (the rewards of a block,
several blocks in flight in one engine actor) submit their requests and wait for their own results,
and one thread adds what was submitted and steps the engine while anything is unfinished, so vLLM's
scheduler always sees all the work there is.

Two things `LLM.generate` gave that it keeps:

- **Isolation.** A request the engine refuses (too long, malformed) fails alone, with its error. A
  step that raises without killing the engine fails no row blindly: the requests in the engine then
  are aborted and run again one at a time, so the one that caused it fails alone.
- **The prefix cache.** A request sent in the same engine step as one that shares its prompt prefix
  computes that prefix again. A request can name the prefix it shares (`prefix_len`: its first tokens,
  e.g. the FLIP prompt before a likelihood request's instruction); while another request with the
  same prefix is still in its prefill (no output yet), it is held and sent once that one has produced
  its first token, when the prefix is in vLLM's prefix cache.

A dead engine (`is_fatal_engine_error`) is raised to every waiting caller.

**Occupancy.** Besides its own counts (requests in the engine per step), the queue reads vLLM's own
scheduler statistics when the engine keeps them (`disable_log_stats=False`, as the engine actors build
it): `SchedulerTap` takes the place of the engine's stat-logger manager and keeps, per step, the
running requests, the preemptions and the prefix-cache queries and hits, instead of logging them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Messages of errors that leave the engine unusable (the device or the engine process is gone), not
# a problem of one prompt: they end the actor (`exit_for_restart`) instead of becoming row errors.
_FATAL_MESSAGES = (
    "CUDA error",
    "CUDA out of memory",
    "NCCL error",
    "device-side assert",
    "CUBLAS_STATUS",
    "cuDNN error",
    "EngineCore encountered an issue",
)


def is_fatal_engine_error(e: BaseException) -> bool:
    """True when the engine is dead or unusable (vLLM's EngineDeadError, CUDA or driver failures,
    device memory exhausted), False for an error that one request caused (too long, malformed)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, (EngineDeadError, MemoryError)) or type(e).__name__ == "OutOfMemoryError":
        return True
    return any(m in f"{type(e).__name__}: {e}" for m in _FATAL_MESSAGES)


@dataclass(eq=False)
class _Request:
    prompt: Any  # a vLLM prompt (TokensPrompt)
    params: Any  # SamplingParams
    key: int | None  # hash of the prefix it shares with other requests, or None
    done: threading.Event = field(default_factory=threading.Event)
    output: Any = None  # the RequestOutput, merged from its deltas
    error: BaseException | None = None
    started: bool = False  # has produced output (its prefill is done)
    gated: bool = True  # held behind a request with the same prefix while that one prefills

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.error, self.output = error, None
        self.done.set()


class SchedulerTap:
    """Takes the place of a vLLM engine's stat-logger manager (`LLMEngine.logger_manager`, to which
    its `step` hands each step's `SchedulerStats` and `IterationStats`): keeps the figures of the
    latest step and sums the rest. What it is handed also goes on to the manager it replaced (so that
    `LLM.get_metrics` still counts), but the periodic log lines do not: the run's summary says what
    matters."""

    def __init__(self, inner=None):
        self.inner = inner
        self.steps = 0  # steps that brought scheduler statistics
        self.running = 0  # running requests after the latest step
        self.preempted = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found there

    @classmethod
    def install(cls, engine) -> SchedulerTap | None:
        """The tap of `engine` (a `vllm.v1.engine.llm_engine.LLMEngine`), put in on first use; None
        when the engine keeps no statistics (`disable_log_stats=True`, `vllm.LLM`'s default)."""
        if not getattr(engine, "log_stats", False) or not hasattr(engine, "logger_manager"):
            return None
        if not isinstance(engine.logger_manager, cls):
            engine.logger_manager = cls(engine.logger_manager)
        return engine.logger_manager

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0) -> None:
        if scheduler_stats is not None:
            self.steps += 1
            self.running = scheduler_stats.num_running_reqs
            cache = scheduler_stats.prefix_cache_stats
            if cache is not None:
                self.prefix_queries += cache.queries
                self.prefix_hits += cache.hits
        if iteration_stats is not None:
            self.preempted += iteration_stats.num_preempted_reqs
        if self.inner is not None:
            self.inner.record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)

    # The rest of the manager's interface, as `LLMEngine` calls it:
    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args, **kwargs) -> None:
        if self.inner is not None:
            self.inner.record_sleep_state(*args, **kwargs)


@dataclass
class Occupancy:
    """What the engine ran, step by step: requests in the engine per step (running and waiting,
    time-weighted), the most at once, and the time with nothing to run since the first request; with
    vLLM's scheduler statistics (`SchedulerTap`), its running requests per step (time-weighted), the
    most, the preemptions and the prefix-cache hits."""

    steps: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    request_seconds: float = 0.0  # sum over steps of (requests in the engine) x (step time)
    max_requests: int = 0
    requests: int = 0
    prefix_held: int = 0  # requests held until a request with their prefix had prefilled
    # From vLLM's scheduler statistics (None: the engine keeps none):
    running_seconds: float | None = None  # sum over steps of (running requests) x (step time)
    max_running: int | None = None
    preempted: int | None = None
    prefix_queries: int | None = None
    prefix_hits: int | None = None

    def counts(self) -> dict:
        """The raw counts (summed over engine actors by `job.occupancy`)."""
        return {
            "steps": self.steps,
            "requests": self.requests,
            "busy_s": self.busy_s,
            "idle_s": self.idle_s,
            "request_seconds": self.request_seconds,
            "max_requests": self.max_requests,
            "prefix_held": self.prefix_held,
            "running_seconds": self.running_seconds,
            "max_running": self.max_running,
            "preempted": self.preempted,
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
        }

    def count_step(self, n: int, dt: float, tap: SchedulerTap | None) -> None:
        """One engine step of `dt` seconds with `n` requests in the engine; the tap's figures after it."""
        self.steps += 1
        self.busy_s += dt
        self.request_seconds += n * dt
        self.max_requests = max(self.max_requests, n)
        if tap is None or not tap.steps:
            return
        self.running_seconds = (self.running_seconds or 0.0) + tap.running * dt
        self.max_running = max(self.max_running or 0, tap.running)
        self.preempted = tap.preempted
        self.prefix_queries, self.prefix_hits = tap.prefix_queries, tap.prefix_hits


class EngineQueue:
    """Submits requests to one `vllm.LLM`'s engine from any thread; one thread steps the engine.

    Use `EngineQueue.of(llm)`: one queue per engine, shared by everything that uses it. While a queue
    runs, nothing else may call the engine (`LLM.generate` would step it from another thread).
    """

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.llm_engine
        self.occupancy = Occupancy()
        self._tap = SchedulerTap.install(self.engine)
        self._cv = threading.Condition()
        self._inbox: list[_Request] = []
        self._dead: BaseException | None = None
        # Owned by the stepping thread:
        self._live: dict[str, _Request] = {}
        self._prefilling: dict[int, str] = {}  # prefix key -> id of the request computing it
        self._held: dict[int, list[_Request]] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="flip-ray-engine-queue", daemon=True)
        self._thread.start()

    _lock = threading.Lock()

    @classmethod
    def of(cls, llm) -> EngineQueue:
        """The queue of `llm`'s engine, made on first use."""
        with cls._lock:
            queue = getattr(llm, "_flip_ray_queue", None)
            if queue is None:
                queue = cls(llm)
                llm._flip_ray_queue = queue
            return queue

    def run(self, prompts: list, params, prefix_lens: list[int | None] | None = None) -> list:
        """Runs `prompts` (one `params`, or one per prompt) and waits for them: one `RequestOutput` per
        prompt, in order, or the exception that request failed with.

        Args:
            prefix_lens: Per prompt, the number of its first tokens that other requests share (held
                while one of them prefills, see the module's docstring); None: not shared.

        Raises:
            The engine's error when it is dead (`is_fatal_engine_error`).
        """
        from vllm.sampling_params import RequestOutputKind

        if not prompts:
            return []
        params = params if isinstance(params, list) else [params] * len(prompts)
        prefix_lens = prefix_lens or [None] * len(prompts)
        requests = []
        for prompt, p, n in zip(prompts, params, prefix_lens, strict=True):
            key = None if n is None else hash(tuple(prompt["prompt_token_ids"][:n]))
            # Deltas for a request others may wait on (its first token ends its prefill); the
            # final output only otherwise. The deltas are merged back into one output.
            p.output_kind = RequestOutputKind.DELTA if key is not None else RequestOutputKind.FINAL_ONLY
            requests.append(_Request(prompt, p, key))
        with self._cv:
            if self._dead is not None:
                raise self._dead
            self._inbox.extend(requests)
            self._cv.notify()
        for r in requests:
            r.done.wait()
        if self._dead is not None:
            raise self._dead
        return [r.error if r.error is not None else r.output for r in requests]

    # -- the stepping thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        idle_since = None
        while True:
            with self._cv:
                while not self._inbox and not self._live:
                    idle_since = idle_since or time.monotonic()
                    self._cv.wait()
                new, self._inbox = self._inbox, []
            if idle_since is not None and self.occupancy.requests:
                self.occupancy.idle_s += time.monotonic() - idle_since
            idle_since = None
            try:
                for r in new:
                    self._add(r)
                if self._live:
                    self._step_or_isolate()
            except BaseException as e:  # a dead engine, or a bug here: every waiting caller raises it
                self._die(e)
                if not isinstance(e, Exception):
                    raise
                return

    def _step_or_isolate(self) -> None:
        try:
            outputs = self._engine_step()
        except Exception as e:
            if is_fatal_engine_error(e):
                raise
            self._isolate(e)
            return
        self._deliver(outputs)

    def _add(self, r: _Request) -> None:
        if r.gated and r.key is not None and r.key in self._prefilling:
            self._held.setdefault(r.key, []).append(r)
            self.occupancy.prefix_held += 1
            return
        rid = str(next(self._ids))
        try:
            (engine_input,) = self.llm._preprocess_cmpl([r.prompt])
            self.engine.add_request(rid, engine_input, r.params)
        except Exception as e:
            if is_fatal_engine_error(e):
                raise
            r.finish(e)  # refused: this request alone
            return
        self.occupancy.requests += 1
        self._live[rid] = r
        if r.key is not None and r.key not in self._prefilling:
            self._prefilling[r.key] = rid

    def _engine_step(self) -> list:
        """One engine step, counted; its outputs."""
        n = self.engine.get_num_unfinished_requests()
        t0 = time.monotonic()
        outputs = self.engine.step()
        self.occupancy.count_step(n, time.monotonic() - t0, self._tap)
        return outputs

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            r = self._live.get(out.request_id)
            if r is None:
                continue
            if r.output is None:
                r.output = out
            else:
                r.output.add(out, aggregate=True)
            if not r.started:
                r.started = True
                self._release(out.request_id, r)
            if out.finished:
                del self._live[out.request_id]
                r.finish()

    def _release(self, rid: str, r: _Request) -> None:
        """`r` has prefilled: the requests held behind its prefix go in (they read it from the cache)."""
        if r.key is None or self._prefilling.get(r.key) != rid:
            return
        del self._prefilling[r.key]
        for held in self._held.pop(r.key, []):
            held.gated = False
            self._add(held)

    def _isolate(self, error: Exception) -> None:
        """A step raised and the engine lives: every request in it is aborted and run again alone, so
        that only the one that causes the error fails (with it)."""
        suspects = list(self._live.values()) + [h for held in self._held.values() for h in held]
        logger.warning(
            "an engine step failed (%s: %s); running its %d requests again one by one",
            type(error).__name__,
            error,
            len(suspects),
        )
        self._abort_all()
        for r in suspects:
            r.output, r.started, r.gated = None, False, False
            self._add(r)
            while self._live:
                try:
                    outputs = self._engine_step()
                except Exception as e:
                    if is_fatal_engine_error(e):
                        raise
                    self._abort_all()
                    r.finish(e)
                    break
                self._deliver(outputs)

    def _abort_all(self) -> None:
        if self._live:
            try:
                self.engine.abort_request(list(self._live), internal=False)  # our ids are external ones
            except Exception as e:
                if is_fatal_engine_error(e):
                    raise
                logger.warning("could not abort the requests of a failed engine step: %s", e)
        self._live.clear()
        self._prefilling.clear()
        self._held.clear()

    def _die(self, error: BaseException) -> None:
        with self._cv:
            self._dead = error
            waiting = list(self._inbox) + list(self._live.values())
            waiting += [h for held in self._held.values() for h in held]
            self._inbox = []
        for r in waiting:
            r.finish(error)
