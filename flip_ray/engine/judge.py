"""LLM-as-a-judge baselines: the authors' pointwise, pairwise and listwise judge prompts, and `Judge`,
which runs them on a `vllm.LLM` (the verdict parsers are in `verdicts.py`).

Text follows the public FLIP code, repo yikee/FLIP at commit 7bbe2c9866df4d6c739b27bb35ee26b33c24ff40:
prompts/llmjudge_pointwise_rating_{SYSTEM,USER}.prompt, prompts/llmjudge_pairwise_ranking_{SYSTEM,USER}.prompt
and prompts/llmjudge_listwise_ranking_{SYSTEM,USER}.prompt. The files are `str.format` templates, so their
`{{`/`}}` are escapes: the system prompts are stored here rendered (single braces), as prompts.py does for
FLIP, and the user templates are kept as written.

Two things the files leave open are filled in here:
- The authors' prompts have no slot for earlier turns. A multi-turn row gets them as a `[Conversation
  History]` block before the user message, exactly as the FLIP prompt does (prompts.render_history).
- The listwise `{response_list}` layout is not in the repo. The system prompt asks for "the index (starting
  from 0)", so each answer is labelled `[AI Response i]` with i from 0, in the style of the pairwise
  `[AI Response A]`, and the parser reads the model's index as 0-based.
"""

from __future__ import annotations

from flip_ray.engine.generation import Generation, PromptFitter, render_and_generate, request_seed, structured_outputs
from flip_ray.engine.specs import PromptSpec
from flip_ray.text.prompts import HISTORY_HEADER, render_history

# Recorded in every run manifest; bump on any change to the prompt text or layout below.
JUDGE_PROMPT_VERSION = "judge-v1"

SCORE_MIN, SCORE_MAX = 1, 10  # "a score on a scale of 1 to 10"
PAIRWISE_CHOICES = ("A", "B")  # the prompt allows no tie

_NOTES = (
    "Notes:\n"
    "- Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
    "creativity, and appropriate level of detail of the response.\n"
)

POINTWISE_SYSTEM_PROMPT = (
    "### Task Description\n"
    "Please act as an impartial judge and evaluate the quality of the answer provided by an AI assistant "
    "to the user query displayed below. Judge whether the provided answer is good.\n"
    "\n" + _NOTES + "- Begin your evaluation by providing a short explanation.\n"
    "- Be as objective as possible. After providing your short explanation, please output a score on a "
    "scale of 1 to 10.\n"
    '- Please respond in the following JSON format: {"REASONING": "[...]", "SCORE": "<your-score>"}'
)

POINTWISE_USER_TEMPLATE = (
    "[Query]\n{prompt}\n\n"
    "[AI Answer]\n{response}\n\n"
    "[Your judgement]\n"
    'Respond in JSON format. {{"REASONING": "[...]", "SCORE": "<your-score>"}}'
)

PAIRWISE_SYSTEM_PROMPT = (
    "### Task Description\n"
    "Please act as an impartial judge and evaluate the quality of the answers provided by AI assistants "
    "to the user query displayed below.\n"
    "\n" + _NOTES + "- Begin your evaluation by briefly explaining your reasoning for selecting the best response.\n"
    '- Be as objective as possible. After providing your short explanation, output either "A" or "B" '
    "depending on which response is better.\n"
    "- Please respond in the following JSON format:\n"
    "{\n"
    '  "REASONING": "[...your explanation of why the chosen response is best...]",\n'
    '  "BETTER_RESPONSE": "A" or "B"\n'
    "}"
)

PAIRWISE_USER_TEMPLATE = (
    "[Query]\n{prompt}\n\n"
    "[AI Response A]\n{response1}\n\n"
    "[AI Response B]\n{response2}\n\n"
    "[Your judgement]\n"
    'Respond in JSON format. {{"REASONING": "[...your explanation of why the chosen response is best...]", '
    '"BETTER_RESPONSE":"A" or "B"}}'
)

