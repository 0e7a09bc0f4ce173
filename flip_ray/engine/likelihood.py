"""The likelihood form of backward inference (`flip_logprob`): the real instruction, teacher-forced
after the FLIP prompt about a response, scored by its log-probability in one prefill (vLLM
`prompt_logprobs`, no decoding). vllm is imported inside functions only."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from flip_ray.engine.generation import TRUNCATION_MARGIN, PromptFitter, render_and_run
from flip_ray.engine.specs import PromptSpec
from flip_ray.text.prompts import build_flip_messages, distractors_for, flip_answer_prefix
from flip_ray.text.rows import RowError

logger = logging.getLogger(__name__)


@dataclass
class Likelihood:
    """Log-probability of the real instruction as the answer to the FLIP question about a response."""

    logprob_sum: float | None = None
    logprob_mean: float | None = None
    tokens: int | None = None
    # logprob_mean minus the mean of the contrast instructions' logprob_mean (with distractors > 0)
    contrast: float | None = None
    n_prompt_tokens: int | None = None
    cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache (not prefilled again)
    truncated: bool = False
    error: str | None = None


class FlipLikelihood:
    """The likelihood form of backward inference: no decoding, one prefill per row.

    The FLIP prompt about the response is followed by the real instruction as the assistant's answer
    (teacher-forced); the reward is the mean log-probability of the instruction's tokens. For rows
    that share an instruction this ranks responses by how much they raise the instruction's
    probability (pointwise mutual information), and it never fails on answer format.

    Args:
        llm: A built `vllm.LLM`.
        prompt: The FLIP prompt, as in `FlipGenerator` (`guided_json` does not apply: nothing is decoded).
        logprob_format: `plain` (the answer is the instruction) or `json` (the instruction follows the
            opening of the JSON answer, `{"INFERRED INSTRUCTION": "`; that opening is not scored).
        distractors: Also score this many contrast instructions (`prompts.distractors_for`) after the
            same response, and report `contrast` = the real instruction's mean log-probability minus
            theirs: how much better the response explains its own instruction than generic ones.
            Costs one more prefill per distractor.
        reuse_prefix: Read the FLIP prompt's KV cache from the prefix cache (left by the generation
            pass over the same rows, or by the other instructions after the same response), so that
            only the instruction is prefilled; False: a full prefill per row (the path before).
    """

    def __init__(
        self,
        llm,
        prompt: PromptSpec | None = None,
        *,
        logprob_format: str = "plain",
        distractors: int = 0,
        reuse_prefix: bool = True,
    ):
        from vllm import SamplingParams

        self.prompt = prompt or PromptSpec()
        self.llm = llm
        self.distractors = distractors
        self.reuse_prefix = reuse_prefix
        self.tokenizer = llm.get_tokenizer()
        self.fitter = PromptFitter(self.tokenizer, self.prompt.chat_template_kwargs)
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.prefix_ids = self.tokenizer.encode(flip_answer_prefix(logprob_format), add_special_tokens=False)
        # prompt_logprobs=0 returns the log-probability of each prompt token as it stands. vLLM skips
        # reading the prefix cache for such requests by default, since cached tokens get no
        # log-probability; only the instruction's are needed, and they follow the FLIP prompt whose
        # KV cache the generation pass (or another instruction after the same response) has left.
        self.params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            skip_reading_prefix_cache=not reuse_prefix,
        )
        self.full_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    def _render(self, instruction: str, response: str, context: list[dict] | None) -> tuple[list[int], list[int], bool]:
        target = self.fitter.encode(instruction)
        if not target:
            raise RowError("instruction has no tokens")
        budget = self.max_model_len - 1 - len(self.prefix_ids) - len(target)
        if budget <= TRUNCATION_MARGIN * 8:
            raise RowError(f"instruction ({len(target)} tokens) is too long for the {self.max_model_len}-token window")
        ids, truncated = self.fitter.fit(
            lambda texts, ctx: build_flip_messages(
                texts[0], ctx, variant=self.prompt.variant, few_shot=self.prompt.few_shot
            ),
            [response],
            context,
            budget,
            f"the FLIP prompt with the instruction (window {self.max_model_len} tokens)",
        )
        return ids + self.prefix_ids, target, truncated

    def score(
        self, instructions: list[str], responses: list[str], contexts: list[list[dict] | None] | None = None
    ) -> list[Likelihood]:
        """Scores each row; a row that fails is returned with `error` set."""
        contexts = contexts if contexts is not None else [None] * len(responses)
        if not self.distractors:
            return self._score(instructions, responses, contexts)
        k = self.distractors
        flat_i, flat_r, flat_c = [], [], []
        for instruction, response, context in zip(instructions, responses, contexts, strict=True):
            for candidate in [instruction, *distractors_for(instruction, k)]:
                flat_i.append(candidate)
                flat_r.append(response)
                flat_c.append(context)
        flat = self._score(flat_i, flat_r, flat_c)
        out = []
        for row in range(len(instructions)):
            own, *others = flat[row * (k + 1) : (row + 1) * (k + 1)]
            failed = next((o.error for o in others if o.error), None)
            if own.error is None and failed is not None:
                own = Likelihood(truncated=own.truncated, error=f"contrast instruction: {failed}")
            elif own.error is None:
                own.contrast = own.logprob_mean - sum(o.logprob_mean for o in others) / len(others)
            out.append(own)
        return out

    def _score(self, instructions: list[str], responses: list[str], contexts: list) -> list[Likelihood]:
        def render(instruction: str, response: str, context) -> tuple[list[int], bool, list[int]]:
            ids, target, truncated = self._render(instruction, response, context)
            return ids + target, truncated, target

        renders = [partial(render, *row) for row in zip(instructions, responses, contexts, strict=True)]
        # The FLIP prompt (before the answer's opening and the instruction) is the prompt of the row's
        # generation, and of the other instructions scored after the same response.
        flip_prompt = (lambda ids, target: len(ids) - len(target) - len(self.prefix_ids)) if self.reuse_prefix else None
        results = run_likelihoods(self.llm, renders, self.params, flip_prompt)
        # A row whose instruction tokens were partly served from the prefix cache (a prompt seen
        # before, cache entries of an identical request) has no log-probability for them: that
        # row again, with a full prefill.
        again = [k for k, r in enumerate(results) if r is _CACHED]
        if again:
            logger.info("flip_logprob: %d row(s) prefilled again without the prefix cache", len(again))
            redo = run_likelihoods(self.llm, [renders[k] for k in again], self.full_params)
            for k, r in zip(again, redo, strict=True):
                results[k] = r if r is not _CACHED else Likelihood(error="no log-probabilities for the instruction")
        return results


def run_likelihoods(llm, renders: list, params, shared_prefix=None) -> list[Likelihood]:
    """`engine.render_and_run` of prompt-log-probability requests: each rendered row's
    `target_likelihood`, or a `Likelihood` with the row's error."""
    return render_and_run(llm, renders, params, target_likelihood, _failed, shared_prefix)


