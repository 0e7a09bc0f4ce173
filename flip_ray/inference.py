"""The engine stage of the scoring job, and the pure functions it is made of.

`BackwardInferenceStage` (engine actors, GPU or CPU)
    reads: `_flip_instruction`, `_flip_response`, `_flip_context`, `error`, `_flip_shard_total`
    writes: `_flip_generations`, the `flip_logprob_*`, `pmi_forward` and `judge_*` columns, `finish_reason`,
    `n_prompt_tokens`, `n_output_tokens`, `truncated`, the `<method>_error` columns, `error`, and
    `_flip_dedup`

Rows with `error` set, and shard markers, pass through untouched and never reach the engine.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

import pyarrow as pa

from flip_ray import schema
from flip_ray.controls import ForwardLikelihood, LexicalLikelihood
from flip_ray.engine import EngineWatchdog, FlipGenerator, exit_for_restart, is_fatal_engine_error
from flip_ray.judge import Judge
from flip_ray.likelihood import FlipLikelihood
from flip_ray.model import check_model_path, prepare_default_model
from flip_ray.specs import EngineSpec, PromptSpec, SamplingSpec
from flip_ray.stages import require_columns, row_error, work_rows
from flip_ray.verdicts import parse_pointwise


class AnswerCache:
    """`flip` answers by (history, response), least recently used first out. Size 0: no reuse at all,
    every row goes to the engine."""

    def __init__(self, size: int):
        self.size = size
        self.answers: OrderedDict[str, object] = OrderedDict()

    @staticmethod
    def key(response: str, context: str | None) -> str:
        return hashlib.sha1(f"{context or ''}\x1f{response}".encode()).hexdigest()

    def plan(self, keys: list[str]) -> tuple[list[int], dict[int, int | object]]:
        """Which of `keys` go to the engine (`fresh`, positions in `keys`) and where each other one
        takes its answer from: the position of an earlier identical key, or a cached answer."""
        fresh, reuse, first = [], {}, {}
        for pos, k in enumerate(keys):
            if not self.size:
                fresh.append(pos)
            elif k in self.answers:
                self.answers.move_to_end(k)
                reuse[pos] = self.answers[k]
            elif k in first:
                reuse[pos] = first[k]
            else:
                first[k] = pos
                fresh.append(pos)
        return fresh, reuse

    def put(self, key: str, answer) -> None:
        if not self.size:
            return
        self.answers[key] = answer
        if len(self.answers) > self.size:
            self.answers.popitem(last=False)


def deduplicated(keys: list[str], cache: AnswerCache, generate) -> tuple[list, list[bool]]:
    """Answers for every key, sending each distinct key the cache does not hold to `generate` once
    (a batch call on the fresh positions). Returns (answer per key, whether it was reused)."""
    fresh, reuse = cache.plan(keys)
    answers: list = [None] * len(keys)
    for pos, answer in zip(fresh, generate(fresh), strict=True):
        answers[pos] = answer
        if getattr(answer, "error", None) is None:
            cache.put(keys[pos], answer)
    for pos, source in reuse.items():
        answers[pos] = answers[source] if isinstance(source, int) else source
    return answers, [pos in reuse for pos in range(len(keys))]


def merge_results(
    n: int, todo: list[int], methods: Sequence[str], errors: list[str | None], results: dict[str, list], reused=None
) -> dict[str, list]:
    """The engine stage's output columns for a batch of `n` rows, from each method's results for
    rows `todo` (`engine.Generation` for flip and judge_pointwise, `likelihood.Likelihood` for the
    likelihood rewards, whose `contrast` is the reward of flip_logprob_lexical and pmi_forward).
    A method's failure goes to its `<method>_error`; `error` only when all failed."""
    cols: dict[str, list] = {name: [None] * n for name in schema.ENGINE_COLUMNS.names}
    cols["error"] = list(errors)
    dedup = [None] * n
    failed: dict[int, dict[str, str]] = {i: {} for i in todo}
    for k, i in enumerate(todo):
        truncated = False
        if "flip" in results:
            g = results["flip"][k]
            cols[schema.GENERATIONS][i] = g.texts
            cols["finish_reason"][i] = g.finish_reason
            cols["n_prompt_tokens"][i] = g.n_prompt_tokens
            dedup[i] = bool(reused and reused[k])
            cols["n_output_tokens"][i] = 0 if dedup[i] else g.n_output_tokens
            truncated |= g.truncated
            if g.error or not g.texts:
                failed[i]["flip"] = g.error or "engine returned no output"
        if "flip_logprob" in results:
            lk = results["flip_logprob"][k]
            cols["flip_logprob_mean"][i] = lk.logprob_mean
            cols["flip_logprob_sum"][i] = lk.logprob_sum
            cols["flip_logprob_tokens"][i] = lk.tokens
            cols["flip_logprob_contrast"][i] = lk.contrast
            cols["n_prompt_tokens"][i] = cols["n_prompt_tokens"][i] or lk.n_prompt_tokens
            truncated |= lk.truncated
            if lk.error:
                failed[i]["flip_logprob"] = lk.error
        for method in ("flip_logprob_lexical", "pmi_forward"):
            if method in results:
                lk = results[method][k]
                cols[method][i] = lk.contrast
                cols["n_prompt_tokens"][i] = cols["n_prompt_tokens"][i] or lk.n_prompt_tokens
                truncated |= lk.truncated
                if lk.error:
                    failed[i][method] = lk.error
        if "judge_pointwise" in results:
            g = results["judge_pointwise"][k]
            truncated |= g.truncated
            if g.error:
                failed[i]["judge_pointwise"] = g.error
            else:
                cols["judge_score"][i], cols["judge_parse_status"][i] = parse_pointwise(g.texts[0] if g.texts else "")
        cols["truncated"][i] = truncated
        for method, message in failed[i].items():
            cols[schema.METHOD_ERROR[method]][i] = message
        cols["error"][i] = row_error(methods, failed[i])
    cols[schema.DEDUP] = dedup
    return cols


