import json
import subprocess
import sys

import pytest

from flip_ray.engine.judge import (
    JUDGE_PROMPT_VERSION,
    LISTWISE_SYSTEM_PROMPT,
    PAIRWISE_JSON_SCHEMA,
    PAIRWISE_SYSTEM_PROMPT,
    POINTWISE_JSON_SCHEMA,
    POINTWISE_SYSTEM_PROMPT,
    listwise_json_schema,
    listwise_messages,
    pairwise_messages,
    pointwise_messages,
)
from flip_ray.engine.verdicts import (
    EMPTY,
    INVALID,
    JSON,
    JSON_EMBEDDED,
    JUDGE_PARSE_STATUSES,
    PARTIAL_JSON,
    RAW_TEXT,
    parse_listwise,
    parse_pairwise,
    parse_pointwise,
)

INSTRUCTION = "Name three {curly} Broadway actors."
CONTEXT = [{"role": "user", "content": "Hi, I like musicals."}, {"role": "assistant", "content": "Great!"}]

# ---- prompts -------------------------------------------------------------------------------------------


def test_version_is_recorded():
    assert JUDGE_PROMPT_VERSION == "judge-v1"


def test_system_prompts_are_the_authors_rendered_text():
    assert POINTWISE_SYSTEM_PROMPT.startswith("### Task Description\nPlease act as an impartial judge")
    assert POINTWISE_SYSTEM_PROMPT.endswith('{"REASONING": "[...]", "SCORE": "<your-score>"}')
    assert 'output either "A" or "B" depending on which response is better.' in PAIRWISE_SYSTEM_PROMPT
    assert "output the index (starting from 0) of the best response." in LISTWISE_SYSTEM_PROMPT
    for prompt in (POINTWISE_SYSTEM_PROMPT, PAIRWISE_SYSTEM_PROMPT, LISTWISE_SYSTEM_PROMPT):
        assert "{{" not in prompt and "}}" not in prompt


def test_pointwise_messages_slots():
    response = "Idina Menzel, {Lin}-Manuel Miranda, Audra McDonald"  # braces must survive str.format
    messages = pointwise_messages(INSTRUCTION, response)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == POINTWISE_SYSTEM_PROMPT
    assert messages[1]["content"] == (
        "[Query]\n" + INSTRUCTION + "\n\n[AI Answer]\n" + response + "\n\n"
        '[Your judgement]\nRespond in JSON format. {"REASONING": "[...]", "SCORE": "<your-score>"}'
    )


def test_pairwise_messages_order_a_then_b():
    user = pairwise_messages(INSTRUCTION, "first answer", "second answer")[1]["content"]
    assert user.startswith(f"[Query]\n{INSTRUCTION}\n\n")
    a, b = user.index("[AI Response A]\nfirst answer\n\n"), user.index("[AI Response B]\nsecond answer\n\n")
    assert a < b < user.index("[Your judgement]")
    assert user.endswith('"BETTER_RESPONSE":"A" or "B"}')


def test_listwise_messages_number_from_zero():
    user = listwise_messages(INSTRUCTION, ["r0", "r1", "r2"])[1]["content"]
    block = "[AI Answers]\n[AI Response 0]\nr0\n\n[AI Response 1]\nr1\n\n[AI Response 2]\nr2\n\n[Your judgement]"
    assert block in user
    assert user.endswith('"BEST_RESPONSE_INDEX": <index-of-best-response>}')
    assert "[AI Response 3]" not in user


def test_listwise_needs_responses():
    with pytest.raises(ValueError):
        listwise_messages(INSTRUCTION, [])


@pytest.mark.parametrize(
    "build",
    [
        lambda c: pointwise_messages(INSTRUCTION, "resp", c),
        lambda c: pairwise_messages(INSTRUCTION, "a", "b", c),
        lambda c: listwise_messages(INSTRUCTION, ["x", "y"], c),
    ],
)
def test_context_goes_first_as_history_block(build):
    user = build(CONTEXT)[1]["content"]
    assert user.startswith("[Conversation History]\nUser: Hi, I like musicals.\n\nAssistant: Great!\n\n[Query]\n")
    assert build(None)[1]["content"].startswith("[Query]\n")
    assert build([])[1]["content"] == build(None)[1]["content"]


