from flip_ray.text.parsing import (
    EMPTY,
    JSON,
    JSON_EMBEDDED,
    PARSE_STATUSES,
    PARTIAL_JSON,
    RAW_TEXT,
    parse_inferred_instruction,
    strip_think,
)


def test_clean_json():
    p = parse_inferred_instruction('{"REASONING": "It lists actors.", "INFERRED INSTRUCTION": "Name Broadway actors."}')
    assert p == ("Name Broadway actors.", "It lists actors.", JSON)


def test_code_fence():
    text = 'Here you go:\n```json\n{"REASONING": "r", "INFERRED INSTRUCTION": "Summarize the text."}\n```'
    assert parse_inferred_instruction(text) == ("Summarize the text.", "r", JSON_EMBEDDED)


def test_bare_fence_without_language():
    text = '```\n{"INFERRED INSTRUCTION": "Translate to French."}\n```'
    assert parse_inferred_instruction(text).instruction == "Translate to French."


def test_think_block_is_dropped():
    text = '<think>Maybe {"INFERRED INSTRUCTION": "wrong"}</think>\n{"INFERRED INSTRUCTION": "right"}'
    p = parse_inferred_instruction(text)
    assert p.instruction == "right" and p.status == JSON_EMBEDDED


def test_dangling_think_close():
    assert strip_think("thinking... </think> answer") == " answer"


def test_key_spelling_variants():
    for key in (
        "inferred_instruction",
        "Inferred Instruction",
        "inferred instruction",
        "Inferred_Instruction",
        "Inferred Instructcion",
        "INFERRED-INSTRUCTION",
        "instruction",
    ):
        p = parse_inferred_instruction(f'{{"{key}": "Do X.", "Reasoning": "because"}}')
        assert p.instruction == "Do X." and p.reasoning == "because", key


def test_raw_newlines_inside_strings():
    p = parse_inferred_instruction('{"REASONING": "line1\nline2", "INFERRED INSTRUCTION": "Explain\nthis"}')
    assert p.instruction == "Explain\nthis" and p.status == JSON


def test_json_inside_prose():
    p = parse_inferred_instruction('Sure! {"INFERRED INSTRUCTION": "List three fruits."} Hope it helps.')
    assert p == ("List three fruits.", None, JSON_EMBEDDED)


def test_cut_off_json_uses_partial_value():
    p = parse_inferred_instruction('{"REASONING": "The text is about cats", "INFERRED INSTRUCTION": "Write about ca')
    assert p.status == PARTIAL_JSON and p.instruction == "Write about ca" and p.reasoning == "The text is about cats"


def test_json_without_instruction_key_falls_back_to_raw():
    p = parse_inferred_instruction('{"type": "response", "body": "x"}')
    assert p.status == RAW_TEXT and p.instruction == '{"type": "response", "body": "x"}'


def test_plain_text_fallback_strips_special_tokens():
    p = parse_inferred_instruction("<|im_start|>Write a poem about the sea.<|im_end|>")
    assert p.status == RAW_TEXT and p.instruction == "Write a poem about the sea."


def test_empty_and_none():
    for text in (None, "", "   ", "<think>only thoughts</think>"):
        assert parse_inferred_instruction(text).status == EMPTY


def test_non_string_value_is_serialised():
    p = parse_inferred_instruction('{"INFERRED INSTRUCTION": ["step one", "step two"]}')
    assert p.instruction == '["step one", "step two"]'


def test_statuses_are_declared():
    samples = ['{"INFERRED INSTRUCTION": "a"}', "x", "", '{"INFERRED INSTRUCTION": "cut']
    assert {parse_inferred_instruction(s).status for s in samples} <= set(PARSE_STATUSES)


def test_unclosed_think_is_reasoning_not_instruction():
    assert parse_inferred_instruction("<think>The response is a haiku about rain, so").status == EMPTY
    p = parse_inferred_instruction('{"INFERRED INSTRUCTION": "Write a haiku."}\n<think>more')
    assert p.instruction == "Write a haiku."
