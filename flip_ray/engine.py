"""Backward inference on a vLLM engine: FLIP prompts in, raw answers out.

`FlipGenerator` wraps a `vllm.LLM` you already have: it renders each response into the FLIP chat
prompt with the model's chat template, truncates what does not fit the model window (flagging it),
and generates. vllm is imported here only, inside functions, so CPU-side modules stay light.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


class PromptFitter:
    """Renders chat messages to token ids with the model's chat template, and fits them in a budget.

    `fit` drops the oldest context turns first, then cuts the longest text at a token boundary, and
    says whether anything was cut.
    """

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fit(
        self,
        build: Callable[[list[str], list[dict] | None], list[dict]],
        texts: list[str],
        context: list[dict] | None,
        budget: int,
        what: str,
    ) -> tuple[list[int], bool]:
        """Token ids of `build(texts, context)` in at most `budget` tokens, and whether anything was cut.

        Raises:
            RowError: Even with every text cut to nothing the prompt does not fit.
        """
        ids = self.ids(build(texts, context))
        if len(ids) <= budget:
            return ids, False
        context = list(context or [])
        while context and len(ids) > budget:
            context.pop(0)
            ids = self.ids(build(texts, context))
        if len(ids) <= budget:
            return ids, True
        pieces = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        while len(ids) > budget:
            longest = max(range(len(pieces)), key=lambda k: len(pieces[k]))
            keep = len(pieces[longest]) - (len(ids) - budget) - _TRUNCATION_MARGIN
            if keep <= 0:
                raise RowError(f"{what} does not fit the model window even with the response cut to nothing")
            pieces[longest] = pieces[longest][:keep]
            ids = self.ids(build([self.tokenizer.decode(p) for p in pieces], context))
        return ids, True


def _generate_isolated(llm, prompts: list, params) -> list:
    """One engine call for the batch; if it raises, each prompt alone, so one bad row fails alone.
    `params` is one SamplingParams or a list with one per prompt."""
    if not prompts:
        return []
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    except Exception as e:
        logger.warning("batch generation failed (%s); retrying %d prompts one by one", e, len(prompts))
    outs = []
    for k, p in enumerate(prompts):
        _abort_unfinished(llm)
        try:
            outs.append(llm.generate([p], params[k] if isinstance(params, list) else params, use_tqdm=False)[0])
        except Exception as e:
            outs.append(e)
    _abort_unfinished(llm)
    return outs


def _abort_unfinished(llm) -> None:
    """Drops requests a failed `generate` left in the engine. `LLM.generate` runs until the engine
    has no unfinished request, so without this the next call would run (and fail on) them again."""
    engine = llm.llm_engine
    if not engine.has_unfinished_requests():
        return
    states = getattr(getattr(engine, "output_processor", None), "request_states", None)
    if states is None:
        logger.warning(
            "cannot abort the %d requests a failed batch left in the engine", engine.get_num_unfinished_requests()
        )
        return
    try:
        engine.abort_request(list(states), internal=True)
    except Exception as e:  # a dead engine: the retries fail and each row records the error
        logger.warning("could not abort the requests a failed batch left in the engine: %s", e)


_warned: set[str] = set()


def _warn_once(message: str, *args) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message, *args)


def request_seed(seed: int | None, temperature: float) -> int | None:
    """The per-request sampling seed to give vLLM, or None where it cannot honour one.

    vLLM's CPU backend fails on a seeded, sampled request whose prefill is split over engine steps
    (it rewinds the torch generator, and CPU generators have no offset: "CPU Generator does not use
    offset"). There sampling is seeded by the engine seed (`build_llm(seed=...)`) instead, which
    repeats for the same rows in the same batches but not row by row.
    """
    if seed is None or temperature == 0:
        return seed
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _warn_once(
            "vLLM's CPU backend cannot seed single requests; sampling at temperature %s is seeded by the "
            "engine seed instead (reproducible for the same batches)",
            temperature,
        )
        return None
    return seed


def _structured(schema: dict | None):
    if schema is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=schema)


def flip_answer_schema(variant: str) -> dict:
    """JSON schema of the answer the FLIP prompt asks for (guided decoding)."""
    props = {"INFERRED INSTRUCTION": {"type": "string"}}
    if variant == "flip":
        props = {"REASONING": {"type": "string"}, **props}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


class FlipGenerator:
    """Renders FLIP prompts for a `vllm.LLM` and generates inferred instructions.

    Args:
        llm: A built `vllm.LLM`.
        temperature, top_p, max_tokens, seed, n: Sampling parameters (greedy when temperature is 0).
        chat_template_kwargs: Extra chat-template arguments (e.g. `{"enable_thinking": False}`).
        ignore_eos: Generate exactly max_tokens tokens (throughput benchmarks only).
        variant, few_shot: The FLIP prompt (`prompts.build_flip_messages`).
        guided_json: Constrain decoding to the JSON answer the prompt asks for (vLLM structured outputs).
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
        variant: str = "flip",
        few_shot: int = 0,
        guided_json: bool = False,
    ):
        from vllm import SamplingParams

        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.fitter = PromptFitter(self.tokenizer, chat_template_kwargs)
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.variant, self.few_shot = variant, few_shot
        self.params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=request_seed(seed, temperature),
            ignore_eos=ignore_eos,
            structured_outputs=_structured(flip_answer_schema(variant) if guided_json else None),
        )
        self.prompt_budget = self.max_model_len - max_tokens
        if self.prompt_budget <= _TRUNCATION_MARGIN:
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room for a prompt in a {self.max_model_len}-token window"
            )

    def _messages(self, texts: list[str], context: list[dict] | None) -> list[dict]:
        return build_flip_messages(texts[0], context, variant=self.variant, few_shot=self.few_shot)

    def render(self, response: str, context: list[dict] | None = None) -> tuple[list[int], bool]:
        """Token ids of the FLIP prompt, cut to fit the window, and whether anything was cut.

        Oldest context turns go first; then the response is cut at a token boundary.

        Raises:
            RowError: Even an empty response would not fit (the window is too small).
        """
        return self.fitter.fit(
            self._messages,
            [response],
            context,
            self.prompt_budget,
            f"the FLIP prompt (window {self.max_model_len} tokens, max_tokens={self.params.max_tokens})",
        )

    def generate(self, responses: list[str], contexts: list[list[dict] | None] | None = None) -> list[Generation]:
        """Generates for each response; a row that fails is returned with `error` set."""
        contexts = contexts if contexts is not None else [None] * len(responses)
        return _render_and_generate(
            self.llm,
            [(lambda r=r, c=c: self.render(r, c)) for r, c in zip(responses, contexts, strict=True)],
            self.params,
        )


