"""Backward inference on a vLLM engine: FLIP prompts in, raw answers out.

`FlipGenerator` wraps a `vllm.LLM` you already have: it renders each response into the FLIP chat
prompt with the model's chat template, truncates what does not fit the model window (flagging it),
and generates. vllm is imported here only, inside functions, so CPU-side modules stay light.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flip_ray.engine.queue import EngineQueue
from flip_ray.engine.specs import PromptSpec, SamplingSpec
from flip_ray.text.prompts import build_flip_messages
from flip_ray.text.rows import RowError

logger = logging.getLogger(__name__)

# Tokens kept free under the window so that re-tokenising a cut response cannot overflow it.
TRUNCATION_MARGIN = 8


@dataclass
class Generation:
    """What the engine produced for one row; plain types only."""

    texts: list[str]
    finish_reason: str | None = None
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    truncated: bool = False
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache


# Blocks in flight render their prompts from several threads of one engine actor; a fast tokenizer
# shared by them can raise "Already borrowed" when used concurrently (huggingface/tokenizers#537).
_TOKENIZER_LOCK = threading.RLock()


class PromptFitter:
    """Renders chat messages to token ids with the model's chat template, and fits them in a budget.

    `fit` drops the oldest context turns first, then cuts the longest text at a token boundary, and
    says whether anything was cut.
    """

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def ids(self, messages: list[dict]) -> list[int]:
        with _TOKENIZER_LOCK:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
            )
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens.

        Raises:
            RowError: The text is not valid Unicode (an unpaired surrogate such as "\\ud800", which a
                Python str can hold): the tokenizer refuses it with a TypeError.
        """
        try:
            with _TOKENIZER_LOCK:
                return self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = f"\\u{ord(e.object[e.start]):04x}"
                raise RowError(f"the text holds an unpaired UTF-16 surrogate ({bad}): not valid Unicode") from None
            raise

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
        pieces = [self.encode(t) for t in texts]
        while len(ids) > budget:
            longest = max(range(len(pieces)), key=lambda k: len(pieces[k]))
            keep = len(pieces[longest]) - (len(ids) - budget) - TRUNCATION_MARGIN
            if keep <= 0:
                raise RowError(f"{what} does not fit the model window even with the response cut to nothing")
            pieces[longest] = pieces[longest][:keep]
            with _TOKENIZER_LOCK:
                texts = [self.tokenizer.decode(p) for p in pieces]
            ids = self.ids(build(texts, context))
        return ids, True


def exit_for_restart(reason: str) -> None:
    """Ends this process at once, so that Ray treats the engine actor as crashed: it restarts it with a
    fresh engine and retries its batch (`runtime.engine_actor_options`: max_restarts and
    max_task_retries). A clean exit (`ray.actor.exit_actor`) would not be retried, and re-raising
    would send the retry to the same actor and its dead engine (ray-project/ray#59522)."""
    logger.error("the vLLM engine is dead or unusable (%s); ending this actor so that Ray restarts it", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(70)


class EngineWatchdog:
    """Watches a vLLM engine that runs in its own process (`EngineSpec.multiprocessing`).

    vLLM notices when the EngineCore process dies and marks its client dead, but `LLM.generate`
    can go on waiting for output that will never come (vLLM 0.32 stops the output thread without
    waking the waiting caller), and the job would hang. This thread polls the engine processes and
    the client's flag every `interval` seconds and, when the engine is gone, ends the actor
    (`exit_for_restart`).
    """

    def __init__(self, llm, interval: float = 1.0):
        self.resources = getattr(llm.llm_engine.engine_core, "resources", None)
        manager = getattr(self.resources, "engine_manager", None)
        self.processes = list(getattr(manager, "processes", None) or [])
        self.interval = interval
        if self.resources is not None:
            threading.Thread(target=self._run, name="flip-ray-engine-watchdog", daemon=True).start()

    def dead(self) -> str | None:
        """Why the engine is dead, or None while it lives."""
        for proc in self.processes:
            if not proc.is_alive():
                return f"engine process {proc.name} (pid {proc.pid}) exited with {proc.exitcode}"
        return "vLLM marked the engine dead" if getattr(self.resources, "engine_dead", False) else None

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            reason = self.dead()
            if reason:
                exit_for_restart(reason)


def generate_isolated(llm, prompts: list, params, prefix_lens: list[int | None] | None = None) -> list:
    """Runs the prompts on the engine's queue (`queue.EngineQueue`: all callers of this engine in one
    vLLM scheduler) and waits for them: one output per prompt, or the exception that prompt alone
    failed with. `params` is one SamplingParams or a list with one per prompt; `prefix_lens` says
    how many first tokens of each prompt other requests share (held while one of them prefills). An
    error that leaves the engine unusable (`is_fatal_engine_error`) is raised, never turned into
    row errors."""
    return EngineQueue.of(llm).run(prompts, params, prefix_lens)


_warned: set[str] = set()


def _warn_once(message: str, *args) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message, *args)


