"""The evaluation job: reading preference data, the per-pair judges' bookkeeping, and (slow) the
whole job on 20 real human-labelled items with the real engine."""

import json
from pathlib import Path

import pytest

from flip_ray.config.base import ConfigError, load_config
from flip_ray.config.jobs import EvalJobConfig, validate_eval_config
from flip_ray.evaluation.pair_judges import listwise_order, listwise_outcome, pair_judge_jobs, pairwise_outcome
from flip_ray.evaluation.pairs_input import Item, load_items, responses_table
from flip_ray.evaluation.run import baseline_scores
from flip_ray.input.files import InputError
from flip_ray.text.rows import RowError, parse_transcript, prompt_parts

SAMPLE = "flip_ray/samples/preference_pairs_sample.jsonl"


def _cfg(path, *overrides):
    return load_config(None, [f"input.path={path}", "output.path=/tmp/unused", *overrides], schema=EvalJobConfig)


def _items(path, *overrides):
    cfg = _cfg(path, *overrides)
    return load_items(cfg.input, cfg.evaluation.subset_from)


def test_prompt_parts_reads_strings_transcripts_and_chats():
    assert prompt_parts("Write a poem.") == ("Write a poem.", [])
    hh = "Human: hi there\n\nAssistant: Hello! How can I help?\n\nHuman: tell me a joke"
    instruction, context = prompt_parts(hh)
    assert instruction == "tell me a joke"
    assert context == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert prompt_parts(chat) == ("Name a colour.", chat[:1])
    assert parse_transcript("Humans are mammals.") is None
    for bad in (None, "", "   ", [], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], 7):
        with pytest.raises(RowError):
            prompt_parts(bad)


