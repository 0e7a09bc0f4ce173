"""Chaos run: a scoring job under `ray job submit` on a 3-node loopback Ray cluster, output on a real
S3 server, while faults of every kind the README lists are injected at random times drawn from a
fixed seed; reruns until the job exits 0, then the invariant and the scores are checked.

    # the full run (docs/RELIABILITY.md): 2,000 rows in 40 shards, 21 faults (3 of each kind)
    flock /tmp/flip_ray_engine.lock .venv/bin/python tests/chaos.py
    # the same in two holds of the engine lock: the fault-free run, then the chaos run on it
    flock /tmp/flip_ray_engine.lock .venv/bin/python tests/chaos.py --workdir /tmp/chaos --phase reference
    flock /tmp/flip_ray_engine.lock .venv/bin/python tests/chaos.py --workdir /tmp/chaos --phase chaos
    # the short run of CI (tests/test_chaos.py): 240 rows in 40 shards, one fault of each kind
    flock /tmp/flip_ray_engine.lock .venv/bin/python tests/chaos.py \
        --rows 240 --rows-per-shard 6 --faults 7 --max-delay 5

Steps: a head (no work) and two worker nodes (`ray start`, token auth, 127.0.0.1 only), a SeaweedFS
S3 server, generated {id, prompt, response} rows uploaded to s3://chaos/in/ as JSONL and Parquet
files; a fault-free run into s3://chaos/ref (timed), then the chaos run into s3://chaos/out-<id>/r1
(and r2, ... when a run over the input finishes before the plan is spent: the rest of the plan goes
into another run over the same input).
Faults (kinds in `KINDS`), one after the other: engine actor kill -9; vLLM EngineCore kill -9
(`model.engine_multiprocessing=true`); a worker node's raylet and workers kill -9, the node started
again; S3 server stopped, started again; driver kill -9, resubmitted; driver SIGTERM, resubmitted; a
second run into the same output (`flip-ray score` from outside the cluster, as another user would
start it), which must be refused with exit 2 while the first goes on
(its verdict awaited while the other faults go on). A fault comes a drawn delay after the previous
one, once the job's current attempt has written a part file. After a job ends non-zero with a code
that says "rerun" (3, 143, a kill), the same job is submitted again. At the end:
`invariant.assert_output_matches_input` on every S3 output, every output column equal to the fault-free
run's by id, and a table.

Exit status 0 when every check holds; 1 with the reason otherwise (the work dir is then kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from clusters import LoopbackCluster, kill_processes_mentioning  # noqa: E402
from invariant import assert_output_matches_input  # noqa: E402
from s3server import SeaweedS3  # noqa: E402

BUCKET = "chaos"
KINDS = ("engine_actor", "engine_core", "node", "s3", "driver_kill", "sigterm", "concurrent")
KIND_NAMES = {
    "engine_actor": "engine actor kill -9",
    "engine_core": "EngineCore kill -9",
    "node": "worker node raylet kill -9, node back",
    "s3": "S3 server stop, start",
    "driver_kill": "driver kill -9, resubmit",
    "sigterm": "driver SIGTERM, rerun",
    "concurrent": "second run into the same output",
}
# Exit codes after which the same command is run again (README: 3 infrastructure, 143 SIGTERM; a
# driver killed by a signal is seen as -9 or 128+9 depending on the shell between).
RERUN_CODES = {3, 143, -15, 137, -9}
# A second run into a working output is refused within seconds (before Ray starts); one still going
# after this long has taken the output.
SECOND_RUN_S = 180
# The scoring job: the embedded model on CPU, short answers, two engine actors with vLLM's EngineCore
# in its own process (the GPU layout) so that it can be killed.
ENGINE = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.enforce_eager=true",
    "model.max_model_len=512",
    "model.cpu_threads=1",
    "model.engine_multiprocessing=true",
    "sampling.max_tokens=16",
    "resources.concurrency=2",
    "resources.batch_size=16",
    # One block at a time, its rewards one after another: every answer is computed in the same
    # batches in every attempt, so the texts can be compared with the fault-free run's bit for bit.
    # (With blocks in flight the batches vary with timing, and a near-tie may decode differently.)
    "resources.max_concurrent_batches=1",
    "input.id_column=id",
]
# Columns computed from a log-probability of the engine: the forward pass in fp32 on CPU may differ in
# the last bits with the batch it runs in (a rerun batches other rows together). Every other column,
# the generated text and the F1 scores on it included, must be equal.
FLOAT_TOLERANCE = {"flip_logprob_mean": 1e-4, "flip_logprob_sum": 1e-3, "flip_logprob_contrast": 1e-4}

# -- input --------------------------------------------------------------------------------------------

_TOPICS = [
    "the sea", "a red bicycle", "winter mornings", "a quiet library", "mountain rivers", "city buses",
    "fresh bread", "an old clock", "summer rain", "a chess game", "paper boats", "the night sky",
    "a garden snail", "street markets", "a lighthouse", "violin lessons", "desert roads", "a lost key",
    "morning coffee", "snowy owls", "a train station", "autumn leaves", "a wooden bridge", "small islands",
]  # fmt: skip
_CATEGORIES = {
    "fruits": ["apple", "pear", "plum", "mango", "cherry", "fig", "lime", "peach"],
    "colours": ["red", "blue", "green", "amber", "violet", "teal", "ochre", "white"],
    "birds": ["robin", "heron", "swift", "owl", "wren", "crow", "gull", "finch"],
    "tools": ["hammer", "saw", "drill", "chisel", "wrench", "file", "plane", "clamp"],
}
_WORDS = {"house": "maison", "water": "eau", "book": "livre", "tree": "arbre", "cat": "chat", "sun": "soleil"}
_VERBS = ["makes me think of", "reminds everyone of", "is a good place for", "always brings", "can teach us"]
_THINGS = ["patience", "slow mornings", "small joys", "long walks", "old friends", "new ideas", "quiet hours"]


def make_rows(n: int, seed: int) -> list[dict]:
    """n short {id, prompt, response} rows of five kinds; a few responses repeat (3% of 2,000: the
    engine's answer cache serves them) and one in 100 is empty (an error row, kept with its reason)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            topic = rng.choice(_TOPICS)
            prompt = f"Write one sentence about {topic}."
            response = f"{topic.capitalize()} {rng.choice(_VERBS)} {rng.choice(_THINGS)}, said guest {i}."
        elif kind == 1:
            a, b = rng.randrange(10, 999), rng.randrange(10, 999)
            prompt, response = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 2:
            cat = rng.choice(sorted(_CATEGORIES))
            x, y, z = rng.sample(_CATEGORIES[cat], 3)
            prompt, response = f"List three {cat} (list {i}).", f"Here are three {cat}: {x}, {y} and {z}."
        elif kind == 3:
            word = rng.choice(sorted(_WORDS))
            prompt = f"Translate the word '{word}' into French for student {i}."
            response = f"The French for '{word}' is '{_WORDS[word]}', student {i}."
        else:
            topic, thing = rng.choice(_TOPICS), rng.choice(_THINGS)
            prompt = f"Give a short tip about {topic} and {thing}."
            response = f"Tip {i}: enjoy {topic} with {thing}, and take notes."
        rows.append({"id": f"c{i:05d}", "prompt": prompt, "response": "" if i % 100 == 99 else response})
    return rows


def upload_input(client, rows: list[dict], rows_per_shard: int) -> int:
    """Writes `rows` to s3://chaos/in/ as files of 1-3 shards each (JSONL split by byte ranges, every
    fifth a Parquet of row groups of half a shard); returns the number of files."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    start, k = 0, 0
    while start < len(rows):
        chunk = rows[start : start + rows_per_shard * (1 + k % 3)]
        if k % 5 == 4:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(chunk), buf, row_group_size=max(1, rows_per_shard // 2))
            key, body = f"in/part-{k:03d}.parquet", buf.getvalue()
        else:
            key, body = f"in/part-{k:03d}.jsonl", "".join(json.dumps(r) + "\n" for r in chunk).encode()
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
        start, k = start + len(chunk), k + 1
    return k


def snapshot_source(dest: Path) -> Path:
    """The tracked and new files of the working tree, copied once: every attempt of both runs runs the
    same code, while other work goes on in the tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for rel in listed.stdout.splitlines():
        src = REPO / rel
        if src.is_file() and not rel.startswith(("docs/", "benchmarks/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


# -- the jobs ----------------------------------------------------------------------------------------


class Jobs:
    """`ray job submit` through its SDK client: submit, status, exit code, logs, the driver process."""

    def __init__(self, cluster: LoopbackCluster, source: Path, logs: Path, args: list[str]):
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(cluster.dashboard)
        self.source, self.logs, self.args, self.count = source, logs, args, 0

    def submit(self, output: str) -> str:
        """Submits the scoring job into `output`; returns its submission id."""
        self.count += 1
        name = f"{output.rsplit('/', 1)[-1]}-{self.count:02d}-{secrets.token_hex(3)}"
        args = [f"input.path=s3://{BUCKET}/in/", f"output.path={output}", *self.args]
        # CHAOS_JOB tells this job's driver process from every other one on the host.
        return self.client.submit_job(
            entrypoint=" ".join([f"CHAOS_JOB={name}", sys.executable, "jobs/score.py", *args]),
            runtime_env={"working_dir": str(self.source)},
            submission_id=name,
        )

    def info(self, job: str):
        for _ in range(30):  # the dashboard may be busy for a moment
            with contextlib.suppress(Exception):
                return self.client.get_job_info(job)
            time.sleep(2)
        return self.client.get_job_info(job)

    def wait(self, job: str, timeout: float) -> int | None:
        """Waits for the job to end; its driver's exit code (None: still running)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info(job)
            if info.status.is_terminal():
                return info.driver_exit_code
            time.sleep(1)
        return None

    def save_logs(self, job: str) -> str:
        text = ""
        with contextlib.suppress(Exception):
            text = self.client.get_job_logs(job)
        (self.logs / f"{job}.log").write_text(text)
        return text

    @staticmethod
    def driver(job: str) -> psutil.Process | None:
        """The job's driver: the python process running jobs/score.py with CHAOS_JOB=job."""
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if cmd[:1] == [sys.executable] and "jobs/score.py" in cmd:
                with contextlib.suppress(psutil.Error):
                    if p.environ().get("CHAOS_JOB") == job:
                        return p
        return None


class PartWatcher(threading.Thread):
    """Lists the output on S3 every 2 s: every part file seen (and its rows, from the footer) and the
    done records. Rows of part files that are gone at the end were written, then discarded: redone."""

    def __init__(self, s3: SeaweedS3, prefix: str):
        super().__init__(daemon=True)
        self.s3, self.prefix = s3, prefix
        self.parts: dict[str, int] = {}
        self.done = 0
        self.stop_event = threading.Event()

    def poll(self) -> None:
        import io

        import pyarrow.parquet as pq

        client = self.s3.client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=self.prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        for key in keys:
            if key.endswith(".parquet") and "/data/" in key and key not in self.parts:
                with contextlib.suppress(client.exceptions.NoSuchKey):  # removed since the listing
                    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                    self.parts[key] = pq.ParquetFile(io.BytesIO(body)).metadata.num_rows
        self.done = sum(1 for k in keys if "/_done/" in k)

    def run(self) -> None:
        while not self.stop_event.wait(2):
            with contextlib.suppress(Exception):  # the server is down: one of the faults
                self.poll()


# -- faults -------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at_s: float
    attempt: int
    detail: str
    outcome: str = "the job went on"


@dataclass
class Chaos:
    """One chaos run: the fault plan drawn from the seed, the faults, the reruns."""

    cluster: LoopbackCluster
    s3: SeaweedS3
    jobs: Jobs
    rng: random.Random
    plan: list[str]
    base: str  # s3://chaos/<run>: each run over the input writes to <base>/r<n>
    max_delay_s: float
    job: str = ""
    outputs: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    attempts: list[tuple[str, int | None]] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)  # the processes of engine actors killed
    started: float = 0.0
    second: tuple | None = None  # a second run started: (process, fault, start time, log), its verdict pending
    second_count: int = 0

    @property
    def output(self) -> str:
        """The output of the current run over the input."""
        return self.outputs[-1]

    def _engines(self) -> list[psutil.Process]:
        """This cluster's engine actor processes (other clusters may run on the host)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "BackwardInferenceStage" in cmd and "MapWorker" in cmd and self.cluster.slot_of(p.pid) is not None:
                found.append(p)
        return sorted(found, key=lambda p: p.pid)

    def _cores(self) -> list[psutil.Process]:
        """vLLM's EngineCore processes: children of this cluster's engine actors."""
        found = []
        for actor in self._engines():
            with contextlib.suppress(psutil.Error):
                found += [c for c in actor.children(recursive=True) if "EngineCore" in " ".join(c.cmdline() or [])]
        return sorted(found, key=lambda p: p.pid)

    def ready(self, kind: str) -> bool:
        """Whether the fault has something to hit now."""
        if kind == "engine_actor":
            return bool(self._engines())
        if kind == "engine_core":
            return bool(self._cores())
        if kind in ("driver_kill", "sigterm"):
            return self.jobs.driver(self.job) is not None
        if kind == "concurrent":  # once this run holds the output's lock, not while it starts
            driver = self.jobs.driver(self.job)
            return driver is not None and self._lock_holder() == driver.pid
        return True

    def _lock_holder(self) -> int | None:
        key = f"{self.output.split('/', 3)[3]}/_lock.json"
        with contextlib.suppress(Exception):
            return json.loads(self.s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())["pid"]
        return None

    def inject(self, kind: str) -> Fault | None:
        """Injects one fault; None when its target went away meanwhile (it is tried again later)."""
        at, attempt = time.time() - self.started, len(self.attempts)
        try:
            if kind == "engine_actor":
                victim = self.rng.choice(self._engines())
                slot = self.cluster.slot_of(victim.pid)
                self.orphans += [c.pid for c in victim.children(recursive=True)]
                victim.kill()
                return Fault(kind, at, attempt, f"pid {victim.pid} on worker {slot}")
            if kind == "engine_core":
                victim = self.rng.choice(self._cores())
                victim.kill()
                return Fault(kind, at, attempt, f"pid {victim.pid}")
            if kind in ("driver_kill", "sigterm"):
                driver = self.jobs.driver(self.job)
                driver.send_signal(signal.SIGKILL if kind == "driver_kill" else signal.SIGTERM)
                return Fault(kind, at, attempt, f"driver pid {driver.pid}")
        except (psutil.NoSuchProcess, IndexError, AttributeError):
            return None
        if kind == "node":
            slots = {self.cluster.slot_of(p.pid) for p in self._engines()} - {None}
            slot = self.rng.choice(sorted(slots) or sorted(self.cluster.workers))
            down = self.rng.uniform(5, 20)
            killed = self.cluster.kill_worker(slot)
            time.sleep(down)
            self.cluster.start_worker(slot)
            return Fault(kind, at, attempt, f"worker {slot}: {len(killed)} processes, back after {down:.0f} s")
        if kind == "s3":
            down = self.rng.uniform(3, 20)
            self.s3.stop()
            time.sleep(down)
            self.s3.start()
            return Fault(kind, at, attempt, f"down {down:.0f} s")
        if kind == "concurrent":
            return self._second_run(at, attempt)
        raise ValueError(kind)

    def _second_run(self, at: float, attempt: int) -> Fault:
        """Starts a second run into the same output while this one works, as another user would from
        their own machine: `flip-ray score` with the same arguments, outside the cluster (a refused run
        starts no Ray). Its verdict is awaited by `_check_second` while the first job and the other
        faults go on."""
        self.second_count += 1
        log = self.jobs.logs / f"second-{self.second_count:02d}.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [
            sys.executable,
            "-m",
            "flip_ray.cli",
            "score",
            f"input.path=s3://{BUCKET}/in/",
            f"output.path={self.output}",
        ]
        with open(log, "w") as out:
            proc = subprocess.Popen([*cmd, *self.jobs.args], cwd=self.jobs.source, env=env, stdout=out, stderr=out)
        fault = Fault("concurrent", at, attempt, f"{log.name} started", outcome="pending")
        self.second = (proc, fault, time.time(), log)
        return fault

    def _check_second(self) -> None:
        """The second run's verdict, once it has ended: refused with exit 2 naming the holder while
        the first job held the output (or the first had ended: inconclusive). One still running after
        `SECOND_RUN_S` was not refused."""
        proc, fault, started, log = self.second
        if proc.poll() is None and time.time() - started < SECOND_RUN_S:
            return
        if proc.poll() is None:  # it is working: it took the output
            proc.kill()
            proc.wait()
        code, text = proc.returncode, log.read_text()
        first = self.jobs.info(self.job).status
        if code == 3 and not first.is_terminal():  # the storage was down when it started: started again
            fault.detail += f"; {log.name} exit 3 (storage down), again"
            self._second_run(fault.at_s, fault.attempt)
            self.second = (*self.second[:1], fault, *self.second[2:])
            return
        self.second = None
        fault.detail = f"{log.name} exit {code} after {time.time() - started:.0f} s, first job {first.value}"
        if code == 2 and "in use by another run" in text:
            fault.outcome = "refused with exit 2, the first went on"
        elif not first.is_terminal():
            raise ChaosFailure(f"a second run into a working output was not refused: {fault.detail}\n{text[-3000:]}")
        else:
            fault.outcome = "inconclusive: the first run had ended"
        print(f"chaos: {time.time() - self.started:7.1f} s  second run: {fault.outcome}", flush=True)

    def _next(self, plan: list[str]) -> int | None:
        """The plan's next fault to inject now: while a second run is pending, none that stops the
        first job's driver (it would free the lock for the second) and no second one."""
        if self.second is None:
            return 0 if plan else None
        return next((i for i, k in enumerate(plan) if k not in ("driver_kill", "sigterm", "concurrent")), None)

    def run(self, watcher: PartWatcher, hang_s: float, max_attempts: int) -> None:
        """Runs the job over the input until the plan is spent. A job that finishes with faults of the
        plan left (a fast machine, or reruns that redid little) is followed by another run over the
        same input into a new output, for the rest of the plan; each output is checked."""
        self.started = time.time()
        plan = list(self.plan)
        while plan:
            left = len(plan)
            self.outputs.append(f"{self.base}/r{len(self.outputs) + 1}")
            if len(self.outputs) > 1:
                print(
                    f"chaos: {time.time() - self.started:7.1f} s  the job finished with {left} fault(s) of the plan"
                    f" left: another run over the input into {self.output}",
                    flush=True,
                )
            self._run_once(plan, watcher, hang_s, max_attempts)
            if plan and len(plan) == left:
                raise ChaosFailure(f"a whole run over the input went by and none of {plan} could be injected")

    def _run_once(self, plan: list[str], watcher: PartWatcher, hang_s: float, max_attempts: int) -> None:
        """Submits the job into the current output and injects faults of the plan (taken from it);
        reruns until the job exits 0."""
        self.job = self.jobs.submit(self.output)
        # A fault is drawn a delay after the previous one, once the current attempt has written a part
        # (`mark`: the parts seen when it was submitted), so that every attempt makes progress and a
        # fault always meets a working job; faults that leave the job running follow each other.
        mark, fire_at, last_change, seen = len(watcher.parts), None, time.time(), (len(watcher.parts), watcher.done)
        while True:
            if self.second is not None:
                self._check_second()
            info = self.jobs.info(self.job)
            if info.status.is_terminal():
                if self.second is not None:  # its verdict first: a rerun now would meet it
                    time.sleep(1)
                    continue
                code = info.driver_exit_code
                self.jobs.save_logs(self.job)
                self.attempts.append((self.job, code))
                last = self.faults[-1] if self.faults else None
                if last and last.attempt == len(self.attempts) - 1 and code != 0 and last.kind != "concurrent":
                    last.outcome = f"job exited {code}, rerun"
                if code == 0:
                    return
                if code not in RERUN_CODES:
                    raise ChaosFailure(f"job {self.job} ended with {code} ({info.status.value}): see its log")
                if len(self.attempts) >= max_attempts:
                    raise ChaosFailure(f"{len(self.attempts)} attempts and the job has not finished")
                self.job = self.jobs.submit(self.output)
                mark, fire_at, last_change = len(watcher.parts), None, time.time()
                continue
            now = (len(watcher.parts), watcher.done)
            if now != seen:
                seen, last_change = now, time.time()
            if time.time() - last_change > hang_s:
                raise ChaosFailure(f"no part file written for {hang_s:.0f} s: job {self.job} hangs")
            if plan and fire_at is None and len(watcher.parts) > mark:
                fire_at = time.time() + self.rng.uniform(0, self.max_delay_s)
            nxt = self._next(plan)
            if nxt is not None and fire_at is not None and time.time() >= fire_at and self.ready(plan[nxt]):
                fault = self.inject(plan[nxt])
                if fault is not None:
                    plan.pop(nxt)
                    self.faults.append(fault)
                    print(f"chaos: {fault.at_s:7.1f} s  {KIND_NAMES[fault.kind]}: {fault.detail}", flush=True)
                    fire_at, last_change = None, time.time()
            time.sleep(1)


class ChaosFailure(AssertionError):
    """A check of the chaos run failed; the message says which and where the logs are."""


def draw_plan(rng: random.Random, n: int) -> list[str]:
    """n faults, every kind at least n // len(KINDS) times (at least once when n >= len(KINDS)), shuffled."""
    plan = list(KINDS) * (n // len(KINDS)) + rng.sample(KINDS, n % len(KINDS))
    rng.shuffle(plan)
    return plan


# -- checks -------------------------------------------------------------------------------------------


def read_output(uri: str) -> dict[str, dict]:
    """The rows of the part files the done records list, by id."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    rows = {}
    for p in fs.glob(f"{root}/_done/*.json"):
        record = json.loads(fs.cat_file(p))
        for name in record["files"]:
            with fs.open(f"{root}/data/{record['shard_id']}/{name}", "rb") as f:
                rows |= {r["id"]: r for r in pq.read_table(f).to_pylist()}
    return rows


def compare_scores(got: dict[str, dict], ref: dict[str, dict]) -> tuple[list[str], dict[str, float]]:
    """Differences between two outputs by id (every column exact but the log-probability floats), and
    the largest gap of each of those floats."""
    problems, gaps = [], dict.fromkeys(FLOAT_TOLERANCE, 0.0)
    for rid, want in sorted(ref.items()):
        row = got.get(rid)
        if row is None:
            problems.append(f"{rid}: missing")
            continue
        for col, value in want.items():
            other = row.get(col)
            if col in FLOAT_TOLERANCE and value is not None and other is not None:
                gaps[col] = max(gaps[col], abs(value - other))
                same = abs(value - other) <= FLOAT_TOLERANCE[col]
            else:
                same = value == other or (value != value and other != other)  # NaN == NaN
            if not same:
                problems.append(f"{rid}.{col}: {other!r} != fault-free {value!r}")
    return problems, gaps


def table(chaos: Chaos, rows: int, shards: int, runs: int, redone: int, wall: float, ref_wall: float) -> str:
    """The results as a Markdown table and three lines (docs/RELIABILITY.md holds the full run's)."""
    over = "" if runs == 1 else f"; {runs} runs over the input (the plan was not spent when a run finished)"
    lines = [
        f"chaos run: {rows} rows in {shards} shards, 3-node loopback Ray cluster, output on S3{over}",
        "",
        "| fault | injected | job went on | job stopped, rerun | refused (exit 2) |",
        "|---|---|---|---|---|",
    ]
    for kind in KINDS:
        mine = [f for f in chaos.faults if f.kind == kind]
        went = sum(f.outcome == "the job went on" for f in mine)
        rerun = sum(f.outcome.startswith("job exited") for f in mine)
        refused = sum(f.outcome.startswith("refused") for f in mine)
        lines.append(f"| {KIND_NAMES[kind]} | {len(mine)} | {went} | {rerun} | {refused} |")
    lines.append(f"| **total** | **{len(chaos.faults)}** | | | |")
    codes = ", ".join(str(code) for _, code in chaos.attempts)
    lines += [
        "",
        f"reruns needed: {len(chaos.attempts) - runs} (exit codes of the attempts: {codes})",
        f"rows redone: {redone} (written to S3 by an attempt, then discarded; {redone / (rows * runs):.1%} of rows)",
        f"wall time: {wall:.0f} s with faults, {ref_wall * runs:.0f} s fault-free ({wall / (ref_wall * runs):.2f}x)",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------


def save_driver_logs(cluster: LoopbackCluster, dest: Path) -> None:
    """Copies flip_ray's own log of every attempt (vLLM's and Ray's lines, full tracebacks) out of the
    head's runtime_env directory, which goes with the cluster."""
    for log in Path(cluster.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/flip_ray_logs/*.log"):
        with contextlib.suppress(OSError):
            shutil.copy2(log, dest / f"flip_ray-{log.name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="input rows (default 2000)")
    ap.add_argument("--rows-per-shard", type=int, default=50, help="input.rows_per_shard (default 50: 40 shards)")
    ap.add_argument("--faults", type=int, default=21, help="faults to inject, every kind alike (default 21)")
    ap.add_argument("--seed", type=int, default=7, help="draws the rows, the fault plan, times and targets")
    ap.add_argument("--max-delay", type=float, default=20.0, help="a fault comes up to this many s after a new part")
    ap.add_argument("--hang-s", type=float, default=900.0, help="no new part file for this long: a hang")
    ap.add_argument("--workdir", type=Path, default=None, help="logs, S3 data, code snapshot (default: a temp dir)")
    ap.add_argument(
        "--phase",
        choices=("both", "reference", "chaos"),
        default="both",
        help="both (default); or the fault-free run alone into --workdir, then the chaos run on it\n"
        "(two shorter holds of the engine lock; the same code snapshot and input)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (it is kept anyway on failure)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = ap.parse_args(argv)
    if args.phase != "both" and args.workdir is None:
        ap.error("--phase reference|chaos needs --workdir (the two phases share it)")
    return args


def earlier_reference(args: argparse.Namespace, workdir: Path) -> dict | None:
    """The record of a fault-free run made earlier in this work dir for the same input, if any."""
    path = workdir / "reference.json"
    if args.phase == "reference" or not path.exists():
        return None
    record = json.loads(path.read_text())
    shape = {"rows": args.rows, "rows_per_shard": args.rows_per_shard, "seed": args.seed}
    if record["shape"] != shape:
        raise ChaosFailure(f"{path} was made for {record['shape']}, not {shape}")
    return record


def prepare_input(args: argparse.Namespace, workdir: Path, s3: SeaweedS3) -> int:
    """The bucket, the input rows and the code snapshot; returns the number of input files."""
    s3.client().create_bucket(Bucket=BUCKET)
    files = upload_input(s3.client(), make_rows(args.rows, args.seed), args.rows_per_shard)
    shutil.rmtree(workdir / "src", ignore_errors=True)
    snapshot_source(workdir / "src")
    return files


def reference_run(jobs: Jobs, s3: SeaweedS3, workdir: Path, record: dict) -> dict:
    """The fault-free run into s3://chaos/ref, timed: what the chaos run is compared with."""
    t0 = time.time()
    job = jobs.submit(f"s3://{BUCKET}/ref")
    code = jobs.wait(job, timeout=3 * 3600)
    wall = time.time() - t0
    jobs.save_logs(job)
    if code != 0:
        raise ChaosFailure(f"the fault-free run exited {code}: see {workdir}/logs/{job}.log")
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key="ref/manifest.json")["Body"].read())
    record |= {"wall_s": wall, "shards": manifest["shards"]["total"], "rows": manifest["counts"]["rows"]}
    (workdir / "reference.json").write_text(json.dumps(record))
    print(f"chaos: fault-free run: {wall:.0f} s, {record['files']} files, {record['shards']} shards", flush=True)
    return record


def check_and_report(chaos: Chaos, watcher: PartWatcher, reference: dict, wall: float, out: Path | None) -> None:
    """The invariant on every output, the scores against the fault-free run, no engine process left
    behind; the table.

    Raises:
        AssertionError: Naming the first check that failed.
    """
    ref = read_output(f"s3://{BUCKET}/ref")
    problems, gaps, kept = [], dict.fromkeys(FLOAT_TOLERANCE, 0.0), 0
    for output in chaos.outputs:
        assert_output_matches_input(output, f"s3://{BUCKET}/in/", id_column="id")
        got = read_output(output)
        kept += len(got)
        found, gap = compare_scores(got, ref)
        problems += [f"{output}: {p}" for p in found]
        gaps = {k: max(v, gap[k]) for k, v in gaps.items()}
    redone = sum(watcher.parts.values()) - kept
    runs = len(chaos.outputs)
    print(
        "\n" + table(chaos, reference["rows"], reference["shards"], runs, redone, wall, reference["wall_s"]), flush=True
    )
    print("largest log-probability gaps to the fault-free run: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    live = [pid for pid in chaos.orphans if psutil.pid_exists(pid)]
    if out is not None:
        results = {
            "faults": [f.__dict__ for f in chaos.faults],
            "attempts": chaos.attempts,
            "outputs": chaos.outputs,
            "rows": reference["rows"],
            "shards": reference["shards"],
            "rows_redone": redone,
            "wall_s": wall,
            "fault_free_wall_s": reference["wall_s"],
            "float_gaps": gaps,
            "score_differences": problems[:50],
            "leaked_engine_processes": live,
        }
        out.write_text(json.dumps(results, indent=2))
    if problems:
        raise ChaosFailure(f"{len(problems)} value(s) differ from the fault-free run: {problems[:10]}")
    if live:
        raise ChaosFailure(f"processes of killed engine actors still run: {live}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="frchaos-", dir="/tmp"))).resolve()  # weed runs elsewhere
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    saved_env = dict(os.environ)  # restored at the end: a test session goes on in this process
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    # Three nodes on two cores: vLLM's default binds every CPU engine of a host to the same cores.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ.pop("RAY_ADDRESS", None)
    reference = earlier_reference(args, workdir)
    if reference is None:  # a new S3 data dir: an emptied prefix on SeaweedFS keeps its directories
        shutil.rmtree(workdir / "s3", ignore_errors=True)
    s3 = SeaweedS3(workdir / "s3")
    cluster = None
    ok = False
    try:
        s3.start()
        os.environ.update(s3.env())
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
        if reference is None:
            shape = {"rows": args.rows, "rows_per_shard": args.rows_per_shard, "seed": args.seed}
            record = {"shape": shape, "files": prepare_input(args, workdir, s3)}
        else:  # the chaos phase on an earlier fault-free run: today's code, the same input
            shutil.rmtree(workdir / "src", ignore_errors=True)
            snapshot_source(workdir / "src")
        cluster = LoopbackCluster(dict(os.environ), object_store_bytes=512 * 1024**2).start()
        print(f"chaos: work dir {workdir}; cluster {cluster.address}; S3 {s3.endpoint}", flush=True)
        job_args = [*ENGINE, f"input.rows_per_shard={args.rows_per_shard}"]
        jobs = Jobs(cluster, workdir / "src", workdir / "logs", job_args)
        if reference is None:
            reference = reference_run(jobs, s3, workdir, record)
        if args.phase == "reference":
            ok = True
            return 0

        rng = random.Random(args.seed)
        # A new output each time: an emptied prefix on SeaweedFS keeps its directories.
        name = f"out-{secrets.token_hex(3)}"
        chaos = Chaos(cluster, s3, jobs, rng, draw_plan(rng, args.faults), f"s3://{BUCKET}/{name}", args.max_delay)
        watcher = PartWatcher(s3, f"{name}/")
        watcher.start()
        chaos.run(watcher, hang_s=args.hang_s, max_attempts=3 * args.faults + 3)
        wall = time.time() - chaos.started
        watcher.stop_event.set()
        watcher.join(timeout=30)
        watcher.poll()  # the parts written since its last look
        check_and_report(chaos, watcher, reference, wall, args.json)
        ok = True
        print("chaos: every check holds", flush=True)
        return 0
    except AssertionError as e:  # ChaosFailure, or the invariant
        print(f"chaos: FAILED: {e}\nchaos: logs in {workdir}/logs", file=sys.stderr, flush=True)
        return 1
    finally:
        if cluster is not None:
            save_driver_logs(cluster, workdir / "logs")
            cluster.stop()
        s3.stop()
        kill_processes_mentioning(str(s3.data))  # weed, if stop() missed it (not this process: its argv names workdir)
        os.environ.clear()
        os.environ.update(saved_env)
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that main's clean-up runs
    sys.exit(main())