def request_seed(seed: int | None, temperature: float) -> int | None:
    """The per-request sampling seed to give vLLM, or None where it cannot honour one.

    vLLM's CPU backend fails on a seeded, sampled request whose prefill is split over engine steps
    (it rewinds the torch generator, and CPU generators have no offset: "CPU Generator does not use
    offset"). There sampling is seeded by the engine seed (`EngineSpec.seed`) instead, which
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


def structured_outputs(schema: dict | None):
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
        prompt: The FLIP prompt (variant, few-shot, chat-template arguments, guided JSON).
        sampling: Decoding (greedy by default).
    """

    def __init__(self, llm, prompt: PromptSpec | None = None, sampling: SamplingSpec | None = None):
        from vllm import SamplingParams

        prompt, sampling = prompt or PromptSpec(), sampling or SamplingSpec()
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.fitter = PromptFitter(self.tokenizer, prompt.chat_template_kwargs)
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.prompt = prompt
        self.params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=request_seed(sampling.seed, sampling.temperature),
            ignore_eos=sampling.ignore_eos,
            structured_outputs=structured_outputs(flip_answer_schema(prompt.variant) if prompt.guided_json else None),
        )
        self.prompt_budget = self.max_model_len - sampling.max_tokens
        if self.prompt_budget <= TRUNCATION_MARGIN:
            raise ValueError(
                f"max_tokens={sampling.max_tokens} leaves no room for a prompt in a {self.max_model_len}-token window"
            )

    def _messages(self, texts: list[str], context: list[dict] | None) -> list[dict]:
        return build_flip_messages(texts[0], context, variant=self.prompt.variant, few_shot=self.prompt.few_shot)

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
        if self.prompt.block_copy or self.prompt.no_repeat_ngram:
            # each row's own sampling parameters: the response whose runs it may not copy
            return render_and_run(
                self.llm,
                [
                    (lambda r=r, c=c: (*self.render(r, c), self.copy_blocked(r)))
                    for r, c in zip(responses, contexts, strict=True)
                ],
                lambda row_params: row_params,
                _generation,
                lambda message, truncated: Generation(texts=[], truncated=truncated, error=message),
                lambda ids, _state: len(ids),
            )
        return render_and_generate(
            self.llm,
            [(lambda r=r, c=c: self.render(r, c)) for r, c in zip(responses, contexts, strict=True)],
            self.params,
            share_prompt=True,
        )

    def copy_blocked(self, response: str):
        """This row's sampling parameters under `reward.block_copy` and `reward.no_repeat_ngram`
        (`copy_block`)."""
        from flip_ray.engine.copy_block import request_params

        k = self.prompt.block_copy
        return request_params(self.params, k, self.fitter.encode(response) if k else [], self.prompt.no_repeat_ngram)


def render_rows(renders: list[Callable[[], tuple]], fail: Callable) -> tuple[list, list[tuple]]:
    """Renders each row: `render()` gives `(prompt ids, truncated, state)`.

    A row whose content the prompt cannot take fails alone, as `fail(message, False)`: a `RowError`
    (it does not fit the window, it has no tokens) or the chat template refusing it (a template's
    `raise_exception`, e.g. roles that do not alternate, is a jinja2 `TemplateError`). Anything else
    is a bug in the prompt code and propagates.

    Returns:
        (results with the failed rows' `fail(...)` in place and None elsewhere,
        `(row index, prompt ids, truncated, state)` of each row that rendered).
    """
    from jinja2 import TemplateError

    results: list = [None] * len(renders)
    rendered = []
    for i, render in enumerate(renders):
        try:
            ids, truncated, state = render()
        except RowError as e:
            results[i] = fail(str(e), False)
            continue
        except TemplateError as e:
            results[i] = fail(f"the chat template refused the row: {type(e).__name__}: {e}", False)
            continue
        rendered.append((i, ids, truncated, state))
    return results, rendered


def render_and_run(
    llm,
    renders: list[Callable[[], tuple]],
    params,
    make: Callable,
    fail: Callable,
    shared_prefix: Callable[[list[int], Any], int | None] | None = None,
) -> list:
    """Renders each row (`render_rows`) and runs the rows that rendered on the engine's queue.

    `make(output, truncated, state)` builds a row's result, `fail(message, truncated)` a failed one;
    `shared_prefix(ids, state)`: how many first tokens of a row's prompt other requests share (the
    FLIP prompt of a row's generation and of its likelihood), or None. `params` is one
    SamplingParams for every row, or a function of a row's state that gives its own.
    """
    from vllm.inputs import TokensPrompt

    results, rendered = render_rows(renders, fail)
    prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids, _, _ in rendered]
    prefix = [shared_prefix(ids, state) for _, ids, _, state in rendered] if shared_prefix else None
    slots = [(i, truncated, state) for i, _, truncated, state in rendered]
    if callable(params):
        params = [params(state) for _, _, state in slots]
    for (i, truncated, state), out in zip(slots, generate_isolated(llm, prompts, params, prefix), strict=True):
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
        cached_tokens=out.num_cached_tokens or 0,
    )


def render_and_generate(
    llm, renders: list[Callable[[], tuple[list[int], bool]]], params, share_prompt: bool = False
) -> list[Generation]:
    """Renders each row (a row that cannot be rendered fails alone) and generates for the rest.
    `share_prompt`: other requests (likelihoods) may start with a row's whole prompt."""
    return render_and_run(
        llm,
        [lambda render=render: (*render(), None) for render in renders],
        params,
        _generation,
        lambda message, truncated: Generation(texts=[], truncated=truncated, error=message),
        (lambda ids, _state: len(ids)) if share_prompt else None,
    )