LISTWISE_SYSTEM_PROMPT = (
    "### Task Description\n"
    "Please act as an impartial judge and evaluate the quality of the answers provided by AI assistants "
    "to the user query displayed below.\n"
    "\n" + _NOTES + "- Begin your evaluation by briefly explaining your reasoning for selecting the best response.\n"
    "- Be as objective as possible. After providing your short explanation, output the index (starting "
    "from 0) of the best response.\n"
    "- Please respond in the following JSON format:\n"
    "{\n"
    '  "REASONING": "[...your explanation of why the chosen response is best...]",\n'
    '  "BEST_RESPONSE_INDEX": <index-of-best-response>\n'
    "}"
)

LISTWISE_USER_TEMPLATE = (
    "[Query]\n{prompt}\n\n"
    "[AI Answers]\n{response_list}\n\n"
    "[Your judgement]\n"
    'Respond in JSON format. {{"REASONING": "[...your explanation of why the chosen response is best...]", '
    '"BEST_RESPONSE_INDEX": <index-of-best-response>}}'
)

# Our layout for {response_list} (not in the authors' repo); 0-based to match "index (starting from 0)".
LISTWISE_ITEM_TEMPLATE = "[AI Response {index}]\n{response}"

# Answer schemas for guided decoding. Keys and their order are the prompt's, so REASONING comes first.
# The prompt shows SCORE quoted ("<your-score>"); guided decoding asks for an integer, which the parser
# reads either way.
POINTWISE_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "REASONING": {"type": "string"},
        "SCORE": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
    },
    "required": ["REASONING", "SCORE"],
    "additionalProperties": False,
}

PAIRWISE_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "REASONING": {"type": "string"},
        "BETTER_RESPONSE": {"type": "string", "enum": list(PAIRWISE_CHOICES)},
    },
    "required": ["REASONING", "BETTER_RESPONSE"],
    "additionalProperties": False,
}


def listwise_json_schema(n: int) -> dict:
    """The listwise answer schema for `n` responses: BEST_RESPONSE_INDEX an integer in [0, n-1]."""
    if n < 1:
        raise ValueError(f"listwise judging needs at least one response, got n={n}")
    return {
        "type": "object",
        "properties": {
            "REASONING": {"type": "string"},
            "BEST_RESPONSE_INDEX": {"type": "integer", "minimum": 0, "maximum": n - 1},
        },
        "required": ["REASONING", "BEST_RESPONSE_INDEX"],
        "additionalProperties": False,
    }


def _messages(system: str, body: str, context: list[dict] | None) -> list[dict]:
    history = render_history(context)
    user = f"{HISTORY_HEADER}{history}\n\n{body}" if history else body
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def pointwise_messages(instruction: str, response: str, context: list[dict] | None = None) -> list[dict]:
    """Chat messages asking the judge to rate one response from 1 to 10.

    Args:
        instruction: The user query the response answers (the last user turn).
        response: The response to rate.
        context: Earlier turns of a multi-turn conversation (`{role, content}` dicts), or None.

    Returns:
        `[system, user]` messages, ready for the model's chat template.
    """
    body = POINTWISE_USER_TEMPLATE.format(prompt=instruction, response=response)
    return _messages(POINTWISE_SYSTEM_PROMPT, body, context)


def pairwise_messages(
    instruction: str, response_a: str, response_b: str, context: list[dict] | None = None
) -> list[dict]:
    """Chat messages asking the judge which of two responses is better ("A" or "B").

    Args:
        instruction: The user query both responses answer.
        response_a: Shown first, as `[AI Response A]`.
        response_b: Shown second, as `[AI Response B]`.
        context: Earlier turns of a multi-turn conversation, or None.

    Returns:
        `[system, user]` messages. Position bias is the caller's to control (e.g. judge both orders).
    """
    body = PAIRWISE_USER_TEMPLATE.format(prompt=instruction, response1=response_a, response2=response_b)
    return _messages(PAIRWISE_SYSTEM_PROMPT, body, context)


