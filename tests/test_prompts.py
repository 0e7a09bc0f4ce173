"""The FLIP prompt text: the authors' system and user messages stay byte-for-byte, and the variants
share their wording."""

from flip_ray.text.prompts import (
    FLIP_SYSTEM_PROMPT,
    NO_REASONING_SYSTEM_PROMPT,
    PROMPT_TEMPLATE_VERSION,
    build_flip_messages,
)

# The authors' prompts/FLIP_SYSTEM.prompt, written out in full: any change to it needs a new
# PROMPT_TEMPLATE_VERSION (run manifests record it, and resume refuses a changed prompt).
AUTHORS_SYSTEM = """### Task Description
Please act as an instruction reconstructor. You will receive a model\u2011generated response. \
Read it carefully and infer the instruction or prompt that produced it.

Notes:
- Reconstruct a single instruction that would most plausibly generate the given response.
- Specify the user\u2019s intent, required output format, and any constraints.
- Be concise and concrete.
- Do not add information or assumptions beyond what appears in the response.
- Do not overfit to the specific phrasing or examples used in this response.
- Begin with a brief explanation of your reasoning.
- Please respond in the following JSON format: {"REASONING": "<explanation>", \
"INFERRED INSTRUCTION": "<instruction>"}"""


def test_authors_system_prompt_is_verbatim():
    assert FLIP_SYSTEM_PROMPT == AUTHORS_SYSTEM
    assert PROMPT_TEMPLATE_VERSION == "flip-v1"


def test_user_message_has_the_authors_layout():
    (system, user) = build_flip_messages("Paris is the capital of France.", variant="flip")
    assert system == {"role": "system", "content": AUTHORS_SYSTEM}
    assert user["content"] == (
        "[Response]\nParis is the capital of France.\n\n[Your Inferred Instruction]\n"
        'Respond in JSON format. {"REASONING": "<explanation>", "INFERRED INSTRUCTION": "<instruction>"}'
    )


def test_braces_in_a_response_are_kept():
    (_, user) = build_flip_messages('def f(): return {"a": 1}')
    assert 'def f(): return {"a": 1}' in user["content"]


def test_no_reasoning_variant_drops_only_the_reasoning_notes():
    lines = NO_REASONING_SYSTEM_PROMPT.splitlines()
    shared = AUTHORS_SYSTEM.splitlines()[:8]  # the task and the first four notes
    assert lines[:8] == shared
    assert lines[8:] == [
        "- Do not explain your answer.",
        '- Please respond in the following JSON format: {"INFERRED INSTRUCTION": "<instruction>"}',
    ]
    (_, user) = build_flip_messages("Hi.", variant="no_reasoning")
    assert user["content"].endswith('Respond in JSON format. {"INFERRED INSTRUCTION": "<instruction>"}')


def test_history_comes_first_and_few_shot_turns_precede_the_question():
    context = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]
    msgs = build_flip_messages("Banana is yellow.", context, variant="flip", few_shot=2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"].startswith(
        "[Conversation History]\nUser: Name a fruit.\n\nAssistant: Apple.\n\n[Response]"
    )
    assert '"REASONING"' in msgs[2]["content"] and '"INFERRED INSTRUCTION"' in msgs[2]["content"]
