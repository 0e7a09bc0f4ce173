"""The FLIP prompts: the authors' instruction-reconstruction system and user messages.

Text follows the public FLIP code (prompts/FLIP_SYSTEM.prompt, prompts/FLIP_USER.prompt). For a
multi-turn row the earlier turns go into the user message as a `[Conversation History]` block, as in
the authors' GRPO variant, so the model reconstructs only the last user turn.
"""

from __future__ import annotations

# Recorded in every run manifest; bump on any change to the text below.
PROMPT_TEMPLATE_VERSION = "flip-v1"

FLIP_SYSTEM_PROMPT = (
    "### Task Description\n"
    "Please act as an instruction reconstructor. You will receive a model\u2011generated response. "
    "Read it carefully and infer the instruction or prompt that produced it.\n"
    "\n"
    "Notes:\n"
    "- Reconstruct a single instruction that would most plausibly generate the given response.\n"
    "- Specify the user\u2019s intent, required output format, and any constraints.\n"
    "- Be concise and concrete.\n"
    "- Do not add information or assumptions beyond what appears in the response.\n"
    "- Do not overfit to the specific phrasing or examples used in this response.\n"
    "- Begin with a brief explanation of your reasoning.\n"
    '- Please respond in the following JSON format: {"REASONING": "<explanation>", '
    '"INFERRED INSTRUCTION": "<instruction>"}'
)

_JSON_REMINDER = 'Respond in JSON format. {"REASONING": "<explanation>", "INFERRED INSTRUCTION": "<instruction>"}'

FLIP_USER_TEMPLATE = "[Response]\n{response}\n\n[Your Inferred Instruction]\n" + _JSON_REMINDER.replace(
    "{", "{{"
).replace("}", "}}")

_HISTORY_HEADER = "[Conversation History]\n"
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_history(context: list[dict] | None) -> str:
    """Renders earlier turns as `Role: content` paragraphs; empty when there is no history."""
    if not context:
        return ""
    turns = [f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in context]
    return "\n\n".join(turns)


def build_flip_user_message(response: str, context: list[dict] | None = None) -> str:
    """The FLIP user message for one response, with the conversation history first if any."""
    body = FLIP_USER_TEMPLATE.format(response=response)
    history = render_history(context)
    if history:
        return f"{_HISTORY_HEADER}{history}\n\n{body}"
    return body


def build_flip_messages(response: str, context: list[dict] | None = None) -> list[dict]:
    """Chat messages asking the model to infer the instruction behind `response`.

    Args:
        response: The model response to read backwards.
        context: Earlier turns of a multi-turn conversation (`{role, content}` dicts), or None.

    Returns:
        `[system, user]` messages, ready for the model's chat template.
    """
    return [
        {"role": "system", "content": FLIP_SYSTEM_PROMPT},
        {"role": "user", "content": build_flip_user_message(response, context)},
    ]
