"""The FLIP prompts: the authors' instruction-reconstruction system and user messages.

Text follows the public FLIP code (prompts/FLIP_SYSTEM.prompt, prompts/FLIP_USER.prompt). For a
multi-turn row the earlier turns go into the user message as a `[Conversation History]` block, as in
the authors' GRPO variant, so the model reconstructs only the last user turn.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from flip_ray.text.metrics import normalize_answer, tokens

# Recorded in every run manifest; bump on any change to the text below.
PROMPT_TEMPLATE_VERSION = "flip-v1"

_TASK = (
    "### Task Description\n"
    "Please act as an instruction reconstructor. You will receive a model\u2011generated response. "
    "Read it carefully and infer the instruction or prompt that produced it.\n"
    "\n"
    "Notes:\n"
)
_NOTES = (
    "- Reconstruct a single instruction that would most plausibly generate the given response.\n"
    "- Specify the user\u2019s intent, required output format, and any constraints.\n"
    "- Be concise and concrete.\n"
    "- Do not add information or assumptions beyond what appears in the response.\n"
)
_USER_HEAD = "[Response]\n{response}\n\n[Your Inferred Instruction]\n"

FLIP_SYSTEM_PROMPT = (
    _TASK + _NOTES + "- Do not overfit to the specific phrasing or examples used in this response.\n"
    "- Begin with a brief explanation of your reasoning.\n"
    '- Please respond in the following JSON format: {"REASONING": "<explanation>", '
    '"INFERRED INSTRUCTION": "<instruction>"}'
)
FLIP_USER_TEMPLATE = (
    _USER_HEAD + 'Respond in JSON format. {{"REASONING": "<explanation>", "INFERRED INSTRUCTION": "<instruction>"}}'
)

# A prompt that asks for the instruction alone: no reasoning to spend the token budget on.
NO_REASONING_SYSTEM_PROMPT = (
    _TASK + _NOTES + "- Do not explain your answer.\n"
    '- Please respond in the following JSON format: {"INFERRED INSTRUCTION": "<instruction>"}'
)
NO_REASONING_USER_TEMPLATE = _USER_HEAD + 'Respond in JSON format. {{"INFERRED INSTRUCTION": "<instruction>"}}'
# Two variants against copying and echoing (issue 25's levers, docs/EVAL.md): the answer's format said
# in words, with no literal placeholder or answer header for a small model to repeat (`no_placeholder`),
# and that plus a request for the user's own words, never quoting the response (`own_words`).
_ANSWER_IN_WORDS = (
    '- Respond in JSON with exactly one key, "INFERRED INSTRUCTION", whose value is the instruction '
    "as the user would have typed it.\n"
)
NO_PLACEHOLDER_SYSTEM_PROMPT = _TASK + _NOTES + "- Do not explain your answer.\n" + _ANSWER_IN_WORDS
OWN_WORDS_SYSTEM_PROMPT = (
    _TASK + _NOTES + "- Write the request in the user's own words: never quote or copy sentences from the response, "
    "and do not start the way the response starts.\n"
    "- Do not explain your answer.\n" + _ANSWER_IN_WORDS
)
_IN_WORDS_USER_TEMPLATE = (
    "[Response]\n{response}\n\nWhat instruction did the user give to get this response? "
    'Answer with the JSON object only, its one key "INFERRED INSTRUCTION".'
)
PROMPT_VARIANTS = ("flip", "no_reasoning", "no_placeholder", "own_words")
# The job's default and every class's (docs/EVAL.md: best for both FLIP forms with the embedded model).
DEFAULT_PROMPT_VARIANT = "no_reasoning"
_SYSTEM_PROMPTS = {
    "flip": FLIP_SYSTEM_PROMPT,
    "no_reasoning": NO_REASONING_SYSTEM_PROMPT,
    "no_placeholder": NO_PLACEHOLDER_SYSTEM_PROMPT,
    "own_words": OWN_WORDS_SYSTEM_PROMPT,
}
_USER_TEMPLATES = {
    "flip": FLIP_USER_TEMPLATE,
    "no_reasoning": NO_REASONING_USER_TEMPLATE,
    "no_placeholder": _IN_WORDS_USER_TEMPLATE,
    "own_words": _IN_WORDS_USER_TEMPLATE,
}

# Worked examples for few-shot prompting, written for flip_ray (not taken from any evaluation set).
FEW_SHOT_EXAMPLES = (
    {
        "response": "Crimson leaves let go,\ndrifting on the cooling wind:\nthe maple exhales.",
        "reasoning": "A three-line poem in 5-7-5 syllables about falling autumn leaves: a haiku.",
        "instruction": "Write a haiku about autumn leaves.",
    },
    {
        "response": 'def reverse_words(s: str) -> str:\n    return " ".join(reversed(s.split()))\n\n'
        "This splits the sentence on whitespace, reverses the list of words and joins them back.",
        "reasoning": "A short Python function that reverses word order, followed by a one-line explanation.",
        "instruction": "Write a Python function that reverses the order of the words in a sentence "
        "and explain how it works.",
    },
    {
        "response": "1. Keep a fixed wake-up time, even at weekends.\n2. Avoid screens for an hour before bed.\n"
        "3. Keep the bedroom cool, dark and quiet.",
        "reasoning": "A numbered list of exactly three practical sleep tips.",
        "instruction": "Give me three tips for sleeping better.",
    },
)

HISTORY_HEADER = "[Conversation History]\n"
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_history(context: list[dict] | None) -> str:
    """Renders earlier turns as `Role: content` paragraphs; empty when there is no history."""
    if not context:
        return ""
    turns = [f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in context]
    return "\n\n".join(turns)


def build_flip_user_message(
    response: str, context: list[dict] | None = None, variant: str = DEFAULT_PROMPT_VARIANT
) -> str:
    """The FLIP user message for one response, with the conversation history first if any."""
    body = _USER_TEMPLATES[variant].format(response=response)
    history = render_history(context)
    if history:
        return f"{HISTORY_HEADER}{history}\n\n{body}"
    return body


def _few_shot_turns(variant: str, few_shot: int) -> list[dict]:
    turns = []
    for example in FEW_SHOT_EXAMPLES[:few_shot]:
        answer = {"INFERRED INSTRUCTION": example["instruction"]}
        if variant == "flip":
            answer = {"REASONING": example["reasoning"], **answer}
        turns.append({"role": "user", "content": build_flip_user_message(example["response"], None, variant)})
        turns.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    return turns


def build_flip_messages(
    response: str, context: list[dict] | None = None, *, variant: str = DEFAULT_PROMPT_VARIANT, few_shot: int = 0
) -> list[dict]:
    """Chat messages asking the model to infer the instruction behind `response`.

    Args:
        response: The model response to read backwards.
        context: Earlier turns of a multi-turn conversation (`{role, content}` dicts), or None.
        variant: `flip` (the authors' prompt: reasoning, then the instruction, as JSON),
            `no_reasoning` (the instruction alone, as JSON with one key), `no_placeholder` (the same,
            its format said in words: no placeholder to repeat) or `own_words` (that, asking for the
            user's own words and no quoting).
        few_shot: Worked examples (from `FEW_SHOT_EXAMPLES`) given as earlier turns, 0 to 3.

    Returns:
        `[system, (user, assistant) * few_shot, user]` messages, ready for the model's chat template.
    """
    if variant not in PROMPT_VARIANTS:
        raise ValueError(f"unknown FLIP prompt variant {variant!r}; expected one of {PROMPT_VARIANTS}")
    return [
        {"role": "system", "content": _SYSTEM_PROMPTS[variant]},
        *_few_shot_turns(variant, few_shot),
        {"role": "user", "content": build_flip_user_message(response, context, variant)},
    ]


# Contrast instructions for the likelihood method (`reward.logprob_distractors`): generic requests of
# many kinds, written for flip_ray. A response that makes every instruction likely is not evidence for
# its own; the contrast score subtracts how likely these are given the same response.
DISTRACTOR_INSTRUCTIONS = (
    "Write a short poem about the ocean.",
    "Explain how vaccines train the immune system.",
    "Write a Python function that checks whether a number is prime.",
    "Summarize the plot of a famous novel in three sentences.",
    "Give me five ideas for a child's birthday party.",
    "Translate the sentence 'Where is the train station?' into French.",
    "What are the pros and cons of working from home?",
    "Write a polite email asking my manager for a day off.",
    "Solve for x: 3x + 7 = 22.",
    "Describe the water cycle for a ten-year-old.",
    "Recommend three books for someone who likes science fiction.",
    "Write a product description for a reusable water bottle.",
    "What caused the fall of the Roman Empire?",
    "Create a weekly workout plan for a beginner.",
    "Write a SQL query that returns the ten most recent orders.",
    "Give me a recipe for a vegetarian pasta dish.",
    "Explain the difference between weather and climate.",
    "Write a short story about a robot who learns to paint.",
    "How do I change a flat tire on a bicycle?",
    "List the planets of the solar system in order from the sun.",
    "Write a cover letter for a junior accountant position.",
    "What is the capital of Australia, and why was it chosen?",
    "Suggest a name for a coffee shop and explain the choice.",
    "Rewrite this sentence to be more formal: 'gonna be late, sorry'.",
)


def distractors_for(instruction: str, k: int) -> list[str]:
    """`k` contrast instructions for `instruction`, the same every time for the same instruction (so
    every response to one prompt is contrasted with the same ones)."""
    pool = [d for d in DISTRACTOR_INSTRUCTIONS if d.strip().lower() != instruction.strip().lower()]
    seed = int.from_bytes(hashlib.sha1(instruction.encode()).digest()[:8], "big")
    return random.Random(seed).sample(pool, min(k, len(pool)))


LOGPROB_FORMATS = ("plain", "json")
LEXICAL_CONTROLS = ("overlap", "shuffle")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def lexical_control(response: str, instruction: str, kind: str = "overlap") -> str:
    """A response's lexical control for `flip_logprob_lexical`: the words it shares with the
    instruction kept, its meaning taken away.

    `overlap`: only its words that also occur in the instruction (SQuAD-normalised), in order: the
    restatement alone, empty when it shares none. `shuffle`: its words shuffled within each sentence,
    seeded by the text (the same response always gets the same control): the same vocabulary,
    little of the meaning.
    """
    if kind == "overlap":
        shared = set(tokens(instruction))
        return " ".join(w for w in response.split() if normalize_answer(w) in shared)
    if kind != "shuffle":
        raise ValueError(f"lexical control must be one of {LEXICAL_CONTROLS}, got {kind!r}")
    rng = random.Random(hashlib.sha1(response.encode()).digest())
    sentences = []
    for sentence in _SENTENCE_END.split(response):
        words = sentence.split()
        rng.shuffle(words)
        if words:
            sentences.append(" ".join(words))
    return "\n".join(sentences) or response


def flip_answer_prefix(logprob_format: str) -> str:
    """What the likelihood method teacher-forces ahead of the real instruction, unscored: nothing
    (`plain`: the answer is the instruction itself) or the opening of the JSON answer the prompt asks
    for (`json`)."""
    if logprob_format not in LOGPROB_FORMATS:
        raise ValueError(f"unknown logprob format {logprob_format!r}; expected one of {LOGPROB_FORMATS}")
    return "" if logprob_format == "plain" else '{"INFERRED INSTRUCTION": "'
