"""One default, from one place: `FlipScorer(llm)` with no other argument gives the same rewards as
`flip-ray score` with its defaults, on the same rows and the same engine."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from flip_ray.config.base import ModelConfig, SamplingConfig, load_config
from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec
from flip_ray.recipe import run_score
from flip_ray.text.prompts import DEFAULT_PROMPT_VARIANT

pytestmark = pytest.mark.slow

ROWS = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()][:4]


def test_spec_defaults_are_the_job_defaults():
    cfg = load_config(None, ["input.path=x", "output.path=y"])
    assert PromptSpec() == PromptSpec.from_config(cfg.model, cfg.reward)
    assert PromptSpec().variant == DEFAULT_PROMPT_VARIANT == cfg.reward.prompt
    assert SamplingSpec() == SamplingSpec.from_config(OmegaConf.structured(SamplingConfig))
    assert cfg.reward.methods == ["flip", "flip_logprob"]


def test_flip_scorer_defaults_give_the_job_rewards(tmp_path, ray_local, embedded_model):
    from flip_ray.scorer import FlipScorer

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # The job with its defaults (only the paths, and the CPU device this machine has).
    run_score(load_config(None, [f"input.path={src}", f"output.path={tmp_path / 'out'}", "model.device=cpu"]))
    job = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}

    engine = EngineSpec.from_config(OmegaConf.structured(ModelConfig), device="cpu", seed=0)
    for key, value in engine.env().items():
        os.environ.setdefault(key, value)
    scorer = FlipScorer(replace(engine, model=embedded_model).build())
    prompts, responses = [r["prompt"] for r in ROWS], [r["response"] for r in ROWS]
    flip = scorer.score(prompts, responses)
    logprob = scorer.log_likelihoods(prompts, responses)
    for k in range(len(ROWS)):
        row = job[ROWS[k]["id"]]  # input.id_column=auto: the input's own `id` column
        assert flip[k].inferred_instruction == row["inferred_instruction"]
        assert flip[k].flip_score == row["flip_score"]
        assert logprob[k] == pytest.approx(row["flip_logprob_mean"], abs=1e-4)