def _render_and_run(llm, renders: list[Callable[[], tuple]], params, make: Callable, fail: Callable) -> list:
    """Renders each row and runs the engine on the rows that rendered, in one call.

    `render()` gives `(prompt ids, truncated, state)`; a row that cannot be rendered fails alone.
    `make(output, truncated, state)` builds a row's result, `fail(message, truncated)` a failed one.
    """
    from vllm.inputs import TokensPrompt

    results: list = [None] * len(renders)
    prompts, slots = [], []
    for i, render in enumerate(renders):
        try:
            ids, truncated, state = render()
        except RowError as e:
            results[i] = fail(str(e), False)
            continue
        except Exception as e:  # a tokenizer or template failure on one row
            results[i] = fail(f"prompt rendering failed: {type(e).__name__}: {e}", False)
            continue
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        slots.append((i, truncated, state))
    for (i, truncated, state), out in zip(slots, _generate_isolated(llm, prompts, params), strict=True):
        if isinstance(out, Exception):
            results[i] = fail(f"engine error: {type(out).__name__}: {out}", truncated)
        else:
            results[i] = make(out, truncated, state)
    return results


def _generation(out, truncated: bool, _state=None) -> Generation:
    finish = [c.finish_reason for c in out.outputs]
    return Generation(
        texts=[c.text for c in out.outputs],
        finish_reason="length" if "length" in finish else (finish[0] if finish else None),
        n_prompt_tokens=len(out.prompt_token_ids),
        n_output_tokens=sum(len(c.token_ids) for c in out.outputs),
        truncated=truncated,
    )


