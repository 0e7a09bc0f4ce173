"""In-process FLIP scoring with an engine you already hold, e.g. as a GRPO reward function.

    from vllm import LLM
    from flip_ray.scorer import FlipScorer

    scorer = FlipScorer(LLM(model="/path/to/checkpoint"), max_tokens=128)
    rewards = scorer(prompts=["Write a haiku about rain."], completions=["Soft rain on the roof..."])

Same prompts, truncation, parser and metric as the batch job. `prompts` may be strings or chat
message lists (the last user turn is the instruction, earlier turns are context); `completions`
may be strings or message lists (the last message's content is the response).
"""

from __future__ import annotations

from typing import Any

from flip_ray.engine.generation import FlipGenerator
from flip_ray.engine.likelihood import FlipLikelihood
from flip_ray.engine.specs import PromptSpec, SamplingSpec
from flip_ray.rewards.flip_f1 import FlipScore, score_generations
from flip_ray.text.rows import RowError, conversation_parts, text_field


def _response_text(completion: Any) -> str:
    if isinstance(completion, (list, tuple)):
        if not completion:
            raise RowError("completion is an empty message list")
        completion = completion[-1].get("content") if isinstance(completion[-1], dict) else None
    return text_field(completion, "response")


def _instruction_and_context(prompt: Any, response: str) -> tuple[str, list[dict] | None]:
    if isinstance(prompt, (list, tuple)):
        instruction, _, context = conversation_parts([*prompt, {"role": "assistant", "content": response}])
        return instruction, context or None
    return text_field(prompt, "prompt"), None


def _split_rows(prompts: list[Any], responses: list[Any]) -> tuple[list, list[int], list[str], list[str], list]:
    """(results with a RowError at each pair that cannot be scored and None elsewhere, indices of the
    scorable pairs, and their instructions, response texts and contexts)."""
    results: list = [None] * len(prompts)
    todo, instructions, texts, contexts = [], [], [], []
    for i, (prompt, completion) in enumerate(zip(prompts, responses, strict=True)):
        try:
            response = _response_text(completion)
            instruction, context = _instruction_and_context(prompt, response)
        except RowError as e:
            results[i] = e
            continue
        todo.append(i)
        instructions.append(instruction)
        texts.append(response)
        contexts.append(context)
    return results, todo, instructions, texts, contexts


class FlipScorer:
    """FLIP rewards for (prompt, response) pairs from a `vllm.LLM`.

    Defaults are the scoring job's (`PromptSpec`, `SamplingSpec`): `FlipScorer(llm)` gives the same
    rewards as `flip-ray score` with its defaults on the same engine.

    Args:
        llm: A built `vllm.LLM`.
        variant, few_shot, chat_template_kwargs, guided_json: The FLIP prompt, as `reward.prompt`,
            `reward.few_shot`, `model.chat_template_kwargs` and `reward.guided_json` in the job.
        temperature, top_p, max_tokens, seed, n: Sampling of `flip`, as `sampling.*` (greedy).
        aggregate: How F1 over n samples is combined (`mean` or `max`).
        error_reward: The reward given to a pair that cannot be scored (empty text, too long).
        likelihood: If true, `__call__` returns the `flip_logprob` reward (mean log-probability of the
            real instruction given the response; one prefill, no decoding) instead of the F1 reward.
        logprob_format: `flip_logprob` scores the instruction alone (`plain`) or inside the JSON answer.
    """

    def __init__(
        self,
        llm,
        *,
        variant: str = PromptSpec.variant,
        few_shot: int = PromptSpec.few_shot,
        chat_template_kwargs: dict | None = None,
        guided_json: bool = PromptSpec.guided_json,
        temperature: float = SamplingSpec.temperature,
        top_p: float = SamplingSpec.top_p,
        max_tokens: int = SamplingSpec.max_tokens,
        seed: int = SamplingSpec.seed,
        n: int = SamplingSpec.n,
        aggregate: str = "mean",
        error_reward: float = 0.0,
        likelihood: bool = False,
        logprob_format: str = "plain",
    ):
        prompt = PromptSpec(variant, few_shot, dict(chat_template_kwargs or {}), guided_json)
        sampling = SamplingSpec(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, n=n)
        self.generator = FlipGenerator(llm, prompt, sampling)
        self.lk = FlipLikelihood(llm, prompt, logprob_format=logprob_format)
        self.likelihood = likelihood
        self.aggregate = aggregate
        self.error_reward = error_reward

    def score(self, prompts: list[Any], responses: list[Any]) -> list[FlipScore | RowError]:
        """Scores each pair; a pair that cannot be scored yields a `RowError` in its place."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        results, todo, instructions, texts, contexts = _split_rows(prompts, responses)
        for i, instruction, g in zip(todo, instructions, self.generator.generate(texts, contexts), strict=False):
            if g.error is not None or not g.texts:
                results[i] = RowError(g.error or "engine returned no output")
            else:
                results[i] = score_generations(instruction, g.texts, self.aggregate)
        return results  # type: ignore[return-value]

    def log_likelihoods(self, prompts: list[Any], responses: list[Any]) -> list[float | RowError]:
        """`flip_logprob` per pair: the mean log-probability of the instruction given the response."""
        results, todo, instructions, texts, contexts = _split_rows(prompts, responses)
        for i, out in zip(todo, self.lk.score(instructions, texts, contexts), strict=True):
            results[i] = RowError(out.error) if out.error else out.logprob_mean
        return results  # type: ignore[return-value]

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        """Reward-function form (TRL's GRPOTrainer calling convention): one float per completion."""
        if self.likelihood:
            return [
                r if isinstance(r, float) else self.error_reward for r in self.log_likelihoods(prompts, completions)
            ]
        return [
            r.flip_score if isinstance(r, FlipScore) else self.error_reward for r in self.score(prompts, completions)
        ]
