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
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens.

        Raises:
            RowError: The text is not valid Unicode (an unpaired surrogate such as "\\ud800", which a
                Python str can hold): the tokenizer refuses it with a TypeError.
        """
        try:
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
            ids = self.ids(build([self.tokenizer.decode(p) for p in pieces], context))
        return ids, True


# Messages of errors that leave the engine unusable (the device or the engine process is gone), not
# a problem of one prompt: they end the actor (`exit_for_restart`) instead of becoming row errors.
_FATAL_MESSAGES = (
    "CUDA error",
    "CUDA out of memory",
    "NCCL error",
    "device-side assert",
    "CUBLAS_STATUS",
    "cuDNN error",
    "EngineCore encountered an issue",
)


def is_fatal_engine_error(e: BaseException) -> bool:
    """True when the engine is dead or unusable (vLLM's EngineDeadError, CUDA or driver failures,
    device memory exhausted), False for an error that one request caused (too long, malformed)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, (EngineDeadError, MemoryError)) or type(e).__name__ == "OutOfMemoryError":
        return True
    return any(m in f"{type(e).__name__}: {e}" for m in _FATAL_MESSAGES)


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


def generate_isolated(llm, prompts: list, params) -> list:
    """One engine call for the batch; if it raises, each prompt alone, so one bad row fails alone.
    `params` is one SamplingParams or a list with one per prompt. An error that leaves the engine
    unusable (`is_fatal_engine_error`) is raised, never turned into row errors."""
    if not prompts:
        return []
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    except Exception as e:
        if is_fatal_engine_error(e):
            raise
        logger.warning("batch generation failed (%s); retrying %d prompts one by one", e, len(prompts))
    outs = []
    for k, p in enumerate(prompts):
        _abort_unfinished(llm)
        try:
            outs.append(llm.generate([p], params[k] if isinstance(params, list) else params, use_tqdm=False)[0])
        except Exception as e:
            if is_fatal_engine_error(e):
                raise
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
    except Exception as e:
        if is_fatal_engine_error(e):
            raise
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
        return render_and_generate(
            self.llm,
            [(lambda r=r, c=c: self.render(r, c)) for r, c in zip(responses, contexts, strict=True)],
            self.params,
        )


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


def render_and_run(llm, renders: list[Callable[[], tuple]], params, make: Callable, fail: Callable) -> list:
    """Renders each row (`render_rows`) and runs the engine on the rows that rendered, in one call.

    `make(output, truncated, state)` builds a row's result, `fail(message, truncated)` a failed one.
    """
    from vllm.inputs import TokensPrompt

    results, rendered = render_rows(renders, fail)
    prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids, _, _ in rendered]
    slots = [(i, truncated, state) for i, _, truncated, state in rendered]
    for (i, truncated, state), out in zip(slots, generate_isolated(llm, prompts, params), strict=True):
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


def render_and_generate(llm, renders: list[Callable[[], tuple[list[int], bool]]], params) -> list[Generation]:
    """Renders each row (a row that cannot be rendered fails alone) and generates for the rest."""
    return render_and_run(
        llm,
        [lambda render=render: (*render(), None) for render in renders],
        params,
        _generation,
        lambda message, truncated: Generation(texts=[], truncated=truncated, error=message),
    )
