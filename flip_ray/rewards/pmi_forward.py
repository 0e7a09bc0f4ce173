"""`pmi_forward`: the forward likelihood baseline, not FLIP: mean log P(response | instruction) minus
mean log P(response | a generic instruction), per response token. Two prefills per row
(`controls.ForwardLikelihood`)."""

from __future__ import annotations

import pyarrow as pa

from flip_ray.rewards.base import EngineRows, EngineSetup, RewardMethod, RowScore, likelihood_score

COLUMN = "pmi_forward"


class ForwardEngine:
    def __init__(self, llm, setup: EngineSetup):
        from flip_ray.engine.controls import ForwardLikelihood

        self.forward = ForwardLikelihood(llm, setup.prompt)

    def score(self, rows: EngineRows, earlier) -> list[RowScore]:
        results = self.forward.score(rows.instructions, rows.responses, rows.contexts)
        return [likelihood_score(lk, {COLUMN: lk.contrast}) for lk in results]  # the reward is the contrast


PMI_FORWARD = RewardMethod(
    name="pmi_forward",
    about="log P(response | instruction) minus log P(response | a generic instruction)",
    fields=(pa.field(COLUMN, pa.float64()),),
    rank_column=COLUMN,
    engine=ForwardEngine,
    report={COLUMN: "log P(response | instruction) minus | a generic instruction (pmi_forward)"},
)
