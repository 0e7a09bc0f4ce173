"""What a reward is: `RewardMethod`, declared once per reward in its own module of this package.

A reward has two parts, both optional but not both absent:

- an engine part (`engine`), built once in each engine actor: given the rows of a block it asks the
  engine for what it needs (generations, prompt log-probabilities) and returns one `RowScore` per row;
- a CPU part (`finish`), built once in each similarity actor: it turns what the engine part left in the
  block (e.g. `flip`'s raw generations) into its output columns.

Everything else about a reward is data: its output columns and their Arrow types (the output schema is
built from them), the column it ranks by and in which direction, what the report shows, its status
column, and the `reward.*` config keys it reads with their validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa


@dataclass(frozen=True)
class EngineRows:
    """The rows of a block that reach the engine (no error, not a shard marker)."""

    instructions: list[str]
    responses: list[str]
    contexts: list[list[dict] | None]  # earlier turns, or None
    raw_contexts: list[str | None]  # the same as JSON text (a stable key for caches)


@dataclass
class RowScore:
    """One reward's engine result for one row.

    `values` holds the reward's engine columns (`RewardMethod.engine_fields`) and may set the shared
    ones `finish_reason` and `n_output_tokens`; `raw` is the result itself, for rewards that reuse it
    (`RewardMethod.uses`)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    truncated: bool = False
    n_prompt_tokens: int | None = None
    reused: bool = False  # the answer was taken from an identical earlier row (dedup)
    raw: Any = None


def likelihood_score(lk, values: Mapping[str, Any]) -> RowScore:
    """A likelihood result (`engine.likelihood.Likelihood`) as a reward's engine result: `values`
    for its columns, the result's error, truncation and prompt length, and the result itself."""
    return RowScore(values, lk.error, lk.truncated, lk.n_prompt_tokens, raw=lk)


@dataclass(frozen=True)
class EngineSetup:
    """What an engine part is built from, in the engine actor: the shared prompt and sampling specs,
    the `reward.*` settings and the `flip` answers remembered per actor (0: no reuse)."""

    prompt: Any  # specs.PromptSpec
    sampling: Any  # specs.SamplingSpec
    settings: Mapping[str, Any]  # the `reward` config section as plain values
    dedup_cache_size: int = 0


@dataclass(frozen=True)
class FinishSetup:
    """What a CPU part is built from, in the similarity actor."""

    settings: Mapping[str, Any]  # the `reward` config section as plain values
    aggregate: str = "mean"  # sampling.aggregate: how the scores of n samples are combined


class EngineScorer(Protocol):
    def score(self, rows: EngineRows, earlier: Mapping[str, list[RowScore]]) -> list[RowScore]:
        """One `RowScore` per row; `earlier` holds the results of the rewards this one `uses` that
        ran before it on the same rows."""


class Finisher(Protocol):
    def __call__(self, batch: pa.Table, instructions: list, responses: list, rows: list[int]) -> dict[str, list]:
        """Its output columns for every row of `batch` (None where not scored), computed for `rows`:
        the rows that reached the engine and that its engine part did not fail on. `instructions`
        and `responses` are the real instruction and the response of every row of `batch`."""


@dataclass(frozen=True)
class RewardMethod:
    """One reward, declared once.

    Attributes:
        name: Its name in `reward.methods` and `evaluation.methods`.
        about: One line on what it measures (report, docs).
        fields: Its output columns, in order, with their Arrow types. Its error column
            (`<name>_error`) is added by the registry.
        rank_column: The scalar it ranks by (filter, best-of-N, pairs, evaluation); a function of the
            `reward.*` settings when it depends on them.
        engine: Builds its engine part in the engine actor: `engine(llm, EngineSetup)`.
        engine_fields: The columns its engine part writes (default: `fields`); may name internal
            ones (`_flip_...`) that its `finish` part turns into `fields`.
        finish: Builds its CPU part in the similarity actor: `finish(FinishSetup)`.
        higher_is_better: The direction of `rank_column`.
        status_column: A column of its `fields` that says how each answer was read (counted in the
            run summary, the report and the evaluation).
        report: Columns shown as rewards in the report, with a label each (default: the rank column
            with `about`).
        example_column: A column of its `fields` that explains a row's score, shown beside the real
            instruction in the report's examples (`flip`: the inferred instruction).
        flags: Boolean columns of its `fields` that mark a row's answer as suspect (`flip`: the
            inferred instruction copies the response, or echoes the prompt); counted beside the
            row flags in the run summary, the report and the evaluation.
        uses: Rewards whose results it reuses when they run in the same block (computed first).
        settings: The `reward.*` config keys it reads.
        validate: Checks those settings; returns the problems found (each a sentence).
        output_tokens: Whether its generated tokens are counted in the run's output tokens.
    """

    name: str
    about: str
    fields: tuple[pa.Field, ...]
    rank_column: str | Callable[[Mapping[str, Any]], str]
    engine: Callable[[Any, EngineSetup], EngineScorer] | None = None
    engine_fields: tuple[pa.Field, ...] | None = None
    finish: Callable[[FinishSetup], Finisher] | None = None
    higher_is_better: bool = True
    status_column: str | None = None
    report: Mapping[str, str] | None = None
    example_column: str | None = None
    flags: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    validate: Callable[[Mapping[str, Any]], Sequence[str]] | None = None

    def __post_init__(self):
        if self.engine is None and self.finish is None:
            raise ValueError(f"reward {self.name!r} has neither an engine part nor a CPU part")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"reward {self.name!r} declares a column twice: {names}")
        types = {f.name: f.type for f in self.fields}
        if bad := [f for f in self.flags if types.get(f) != pa.bool_()]:
            raise ValueError(f"reward {self.name!r}: flags {bad} are not boolean columns of its fields")

    @property
    def error_column(self) -> str:
        return f"{self.name}_error"

    def ranked_by(self, settings: Mapping[str, Any] | None = None) -> str:
        """The column it ranks by under `settings` (the `reward` config section)."""
        if callable(self.rank_column):
            return self.rank_column(settings or {})
        return self.rank_column

    def engine_columns(self) -> tuple[pa.Field, ...]:
        return self.fields if self.engine_fields is None else self.engine_fields

    def report_columns(self) -> Mapping[str, str]:
        if self.report is not None:
            return self.report
        return {self.ranked_by(): f"{self.about} ({self.name})"}
