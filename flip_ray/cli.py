"""`flip-ray` command line: `score` runs the job, `prepare-model` converts the embedded model.

flip-ray score [--config configs/local.yaml] [key=value ...]
flip-ray filter|pairs|evaluate [--config configs/<job>.yaml] [key=value ...]
flip-ray report OUTPUT [--allow-incomplete]
flip-ray prepare-model [--force]

Exit codes (README, "Reruns, resume and exit codes"):
  0 complete; 1 a shard could not be read, or no rows; 2 bad config, input, output or model (nothing
  started); 3 stopped by an infrastructure error, a lost output lock or the error checks; 4 a bug in
  flip_ray (traceback shown); 130 / 143 stopped by SIGINT / SIGTERM (rerun resumes).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import traceback

from flip_ray.config.base import ConfigError, load_config

logger = logging.getLogger("flip_ray")

# Errors a user can fix from the message alone: printed without a traceback.
_USER_ERRORS: tuple[type[Exception], ...] = (ConfigError,)
EXIT_OK, EXIT_INCOMPLETE, EXIT_USER, EXIT_STOPPED, EXIT_BUG = 0, 1, 2, 3, 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _user_errors() -> tuple[type[Exception], ...]:
    from flip_ray.engine.embedded import ModelError
    from flip_ray.input.files import InputError
    from flip_ray.job.store import OutputError

    return (*_USER_ERRORS, InputError, ModelError, OutputError)


def _quiet_telemetry() -> None:
    # Set for this process and the Ray workers it starts; not at import time.
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(key, value)


def _occupancy_line(occ: dict) -> str:
    """How full the engines were kept (`job.occupancy.summarize`), in one line."""
    if occ.get("mean_running_requests") is not None:
        hit = occ.get("prefix_cache_hit_rate")
        return (
            f"  engine: {occ['mean_running_requests']} requests running per step on average "
            f"(most {occ['max_running_requests']}; {occ['mean_requests_in_engine']} in the engine), "
            f"{occ['preempted_requests']} preempted, idle {occ['idle_fraction']:.0%} of its time"
            + (f", prefix cache hit {hit:.0%}" if hit is not None else "")
        )
    return (
        f"  engine: {occ['mean_requests_in_engine']} requests in the engine per step on average "
        f"(most {occ['max_requests_in_engine']}), idle {occ['idle_fraction']:.0%} of its time"
    )


def _reward_line(method: str, entry: dict) -> str:
    mean = "n/a" if entry["mean"] is None else f"{entry['mean']:.4f}"
    line = f"  {method}: mean {entry['column']} {mean} over {entry['scored']} rows"
    line += f"   status {entry['status']}" if "status" in entry else ""
    if entry.get("flags"):
        n = max(entry["scored"], 1)
        shares = ", ".join(f"{f.removeprefix('flag_')} {k} ({k / n:.0%})" for f, k in entry["flags"].items())
        line += f"\n    {method} answers flagged: {shares}"
    return line


def _row_flags(counts: dict) -> dict:
    """The row flags' counts; the rewards' own flags are on their reward's line."""
    own = {f for entry in counts.get("rewards", {}).values() for f in entry.get("flags", {})}
    return {f: n for f, n in counts["flagged"].items() if f not in own}


def format_summary(manifest: dict) -> str:
    c, t, sh = manifest["counts"], manifest["timings"], manifest["shards"]
    lines = [
        f"flip_ray: scored {c['scored']}/{c['rows']} rows ({c['errors']} with errors, {c['truncated']} truncated)",
        f"  shards: {sh['done']}/{sh['total']} done ({sh['skipped_already_done']} skipped as already done, "
        f"{sh['scored_this_run']} scored now, {len(sh['failed'])} failed)",
        "  ids: "
        + (
            f"from the input column {manifest['input']['id_column']!r}"
            if manifest["input"].get("id_column")
            else "<file>:<row> (derived: no id column)"
        ),
        *(_reward_line(method, entry) for method, entry in c.get("rewards", {}).items()),
        f"  flagged {_row_flags(c)}   engine calls saved by dedup: {c['dedup_saved']}",
        f"  this run: {t['rows_this_run']} rows, {t['rows_per_s']} rows/s, {t['output_tokens_per_s']} output tokens/s "
        f"({t['pipeline_s']} s pipeline, {t['total_s']} s total)",
        f"  output: {manifest['output']['data']}  manifest: {manifest['output']['path']}/manifest.json",
    ]
    occ = manifest.get("engine_occupancy")
    if occ:
        lines.insert(-1, _occupancy_line(occ))
    if manifest.get("report"):
        lines.append(f"  report: {manifest['report']}")
    for method, count in c.get("method_errors", {}).items():
        lines.append(f"  {method} could not score {count} row(s) (why: the {method}_error column)")
    for kind, count in list(c["error_kinds"].items())[:5]:
        lines.append(f"  error x{count}: {kind}")
    for failure in sh["failed"]:
        lines.append(f"  FAILED shard {failure['key']}: {failure['error']}")
    return "\n".join(lines)


