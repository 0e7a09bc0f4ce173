"""Streaming memory: peak RSS of the driver and of the whole Ray node for 10k, 100k and 1M rows,
with the engine replaced by a cheap stand-in (`standin.py`; the shipped job never does this).

    .venv/bin/python benchmarks/streaming_memory.py [--rows 10000,100000,1000000] [key=value ...]
    .venv/bin/python benchmarks/streaming_memory.py --rows 1000000 --files 1 --format jsonl   # one big file

Input: rows built from ../shared/data AlpacaEval outputs (responses cut to 600 characters), unique
ids, written as Parquet files of 50k rows (row groups of 10k), or as `--files N` files of the
`--format` (parquet or jsonl) sharing the rows evenly: one 1M-row file is split by the job into
shards of `input.rows_per_shard` rows (Parquet by row groups, JSONL by byte ranges).
Each size runs in a fresh process that starts its own local Ray. The
driver's peak is its VmHWM (reset when the process starts, since ru_maxrss inherits the parent's
RSS across fork and exec); a thread samples the RSS of the driver and of every process under it
(raylet, workers, object store) for the node peak.
Target: driver peak at 1M <= 1.2x the peak at 10k, i.e. no stage materialises the dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datadir import DATA  # benchmarks/datadir.py: $FLIP_RAY_DATA or ../shared/data

HERE = Path(__file__).resolve().parent
SHARD_ROWS = 50_000


def make_input(directory: Path, rows: int, files: int | None = None, fmt: str = "parquet") -> None:
    with gzip.open(DATA / "alpacaeval_outputs" / "data.jsonl.gz", "rt") as f:
        base = [json.loads(line) for line in f]
    directory.mkdir(parents=True, exist_ok=True)
    per_file = SHARD_ROWS if files is None else -(-rows // files)
    written = 0
    while written < rows:
        n = min(per_file, rows - written)
        path = directory / f"part-{written // per_file:05d}.{'parquet' if fmt == 'parquet' else 'jsonl'}"
        if fmt == "jsonl":
            with open(path, "w") as out:
                for i in range(n):
                    r = base[(written + i) % len(base)]
                    row = {"id": f"row-{written + i}", "prompt": r["prompt"], "response": r["response"][:600]}
                    out.write(json.dumps({**row, "model": r["model"]}) + "\n")
        else:
            with pq.ParquetWriter(path, _SCHEMA) as out:
                for start in range(0, n, 10_000):
                    chunk = [base[(written + i) % len(base)] for i in range(start, min(n, start + 10_000))]
                    out.write_table(
                        pa.table(
                            {
                                "id": [f"row-{written + start + i}" for i in range(len(chunk))],
                                "prompt": [r["prompt"] for r in chunk],
                                "response": [r["response"][:600] for r in chunk],
                                "model": [r["model"] for r in chunk],
                            },
                            schema=_SCHEMA,
                        )
                    )
        written += n


_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("model", pa.string())])


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM) since `_reset_peak_rss`."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> float:
    """Resets VmHWM to the current RSS and returns what it was (Linux >= 4.0).

    `getrusage(...).ru_maxrss` cannot be used here: Linux carries it across fork and exec, so a
    child started by this script inherits the parent's RSS at the fork as its "peak", and the parent
    grows with the input it generates.
    """
    before = _peak_rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def child(input_dir: str, output_dir: str, extra: list[str]) -> None:
    import psutil

    inherited_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _reset_peak_rss()

    sys.path.insert(0, str(HERE))
    import standin

    standin.install()
    from flip_ray.config.base import load_config
    from flip_ray.recipe import run_score

    me = psutil.Process()
    peak = {"node": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak["node"] = max(peak["node"], total)
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    cfg = load_config(
        None,
        [
            f"input.path={input_dir}",
            f"output.path={output_dir}",
            "input.id_column=id",
            "input.check_duplicate_ids=false",
            "model.device=cpu",
            "resources.batch_size=1024",
            "output.report=false",
            *extra,
        ],
    )
    t0 = time.perf_counter()
    manifest = run_score(cfg)
    elapsed = time.perf_counter() - t0
    stop.set()
    t.join()
    result = {
        "rows": manifest["counts"]["rows"],
        "seconds": elapsed,
        "driver_peak_mib": _peak_rss_mib(),
        "node_peak_mib": peak["node"] / 2**20,
        # what ru_maxrss said before this process ran anything: the parent's RSS at the fork
        "inherited_ru_maxrss_mib": inherited_maxrss,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument(
        "--files", type=int, default=None, help="write the rows as this many files (default 50k rows each)"
    )
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--child", nargs=2, metavar=("INPUT", "OUTPUT"))
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for the job")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.overrides)
        return
    results = []
    for rows in (int(x) for x in args.rows.split(",")):
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
            make_input(Path(tmp) / "in", rows, args.files, args.format)
            cmd = [sys.executable, __file__, "--child", f"{tmp}/in", f"{tmp}/out", *args.overrides]
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
            r = json.loads(line[7:])
            results.append(r)
            print(
                f"{r['rows']:>9,} rows: {r['seconds']:7.1f} s ({r['rows'] / r['seconds']:,.0f} rows/s), "
                f"driver peak {r['driver_peak_mib']:,.0f} MiB, node peak {r['node_peak_mib']:,.0f} MiB",
                flush=True,
            )
    if len(results) > 1:
        print(f"driver peak, largest / smallest: {results[-1]['driver_peak_mib'] / results[0]['driver_peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
