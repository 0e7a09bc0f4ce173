"""`flip-ray` command line: `score` runs the job, `prepare-model` converts the embedded model.

flip-ray score [--config configs/local.yaml] [key=value ...]
flip-ray filter|pairs|evaluate [--config configs/<job>.yaml] [key=value ...]
flip-ray report OUTPUT [--allow-incomplete]
flip-ray prepare-model [--force]

Exit codes (README, "Reruns, resume and exit codes"):
  0 complete; 1 a shard could not be read, or no rows; 2 bad config, input, output or model (nothing
  started); 3 stopped by an infrastructure error or the error budget (rerun resumes); 4 a bug in
  flip_ray (traceback shown); 130 / 143 stopped by SIGINT / SIGTERM (rerun resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from flip_ray.config import ConfigError, load_config

logger = logging.getLogger("flip_ray")

# Errors a user can fix from the message alone: printed without a traceback.
_USER_ERRORS: tuple[type[Exception], ...] = (ConfigError,)
EXIT_OK, EXIT_INCOMPLETE, EXIT_USER, EXIT_STOPPED, EXIT_BUG = 0, 1, 2, 3, 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _user_errors() -> tuple[type[Exception], ...]:
    from flip_ray.model import ModelError
    from flip_ray.shards import InputError
    from flip_ray.store import OutputError

    return (*_USER_ERRORS, InputError, ModelError, OutputError)


def _quiet_telemetry() -> None:
    # Set for this process and the Ray workers it starts; not at import time.
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(key, value)


def format_summary(manifest: dict) -> str:
    c, t, sh = manifest["counts"], manifest["timings"], manifest["shards"]
    mean = f"{c['mean_flip_score']:.4f}" if c["mean_flip_score"] is not None else "n/a"
    lines = [
        f"flip_ray: scored {c['scored']}/{c['rows']} rows ({c['errors']} with errors, {c['truncated']} truncated)",
        f"  shards: {sh['done']}/{sh['total']} done ({sh['skipped_already_done']} skipped as already done, "
        f"{sh['scored_this_run']} scored now, {len(sh['failed'])} failed)",
        f"  mean flip_score {mean}   parse_status {c['parse_status']}",
        f"  flagged {c['flagged']}   engine calls saved by dedup: {c['dedup_saved']}",
        f"  this run: {t['rows_this_run']} rows, {t['rows_per_s']} rows/s, {t['output_tokens_per_s']} output tokens/s "
        f"({t['pipeline_s']} s pipeline, {t['total_s']} s total)",
        f"  output: {manifest['output']['data']}  manifest: {manifest['output']['path']}/manifest.json",
    ]
    if manifest.get("report"):
        lines.append(f"  report: {manifest['report']}")
    for method, count in c.get("method_errors", {}).items():
        lines.append(f"  {method} could not score {count} row(s) (why: the {method}_error column)")
    for kind, count in list(c["error_kinds"].items())[:5]:
        lines.append(f"  error x{count}: {kind}")
    for failure in sh["failed"]:
        lines.append(f"  FAILED shard {failure['key']}: {failure['error']}")
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    from flip_ray.score import run_score

    cfg = load_config(args.config, args.overrides)
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
    from flip_ray.config_jobs import FilterJobConfig
    from flip_ray.downstream import run_filter

    summary = run_filter(load_config(args.config, args.overrides, schema=FilterJobConfig))
    print(
        f"flip_ray filter ({summary['mode']}): kept {summary['kept']} of {summary['rows']} rows -> {summary['output']}"
    )
    for reason, n in summary["dropped"].items():
        print(f"  dropped {n}: {reason}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flip_ray.config_jobs import EvalJobConfig
    from flip_ray.evaluate import run_evaluate

    cfg = load_config(args.config, args.overrides, schema=EvalJobConfig)
    result = run_evaluate(cfg)
    m = result["manifest"]
    print(result["table"])
    print(
        f"flip_ray evaluate: {m['pairs']} pairs ({m['responses']} responses, {m['bad_rows']} bad rows) in "
        f"{m['total_s']} s -> {m['output']['summary']}"
    )
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from flip_ray.config_jobs import PairsJobConfig
    from flip_ray.downstream import run_pairs

    summary = run_pairs(load_config(args.config, args.overrides, schema=PairsJobConfig))
    print(
        f"flip_ray pairs ({summary['strategy']}): {summary['pairs']} pairs from {summary['eligible']} eligible of "
        f"{summary['rows']} rows -> {summary['output']}"
    )
    for reason, n in summary["dropped"].items():
        print(f"  left out {n}: {reason}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flip_ray.report import build_report

    print(build_report(args.output, allow_incomplete=args.allow_incomplete))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from flip_ray.model import prepare_default_model

    path = prepare_default_model(args.dir, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flip-ray", description="FLIP backward-inference rewards on Ray + vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score a corpus of (prompt, response) rows")
    score.add_argument("--config", help="YAML config (default: built-in defaults, embedded model on CPU)")
    score.add_argument("overrides", nargs="*", help="key=value overrides, e.g. input.path=data.jsonl")
    score.set_defaults(func=cmd_score)
    for name, func, text in (
        ("filter", cmd_filter, "keep scored rows by threshold, quantile, top-k or best-of-N"),
        ("pairs", cmd_pairs, "build DPO preference pairs from scored rows"),
        ("evaluate", cmd_evaluate, "measure reward methods' accuracy on preference data (chosen vs rejected)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML config")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. input.path=outputs/scored")
        p.set_defaults(func=func)
    rep = sub.add_parser("report", help="write an HTML report with plots for a scored output")
    rep.add_argument("output", help="a scoring run's output.path")
    rep.add_argument(
        "--allow-incomplete", action="store_true", help="report on the finished shards of an unfinished run"
    )
    rep.set_defaults(func=cmd_report)
    prep = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M GGUF into an HF checkpoint")
    prep.add_argument("--dir", default=None, help="target directory (default: the flip_ray cache)")
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prep.set_defaults(func=cmd_prepare_model)
    return parser


def _terminate(signum, frame):
    from flip_ray.score import Terminated

    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_telemetry()
    from flip_ray.pipeline import RunInterrupted
    from flip_ray.score import RunStopped, Terminated
    from flip_ray.tracker import ErrorBudgetExceeded

    # SIGTERM (what `ray job stop`, Kubernetes and schedulers send) stops the job as Ctrl-C does.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"flip-ray: error: {e}", file=sys.stderr)
        return EXIT_USER
    except (ErrorBudgetExceeded, RunInterrupted) as e:
        print(f"flip-ray: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except RunStopped as e:
        print(f"flip-ray: {e}", file=sys.stderr)
        return EXIT_SIGNAL[e.signum]
    except (KeyboardInterrupt, Terminated) as e:  # outside a scoring run: nothing to keep or clear
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        print(f"flip-ray: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return EXIT_SIGNAL[signum]
    except Exception:
        traceback.print_exc()
        print(
            "flip-ray: internal error: this is a bug in flip_ray, please report it with the traceback above. "
            "Finished shards are kept; a rerun resumes once it is fixed",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
