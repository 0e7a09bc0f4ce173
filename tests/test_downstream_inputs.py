"""filter and pairs on scored outputs built by hand (real Parquet part, done record and manifest, as
`flip-ray score` writes them; no engine): the quantile filter on any real-valued score, rows without
a prompt, scores that are NaN or not numeric, and outputs that overlap the input. The jobs run on a
local Ray (marked slow, as every test that starts Ray); the refusals run through the command line
and stop before Ray starts."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flip_ray.config.base import ConfigError, load_config
from flip_ray.config.jobs import FilterJobConfig, PairsJobConfig, validate_filter_config, validate_pairs_config
from flip_ray.downstream.jobs import run_filter, run_pairs
from flip_ray.job.store import MANIFEST, OutputStore

REPO = Path(__file__).resolve().parents[1]
SCORING = {"input": {"prompt_column": "prompt", "response_column": "response"}}


def make_scored(root: Path, rows: list[dict], *, scoring: dict = SCORING, shards: int = 2) -> Path:
    """A finished scoring output: the rows split over `shards` part files, each listed in a done
    record, and a manifest marked complete with the scoring config."""
    store = OutputStore(str(root))
    for i in range(shards):
        part = rows[i::shards]
        sid = f"shard-{i}"
        (root / "data" / sid).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), root / "data" / sid / "part-0.parquet")
        store.write_done({"shard_id": sid, "files": ["part-0.parquet"], "rows": len(part)})
    store.write_json({"complete": True, "config": scoring}, MANIFEST)
    return root


def row(i: int, prompt: str | None, **scores) -> dict:
    return {
        "id": f"r{i:02d}",
        "prompt": prompt,
        "response": f"answer {i}",
        "error": None,
        "flag_too_short": False,
        **scores,
    }


def filter_job(scored: Path, out: Path, *overrides: str) -> dict:
    args = [f"input.path={scored}", f"output.path={out}", *overrides]
    return run_filter(load_config(None, args, schema=FilterJobConfig))


def pairs_job(scored: Path, out: Path, *overrides: str) -> dict:
    args = [f"input.path={scored}", f"output.path={out}", *overrides]
    return run_pairs(load_config(None, args, schema=PairsJobConfig))


def kept_ids(out: Path) -> set[str]:
    return {r["id"] for r in pq.read_table(out).to_pylist()} if out.exists() else set()


def expected_at_or_above(scores: dict[str, float], q: float) -> set[str]:
    threshold = np.quantile(list(scores.values()), q)  # linear, as the filter's definition says
    return {i for i, s in scores.items() if s >= threshold}


# Twelve rows over three prompts; r11 is left out by its error, whatever its score.
LOGPROB = [-0.31, -2.5, -1.75, -0.9, -4.0, -0.05, -1.2, -3.3, -0.6, -2.1, -0.05, -9.0]
JUDGE = [7.0, 3.0, 9.0, 1.0, 10.0, 5.5, 8.0, 2.0, 6.0, 4.0, 10.0, 1.0]


@pytest.fixture(scope="module")
def mixed_scores(tmp_path_factory) -> Path:
    rows = [
        row(i, f"prompt {i % 3}", flip_score=None, flip_logprob_mean=lp, judge_score=js)
        for i, (lp, js) in enumerate(zip(LOGPROB, JUDGE, strict=True))
    ]
    rows[11]["error"] = "response is empty"
    return make_scored(tmp_path_factory.mktemp("mixed") / "scored", rows)


def eligible_scores(values: list[float]) -> dict[str, float]:
    return {f"r{i:02d}": v for i, v in enumerate(values) if i != 11}


@pytest.mark.slow
@pytest.mark.parametrize(
    "column,values,q",
    [
        ("flip_logprob_mean", LOGPROB, 0.5),  # negative log-probabilities
        ("judge_score", JUDGE, 0.25),  # a 1-10 verdict
        ("flip_logprob_mean", LOGPROB, 1.0),  # the top-scored rows, ties included
        ("judge_score", JUDGE, 1.0),
        ("flip_logprob_mean", LOGPROB, 0.0),  # every eligible row
    ],
)
def test_quantile_keeps_rows_at_or_above_the_quantile_of_any_real_score(
    ray_local, mixed_scores, tmp_path, column, values, q
):
    summary = filter_job(
        mixed_scores, tmp_path / "kept", "filter.mode=quantile", f"filter.quantile={q}", f"columns.score={column}"
    )
    scores = eligible_scores(values)
    want = expected_at_or_above(scores, q)
    assert kept_ids(tmp_path / "kept") == want
    if q == 1:
        assert want == {i for i, s in scores.items() if s == max(scores.values())} and len(want) == 2
    elif q == 0:
        assert want == set(scores)
    else:
        assert 0 < len(want) < len(scores)  # the case can tell a wrong threshold from a right one
    assert summary["threshold"] == pytest.approx(np.quantile(list(scores.values()), q))
    assert summary["kept"] == len(want) and summary["eligible"] == 11
    assert summary["dropped"] == {"error": 1, "below_threshold": 11 - len(want)}


@pytest.mark.slow
def test_no_eligible_rows_keeps_nothing_and_says_why(ray_local, tmp_path):
    rows = [{**row(i, "p", flip_score=None), "error": "response is empty"} for i in range(4)]
    scored = make_scored(tmp_path / "scored", rows)
    for mode in ("quantile", "best_of_n"):
        summary = filter_job(scored, tmp_path / mode, f"filter.mode={mode}")
        assert summary["kept"] == 0 and summary["eligible"] == 0 and summary["rows"] == 4
        assert summary["dropped"]["error"] == 4 and kept_ids(tmp_path / mode) == set()
    assert summary["dropped"]["not_best_of_n"] == 0
    pairs = pairs_job(scored, tmp_path / "pairs")
    assert pairs["pairs"] == 0 and pairs["dropped"] == {"error": 4}


# Two prompts with three answers each, and answers whose prompt is missing, scored highest and
# lowest, so grouping them together (as one prompt) would make them the best and the worst.
NO_PROMPT_ROWS = [
    row(0, "Name a fruit.", flip_score=0.6),
    row(1, "Name a fruit.", flip_score=0.4),
    row(2, "Name a fruit.", flip_score=0.2),
    row(3, "Name a car.", flip_score=0.5),
    row(4, "Name a car.", flip_score=0.3),
    row(5, "Name a car.", flip_score=0.1),
    row(6, None, flip_score=0.99),
    row(7, "", flip_score=0.01),
    row(8, "   ", flip_score=0.98),
    row(9, None, flip_score=0.02),
]
NO_PROMPT_IDS = {"r06", "r07", "r08", "r09"}


@pytest.mark.slow
def test_rows_without_a_prompt_are_never_grouped(ray_local, tmp_path):
    scored = make_scored(tmp_path / "scored", NO_PROMPT_ROWS)
    best = filter_job(scored, tmp_path / "best", "filter.mode=best_of_n")
    assert kept_ids(tmp_path / "best") == {"r00", "r03"}
    assert best["dropped"] == {"no_prompt": 4, "not_best_of_n": 4}
    assert best["kept"] + sum(best["dropped"].values()) == best["rows"] == 10

    pairs = pairs_job(scored, tmp_path / "pairs", "pairs.strategy=all_pairs")
    made = pq.read_table(tmp_path / "pairs").to_pylist()
    assert pairs["pairs"] == len(made) == 6 and pairs["dropped"] == {"no_prompt": 4} and pairs["eligible"] == 6
    by_id = {r["id"]: r for r in NO_PROMPT_ROWS}
    for p in made:
        assert {p["chosen_id"], p["rejected_id"]}.isdisjoint(NO_PROMPT_IDS)
        assert by_id[p["chosen_id"]]["prompt"] == by_id[p["rejected_id"]]["prompt"] == p["prompt"]
        assert p["chosen"] == by_id[p["chosen_id"]]["response"] and p["rejected"] == by_id[p["rejected_id"]]["response"]

    # Filters that judge each row alone keep them: a missing prompt does not change a score.
    kept = filter_job(scored, tmp_path / "t", "filter.mode=threshold", "filter.threshold=0.9")
    assert kept_ids(tmp_path / "t") == {"r06", "r08"} and "no_prompt" not in kept["dropped"]


@pytest.mark.slow
def test_chat_rows_without_a_prompt_and_null_prompt_keys_are_never_grouped(ray_local, tmp_path):
    def chat(i, turns, score, conversation=None):
        return {"id": f"c{i}", "messages": turns, "conversation": conversation, "flip_score": score, "error": None}

    def conv(question, answer):
        return json.dumps([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])

    rows = [
        chat(0, conv("Name a fruit.", "Apple."), 0.8, "a"),
        chat(1, conv("Name a fruit.", "Car."), 0.1, "a"),
        chat(2, None, 0.99),  # null chat
        chat(3, "not json [", 0.01),  # unparseable
        chat(4, json.dumps([{"role": "assistant", "content": "Hi."}]), 0.5),  # nothing before the answer
        chat(5, conv("  ", "Banana."), 0.02),  # a blank question
    ]
    scoring = {"input": {"messages_column": "messages"}}
    scored = make_scored(tmp_path / "scored", rows, scoring=scoring)
    pairs = pairs_job(scored, tmp_path / "pairs")
    made = pq.read_table(tmp_path / "pairs").to_pylist()
    assert pairs["dropped"] == {"no_prompt": 4} and [(p["chosen_id"], p["rejected_id"]) for p in made] == [("c0", "c1")]
    assert made[0]["prompt"] == [{"role": "user", "content": "Name a fruit."}]

    # A prompt_key column: a null or blank key is no group either.
    for r, key in zip(rows, ["a", "a", None, "", "b", "b"], strict=True):
        r["conversation"] = key
    keyed = make_scored(tmp_path / "keyed", rows, scoring=scoring)
    best = filter_job(keyed, tmp_path / "best", "filter.mode=best_of_n", "columns.prompt_key=conversation")
    assert kept_ids(tmp_path / "best") == {"c0", "c4"}
    assert best["dropped"] == {"no_prompt": 2, "not_best_of_n": 2}
    # For pairs the key is not enough: c4 and c5 have no question to write as the prompt.
    pairs = pairs_job(keyed, tmp_path / "kp", "columns.prompt_key=conversation")
    assert pairs["dropped"] == {"no_prompt": 4} and pairs["pairs"] == 1


@pytest.mark.slow
def test_pairs_leave_out_rows_without_a_response(ray_local, tmp_path):
    rows = [row(0, "p", flip_score=0.9), row(1, "p", flip_score=0.5), row(2, "p", flip_score=0.1)]
    rows[0]["response"] = None
    scored = make_scored(tmp_path / "scored", rows)
    pairs = pairs_job(scored, tmp_path / "pairs")
    made = pq.read_table(tmp_path / "pairs").to_pylist()
    assert pairs["dropped"] == {"no_response": 1}
    assert [(p["chosen_id"], p["rejected_id"]) for p in made] == [("r01", "r02")]


@pytest.mark.slow
def test_non_finite_scores_are_left_out_with_their_reason(ray_local, tmp_path):
    rows = [
        row(0, "p", s=0.2),
        row(1, "p", s=math.nan),
        row(2, "p", s=0.7),
        row(3, "p", s=math.inf),
        row(4, "q", s=-math.inf),
        row(5, "q", s=0.3),
        row(6, "q", s=0.4),
    ]
    scored = make_scored(tmp_path / "scored", rows)
    best = filter_job(scored, tmp_path / "best", "filter.mode=best_of_n", "columns.score=s")
    assert kept_ids(tmp_path / "best") == {"r02", "r06"}
    assert best["dropped"] == {"score_not_finite": 3, "not_best_of_n": 2}
    q = filter_job(scored, tmp_path / "q", "filter.mode=quantile", "filter.quantile=0.5", "columns.score=s")
    assert q["threshold"] == pytest.approx(0.35) and kept_ids(tmp_path / "q") == {"r02", "r06"}
    pairs = pairs_job(scored, tmp_path / "pairs", "columns.score=s", "pairs.strategy=all_pairs")
    made = pq.read_table(tmp_path / "pairs").to_pylist()
    assert pairs["pairs"] == 2 and all(math.isfinite(p["margin"]) for p in made)


def flip_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "flip-ray"), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def assert_refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr


def test_a_score_column_that_is_not_numeric_is_refused_before_work(tmp_path):
    rows = [{**row(i, "p", flip_score=0.5), "parse_status": "json", "ok": True} for i in range(3)]
    scored = make_scored(tmp_path / "scored", rows)
    previous = tmp_path / "kept"
    previous.mkdir()
    (previous / "keep-me.txt").write_text("an earlier result")
    for column in ("parse_status", "ok"):
        for command in ("filter", "pairs"):
            done = flip_ray(
                command,
                f"input.path={scored}",
                f"output.path={previous}",
                "output.overwrite=true",
                f"columns.score={column}",
            )
            assert_refused(done, f"columns.score={column}", "must be an integer or floating-point column")
    assert (previous / "keep-me.txt").exists(), "refused before the output was touched"


@pytest.mark.parametrize("where", ["same", "inside", "data", "above"])
def test_an_output_overlapping_the_scored_output_is_refused(tmp_path, where):
    scored = make_scored(tmp_path / "runs" / "scored", [row(i, "p", flip_score=0.5) for i in range(2)])
    out = {
        "same": scored,
        "inside": scored / "kept",
        "data": scored / "data",
        "above": tmp_path / "runs",
    }[where]
    done = flip_ray("filter", f"input.path={scored}", f"output.path={out}", "output.overwrite=true")
    assert_refused(done, "overlaps the scored output")
    assert sorted(p.name for p in (scored / "data").iterdir()) == ["shard-0", "shard-1"]
    assert (scored / MANIFEST).exists()


def test_non_finite_thresholds_are_refused():
    base = ["input.path=a", "output.path=b"]
    for value in ("nan", "inf", "-inf"):
        cfg = load_config(None, [*base, f"filter.threshold={value}"], schema=FilterJobConfig)
        with pytest.raises(ConfigError, match="filter.threshold"):
            validate_filter_config(cfg)
    for value in ("nan", "inf"):
        cfg = load_config(None, [*base, f"pairs.min_margin={value}"], schema=PairsJobConfig)
        with pytest.raises(ConfigError, match="pairs.min_margin"):
            validate_pairs_config(cfg)


def test_filter_output_of_someone_elses_files_is_refused_even_with_overwrite(tmp_path):
    scored = make_scored(tmp_path / "scored", [row(i, "p", flip_score=0.5) for i in range(2)])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train.parquet").write_bytes(b"their rows")
    for extra in ([], ["output.overwrite=true"]):
        done = flip_ray("filter", f"input.path={scored}", f"output.path={theirs}", "filter.threshold=0", *extra)
        assert_refused(done, "no flip_ray filter or pairs job wrote (train.parquet)")
    assert (theirs / "train.parquet").read_bytes() == b"their rows"


@pytest.mark.slow
def test_overwrite_replaces_only_what_the_earlier_job_wrote(ray_local, tmp_path):
    scored = make_scored(tmp_path / "scored", [row(i, f"p{i % 2}", flip_score=i / 10) for i in range(6)])
    out = tmp_path / "kept"
    assert filter_job(scored, out, "filter.threshold=0")["kept"] == 6
    record = json.loads((out / ".flip_ray_job").read_text())
    assert record["job"] == "filter" and sorted(record["files"]) == sorted(p.name for p in out.glob("*.parquet"))
    with pytest.raises(Exception, match="earlier flip_ray filter job.*output.overwrite=true"):
        filter_job(scored, out, "filter.threshold=0")
    assert filter_job(scored, out, "filter.threshold=0.3", "output.overwrite=true")["kept"] == 3
    assert kept_ids(out) == {"r03", "r04", "r05"}
    before = sorted(p.name for p in out.iterdir())
    (out / "notes.md").write_text("mine")
    with pytest.raises(Exception, match=r"no flip_ray filter or pairs job wrote \(notes\.md\)"):
        filter_job(scored, out, "filter.threshold=0", "output.overwrite=true")
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir() if p.name != "notes.md") == before
