"""`flip_logprob_lexical`: `flip_logprob` minus the same instruction's log-probability after a lexical
control of the response (`reward.lexical_control`): what the response says about the instruction
beyond the words they share. One more prefill per row (`controls.LexicalLikelihood`); when
`flip_logprob` runs too, its result is the own term and only the control is prefilled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from flip_ray.rewards.base import EngineRows, EngineSetup, RewardMethod, RowScore, likelihood_score
from flip_ray.text.prompts import LEXICAL_CONTROLS

COLUMN = "flip_logprob_lexical"


class LexicalEngine:
    def __init__(self, llm, setup: EngineSetup):
        from flip_ray.engine.controls import LexicalLikelihood

        s = setup.settings
        self.lexical = LexicalLikelihood(
            llm,
            setup.prompt,
            logprob_format=s.get("logprob_format", "plain"),
            control=s.get("lexical_control", "overlap"),
        )

    def score(self, rows: EngineRows, earlier) -> list[RowScore]:
        # The own term is flip_logprob's when both run (same prompt and format; its distractors, if
        # any, change only its contrast): only the controls are prefilled then.
        own = earlier.get("flip_logprob")
        results = self.lexical.score(
            rows.instructions, rows.responses, rows.contexts, own=[r.raw for r in own] if own else None
        )
        return [likelihood_score(lk, {COLUMN: lk.contrast}) for lk in results]  # the reward is the contrast


def validate(settings: Mapping[str, Any]) -> list[str]:
    control = settings.get("lexical_control", "overlap")
    if control not in LEXICAL_CONTROLS:
        return [f"`reward.lexical_control` must be one of {LEXICAL_CONTROLS}, got {control!r}"]
    return []


FLIP_LOGPROB_LEXICAL = RewardMethod(
    name="flip_logprob_lexical",
    about="flip_logprob minus its lexical control",
    fields=(pa.field(COLUMN, pa.float64()),),
    rank_column=COLUMN,
    engine=LexicalEngine,
    report={COLUMN: "flip_logprob minus its lexical control (flip_logprob_lexical)"},
    uses=("flip_logprob",),
    settings=("prompt", "few_shot", "logprob_format", "lexical_control"),
    validate=validate,
)
