"""The engine stage's logic without Ray or an engine: deduplication, merging the methods' results
into columns, per-method errors, the similarity stage's columns; and regressions of bugs found in
a read of the code (dedup off, `max` with another metric, weights hashed on every run)."""

import pyarrow as pa
import pytest

from flip_ray import rewards, schema
from flip_ray.engine.generation import Generation
from flip_ray.engine.likelihood import Likelihood
from flip_ray.job.engine_stage import merge_results
from flip_ray.job.stages import flag_columns, output_table, row_error
from flip_ray.rewards import flip as flip_reward
from flip_ray.rewards import flip_logprob, judge_pointwise
from flip_ray.rewards.flip import GENERATIONS, AnswerCache, deduplicated


def merge(n, todo, names, errors, results):
    """merge_results on the rewards named, from their engine results turned into `RowScore`s the way
    each reward's engine part does."""
    to_row = {
        "flip": lambda g, reused: flip_reward.row_score(g, reused),
        "flip_logprob": lambda lk, _: flip_logprob.row_score(lk),
        "flip_logprob_lexical": lambda lk, _: rewards.likelihood_score(lk, {"flip_logprob_lexical": lk.contrast}),
        "pmi_forward": lambda lk, _: rewards.likelihood_score(lk, {"pmi_forward": lk.contrast}),
        "judge_pointwise": lambda g, _: judge_pointwise.row_score(g),
    }
    scored = {}
    for name, (answers, *reused) in results.items():
        flags = reused[0] if reused else [False] * len(answers)
        scored[name] = [to_row[name](a, r) for a, r in zip(answers, flags, strict=True)]
    return merge_results(n, todo, rewards.resolve(names), errors, scored)


def fake_generate(calls):
    def generate(positions):
        calls.append(list(positions))
        return [Generation(texts=[f'{{"INFERRED INSTRUCTION": "q{p}"}}'], n_output_tokens=5) for p in positions]

    return generate


def test_dedup_off_sends_every_row_and_marks_none_reused():
    calls = []
    answers, reused = deduplicated(["a", "a", "b"], AnswerCache(0), fake_generate(calls))
    assert calls == [[0, 1, 2]] and reused == [False, False, False]
    cols = merge(3, [0, 1, 2], ("flip",), [None] * 3, {"flip": (answers, reused)})
    assert cols["n_output_tokens"] == [5, 5, 5]  # each row's own generation


def test_dedup_on_reuses_within_the_batch_and_across_batches():
    cache, calls = AnswerCache(10), []
    answers, reused = deduplicated(["a", "a", "b"], cache, fake_generate(calls))
    assert calls == [[0, 2]] and reused == [False, True, False] and answers[1] is answers[0]
    answers, reused = deduplicated(["b", "c"], cache, fake_generate(calls))
    assert calls[-1] == [1] and reused == [True, False]
    cols = merge(2, [0, 1], ("flip",), [None, None], {"flip": (answers, reused)})
    # A reused answer holds its answer's tokens (a row's values do not depend on which identical row
    # came first); the run's output-token count leaves it out.
    assert cols["n_output_tokens"] == [5, 5] and cols[schema.DEDUP] == [True, False]


def test_output_tokens_count_only_generated_answers():
    from flip_ray.job.stages import part_stats

    cols = {name: [None, None] for name in schema.output_schema(pa.schema([]), ("flip",)).names}
    cols |= {"n_output_tokens": [7, 7], "truncated": [False, False], **{f: [False, False] for f in schema.FLAG_NAMES}}
    table = pa.table(cols)
    assert part_stats(table, None, [False, True])["output_tokens"] == 7
    assert part_stats(table)["output_tokens"] == 14


def test_a_failed_answer_is_not_cached():
    cache = AnswerCache(10)
    deduplicated(["a"], cache, lambda positions: [Generation(texts=[], error="boom") for _ in positions])
    assert "a" not in cache.answers


def test_one_method_failing_keeps_the_others():
    flip = [Generation(texts=['{"INFERRED INSTRUCTION": "x"}'], n_prompt_tokens=10), Generation([], error="bad")]
    logprob = [Likelihood(error="too long"), Likelihood(error="too long")]
    cols = merge(
        3,
        [0, 2],
        ("flip", "flip_logprob"),
        [None, "response is empty", None],
        {"flip": (flip,), "flip_logprob": (logprob,)},
    )
    assert cols["flip_error"] == [None, None, "bad"] and cols["flip_logprob_error"] == ["too long", None, "too long"]
    assert cols["error"] == [None, "response is empty", "flip: bad; flip_logprob: too long"]
    assert cols[GENERATIONS][0] and cols["flip_logprob_mean"][0] is None
    assert row_error(("flip",), {"flip": "x"}) == "x" and row_error(("flip", "flip_logprob"), {"flip": "x"}) is None


