"""Backward inference on a vLLM engine: FLIP prompts in, raw answers out.

`FlipGenerator` wraps a `vllm.LLM` you already have: it renders each response into the FLIP chat
prompt with the model's chat template, truncates what does not fit the model window (flagging it),
and generates. vllm is imported here only, inside functions, so CPU-side modules stay light.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flip_ray.prompts import build_flip_messages
from flip_ray.records import RowError

logger = logging.getLogger(__name__)

# Tokens kept free under the window so that re-tokenising a cut response cannot overflow it.
_TRUNCATION_MARGIN = 8


@dataclass
class Generation:
    """What the engine produced for one row; plain types only."""

    texts: list[str]
    finish_reason: str | None = None
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    truncated: bool = False
    error: str | None = None


def build_llm(
    model: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enable_prefix_caching: bool = True,
    enforce_eager: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    load_format: str = "auto",
):
    """Builds a `vllm.LLM` with the engine arguments flip_ray exposes."""
    from vllm import LLM

    kwargs = dict(
        model=model,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=enable_prefix_caching,
        enforce_eager=enforce_eager,
        trust_remote_code=trust_remote_code,
        seed=seed,
        load_format=load_format,
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return LLM(**kwargs)


class FlipGenerator:
    """Renders FLIP prompts for a `vllm.LLM` and generates inferred instructions.

    Args:
        llm: A built `vllm.LLM`.
        temperature, top_p, max_tokens, seed, n: Sampling parameters (greedy when temperature is 0).
        chat_template_kwargs: Extra chat-template arguments (e.g. `{"enable_thinking": False}`).
    """

    def __init__(
        self,
        llm,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
        n: int = 1,
        chat_template_kwargs: dict | None = None,
        ignore_eos: bool = False,
    ):
        from vllm import SamplingParams

        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, ignore_eos=ignore_eos
        )
        self.prompt_budget = self.max_model_len - max_tokens
        if self.prompt_budget <= _TRUNCATION_MARGIN:
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room for a prompt in a {self.max_model_len}-token window"
            )

    def _prompt_ids(self, response: str, context: list[dict] | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            build_flip_messages(response, context),
            tokenize=False,
            add_generation_prompt=True,
            **self.chat_template_kwargs,
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render(self, response: str, context: list[dict] | None = None) -> tuple[list[int], bool]:
        """Token ids of the FLIP prompt, cut to fit the window, and whether anything was cut.

        Oldest context turns go first; then the response is cut at a token boundary.

        Raises:
            RowError: Even an empty response would not fit (the window is too small).
        """
        ids = self._prompt_ids(response, context)
        if len(ids) <= self.prompt_budget:
            return ids, False
        context = list(context or [])
        while context and len(ids) > self.prompt_budget:
            context.pop(0)
            ids = self._prompt_ids(response, context)
        if len(ids) <= self.prompt_budget:
            return ids, True
        response_ids = self.tokenizer.encode(response, add_special_tokens=False)
        overflow = len(ids) - self.prompt_budget
        keep = len(response_ids) - overflow - _TRUNCATION_MARGIN
        while keep > 0:
            ids = self._prompt_ids(self.tokenizer.decode(response_ids[:keep]), context)
            if len(ids) <= self.prompt_budget:
                return ids, True
            keep -= max(_TRUNCATION_MARGIN, len(ids) - self.prompt_budget)
        raise RowError(
            f"the FLIP prompt does not fit the model window ({self.max_model_len} tokens) with "
            f"max_tokens={self.params.max_tokens}, even with the response cut to nothing"
        )

    def generate(self, responses: list[str], contexts: list[list[dict] | None] | None = None) -> list[Generation]:
        """Generates for each response; a row that fails is returned with `error` set."""
        from vllm.inputs import TokensPrompt

        contexts = contexts if contexts is not None else [None] * len(responses)
        results: list[Generation | None] = [None] * len(responses)
        prompts, slots, flags = [], [], []
        for i, (response, context) in enumerate(zip(responses, contexts, strict=False)):
            try:
                ids, truncated = self.render(response, context)
            except RowError as e:
                results[i] = Generation(texts=[], error=str(e))
                continue
            except Exception as e:  # a tokenizer or template failure on one row
                results[i] = Generation(texts=[], error=f"prompt rendering failed: {type(e).__name__}: {e}")
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            slots.append(i)
            flags.append(truncated)
        for i, truncated, out in zip(slots, flags, self._generate_isolated(prompts), strict=False):
            if isinstance(out, Exception):
                results[i] = Generation(
                    texts=[], truncated=truncated, error=f"engine error: {type(out).__name__}: {out}"
                )
                continue
            finish = [c.finish_reason for c in out.outputs]
            results[i] = Generation(
                texts=[c.text for c in out.outputs],
                finish_reason="length" if "length" in finish else (finish[0] if finish else None),
                n_prompt_tokens=len(out.prompt_token_ids),
                n_output_tokens=sum(len(c.token_ids) for c in out.outputs),
                truncated=truncated,
            )
        return results  # type: ignore[return-value]

    def _generate_isolated(self, prompts: list) -> list:
        """One engine call for the batch; if it raises, each prompt alone, so one bad row fails alone."""
        if not prompts:
            return []
        try:
            return self.llm.generate(prompts, self.params, use_tqdm=False)
        except Exception as e:
            logger.warning("batch generation failed (%s); retrying %d prompts one by one", e, len(prompts))
        outs = []
        for p in prompts:
            try:
                outs.append(self.llm.generate([p], self.params, use_tqdm=False)[0])
            except Exception as e:
                outs.append(e)
        return outs
