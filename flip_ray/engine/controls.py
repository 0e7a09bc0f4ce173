"""Likelihood rewards that discount word overlap: prefill only, no decoding.

`flip_logprob_lexical`: `flip_logprob` minus the same instruction's log-probability after a lexical
control of the response (`prompts.lexical_control`): only its words that also occur in the
instruction (`overlap`), or its words shuffled within each sentence (`shuffle`). Either control keeps
the words the response shares with the instruction, so whatever the instruction gains from them
(the restating hack) is in both terms and cancels; what remains is what the response says about the
instruction beyond those words.

`pmi_forward`: the forward direction, mean log P(response | instruction) minus mean log P(response |
a generic instruction), per response token: how much the instruction explains the response
(pointwise mutual information, the MMI criterion of Li et al. 2016, "A Diversity-Promoting
Objective Function for Neural Conversation Models"). Not FLIP, but the likelihood baseline next to it.

vLLM is imported inside functions only.
"""

from __future__ import annotations

from functools import partial

from flip_ray.engine.generation import TRUNCATION_MARGIN, PromptFitter
from flip_ray.engine.likelihood import FlipLikelihood, Likelihood, run_likelihoods
from flip_ray.engine.specs import PromptSpec
from flip_ray.text.prompts import lexical_control
from flip_ray.text.rows import RowError

GENERIC_INSTRUCTION = "Write a response."


class LexicalLikelihood:
    """`flip_logprob_lexical`: the real instruction's mean log-probability after the response minus
    after its lexical control (`prompts.lexical_control`), both as the answer to the FLIP question.

    Args:
        llm: A built `vllm.LLM`.
        prompt: The FLIP prompt, as in `FlipLikelihood`.
        logprob_format: As in `FlipLikelihood`.
        control: `shuffle` or `overlap` (`prompts.LEXICAL_CONTROLS`).
    """

    def __init__(
        self, llm, prompt: PromptSpec | None = None, *, logprob_format: str = "plain", control: str = "overlap"
    ):
        self.likelihood = FlipLikelihood(llm, prompt, logprob_format=logprob_format)
        self.control = control

    def score(
        self,
        instructions: list[str],
        responses: list[str],
        contexts: list[list[dict] | None] | None = None,
        own: list[Likelihood] | None = None,
    ) -> list[Likelihood]:
        """One result per row; `contrast` holds the reward (own minus control mean log-probability).
        `own`: the rows' `flip_logprob` results when already computed (same prompt and format), so
        that only the controls are prefilled."""
        contexts = contexts if contexts is not None else [None] * len(responses)
        n = len(responses)
        controls = [lexical_control(r, i, self.control) for r, i in zip(responses, instructions, strict=True)]
        if own is None:
            both = self.likelihood.score(
                [*instructions, *instructions], [*responses, *controls], [*contexts, *contexts]
            )
            own, control_results = both[:n], both[n:]
        else:
            control_results = self.likelihood.score(instructions, controls, contexts)
        out = []
        for mine, control in zip(own, control_results, strict=True):
            if mine.error is not None:
                out.append(Likelihood(truncated=mine.truncated, error=mine.error))
            elif control.error is not None:
                out.append(Likelihood(truncated=mine.truncated, error=f"lexical control: {control.error}"))
            else:
                out.append(
                    Likelihood(
                        logprob_sum=mine.logprob_sum,
                        logprob_mean=mine.logprob_mean,
                        tokens=mine.tokens,
                        contrast=mine.logprob_mean - control.logprob_mean,
                        n_prompt_tokens=mine.n_prompt_tokens,
                        truncated=mine.truncated or control.truncated,
                    )
                )
        return out


class ForwardLikelihood:
    """`pmi_forward`: mean log P(response | instruction) - mean log P(response | generic instruction).

    Both requests see the same response tokens (cut to fit the window after the longer prompt, the
    row flagged truncated), so the two means are over the same tokens.
    """

    def __init__(self, llm, prompt: PromptSpec | None = None, generic: str = GENERIC_INSTRUCTION):
        from vllm import SamplingParams

        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.fitter = PromptFitter(self.tokenizer, (prompt or PromptSpec()).chat_template_kwargs)
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.generic = generic
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    def _render(self, instruction: str, response: str, context, condition: str) -> tuple[list[int], bool, list[int]]:
        conditional = self.fitter.ids([*(context or []), {"role": "user", "content": instruction}])
        generic = self.fitter.ids([*(context or []), {"role": "user", "content": self.generic}])
        target = self.fitter.encode(response)
        if not target:
            raise RowError("response has no tokens")
        budget = self.max_model_len - 1 - max(len(conditional), len(generic)) - TRUNCATION_MARGIN
        if budget <= TRUNCATION_MARGIN:
            raise RowError(
                "the instruction (with its history) leaves no room for the response "
                f"in the {self.max_model_len}-token window"
            )
        truncated = len(target) > budget
        target = target[:budget]
        prompt = conditional if condition == "instruction" else generic
        return prompt + target, truncated, target

    def score(
        self, instructions: list[str], responses: list[str], contexts: list[list[dict] | None] | None = None
    ) -> list[Likelihood]:
        """One result per row; `contrast` holds `pmi_forward`, `logprob_mean` the conditional mean."""
        contexts = contexts if contexts is not None else [None] * len(responses)
        rows = list(zip(instructions, responses, contexts, strict=True))
        renders = [partial(self._render, *row, condition) for condition in ("instruction", "generic") for row in rows]
        results = run_likelihoods(self.llm, renders, self.params)
        n = len(rows)
        out = []
        for conditional, generic in zip(results[:n], results[n:], strict=True):
            if conditional.error is None and generic.error is not None:
                conditional = Likelihood(truncated=conditional.truncated, error=f"generic instruction: {generic.error}")
            elif conditional.error is None:
                conditional.contrast = conditional.logprob_mean - generic.logprob_mean
            out.append(conditional)
        return out
