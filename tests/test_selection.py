"""Flags, drop reasons, best-of-N and DPO pairs as pure functions (no Ray, no model)."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from flip_ray.downstream.jobs import DROP, KEY, Columns, annotate, check_score_column, pairs_for_group
from flip_ray.downstream.selection import drop_reason, group_key, make_dpo_pairs, missing_text, prompt_key, top_k
from flip_ray.input.files import InputError
from flip_ray.text.flags import compute_flags, copied_fraction, language_of, script_of, word_count

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
    for bad in (math.nan, math.inf, -math.inf):
        assert drop_reason(row(1, bad), **kw) == "score_not_finite"
    assert drop_reason(row(1, -7.5), **kw) is None and drop_reason(row(1, 12), **kw) is None


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


def test_no_prompt_has_no_key():
    # None, not a shared hash of "": rows without a prompt must not form one group.
    for text in (None, "", "  \n"):
        assert prompt_key(text) is None
    answer_only = [{"role": "assistant", "content": "a"}]
    blank_question = [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]
    for chat in ("not json [", json.dumps(answer_only), blank_question, [], json.dumps({"role": "user"})):
        assert prompt_key(None, chat) is None, chat
    assert group_key(None) is None and group_key("") is None and group_key(" ") is None
    assert group_key("conv-1") == "conv-1" and group_key(0) == "0"


def test_missing_text_for_pairs():
    assert missing_text("q", "a", None, chat=False) is None
    assert missing_text("", "a", None, chat=False) == "no_prompt"
    assert missing_text("q", None, None, chat=False) == missing_text("q", " ", None, chat=False) == "no_response"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert missing_text(None, None, json.dumps(conv), chat=True) is None
    assert missing_text(None, None, None, chat=True) == "no_prompt"
    assert missing_text(None, None, [conv[0], {"role": "assistant", "content": ""}], chat=True) == "no_response"


def test_annotate_drops_rows_without_a_prompt_only_where_rows_are_grouped():
    table = pa.Table.from_pylist(
        [
            {"id": "a", "prompt": "p", "response": "r", "flip_score": 0.5, "error": None},
            {"id": "b", "prompt": None, "response": "r", "flip_score": 0.9, "error": None},
            {"id": "c", "prompt": "", "response": "r", "flip_score": 0.1, "error": None},
            {"id": "d", "prompt": "p", "response": None, "flip_score": 0.3, "error": None},
            {"id": "e", "prompt": None, "response": "r", "flip_score": None, "error": "response is empty"},
        ]
    )
    cols = Columns(prompt="prompt", response="response", messages=None, id="id", prompt_key=None, score="flip_score")
    kw = dict(cols=cols, include_errors=False, exclude_flags=())

    def reasons(**mode):
        return annotate(table, **kw, **mode).column(DROP).to_pylist()

    assert reasons() == ["", "", "", "", "error"]  # threshold, quantile: each row alone
    assert reasons(grouped=True) == ["", "no_prompt", "no_prompt", "", "error"]
    assert reasons(grouped=True, pairs=True) == ["", "no_prompt", "no_prompt", "no_response", "error"]
    keys = annotate(table, **kw).column(KEY).to_pylist()
    assert keys[0] == keys[3] == prompt_key("p") and keys[1] is keys[2] is keys[4] is None


def test_score_column_must_be_numeric():
    schema = pa.schema([("s", pa.float64()), ("n", pa.int64()), ("t", pa.string()), ("b", pa.bool_())])
    check_score_column(schema, "s")
    check_score_column(schema, "n")
    for column in ("t", "b"):
        with pytest.raises(InputError, match=f"columns.score={column} is a"):
            check_score_column(schema, column)


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
