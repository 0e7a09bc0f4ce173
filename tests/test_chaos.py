"""The chaos run, short: 240 rows in 40 shards on a 3-node loopback Ray cluster under `ray job submit`,
output on the S3 server, one fault of each kind the README lists at times drawn from a fixed seed;
the job is rerun until it exits 0, then the output must hold one row per input row, no stray part,
manifest counts equal to data/, and every value equal to a fault-free run's (`tests/chaos.py`; the
full run and its table are in docs/RELIABILITY.md).

It runs as its own process, as a user runs it: a Ray client that talked to the token-authenticated
cluster keeps its auth settings in-process, which would break every later test's local Ray."""

import json
import subprocess
import sys
from pathlib import Path

import chaos
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(3600)  # a fault-free run, then seven faults and the reruns they need (~13 min on 2 cores)
def test_short_chaos_run(tmp_path, embedded_model):
    results = tmp_path / "results.json"
    argv = f"--rows 240 --rows-per-shard 6 --faults {len(chaos.KINDS)} --seed 7 --max-delay 5".split()
    done = subprocess.run(
        [sys.executable, str(Path(chaos.__file__)), *argv, "--workdir", str(tmp_path / "work"), "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=3500,
    )
    sys.stdout.write(done.stdout)  # the table, shown with -s or on failure
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(results.read_text())
    assert sorted(f["kind"] for f in found["faults"]) == sorted(chaos.KINDS)
    assert found["attempts"][-1][1] == 0
    assert not found["score_differences"] and not found["leaked_engine_processes"]