def listwise_messages(instruction: str, responses: list[str], context: list[dict] | None = None) -> list[dict]:
    """Chat messages asking the judge for the 0-based index of the best of `responses`.

    Args:
        instruction: The user query all responses answer.
        responses: The candidates, shown in order as `[AI Response 0]`, `[AI Response 1]`, ...
        context: Earlier turns of a multi-turn conversation, or None.

    Returns:
        `[system, user]` messages.
    """
    if not responses:
        raise ValueError("listwise judging needs at least one response")
    response_list = "\n\n".join(
        LISTWISE_ITEM_TEMPLATE.format(index=i, response=response) for i, response in enumerate(responses)
    )
    body = LISTWISE_USER_TEMPLATE.format(prompt=instruction, response_list=response_list)
    return _messages(LISTWISE_SYSTEM_PROMPT, body, context)


class Judge:
    """The same model as an LLM judge (the authors' prompts above): a baseline for FLIP.

    Args:
        llm: A built `vllm.LLM`.
        prompt: Only its chat-template arguments and `guided_json` (constrain decoding to the JSON
            verdict the prompt asks for) apply.
        max_tokens, temperature, seed: Sampling parameters of the verdict.
    """

    def __init__(
        self, llm, prompt: PromptSpec | None = None, *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0
    ):
        prompt = prompt or PromptSpec()
        self.llm = llm
        self.fitter = PromptFitter(llm.get_tokenizer(), prompt.chat_template_kwargs)
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.guided_json = prompt.guided_json

    def _params(self, schema: dict):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=request_seed(self.seed, self.temperature),
            structured_outputs=structured_outputs(schema if self.guided_json else None),
        )

    def _fit(self, build, texts: list[str], context: list[dict] | None) -> tuple[list[int], bool]:
        budget = self.max_model_len - self.max_tokens
        return self.fitter.fit(build, texts, context, budget, f"the judge prompt (window {self.max_model_len} tokens)")

    def pointwise(
        self, instructions: list[str], responses: list[str], contexts: list[list[dict] | None] | None = None
    ) -> list[Generation]:
        """1-10 verdicts, one per (instruction, response); parse with `judge.parse_pointwise`."""
        contexts = contexts if contexts is not None else [None] * len(responses)
        renders = [
            (lambda q=q, r=r, c=c: self._fit(lambda t, ctx, q=q: pointwise_messages(q, t[0], ctx), [r], c))
            for q, r, c in zip(instructions, responses, contexts, strict=True)
        ]
        return render_and_generate(self.llm, renders, self._params(POINTWISE_JSON_SCHEMA))

    def pairwise(
        self, instructions: list[str], pairs: list[tuple[str, str]], contexts: list[list[dict] | None] | None = None
    ) -> list[Generation]:
        """A/B verdicts, one per (instruction, (response A, response B)); parse with `judge.parse_pairwise`."""
        contexts = contexts if contexts is not None else [None] * len(pairs)
        renders = [
            (lambda q=q, p=p, c=c: self._fit(lambda t, ctx, q=q: pairwise_messages(q, t[0], t[1], ctx), list(p), c))
            for q, p, c in zip(instructions, pairs, contexts, strict=True)
        ]
        return render_and_generate(self.llm, renders, self._params(PAIRWISE_JSON_SCHEMA))

    def listwise(
        self, instructions: list[str], candidates: list[list[str]], contexts: list[list[dict] | None] | None = None
    ) -> list[Generation]:
        """Best-index verdicts, one per (instruction, responses); parse with `judge.parse_listwise`."""
        contexts = contexts if contexts is not None else [None] * len(candidates)
        renders, params = [], []
        for q, cands, c in zip(instructions, candidates, contexts, strict=True):
            renders.append(
                lambda q=q, cands=cands, c=c: self._fit(
                    lambda t, ctx, q=q: listwise_messages(q, t, ctx), list(cands), c
                )
            )
            params.append(self._params(listwise_json_schema(len(cands))))
        return render_and_generate(self.llm, renders, params)
