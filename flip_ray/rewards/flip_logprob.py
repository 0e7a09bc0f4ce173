"""`flip_logprob`: the likelihood form of backward inference. The real instruction, teacher-forced as
the answer to the FLIP question about the response; its mean log-probability is the reward. One
prefill per row, no decoding (`likelihood.FlipLikelihood`). With `reward.logprob_distractors` > 0 it
also scores generic instructions after each response and ranks by `flip_logprob_contrast`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from flip_ray.rewards.base import EngineRows, EngineSetup, RewardMethod, RowScore, likelihood_score
from flip_ray.text.prompts import LOGPROB_FORMATS

FIELDS = (
    pa.field("flip_logprob_mean", pa.float64()),
    pa.field("flip_logprob_sum", pa.float64()),
    pa.field("flip_logprob_tokens", pa.int64()),
    pa.field("flip_logprob_contrast", pa.float64()),
)


def row_score(lk) -> RowScore:
    values = {
        "flip_logprob_mean": lk.logprob_mean,
        "flip_logprob_sum": lk.logprob_sum,
        "flip_logprob_tokens": lk.tokens,
        "flip_logprob_contrast": lk.contrast,
    }
    return likelihood_score(lk, values)


class FlipLogprobEngine:
    def __init__(self, llm, setup: EngineSetup):
        from flip_ray.engine.likelihood import FlipLikelihood

        s = setup.settings
        self.likelihood = FlipLikelihood(
            llm,
            setup.prompt,
            logprob_format=s.get("logprob_format", "plain"),
            distractors=s.get("logprob_distractors", 0),
        )

    def score(self, rows: EngineRows, earlier) -> list[RowScore]:
        return [row_score(lk) for lk in self.likelihood.score(rows.instructions, rows.responses, rows.contexts)]


def ranked_by(settings: Mapping[str, Any]) -> str:
    return "flip_logprob_contrast" if settings.get("logprob_distractors") else "flip_logprob_mean"


def validate(settings: Mapping[str, Any]) -> list[str]:
    problems = []
    fmt, k = settings.get("logprob_format", "plain"), settings.get("logprob_distractors", 0)
    if fmt not in LOGPROB_FORMATS:
        problems.append(f"`reward.logprob_format` must be one of {LOGPROB_FORMATS}, got {fmt!r}")
    if not 0 <= k <= 16:
        problems.append("`reward.logprob_distractors` must be in [0, 16]")
    return problems


FLIP_LOGPROB = RewardMethod(
    name="flip_logprob",
    about="mean log-probability of the real instruction after the response",
    fields=FIELDS,
    rank_column=ranked_by,
    engine=FlipLogprobEngine,
    report={
        "flip_logprob_mean": "mean log-probability of the real instruction (flip_logprob)",
        "flip_logprob_contrast": "flip_logprob minus generic instructions' (contrast)",
    },
    settings=("prompt", "few_shot", "logprob_format", "logprob_distractors"),
    validate=validate,
)