class BackwardInferenceStage:
    """Engine actor: one `vllm.LLM` per actor, built once; computes the configured rewards per batch.

    Args:
        engine: The engine (model, dtype, window, ...), built in this actor.
        prompt: The FLIP prompt.
        sampling: Decoding of `flip`.
        methods: Rewards to compute (`schema.SCORE_METHODS`).
        logprob_format, logprob_distractors: `flip_logprob` options (`likelihood.FlipLikelihood`);
            the format also applies to `flip_logprob_lexical` (`controls.LexicalLikelihood`).
        lexical_control: The control of `flip_logprob_lexical` (`prompts.LEXICAL_CONTROLS`).
        judge_max_tokens: Verdict tokens of `judge_pointwise`.
        dedup_cache_size: `flip` answers remembered per actor for identical (response, history)
            rows; 0 turns deduplication off.
    """

    def __init__(
        self,
        *,
        engine: EngineSpec,
        prompt: PromptSpec,
        sampling: SamplingSpec,
        methods: tuple[str, ...],
        logprob_format: str = "plain",
        logprob_distractors: int = 0,
        lexical_control: str = "overlap",
        judge_max_tokens: int = 256,
        dedup_cache_size: int = 0,
    ):
        if engine.model is None:  # the embedded model, converted once per node
            engine = replace(engine, model=str(prepare_default_model()))
        check_model_path(engine.model, load_format=engine.load_format)  # here: ModelError, not a vLLM trace
        llm = engine.build()
        if engine.multiprocessing:
            EngineWatchdog(llm)  # a dead EngineCore process ends this actor instead of hanging it
        self.methods = tuple(methods)
        self.cache = AnswerCache(dedup_cache_size)
        self.generator = FlipGenerator(llm, prompt, sampling) if "flip" in self.methods else None
        self.likelihood = (
            FlipLikelihood(llm, prompt, logprob_format=logprob_format, distractors=logprob_distractors)
            if "flip_logprob" in self.methods
            else None
        )
        self.lexical = (
            LexicalLikelihood(llm, prompt, logprob_format=logprob_format, control=lexical_control)
            if "flip_logprob_lexical" in self.methods
            else None
        )
        self.forward = ForwardLikelihood(llm, prompt) if "pmi_forward" in self.methods else None
        self.judge = (
            Judge(llm, prompt, max_tokens=judge_max_tokens, seed=sampling.seed)
            if "judge_pointwise" in self.methods
            else None
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._score(batch)
        except Exception as e:
            if is_fatal_engine_error(e):  # a dead engine: never error rows, a restarted actor instead
                exit_for_restart(f"{type(e).__name__}: {e}")
            raise

    def _score(self, batch: pa.Table) -> pa.Table:
        require_columns(
            "BackwardInferenceStage",
            batch,
            [schema.INSTRUCTION, schema.RESPONSE, schema.CONTEXT, "error", schema.SHARD_TOTAL],
        )
        todo = work_rows(batch)
        instructions, responses, raw_contexts = (
            [column[i] for i in todo]
            for column in (batch.column(c).to_pylist() for c in (schema.INSTRUCTION, schema.RESPONSE, schema.CONTEXT))
        )
        contexts = [json.loads(c) if c else None for c in raw_contexts]
        results: dict[str, list] = {}
        reused = None
        if self.generator is not None:
            keys = [AnswerCache.key(r, c) for r, c in zip(responses, raw_contexts, strict=True)]
            results["flip"], reused = deduplicated(
                keys,
                self.cache,
                lambda fresh: self.generator.generate([responses[p] for p in fresh], [contexts[p] for p in fresh]),
            )
        if self.likelihood is not None:
            results["flip_logprob"] = self.likelihood.score(instructions, responses, contexts)
        if self.lexical is not None:  # the own term is flip_logprob's when both run (distractors aside)
            results["flip_logprob_lexical"] = self.lexical.score(
                instructions, responses, contexts, own=results.get("flip_logprob")
            )
        if self.forward is not None:
            results["pmi_forward"] = self.forward.score(instructions, responses, contexts)
        if self.judge is not None:
            results["judge_pointwise"] = self.judge.pointwise(instructions, responses, contexts)
        cols = merge_results(batch.num_rows, todo, self.methods, batch.column("error").to_pylist(), results, reused)
        batch = schema.put_column(
            batch, schema.CONTROL_COLUMNS.field(schema.DEDUP), pa.array(cols.pop(schema.DEDUP), pa.bool_())
        )
        for f in schema.ENGINE_COLUMNS:
            batch = schema.put_column(batch, f, pa.array(cols[f.name], f.type))
        return batch
