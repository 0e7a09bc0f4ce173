"""`flip`: the paper's reward. The engine infers the instruction from the response alone (generation,
`sampling.*`); the similarity actors parse the answer and compare it with the real instruction
(`reward.similarity`: word-level F1 by default).

Identical (history, response) rows share one generation per engine actor (`dedup.*`)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from flip_ray.rewards.base import EngineRows, EngineSetup, FinishSetup, RewardMethod, RowScore
from flip_ray.rewards.flip_f1 import score_batch
from flip_ray.text.copying import COPY_FLAGS, measure_copying
from flip_ray.text.similarity import METRICS

# Internal column: the raw answers of the engine, one per sample; the similarity stage reads them.
GENERATIONS = "_flip_generations"
FIELDS = (
    pa.field("inferred_instruction", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("flip_score", pa.float64()),
    pa.field("flip_precision", pa.float64()),
    pa.field("flip_recall", pa.float64()),
    pa.field("parse_status", pa.string()),
    # how much of the inferred instruction is the response copied, and whether it echoes the prompt
    # (`text.copying`): measured on the reported answer
    pa.field("copy_span", pa.int64()),
    pa.field("copy_fraction", pa.float64()),
    *(pa.field(name, pa.bool_()) for name in COPY_FLAGS),
)


class AnswerCache:
    """`flip` answers by (history, response), least recently used first out. Size 0: no reuse at all,
    every row goes to the engine."""

    def __init__(self, size: int):
        self.size = size
        self.answers: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()  # blocks in flight share the actor's cache

    @staticmethod
    def key(response: str, context: str | None) -> str:
        return hashlib.sha1(f"{context or ''}\x1f{response}".encode()).hexdigest()

    def plan(self, keys: list[str]) -> tuple[list[int], dict[int, int | object]]:
        """Which of `keys` go to the engine (`fresh`, positions in `keys`) and where each other one
        takes its answer from: the position of an earlier identical key, or a cached answer."""
        with self.lock:
            return self._plan(keys)

    def _plan(self, keys: list[str]) -> tuple[list[int], dict[int, int | object]]:
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
        with self.lock:
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


def row_score(g, reused: bool) -> RowScore:
    """A `engine.Generation` as flip's engine result. A reused answer holds the tokens of the answer it
    shares, so that a row's values do not depend on which of two identical rows the engine saw first
    (the run's output-token count leaves reused rows out: `job.stages.part_stats`)."""
    values = {GENERATIONS: g.texts, "finish_reason": g.finish_reason, "n_output_tokens": g.n_output_tokens}
    error = g.error or (None if g.texts else "engine returned no output")
    return RowScore(values, error, g.truncated, g.n_prompt_tokens, reused, g)


class FlipEngine:
    def __init__(self, llm, setup: EngineSetup):
        from flip_ray.engine.generation import FlipGenerator

        self.generator = FlipGenerator(llm, setup.prompt, setup.sampling)
        self.cache = AnswerCache(setup.dedup_cache_size)

    def score(self, rows: EngineRows, earlier) -> list[RowScore]:
        keys = [AnswerCache.key(r, c) for r, c in zip(rows.responses, rows.raw_contexts, strict=True)]
        answers, reused = deduplicated(
            keys,
            self.cache,
            lambda fresh: self.generator.generate(
                [rows.responses[p] for p in fresh], [rows.contexts[p] for p in fresh]
            ),
        )
        return [row_score(g, r) for g, r in zip(answers, reused, strict=True)]


class FlipFinish:
    """Parses each answer, measures it against the real instruction (`flip_f1.score_batch`) and
    against the response it was read from (`copying.measure_copying`)."""

    def __init__(self, setup: FinishSetup):
        from flip_ray.text.similarity import EmbeddingSimilarity

        self.similarity = setup.settings.get("similarity", "f1")
        self.aggregate = setup.aggregate
        self.embedder = EmbeddingSimilarity() if self.similarity == "embedding" else None

    def __call__(self, batch: pa.Table, instructions: list, responses: list, rows: list[int]) -> dict[str, list]:
        generations = batch.column(GENERATIONS).to_pylist()
        cols: dict[str, list] = {f.name: [None] * batch.num_rows for f in FIELDS}
        scores = score_batch(
            [instructions[i] for i in rows],
            [generations[i] for i in rows],
            self.aggregate,
            self.similarity,
            self.embedder,
        )
        for i, s in zip(rows, scores, strict=True):
            for f, value in zip(FIELDS, (*s, *measure_copying(s.inferred_instruction, responses[i])), strict=True):
                cols[f.name][i] = value
        return cols


def validate(settings: Mapping[str, Any]) -> list[str]:
    problems = []
    similarity = settings.get("similarity", "f1")
    if similarity not in METRICS:
        problems.append(f"`reward.similarity` must be one of {METRICS}, got {similarity!r}")
    for key, example in (
        ("block_copy", "reward.block_copy=4: no 4 tokens of the response copied in a row"),
        ("no_repeat_ngram", "reward.no_repeat_ngram=4: no 4 tokens of the answer repeated"),
    ):
        k = settings.get(key, 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
            problems.append(f"`reward.{key}` must be 0 (off) or a run of at least 2 tokens, got {k!r} (e.g. {example})")
    return problems


FLIP = RewardMethod(
    name="flip",
    about="F1 of the inferred and the real instruction",
    fields=FIELDS,
    rank_column="flip_score",
    engine=FlipEngine,
    engine_fields=(pa.field(GENERATIONS, pa.list_(pa.string())),),
    finish=FlipFinish,
    status_column="parse_status",
    example_column="inferred_instruction",
    flags=COPY_FLAGS,
    settings=("prompt", "few_shot", "guided_json", "similarity", "block_copy", "no_repeat_ngram"),
    validate=validate,
)