def test_likelihood_variants_write_their_reward_and_their_own_errors():
    """flip_logprob_lexical and pmi_forward write their `contrast` into their own column; a failure
    of one is that method's error only."""
    lexical = [Likelihood(logprob_mean=-2.0, contrast=0.5, n_prompt_tokens=40), Likelihood(error="lexical control: x")]
    forward = [Likelihood(logprob_mean=-1, contrast=-0.25, truncated=True), Likelihood(logprob_mean=-1, contrast=0.1)]
    methods = ("flip_logprob_lexical", "pmi_forward")
    cols = merge(2, [0, 1], methods, [None, None], {"flip_logprob_lexical": (lexical,), "pmi_forward": (forward,)})
    assert cols["flip_logprob_lexical"] == [0.5, None] and cols["pmi_forward"] == [-0.25, 0.1]
    assert cols["flip_logprob_lexical_error"] == [None, "lexical control: x"]
    assert cols["pmi_forward_error"] == [None, None]
    assert cols["error"] == [None, None] and cols["truncated"] == [True, False] and cols["n_prompt_tokens"][0] == 40
    assert "flip_logprob_mean" not in cols  # flip_logprob's own column only when it was asked for
    assert {rewards.get(m).ranked_by() for m in methods} <= set(schema.scored_fields(methods).names)


def test_lexical_controls_keep_the_shared_words_and_are_seeded():
    from flip_ray.text.prompts import lexical_control

    text = "The capital of France is Paris. It is also the largest city!\nShort line"
    control = lexical_control(text, "What is the capital of France?", "shuffle")
    assert control == lexical_control(text, "anything", "shuffle") and control != text  # seeded by the response
    assert sorted(control.split()) == sorted(text.split())
    # Words move within their sentence only.
    assert [sorted(s.split()) for s in control.splitlines()] == [
        sorted("The capital of France is Paris.".split()),
        sorted("It is also the largest city!".split()),
        sorted("Short line".split()),
    ]
    # overlap: only the words the instruction has too (SQuAD-normalised: no articles), in order; may be empty.
    assert lexical_control(text, "What is the capital of France?", "overlap") == "capital of France is is"
    assert lexical_control("Bananas are yellow.", "Name a colour.", "overlap") == ""
    with pytest.raises(ValueError, match="overlap"):
        lexical_control(text, "x", "reverse")


def test_an_empty_answer_is_a_flip_error():
    cols = merge(1, [0], ("flip",), [None], {"flip": ([Generation(texts=[])],)})
    assert cols["flip_error"] == ["engine returned no output"] and cols["error"] == ["engine returned no output"]


def test_max_with_another_metric_reports_the_sample_it_scores(monkeypatch):
    import flip_ray.rewards.flip_f1 as scoring

    real, parsed = scoring.parse_inferred_instruction, []

    def counting(text):
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(scoring, "parse_inferred_instruction", counting)
    instruction = "write a short poem about the sea"
    samples = [
        '{"INFERRED INSTRUCTION": "the sea short poem a write about"}',  # best by F1 (all words), poor order
        '{"INFERRED INSTRUCTION": "write a poem about the sea"}',  # best by ROUGE-L (order kept)
    ]
    (s,) = scoring.score_batch([instruction], [samples], "max", "rouge_l")
    from flip_ray.text.similarity import rouge_l

    assert s.inferred_instruction == "write a poem about the sea"
    assert s.flip_score == pytest.approx(rouge_l("write a poem about the sea", instruction))
    assert len(parsed) == 2, "each answer is parsed once"


def test_similarity_stage_columns_without_ray():
    flags = flag_columns(["Say hi.", None], ["Hi there, friend!", "x"], copy_threshold=0.6, min_response_words=3)
    assert flags["response_words"] == [3, None] and flags["flag_too_short"] == [False, None]
    kept = pa.schema([("prompt", pa.string())])
    batch = pa.table(
        {
            "prompt": ["Say hi.", "Say bye."],
            GENERATIONS: [['{"INFERRED INSTRUCTION": "Say hi."}'], None],
            "error": [None, "response is empty"],
            **{f.name: pa.nulls(2, f.type) for f in schema.CONTROL_COLUMNS},
        }
    )
    finish = rewards.get("flip").finish(rewards.FinishSetup(settings={"similarity": "f1"}))
    flip = finish(batch, ["Say hi.", "Say bye."], ["Hi there, friend!", "x"], [0])
    assert flip["flip_score"] == [1.0, None] and flip["parse_status"] == ["json", None]
    out = output_table(batch, {**flags, **flip}, schema.output_schema(kept, ["flip"]))
    assert out.schema.names[:2] == ["id", "prompt"] and out.column("error").to_pylist() == [None, "response is empty"]
    assert out.column("flip_score").to_pylist() == [1.0, None]


def test_weights_are_hashed_once_per_checkpoint(tmp_path, monkeypatch):
    import os

    import flip_ray.engine.embedded as model

    monkeypatch.setenv("FLIP_RAY_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    first = model.weights_fingerprint(str(ckpt))
    monkeypatch.setattr(model, "file_sha256", lambda p: (_ for _ in ()).throw(AssertionError("hashed again")))
    assert model.weights_fingerprint(str(ckpt)) == first  # a resume: a stat, no hash
    monkeypatch.undo()
    monkeypatch.setenv("FLIP_RAY_CACHE", str(tmp_path / "cache"))
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert model.weights_fingerprint(str(ckpt))["sha256"] != first["sha256"]