def quiet_console(output_path, verbose: bool):
    """The run's console: flip_ray's lines and progress on the terminal, the rest in a log file under
    output.path/logs/ (or ./flip_ray_logs/ for an output on object storage)."""
    from flip_ray.job.console import Console, log_dir_for

    try:
        log_dir = log_dir_for(str(output_path)) if output_path else None
    except (ValueError, ImportError):
        log_dir = None
    return Console(log_dir, verbose=verbose)


def cmd_score(args: argparse.Namespace) -> int:
    from flip_ray.recipe import run_score

    cfg = load_config(args.config, args.overrides)
    with quiet_console(cfg.output.path, args.verbose):
        manifest = run_score(cfg)
    print(format_summary(manifest), flush=True)
    if manifest["counts"]["rows"] == 0 and not manifest["shards"]["failed"]:
        print(f"flip-ray: error: input.path {cfg.input.path} holds no rows", file=sys.stderr)
        return EXIT_INCOMPLETE
    failed = manifest["shards"]["failed"]
    if failed:  # rows missing from the output: not a success
        print(
            f"flip-ray: {len(failed)} shard(s) could not be read (listed above); fix or remove those files and rerun "
            "with the same config to finish",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    return EXIT_OK


def cmd_filter(args: argparse.Namespace) -> int:
    from flip_ray.config.jobs import FilterJobConfig
    from flip_ray.downstream.jobs import run_filter

    summary = run_filter(load_config(args.config, args.overrides, schema=FilterJobConfig))
    print(
        f"flip_ray filter ({summary['mode']}): kept {summary['kept']} of {summary['rows']} rows -> {summary['output']}"
    )
    if summary.get("threshold") is not None:
        print(f"  threshold: {summary['threshold']}")
    if summary.get("eligible") == 0:
        print("  no eligible rows: nothing kept (the reasons are below)")
    for reason, n in summary["dropped"].items():
        print(f"  dropped {n}: {reason}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flip_ray.config.jobs import EvalJobConfig
    from flip_ray.evaluation.run import run_evaluate

    cfg = load_config(args.config, args.overrides, schema=EvalJobConfig)
    with quiet_console(cfg.output.path, args.verbose):
        result = run_evaluate(cfg)
    m = result["manifest"]
    print(result["table"])
    print(
        f"flip_ray evaluate: {m['pairs']} pairs ({m['responses']} responses, {m['bad_rows']} bad rows) in "
        f"{m['total_s']} s -> {m['output']['summary']}"
    )
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from flip_ray.config.jobs import PairsJobConfig
    from flip_ray.downstream.jobs import run_pairs

    summary = run_pairs(load_config(args.config, args.overrides, schema=PairsJobConfig))
    print(
        f"flip_ray pairs ({summary['strategy']}): {summary['pairs']} pairs from {summary['eligible']} eligible of "
        f"{summary['rows']} rows -> {summary['output']}"
    )
    for reason, n in summary["dropped"].items():
        print(f"  left out {n}: {reason}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flip_ray.downstream.report import build_report

    print(build_report(args.output, allow_incomplete=args.allow_incomplete))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from flip_ray.engine.embedded import prepare_default_model

    path = prepare_default_model(args.dir, force=args.force)
    print(path)
    return 0


# The keys most runs set, shown with their defaults by `flip-ray <command> --help`.
COMMON_KEYS = {
    "score": (
        "input.path", "output.path", "input.prompt_column", "input.response_column", "input.messages_column",
        "input.id_column", "model.path", "model.device", "reward.methods", "reward.prompt", "sampling.max_tokens",
        "resources.concurrency", "resources.batch_size", "input.rows_per_shard", "output.overwrite",
        "input.rescore_changed",
    ),
    "filter": (
        "input.path", "output.path", "filter.mode", "filter.threshold", "filter.quantile", "filter.top_k",
        "columns.score", "eligibility.include_errors", "output.format", "input.allow_incomplete",
    ),
    "pairs": (
        "input.path", "output.path", "pairs.strategy", "pairs.min_margin", "pairs.max_pairs_per_prompt",
        "columns.score", "output.format", "input.allow_incomplete",
    ),
    "evaluate": (
        "input.path", "output.path", "evaluation.methods", "input.sample_per_file", "model.path",
        "reward.prompt", "sampling.max_tokens",
    ),
}  # fmt: skip
EXAMPLES = {
    "score": "flip-ray score --config configs/local.yaml        # the demo: the bundled sample, embedded model",
    "filter": "flip-ray filter --config configs/filter.yaml",
    "pairs": "flip-ray pairs --config configs/pairs.yaml",
    "evaluate": "flip-ray evaluate --config configs/evaluate.yaml",
}


def _keys_help(command: str) -> str:
    from omegaconf import OmegaConf

    from flip_ray.config.jobs import JOB_SCHEMAS

    defaults = OmegaConf.structured(JOB_SCHEMAS[command])
    lines = []
    for key in COMMON_KEYS[command]:
        section, leaf = key.rsplit(".", 1)
        node = OmegaConf.select(defaults, section)
        value = "(required)" if OmegaConf.is_missing(node, leaf) else node[leaf]
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        lines.append(f"  {key:<32} {value}")
    return (
        "config: the built-in defaults (flip_ray/config/base.py, flip_ray/config/jobs.py), then --config FILE, then\n"
        "key=value overrides; unknown keys are refused with the nearest valid name.\n\n"
        "most used keys (default):\n" + "\n".join(lines) + f"\n\nexample:\n  {EXAMPLES[command]}\n"
        "all keys: the README's config reference."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip-ray",
        description="FLIP backward-inference rewards on Ray + vLLM: a small LM reads only the response, infers the "
        "instruction behind it, and the reward is how well it matches the real one.",
        epilog="`flip-ray <command> --help` lists the command's most used keys and their defaults. Exit codes: 0 "
        "complete, 1 a shard unreadable, 2 bad config/input/output/model, 3 stopped (rerun resumes), 4 a bug, "
        "130/143 Ctrl-C/SIGTERM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    jobs = (
        ("score", cmd_score, "score a corpus of (prompt, response) rows"),
        ("filter", cmd_filter, "keep scored rows by threshold, quantile, top-k or best-of-N"),
        ("pairs", cmd_pairs, "build DPO preference pairs from scored rows"),
        ("evaluate", cmd_evaluate, "measure reward methods' accuracy on preference data (chosen vs rejected)"),
    )
    for name, func, text in jobs:
        p = sub.add_parser(
            name, help=text, description=text, epilog=_keys_help(name), formatter_class=argparse.RawTextHelpFormatter
        )
        p.add_argument("--config", help="YAML config (default: none, the built-in defaults)")
        p.add_argument("--verbose", action="store_true", help="show vLLM's and Ray's own logs in the terminal")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. input.path=data.jsonl")
        p.set_defaults(func=func)
    rep = sub.add_parser("report", help="write the HTML report of a scored output")
    rep.add_argument("output", help="a scoring run's output.path")
    rep.add_argument(
        "--allow-incomplete", action="store_true", help="report on the finished shards of an unfinished run"
    )
    rep.set_defaults(func=cmd_report, verbose=False)
    prep = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M GGUF into an HF checkpoint")
    prep.add_argument("--dir", default=None, help="target directory (default: the flip_ray cache)")
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prep.set_defaults(func=cmd_prepare_model, verbose=False)
    return parser


COMMANDS = ("score", "filter", "pairs", "evaluate", "report", "prepare-model")


def _unknown_command(argv: list[str]) -> str | None:
    """A message with the nearest command when the first word is not one (argparse only lists them)."""
    import difflib

    commands = list(COMMANDS)
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in commands:
        return None
    close = difflib.get_close_matches(word, commands, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"flip-ray: unknown command '{word}'{hint} Commands: {', '.join(commands)} (flip-ray --help)"


def _terminate(signum, frame):
    from flip_ray.recipe import Terminated

    raise Terminated()


# Exceptions that say the storage or the network did not answer (botocore, aiohttp, requests): never
# a user's mistake (a wrong bucket or key is a ClientError) and never a bug in flip_ray.
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
}
_NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}


def storage_unreachable(e: BaseException) -> str | None:
    """The last line of the exception in `e`'s chain that says the storage or the network did not
    answer, or None when none does (then it is a bug, or a user error already told apart)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (
            isinstance(e, (ConnectionError, TimeoutError))
            or type(e).__name__ in _UNREACHABLE
            or (isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS)
        ):
            return (str(e).strip().splitlines() or [type(e).__name__])[-1]
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    unknown = _unknown_command(argv)
    if unknown:
        print(unknown, file=sys.stderr)
        return EXIT_USER
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_telemetry()
    from flip_ray.job.lock import LockLost
    from flip_ray.job.pipeline import RunInterrupted
    from flip_ray.job.tracker import ErrorBudgetExceeded
    from flip_ray.recipe import RunStopped, Terminated

    # SIGTERM (what `ray job stop`, Kubernetes and schedulers send) stops the job as Ctrl-C does.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"flip-ray: error: {e}", file=sys.stderr)
        return EXIT_USER
    except (ErrorBudgetExceeded, RunInterrupted, LockLost) as e:
        print(f"flip-ray: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except RunStopped as e:
        print(f"flip-ray: {e}", file=sys.stderr)
        return EXIT_SIGNAL[e.signum]
    except (KeyboardInterrupt, Terminated) as e:  # outside a scoring run: nothing to keep or clear
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        print(f"flip-ray: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return EXIT_SIGNAL[signum]
    except Exception as e:
        unreachable = storage_unreachable(e)
        if unreachable is not None:  # the storage or the network failed, not our code: a rerun may succeed
            print(
                f"flip-ray: the storage could not be reached ({unreachable}); finished shards are kept. Rerun with "
                "the same config once it answers",
                file=sys.stderr,
            )
            return EXIT_STOPPED
        traceback.print_exc()
        print(
            "flip-ray: internal error: this is a bug in flip_ray, please report it with the traceback above. "
            "Finished shards are kept; a rerun resumes once it is fixed",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