def _render_and_generate(llm, renders: list[Callable[[], tuple[list[int], bool]]], params) -> list[Generation]:
    """Renders each row (a row that cannot be rendered fails alone) and generates for the rest."""
    return _render_and_run(
        llm,
        [lambda render=render: (*render(), None) for render in renders],
        params,
        _generation,
        lambda message, truncated: Generation(texts=[], truncated=truncated, error=message),
    )


class Judge:
    """The same model as an LLM judge (the authors' prompts, `judge.py`): a baseline for FLIP.

    Args:
        llm: A built `vllm.LLM`.
        max_tokens, temperature, seed: Sampling parameters of the verdict.
        chat_template_kwargs: Extra chat-template arguments.
        guided_json: Constrain decoding to the JSON verdict the prompt asks for.
    """

    def __init__(
        self,
        llm,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        chat_template_kwargs: dict | None = None,
        guided_json: bool = False,
    ):
        self.llm = llm
        self.fitter = PromptFitter(llm.get_tokenizer(), chat_template_kwargs)
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.guided_json = guided_json

    def _params(self, schema: dict):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=request_seed(self.seed, self.temperature),
            structured_outputs=_structured(schema if self.guided_json else None),
        )

    def _fit(self, build, texts: list[str], context: list[dict] | None) -> tuple[list[int], bool]:
        budget = self.max_model_len - self.max_tokens
        return self.fitter.fit(build, texts, context, budget, f"the judge prompt (window {self.max_model_len} tokens)")

    def pointwise(
        self, instructions: list[str], responses: list[str], contexts: list[list[dict] | None] | None = None
    ) -> list[Generation]:
        """1-10 verdicts, one per (instruction, response); parse with `judge.parse_pointwise`."""
        from flip_ray.judge import POINTWISE_JSON_SCHEMA, pointwise_messages

        contexts = contexts if contexts is not None else [None] * len(responses)
        renders = [
            (lambda q=q, r=r, c=c: self._fit(lambda t, ctx, q=q: pointwise_messages(q, t[0], ctx), [r], c))
            for q, r, c in zip(instructions, responses, contexts, strict=True)
        ]
        return _render_and_generate(self.llm, renders, self._params(POINTWISE_JSON_SCHEMA))

    def pairwise(
        self, instructions: list[str], pairs: list[tuple[str, str]], contexts: list[list[dict] | None] | None = None
    ) -> list[Generation]:
        """A/B verdicts, one per (instruction, (response A, response B)); parse with `judge.parse_pairwise`."""
        from flip_ray.judge import PAIRWISE_JSON_SCHEMA, pairwise_messages

        contexts = contexts if contexts is not None else [None] * len(pairs)
        renders = [
            (lambda q=q, p=p, c=c: self._fit(lambda t, ctx, q=q: pairwise_messages(q, t[0], t[1], ctx), list(p), c))
            for q, p, c in zip(instructions, pairs, contexts, strict=True)
        ]
        return _render_and_generate(self.llm, renders, self._params(PAIRWISE_JSON_SCHEMA))

    def listwise(
        self, instructions: list[str], candidates: list[list[str]], contexts: list[list[dict] | None] | None = None
    ) -> list[Generation]:
        """Best-index verdicts, one per (instruction, responses); parse with `judge.parse_listwise`."""
        from flip_ray.judge import listwise_json_schema, listwise_messages

        contexts = contexts if contexts is not None else [None] * len(candidates)
        renders, params = [], []
        for q, cands, c in zip(instructions, candidates, contexts, strict=True):
            renders.append(
                lambda q=q, cands=cands, c=c: self._fit(
                    lambda t, ctx, q=q: listwise_messages(q, t, ctx), list(cands), c
                )
            )
            params.append(self._params(listwise_json_schema(len(cands))))
        return _render_and_generate(self.llm, renders, params)
