"""`flip-ray --help`, `flip-ray <command> --help`, and typos: what a new user meets first."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def flip_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flip_ray.cli", *args], cwd=REPO, capture_output=True, text=True)


def test_help_lists_the_commands_and_exit_codes():
    done = flip_ray("--help")
    assert done.returncode == 0
    for command in ("score", "filter", "pairs", "evaluate", "report", "prepare-model"):
        assert command in done.stdout
    assert "3 stopped (rerun resumes)" in done.stdout


@pytest.mark.parametrize(
    "command,lines",
    [
        ("score", ["input.path                       (required)", "input.id_column                  auto",
                   "reward.methods                   ['flip', 'flip_logprob']", "configs/local.yaml"]),
        ("filter", ["filter.mode                      threshold", "configs/filter.yaml"]),
        ("pairs", ["pairs.strategy                   best_vs_worst"]),
        ("evaluate", ["sampling.max_tokens              128"]),
    ],
)  # fmt: skip
def test_command_help_shows_the_most_used_keys_with_defaults(command, lines):
    done = flip_ray(command, "--help")
    assert done.returncode == 0
    for line in lines:
        assert line in done.stdout, (line, done.stdout)
    assert "built-in defaults" in done.stdout


def test_typos_get_the_nearest_name():
    done = flip_ray("scor", "input.path=x")
    assert done.returncode == 2 and "did you mean 'score'?" in done.stderr
    done = flip_ray("score", "input.pth=x", "output.path=y")
    assert done.returncode == 2 and "Did you mean: 'path'?" in done.stderr and "Traceback" not in done.stderr