# ---- pointwise parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"REASONING": "Accurate and complete.", "SCORE": "8"}', (8.0, JSON)),
        ('{"REASONING": "Accurate.", "SCORE": 8}', (8.0, JSON)),
        ('{\n  "REASONING": "line one\nline two",\n  "SCORE": 9\n}', (9.0, JSON)),
        ('{"reasoning": "ok", "score": 6}', (6.0, JSON)),
        ('{"Reasoning": "ok", "Score": "6"}', (6.0, JSON)),
        ('{"Rating": "7.5"}', (7.5, JSON)),
        ('{"REASONING": "ok", "SCORE": "8/10"}', (8.0, JSON)),
        ('Here is my judgement:\n```json\n{"REASONING": "ok", "SCORE": 7}\n```', (7.0, JSON_EMBEDDED)),
        ('<think>Maybe a 3? No.</think>\n{"REASONING": "Good.", "SCORE": 9}', (9.0, JSON_EMBEDDED)),
        ('{"REASONING": "Good.", "SCORE": 8}\nI hope this evaluation helps!', (8.0, JSON_EMBEDDED)),
        ('{"evaluation": {"REASONING": "ok", "SCORE": 5}}', (5.0, JSON_EMBEDDED)),
        ('{"REASONING": "It says "hello" twice", "SCORE": "7"}', (7.0, PARTIAL_JSON)),
        ('{"SCORE": 4, "REASONING": "The answer misses the second half of the que', (4.0, PARTIAL_JSON)),
        ("7.5", (7.5, RAW_TEXT)),
        ("**8**", (8.0, RAW_TEXT)),
        ("I would rate this 8/10", (8.0, RAW_TEXT)),
        ("The answer is thorough.\n\nScore: 7", (7.0, RAW_TEXT)),
        ("**Rating:** 6", (6.0, RAW_TEXT)),
        ("I'd give it 9 out of 10.", (9.0, RAW_TEXT)),
        ("<|im_start|>Score: 10<|im_end|>", (10.0, RAW_TEXT)),
    ],
)
def test_parse_pointwise(text, expected):
    assert parse_pointwise(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"REASONING": "bad", "SCORE": 0}',
        '{"REASONING": "great", "SCORE": 11}',
        '{"SCORE": "11"}',
        '{"SCORE": "<your-score>"}',
        '{"SCORE": null}',
        '{"SCORE": true}',
        '{"REASONING": "The answer is detailed but it',  # cut before the score
        '{"REASONING": "ok", "SCORE": 1',  # cut inside the number: 1 or 10?
        "rating: 4/5",  # another scale
        "Score: 0",
        "-1",
        "The response lists 3 actors.",
        "asdf qwerty",
        "```\n```",
    ],
)
def test_parse_pointwise_invalid(text):
    assert parse_pointwise(text) == (None, INVALID)


@pytest.mark.parametrize("text", [None, "", "   \n", "<think>only thoughts</think>", "<think>cut off mid-thought"])
def test_parse_pointwise_empty(text):
    assert parse_pointwise(text) == (None, EMPTY)


# ---- pairwise parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"REASONING": "B is wrong.", "BETTER_RESPONSE": "A"}', ("A", JSON)),
        ('{"REASONING":"x","BETTER_RESPONSE":"b"}', ("B", JSON)),
        ('{"better_response": "Response B"}', ("B", JSON)),
        ('{"Better Response": "AI Response A"}', ("A", JSON)),
        ('```json\n{"REASONING": "x", "BETTER_RESPONSE": "B"}\n```', ("B", JSON_EMBEDDED)),
        ('<think>A seems better... no, B.</think>{"REASONING": "x", "BETTER_RESPONSE": "B"}', ("B", JSON_EMBEDDED)),
        ('{"REASONING": "x", "BETTER_RESPONSE": "A"} Let me know if you need more.', ("A", JSON_EMBEDDED)),
        ('{"REASONING": "A says "yes"", "BETTER_RESPONSE": "A"}', ("A", PARTIAL_JSON)),
        ('{"BETTER_RESPONSE": "B", "REASONING": "Response A ignores the', ("B", PARTIAL_JSON)),
        ("A", ("A", RAW_TEXT)),
        ("[[B]]", ("B", RAW_TEXT)),
        ("Output (a) is better", ("A", RAW_TEXT)),
        ("Response B is clearly better than Response A.", ("B", RAW_TEXT)),
        ("Both are fluent. The better response is B.", ("B", RAW_TEXT)),
        ("After weighing both, I choose Response A.", ("A", RAW_TEXT)),
    ],
)
def test_parse_pairwise(text, expected):
    assert parse_pairwise(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"REASONING": "equal", "BETTER_RESPONSE": "tie"}',  # the authors' prompt allows no tie
        '{"BETTER_RESPONSE": "C"}',
        '{"BETTER_RESPONSE": "A" or "B"}',  # the template echoed back
        '{"BETTER_RESPONSE": ["A", "B"]}',
        "tie",
        "Both responses are equally good.",
        "Response A is not better than Response B.",
        "I prefer a response that is concise.",  # "a" the article is no verdict
        "lorem ipsum",
    ],
)
def test_parse_pairwise_invalid(text):
    assert parse_pairwise(text) == (None, INVALID)


