"""Flags, drop reasons, best-of-N and DPO pairs as pure functions (no Ray, no model)."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from flip_ray.downstream import KEY, Columns, pairs_for_group
from flip_ray.flags import compute_flags, copied_fraction, language_of, script_of, word_count
from flip_ray.selection import drop_reason, make_dpo_pairs, prompt_key, top_k

SAMPLE = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
PROMPT = "Who created the Superman cartoon character?"
FRENCH = (
    "Superman a été créé par l'écrivain Jerry Siegel et le dessinateur Joe Shuster, deux jeunes de Cleveland. "
    "Le personnage est apparu pour la première fois dans Action Comics en 1938 et il est devenu le premier "
    "grand super-héros de la bande dessinée."
)
HACKS = {
    "verbatim": PROMPT,
    "sure": f"Sure! {PROMPT}",
    "one_word": "Siegel.",
    "french": FRENCH,
    "russian": "Супермена создали писатель Джерри Сигел и художник Джо Шустер в 1938 году.",
    "chinese": "超人是由作家杰里·西格尔和画家乔·舒斯特在一九三八年创作的漫画人物。",
}


@pytest.mark.parametrize(
    "name,flag",
    [
        ("verbatim", "flag_restates_prompt"),
        ("sure", "flag_restates_prompt"),
        ("one_word", "flag_too_short"),
        ("french", "flag_language_mismatch"),
        ("russian", "flag_language_mismatch"),
        ("chinese", "flag_language_mismatch"),
    ],
)
def test_constructed_hacks_are_flagged(name, flag):
    assert getattr(compute_flags(PROMPT, HACKS[name]), flag)


def test_ordinary_rows_are_not_flagged():
    for r in SAMPLE:
        f = compute_flags(r["prompt"], r["response"])
        assert not (f.flag_restates_prompt or f.flag_too_short or f.flag_language_mismatch), r["id"]


def test_answer_that_echoes_the_question_is_not_a_restatement():
    p = "Tell me how to implement a SCIM server in PHP using Slim as a router"
    r = "To implement a SCIM server in PHP using Slim as a router, follow these steps. " + "First install Slim. " * 40
    f = compute_flags(p, r)
    assert f.prompt_copy_fraction > 0.6 and not f.flag_restates_prompt


def test_helpers():
    assert copied_fraction(["a", "b", "c", "d"], ["x", "a", "b", "c", "d"]) == 1.0
    assert copied_fraction(["a", "b", "c", "d"], ["d", "c", "b", "a"]) == 0.0
    assert script_of("Привет мир") == "CYRILLIC" and script_of("123 !!") is None
    assert language_of("the cat is on the mat and it is happy with that".split()) == "en"
    assert language_of("too short".split()) is None
    # function words count with multiplicity, and a near tie is no verdict
    assert language_of("les les les chat noir dort bien dans".split()) == "fr"
    assert language_of("the and of le la les cat chat".split()) is None
    assert script_of("Hello мир мир мир мир мир") == "CYRILLIC" and script_of("Hello, 世界") == "LATIN"
    assert script_of("日本語のテキスト") == "CJK" and script_of("naïve café") == "LATIN"
    assert word_count("two words") == 2 and word_count("超人是由作家杰里") == 4 and word_count("") == 0


def row(i, score, error=None, **flags):
    return {"id": f"r{i}", "flip_score": score, "error": error, **flags}


def test_drop_reasons():
    kw = dict(score_column="flip_score", include_errors=False, exclude_flags=("flag_too_short",))
    assert drop_reason(row(1, 0.5), **kw) is None
    assert drop_reason(row(1, None, error="response is empty"), **kw) == "error"
    assert drop_reason(row(1, 0.5, flag_too_short=True), **kw) == "flag_too_short"
    assert drop_reason(row(1, None), **kw) == "no_score"
    assert drop_reason(row(1, 0.2, error="x"), **{**kw, "include_errors": True}) is None


def test_best_of_n_ties_break_by_id():
    rows = [row(3, 0.5), row(1, 0.5), row(2, 0.1)]
    assert [r["id"] for r in top_k(rows, 1, score_column="flip_score")] == ["r1"]
    assert [r["id"] for r in top_k(list(reversed(rows)), 2, score_column="flip_score")] == ["r1", "r3"]


def test_pair_strategies():
    rows = [row(1, 0.9), row(2, 0.5), row(3, 0.45), row(4, 0.1)]
    ids = lambda pairs: [(a["id"], b["id"]) for a, b in pairs]  # noqa: E731
    assert ids(make_dpo_pairs(rows, strategy="best_vs_worst", score_column="flip_score")) == [("r1", "r4")]
    all_pairs = make_dpo_pairs(rows, strategy="all_pairs", score_column="flip_score", min_margin=0.1)
    assert ("r2", "r3") not in ids(all_pairs) and len(all_pairs) == 5
    assert ids(all_pairs)[0] == ("r1", "r4")  # largest margin first
    assert len(make_dpo_pairs(rows, strategy="all_pairs", score_column="flip_score", max_pairs=2)) == 2
    a = make_dpo_pairs(rows, strategy="best_vs_random", score_column="flip_score", seed=7)
    assert a == make_dpo_pairs(list(reversed(rows)), strategy="best_vs_random", score_column="flip_score", seed=7)
    assert a[0][0]["id"] == "r1"
    assert make_dpo_pairs([row(1, 0.5), row(2, 0.5)], strategy="best_vs_worst", score_column="flip_score") == []
    assert make_dpo_pairs([row(1, 0.5)], strategy="all_pairs", score_column="flip_score") == []
    with pytest.raises(ValueError, match="unknown pair strategy"):
        make_dpo_pairs(rows, strategy="nope", score_column="flip_score")


def test_prompt_key_groups_by_prompt_or_chat_without_last_turn():
    assert prompt_key("What is Atlantis?") == prompt_key("What is Atlantis?") != prompt_key("What is Gremolata?")
    a = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}]
    b = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a2"}]
    assert prompt_key(None, a) == prompt_key(None, json.dumps(b))


def test_chat_pairs_are_message_lists():
    conv = lambda text: [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": text}]  # noqa: E731
    rows = [
        {"id": "a", "messages": json.dumps(conv("Apple.")), "flip_score": 0.8, KEY: "k"},
        {"id": "b", "messages": json.dumps(conv("Car.")), "flip_score": 0.1, KEY: "k"},
    ]
    cols = Columns(prompt=None, response=None, messages="messages", id="id", prompt_key=None, score="flip_score")
    out = pairs_for_group(
        pa.Table.from_pylist(rows), cols=cols, strategy="best_vs_worst", min_margin=0.0, max_pairs=None, seed=0
    ).to_pylist()
    assert out[0]["prompt"] == [{"role": "user", "content": "Name a fruit."}]
    assert out[0]["chosen"] == [{"role": "assistant", "content": "Apple."}]
    assert out[0]["rejected"] == [{"role": "assistant", "content": "Car."}]
    assert out[0]["margin"] == pytest.approx(0.7)
