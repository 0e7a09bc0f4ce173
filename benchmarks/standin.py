"""A cheap stand-in for the engine stage, for benchmarks of everything around it.

It answers like a small model mostly does (the response's opening as the "instruction", wrapped in
the JSON the FLIP prompt asks for) at no cost, so read, similarity, write and the driver can be
measured at scales the CPU engine would take hours for. Benchmarks only: the shipped job always
runs the real engine stage.
"""

from __future__ import annotations

import json

import pyarrow as pa

from flip_ray import schema


class StandInEngineStage:
    """Same input and output columns as `BackwardInferenceStage` for `flip` (its other rewards' columns
    stay null); accepts (and ignores) its other kwargs."""

    def __init__(self, *, methods=(), **_):
        self.fields = schema.engine_fields(list(methods) or ["flip"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        totals = batch.column(schema.SHARD_TOTAL).to_pylist()
        responses = batch.column(schema.RESPONSE).to_pylist()
        cols = {name: [None] * n for name in self.fields.names}
        cols["error"] = list(errors)
        dedup = [None] * n
        for i in range(n):
            if errors[i] is not None or totals[i] is not None:
                continue
            opening = " ".join(responses[i].split()[:12])
            cols["_flip_generations"][i] = [json.dumps({"REASONING": "stand-in", "INFERRED INSTRUCTION": opening})]
            cols["finish_reason"][i] = "stop"
            cols["n_prompt_tokens"][i] = len(responses[i].split())
            cols["n_output_tokens"][i] = 20
            cols["truncated"][i] = False
            dedup[i] = False
        for f in self.fields:
            batch = schema.put_column(batch, f, pa.array(cols[f.name], f.type))
        return schema.put_column(batch, schema.CONTROL_COLUMNS.field(schema.DEDUP), pa.array(dedup, pa.bool_()))


def install() -> None:
    """Makes the pipeline build the stand-in instead of the engine stage, in this process and in the
    local Ray cluster it is about to start (whose workers inherit PYTHONPATH to import this module)."""
    import os
    from pathlib import Path

    import flip_ray.job.engine_stage

    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    flip_ray.job.engine_stage.BackwardInferenceStage = StandInEngineStage