def test_parse_pairwise_empty():
    assert parse_pairwise("") == (None, EMPTY)
    assert parse_pairwise("<think>A or B?</think>") == (None, EMPTY)


# ---- listwise parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"REASONING": "Most complete.", "BEST_RESPONSE_INDEX": 2}', (2, JSON)),
        ('{"REASONING": "x", "BEST_RESPONSE_INDEX": 0}', (0, JSON)),
        ('{"best_response_index": "1"}', (1, JSON)),
        ('{"Best Response Index": 2.0}', (2, JSON)),
        ('{"BEST_RESPONSE_INDEX": "Response 1"}', (1, JSON)),
        ('```json\n{"REASONING": "x", "BEST_RESPONSE_INDEX": 1}\n```', (1, JSON_EMBEDDED)),
        ('<think>0 or 2</think>\n{"REASONING": "x", "BEST_RESPONSE_INDEX": 2}', (2, JSON_EMBEDDED)),
        ('{"BEST_RESPONSE_INDEX": 1, "REASONING": "Response 0 is vague and', (1, PARTIAL_JSON)),
        ("Response 2", (2, RAW_TEXT)),  # the prompt numbers from 0, so this is the third response
        ("[AI Response 0]", (0, RAW_TEXT)),
        ("1", (1, RAW_TEXT)),
        ("AI Response 1 is clearly the best.", (1, RAW_TEXT)),
        ("All are fine, but the best response is Response 2.", (2, RAW_TEXT)),
        ("BEST RESPONSE INDEX: 0", (0, RAW_TEXT)),
    ],
)
def test_parse_listwise(text, expected):
    assert parse_listwise(text, 3) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"BEST_RESPONSE_INDEX": 3}',  # out of range for 3 responses
        '{"BEST_RESPONSE_INDEX": -1}',
        '{"BEST_RESPONSE_INDEX": 1.5}',
        '{"BEST_RESPONSE_INDEX": "<index-of-best-response>"}',
        '{"REASONING": "x", "BEST_RESPONSE_INDEX": 1',  # cut: 1 or 12?
        "Response 5",
        "None of them.",
    ],
)
def test_parse_listwise_invalid(text):
    assert parse_listwise(text, 3) == (None, INVALID)


def test_parse_listwise_range_follows_n():
    assert parse_listwise('{"BEST_RESPONSE_INDEX": 3}', 4) == (3, JSON)
    assert parse_listwise("", 4) == (None, EMPTY)
    with pytest.raises(ValueError):
        parse_listwise("0", 0)


def test_statuses_are_known():
    results = [parse_pointwise("Score: 7"), parse_pairwise("x"), parse_listwise("", 2)]
    assert all(status in JUDGE_PARSE_STATUSES for _, status in results)


# ---- schemas -------------------------------------------------------------------------------------------


def _check_schema(schema: dict, keys: list[str]) -> dict:
    assert schema["type"] == "object"
    assert schema["required"] == keys and list(schema["properties"]) == keys  # the prompt's order
    assert schema["properties"]["REASONING"] == {"type": "string"}
    json.dumps(schema)  # plain data, ready for the engine
    return schema["properties"][keys[1]]


def test_pointwise_schema():
    score = _check_schema(POINTWISE_JSON_SCHEMA, ["REASONING", "SCORE"])
    assert score == {"type": "integer", "minimum": 1, "maximum": 10}


def test_pairwise_schema():
    choice = _check_schema(PAIRWISE_JSON_SCHEMA, ["REASONING", "BETTER_RESPONSE"])
    assert choice["enum"] == ["A", "B"]


def test_listwise_schema():
    index = _check_schema(listwise_json_schema(4), ["REASONING", "BEST_RESPONSE_INDEX"])
    assert index == {"type": "integer", "minimum": 0, "maximum": 3}
    with pytest.raises(ValueError):
        listwise_json_schema(0)


def test_schema_conforming_answers_parse_as_clean_json():
    assert parse_pointwise(json.dumps({"REASONING": "r", "SCORE": 10})) == (10.0, JSON)
    assert parse_pairwise(json.dumps({"REASONING": "r", "BETTER_RESPONSE": "B"})) == ("B", JSON)
    assert parse_listwise(json.dumps({"REASONING": "r", "BEST_RESPONSE_INDEX": 3}), 4) == (3, JSON)


def test_import_loads_no_heavy_frameworks():
    code = (
        "import sys, flip_ray.engine.judge, flip_ray.engine.verdicts\n"
        "print(','.join(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
