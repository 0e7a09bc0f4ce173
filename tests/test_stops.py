"""How a run ends, with real processes: Ctrl-C and SIGTERM stop it cleanly (finished shards kept,
unfinished cleared, exit 130 / 143, no traceback), and a bug in flip_ray's own code shows its
traceback with exit 4 instead of passing for an infrastructure failure."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from clusters import kill_processes_mentioning
from invariant import assert_output_matches_input
from test_faults import ENGINE, done_files, make_shards, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def start(inp: Path, out: Path, ray_tmp: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "flip_ray.cli", "score", f"input.path={inp}", f"output.path={out}", *ENGINE]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def stop_with(signum: int, inp: Path, out: Path, ray_tmp: str, log: Path) -> dict[str, str]:
    """Starts a run, sends `signum` once it has finished a shard more than before, checks the stop;
    returns the done records it left."""
    before = len(done_files(out))
    try:
        proc = start(inp, out, ray_tmp, log)
        wait_for(lambda: len(done_files(out)) > before or proc.poll() is not None, 600, "a finished shard")
        assert proc.poll() is None, "the run ended before it could be stopped: " + log.read_text()[-2000:]
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
    finally:
        kill_processes_mentioning(ray_tmp)
    text = log.read_text()
    assert rc == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"flip-ray: stopped by {signal.Signals(signum).name}"), last
    assert "rerun with the same config to resume" in last
    assert "Traceback" not in text and "*** SIG" not in text and "Aborted" not in text, text[-3000:]
    kept = done_files(out)
    assert len(kept) > before, "finished shards must be kept"
    # Unfinished shards are cleared: every directory under data/ has its done record.
    assert {p.name for p in (out / "data").iterdir()} == {json.loads(t)["shard_id"] for t in kept.values()}
    assert not (out / "manifest.json").exists()
    return kept


def test_sigint_and_sigterm_stop_cleanly_and_the_rerun_resumes(tmp_path, embedded_model):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_shards(inp, n_shards=8, rows=3)
    ray_tmp = tempfile.mkdtemp(prefix="frs-", dir="/tmp")
    after_int = stop_with(signal.SIGINT, inp, out, ray_tmp, tmp_path / "sigint.log")
    after_term = stop_with(signal.SIGTERM, inp, out, ray_tmp, tmp_path / "sigterm.log")
    assert {k: after_term[k] for k in after_int} == after_int, "shards finished before a stop are not redone"
    rerun = subprocess.run(
        [sys.executable, "-m", "flip_ray.cli", "score", f"input.path={inp}", f"output.path={out}", *ENGINE],
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp},
        capture_output=True,
        text=True,
        timeout=900,
    )
    kill_processes_mentioning(ray_tmp)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert {k: done_files(out)[k] for k in after_term} == after_term
    assert_output_matches_input(out, inp, id_column="id")


BUGGY = """
import pyarrow as pa

from flip_ray.job.stages import SimilarityStage


class BuggySimilarityStage(SimilarityStage):
    def __call__(self, batch: pa.Table) -> pa.Table:
        return {}["a bug in flip_ray"]
"""


def test_a_bug_shows_its_traceback_and_exit_4(tmp_path, embedded_model):
    """A KeyError raised inside a stage on a Ray worker: not "rerun to resume" (exit 3), but the
    remote traceback and exit 4."""
    make_shards(tmp_path / "in", n_shards=1, rows=2)
    (tmp_path / "buggy.py").write_text(BUGGY)
    driver = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
import ray.cloudpickle
import buggy
import flip_ray.job.stages
ray.cloudpickle.register_pickle_by_value(buggy)  # the workers cannot import this test module
flip_ray.job.stages.SimilarityStage = buggy.BuggySimilarityStage
from flip_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""
    ray_tmp = tempfile.mkdtemp(prefix="frb-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    args = ["score", f"input.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", *ENGINE]
    try:
        done = subprocess.run(
            [sys.executable, "-c", driver, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        kill_processes_mentioning(ray_tmp)
    assert done.returncode == 4, done.stderr[-3000:]
    assert "Traceback" in done.stderr and "KeyError: 'a bug in flip_ray" in done.stderr
    assert "this is a bug in flip_ray" in done.stderr.strip().splitlines()[-1]
    assert "rerun with the same config to resume" not in done.stderr