def _failed(message: str, truncated: bool) -> Likelihood:
    return Likelihood(truncated=truncated, error=message)


# `target_likelihood`'s answer for a row whose instruction tokens came (partly) from the prefix cache.
_CACHED = Likelihood(error="instruction tokens served from the prefix cache")


def target_likelihood(out, truncated: bool, target: list[int]) -> Likelihood:
    """The log-probability of the prompt's last tokens `target` (the instruction; the response for
    `pmi_forward`) from the prompt log-probabilities vLLM returned. With the
    prefix cache read, vLLM returns prompt log-probabilities for the computed (uncached) tokens
    only; the instruction, after the cached FLIP prompt, is normally all computed, and `_CACHED`
    says when it was not."""
    positions = (out.prompt_logprobs or [])[-len(target) :]
    if len(positions) < len(target) or any(
        pos is None or tok not in pos for pos, tok in zip(positions, target, strict=True)
    ):
        return _CACHED
    values = [pos[tok].logprob for pos, tok in zip(positions, target, strict=True)]
    total = float(sum(values))
    return Likelihood(
        logprob_sum=total,
        logprob_mean=total / len(values),
        tokens=len(values),
        n_prompt_tokens=len(out.prompt_token_ids),
        cached_tokens=out.num_cached_tokens or 0,
        truncated=truncated,
    )
