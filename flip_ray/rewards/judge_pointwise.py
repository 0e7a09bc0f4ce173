"""`judge_pointwise`: the same model as a 1-10 judge with the authors' prompt (a baseline, not FLIP);
generation of `reward.judge_max_tokens` tokens, verdict parsed by `verdicts.parse_pointwise`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from flip_ray.engine.verdicts import parse_pointwise
from flip_ray.rewards.base import EngineRows, EngineSetup, RewardMethod, RowScore

FIELDS = (pa.field("judge_score", pa.float64()), pa.field("judge_parse_status", pa.string()))


def row_score(g) -> RowScore:
    """The verdict's score and how it was read. The judge's prompt is not the row's FLIP prompt: its
    length is not reported as `n_prompt_tokens`."""
    if g.error:
        return RowScore({}, g.error, g.truncated, raw=g)
    score, status = parse_pointwise(g.texts[0] if g.texts else "")
    return RowScore({"judge_score": score, "judge_parse_status": status}, None, g.truncated, raw=g)


class JudgeEngine:
    def __init__(self, llm, setup: EngineSetup):
        from flip_ray.engine.judge import Judge

        max_tokens = setup.settings.get("judge_max_tokens", 256)
        self.judge = Judge(llm, setup.prompt, max_tokens=max_tokens, seed=setup.sampling.seed)

    def score(self, rows: EngineRows, earlier) -> list[RowScore]:
        return [row_score(g) for g in self.judge.pointwise(rows.instructions, rows.responses, rows.contexts)]


def validate(settings: Mapping[str, Any]) -> list[str]:
    return [] if settings.get("judge_max_tokens", 256) >= 1 else ["`reward.judge_max_tokens` must be >= 1"]


JUDGE_POINTWISE = RewardMethod(
    name="judge_pointwise",
    about="the same model as a 1-10 judge",
    fields=FIELDS,
    rank_column="judge_score",
    engine=JudgeEngine,
    status_column="judge_parse_status",
    report={"judge_score": "the same model as a 1-10 judge (judge_pointwise)"},
    settings=("judge_max_tokens",),
    validate=validate,
)
