"""Row-level rules: what the instruction, response and context of a row are, and its id.

Pure functions on plain values; a row that breaks a rule raises `RowError`, which the reader turns
into a recorded per-row error instead of a crash.
"""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ", re.MULTILINE)


class RowError(ValueError):
    """This row cannot be scored; the message is stored in its `error` column."""


class InputError(ValueError):
    """The input cannot be read as configured; the message names the path or column."""


def derive_id(shard_key: str, index: int) -> str:
    """Stable id for a row without an id column: its file (relative to the input) and position."""
    return f"{shard_key}:{index}"


def text_field(value: Any, name: str) -> str:
    """Returns `value` if it is a non-blank string, else raises RowError naming the field."""
    if value is None:
        raise RowError(f"{name} is null")
    if not isinstance(value, str):
        raise RowError(f"{name} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError(f"{name} is empty" if not value else f"{name} is whitespace only")
    return value


def conversation_parts(messages: Any) -> tuple[str, str, list[dict]]:
    """Splits a chat into (instruction, response, context).

    The response is the last turn, which must be the assistant's; the instruction is the whole
    user turn right before it; everything earlier is context.

    Raises:
        RowError: Not a list of `{role, content}` turns, an unknown role, no user or assistant
            turn in the right place, or empty text.
    """
    if messages is None:
        raise RowError("messages is null")
    if not isinstance(messages, (list, tuple)):
        raise RowError(f"messages is {type(messages).__name__}, expected a list of {{role, content}}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"messages[{i}] is not a {{role, content}} object")
        if m["role"] not in ROLES:
            raise RowError(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        turns.append({"role": m["role"], "content": text_field(m["content"], f"messages[{i}].content")})
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("messages has no assistant turn")
    if not any(t["role"] == "user" for t in turns):
        raise RowError("messages has no user turn")
    if turns[-1]["role"] != "assistant":
        raise RowError(f"messages ends with a {turns[-1]['role']} turn; the last turn must be the assistant's response")
    if len(turns) < 2 or turns[-2]["role"] != "user":
        raise RowError("the assistant's last turn does not follow a user turn")
    return turns[-2]["content"], turns[-1]["content"], turns[:-2]


def parse_transcript(text: str) -> list[dict] | None:
    """An HH-RLHF style transcript ("Human: ...\\n\\nAssistant: ...") as chat turns, or None if
    `text` is not one."""
    if not text.lstrip().startswith("Human:"):
        return None
    marks = list(_HH_TURN.finditer(text.lstrip()))
    body = text.lstrip()
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(body)
        content = body[m.end() : end].strip()
        turns.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": content})
    if len(turns) < 1 or turns[-1]["role"] != "user":
        return None
    return turns


def prompt_parts(prompt) -> tuple[str, list[dict]]:
    """(instruction, earlier turns) of a pair's prompt: a string, an HH transcript or a chat.

    Raises:
        RowError: An empty prompt, or a chat that does not end with a user turn.
    """
    if isinstance(prompt, str):
        turns = parse_transcript(prompt)
        if turns is None:
            return text_field(prompt, "prompt"), []
        prompt = turns
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RowError(f"prompt is {type(prompt).__name__}, expected a string or a list of {{role, content}}")
    turns = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RowError(f"prompt[{i}] is not a {{role, content}} turn with a role in {ROLES}")
        turns.append({"role": m["role"], "content": text_field(m.get("content"), f"prompt[{i}].content")})
    if turns[-1]["role"] != "user":
        raise RowError(f"prompt ends with a {turns[-1]['role']} turn; the last turn must be the user's instruction")
    return turns[-1]["content"], turns[:-1]