def test_load_items_records_bad_rows_and_keeps_good_ones(tmp_path):
    rows = [
        {"id": "a", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Bye."},
        {"id": "b", "prompt": "Pick one.", "chosen": "One.", "rejected": ["Two.", "Three."], "subset": "bon"},
        {"id": "c", "prompt": "Q", "chosen": "", "rejected": "x"},
        {"id": "d", "prompt": "Q", "chosen": "same", "rejected": "same"},
        {"id": "e", "prompt": "Q", "chosen": "A", "rejected": []},
        {"id": None, "prompt": "Q", "chosen": "A", "rejected": "B"},
        {"id": "g", "prompt": "Q", "chosen": "A", "rejected": ["B", "C"]},
        {"id": "h", "prompt": "Q", "chosen": "A", "rejected": "[1, 2, 3]"},  # a response that looks like JSON
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    items, bad = _items(path)
    assert [i.id for i in items] == ["a", "b", "g", "h"]
    assert items[3].candidates == ["A", "[1, 2, 3]"]
    assert items[1].candidates == ["One.", "Two.", "Three."] and items[1].subset == "bon"
    assert items[0].subset == "pairs"  # no subset column: the file
    assert items[2].candidates == ["A", "B", "C"]
    reasons = {b["id"]: b["error"] for b in bad}
    assert "chosen is empty" in reasons["c"]
    assert "repeats the chosen" in reasons["d"]
    assert "empty list" in reasons["e"]
    assert any("id is missing" in b["error"] for b in bad)
    assert any("line 9" in b["error"] for b in bad)
    assert len(bad) == 5


def test_duplicate_pair_ids_are_refused(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps({"id": "x", "prompt": "Q", "chosen": "A", "rejected": "B"}) for _ in range(2)))
    with pytest.raises(InputError, match="repeats ids"):
        _items(path)


def test_sampling_is_seeded_and_nested(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(
        "\n".join(json.dumps({"id": str(k), "prompt": "Q", "chosen": "A", "rejected": "B"}) for k in range(300))
    )
    small = {i.id for i in _items(path, "input.sample_per_file=30")[0]}
    large = {i.id for i in _items(path, "input.sample_per_file=60")[0]}
    assert len(small) == 30 and len(large) == 60 and small <= large
    assert small == {i.id for i in _items(path, "input.sample_per_file=30")[0]}
    assert small != {i.id for i in _items(path, "input.sample_per_file=30", "input.sample_seed=1")[0]}


def test_bundled_sample_and_response_rows():
    items, bad = _items(SAMPLE, "evaluation.subset_from=column")
    assert len(items) == 20 and not bad
    assert sum(len(i.candidates) > 2 for i in items) == 2
    assert {i.subset for i in items} == {"pandalm_test", "hh_rlhf_harmless_test", "llmeval2_human"}
    hh = [i for i in items if i.subset == "hh_rlhf_harmless_test"]
    multi = [i for i in hh if i.prompt_text.startswith("Human:")]
    assert len(multi) == 3 and all(i.context and i.context[0]["role"] == "user" for i in multi)
    assert all(not i.context for i in hh if i not in multi)
    table = responses_table(items)
    assert table.num_rows == sum(len(i.candidates) for i in items)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["id"] == f"{items[0].id}#0" and row["candidate"] == 0
    assert row["messages"][-1] == {"role": "assistant", "content": items[0].candidates[0]}
    assert row["messages"][-2] == {"role": "user", "content": items[0].instruction}


def _item(n_candidates=2):
    return Item("p", "Say hi.", [], [f"response {k}" for k in range(n_candidates)], "s", "Say hi.")


def test_pairwise_judge_runs_both_orders_and_combines_votes():
    item = _item(3)
    jobs = pair_judge_jobs([item], ["judge_pairwise"], seed=0)
    assert [j["job"] for j in jobs] == ["p:0:0:1", "p:0:1:0", "p:0:0:2", "p:0:2:0"]
    assert json.loads(jobs[1]["candidates"]) == ["response 1", "response 0"]

    def results(picks):
        return {job: {"pick": p, "error": None} for job, p in picks.items()}

    # Chosen preferred in both orders against both rejected: correct.
    win = results({"p:0:0:1": 0, "p:0:1:0": 1, "p:0:0:2": 0, "p:0:2:0": 1})
    assert pairwise_outcome(0, item, win) == (1.0, 0)
    # Position bias (always "A"): each comparison splits 1-1, a tie.
    biased = results({"p:0:0:1": 0, "p:0:1:0": 0, "p:0:0:2": 0, "p:0:2:0": 0})
    assert pairwise_outcome(0, item, biased) == (0.5, None)
    # Loses both orders against rejected #2: wrong, whatever happens against #1.
    lose = results({"p:0:0:1": 0, "p:0:1:0": 1, "p:0:0:2": 1, "p:0:2:0": 0})
    assert pairwise_outcome(0, item, lose) == (0.0, 2)
    # An unreadable verdict is no vote; an engine error makes the item missing.
    assert pairwise_outcome(0, item, results({"p:0:0:1": None, "p:0:1:0": 1, "p:0:0:2": 0, "p:0:2:0": 1}))[0] == 1.0
    broken = {**win, "p:0:2:0": {"pick": None, "error": "engine error"}}
    assert pairwise_outcome(0, item, broken) == (None, None)


def test_listwise_judge_shuffles_and_maps_picks_back():
    item = _item(4)
    order = listwise_order(item, seed=0)
    assert sorted(order) == [0, 1, 2, 3] and order == listwise_order(item, seed=0)
    assert any(listwise_order(Item(f"id{k}", "q", [], item.candidates, "s"), 0)[0] != 0 for k in range(10))
    (job,) = pair_judge_jobs([item], ["judge_listwise"], seed=0)
    assert json.loads(job["candidates"]) == [item.candidates[k] for k in order]
    shown_chosen = order.index(0)
    assert listwise_outcome(0, item, {"l:0": {"pick": shown_chosen, "error": None}}, 0) == (1.0, 0)
    other = (shown_chosen + 1) % 4
    assert listwise_outcome(0, item, {"l:0": {"pick": other, "error": None}}, 0) == (0.0, order[other])
    assert listwise_outcome(0, item, {"l:0": {"pick": None, "error": None}}, 0) == (0.25, None)


def test_baselines():
    item = Item(
        "p",
        "Explain photosynthesis briefly.",
        [],
        ["Plants make sugar from light.", "Yes."],
        "s",
        "Explain photosynthesis briefly.",
    )
    assert baseline_scores(item, "longer")[0] > baseline_scores(item, "longer")[1]
    assert baseline_scores(item, "shorter")[0] < baseline_scores(item, "shorter")[1]
    assert baseline_scores(item, "prompt_overlap") == [0.0, 0.0]
    item.candidates = ["Photosynthesis: plants explain light.", "No."]
    assert baseline_scores(item, "prompt_overlap")[0] > 0


def test_eval_config_is_checked_before_anything_runs():
    validate_eval_config(_cfg(SAMPLE))
    for override, message in (
        ("evaluation.methods=[flip,bogus]", "unknown method"),
        ("evaluation.methods=[]", "at least one"),
        ("evaluation.subset_from=nowhere", "subset_from"),
        ("reward.similarity=cosine", "reward.similarity"),
        ("input.sample_per_file=0", "sample_per_file"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate_eval_config(_cfg(SAMPLE, override))


def test_evaluation_never_writes_into_a_directory_of_someone_elses_files(tmp_path):
    from flip_ray.evaluation.run import prepare
    from flip_ray.job.store import OutputError

    out = tmp_path / "theirs"
    (out / "responses").mkdir(parents=True)
    (out / "responses" / "mine.parquet").write_bytes(b"their data")
    for overwrite in ("false", "true"):
        cfg = load_config(
            None, [f"input.path={SAMPLE}", f"output.path={out}", f"output.overwrite={overwrite}"], schema=EvalJobConfig
        )
        with pytest.raises(OutputError, match=r"did not write \(responses/mine\.parquet\)"):
            prepare(cfg)
    assert (out / "responses" / "mine.parquet").read_bytes() == b"their data"


@pytest.mark.slow
def test_evaluation_end_to_end_on_real_pairs(tmp_path, caplog):
    """20 human-labelled items (2 best-of-N) through the real engine: summary.json holds every method
    with consistent counts, and the per-response scores are where the summary says."""
    import pyarrow.dataset as pads
    from PIL import Image

    from flip_ray.evaluation.run import run_evaluate

    out = tmp_path / "eval"
    cfg = load_config(
        None,
        [
            f"input.path={SAMPLE}",
            f"output.path={out}",
            "evaluation.methods=[flip,flip_logprob,judge_pairwise,longer,shorter,prompt_overlap]",
            "evaluation.subset_from=column",
            "evaluation.judge_max_tokens=48",
            "evaluation.bootstrap=500",
            "sampling.max_tokens=32",
            "model.max_model_len=1024",
            "resources.batch_size=16",
        ],
        schema=EvalJobConfig,
    )
    with caplog.at_level("INFO", logger="flip_ray"):
        result = run_evaluate(cfg)
    # Row progress per method, as the scoring job counts it.
    assert "flip_logprob 43/43 rows (100%)" in caplog.text and "flip 43/43 rows (100%)" in caplog.text
    plot = Image.open(out / "summary.png").convert("L")
    assert plot.size[0] > 400 and plot.getextrema()[1] - plot.getextrema()[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result["summary"]))
    assert list(summary) == ["flip", "flip_logprob", "judge_pairwise", "longer", "shorter", "prompt_overlap"]
    for method, s in summary.items():
        assert s["n"] + s["missing"] == 20, method
        assert s["accuracy"] is None or s["ci_low"] <= s["accuracy"] <= s["ci_high"], method
        assert set(s["per_subset"]) == {"pandalm_test", "hh_rlhf_harmless_test", "llmeval2_human"}
        assert sum(v["n"] for v in s["per_subset"].values()) == s["n"]
    # Length rules disagree everywhere except ties, by construction.
    assert summary["longer"]["agree_longer"] == 1.0 and summary["longer"]["agree_shorter"] == 0.0
    assert summary["longer"]["accuracy"] + summary["shorter"]["accuracy"] == pytest.approx(1.0)
    assert summary["flip_logprob"]["missing"] == 0 and summary["flip_logprob"]["ties"] == 0
    assert summary["flip_logprob"]["rows_per_s"] > 0 and summary["flip"]["rows_per_s"] > 0
    assert "flip_logprob" in (out / "summary.md").read_text()
    # How often flip's answers copy the response or echo the prompt, overall and per set, from its
    # stored rows; the other methods have no such flags.
    flip_rows = pads.dataset(str(out / "scores" / "flip" / "data"), format="parquet").to_table().to_pylist()
    flags = summary["flip"]["flags"]
    assert set(flags) == {"flag_copied_response", "flag_echoed_template"}
    for flag, rates in flags.items():
        scored_rows = [r for r in flip_rows if r[flag] is not None]
        assert rates["n"] == len(scored_rows) == 43
        assert rates["rate"] == round(sum(r[flag] for r in scored_rows) / len(scored_rows), 4)
        assert set(rates["per_subset"]) == set(summary["flip"]["per_subset"])
    assert "flags" not in summary["flip_logprob"] and "flags" not in summary["longer"]
    assert "| flip | copied_response |" in (out / "summary.md").read_text()
    assert (out / "errors.jsonl").read_text() == ""
    manifest = json.loads((out / "eval_manifest.json").read_text())
    assert manifest["pairs"] == 20 and manifest["best_of_n_items"] == 2 and manifest["responses"] == 43
    # The per-response scores are a normal scoring run, with the likelihood columns filled.
    scored = pads.dataset(str(out / "scores" / "flip_logprob" / "data"), format="parquet").to_table()
    assert scored.num_rows == 43
    assert scored.column("flip_logprob_mean").null_count == 0
    assert "flip_score" not in scored.column_names  # flip ran in its own pass
    # A rerun with the same config into a finished evaluation is refused without overwrite.
    from flip_ray.job.store import OutputError

    with pytest.raises(OutputError, match="finished evaluation"):
        run_evaluate(cfg)
    # The reported accuracy is what the stored scores give.
    by_id = dict(zip(scored.column("id").to_pylist(), scored.column("flip_logprob_mean").to_pylist(), strict=True))
    items = [json.loads(line) for line in Path(SAMPLE).read_text().splitlines()]
    wins = 0.0
    for it in items:
        rejected = it["rejected"] if isinstance(it["rejected"], list) else [it["rejected"]]
        c = by_id[f"{it['id']}#0"]
        r = [by_id[f"{it['id']}#{k + 1}"] for k in range(len(rejected))]
        wins += 1.0 if c > max(r) else 0.0
    assert summary["flip_logprob"]["accuracy"] == pytest.approx(wins / 20)


def test_engine_outcomes_missing_versus_no_verdict():
    from flip_ray.evaluation.run import engine_outcomes

    items = [_item(2), Item("q", "Q", [], ["a", "b", "c"], "s"), Item("r", "Q", [], ["a", "b"], "s")]
    scores = {
        "p#0": (0.9, None), "p#1": (0.1, None),  # chosen wins
        "q#0": (None, None), "q#1": (5.0, None), "q#2": (3.0, None),  # a judge with no verdict: a 3-way tie
        "r#0": (0.2, None), "r#1": (None, "engine error: boom"),  # an error: the item is missing
    }  # fmt: skip
    outcomes, picks = engine_outcomes(items, scores)
    assert outcomes == [1.0, pytest.approx(1 / 3), None] and picks == [0, None, None]
    assert engine_outcomes([Item("z", "Q", [], ["a", "b"], "s")], {})[0] == [None]
