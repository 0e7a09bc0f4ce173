"""The in-process API on a real vllm.LLM (SmolLM2-135M on CPU), in this test process."""

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(embedded_model):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
    from flip_ray.engine import build_llm

    return build_llm(embedded_model, dtype="float32", max_model_len=512, enforce_eager=True)


def test_scorer_matches_metric_and_handles_chat_and_bad_rows(llm):
    from flip_ray.metrics import f1_score
    from flip_ray.parsing import parse_inferred_instruction
    from flip_ray.records import RowError
    from flip_ray.scorer import FlipScorer

    rows = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()][:4]
    scorer = FlipScorer(llm, max_tokens=48)
    prompts = [r["prompt"] for r in rows] + [[{"role": "user", "content": rows[0]["prompt"]}], "Say hi."]
    completions = [r["response"] for r in rows] + [[{"role": "assistant", "content": rows[0]["response"]}], ""]
    results = scorer.score(prompts, completions)
    assert isinstance(results[-1], RowError)
    for prompt, r in zip(prompts[:4], results[:4], strict=False):
        assert 0 <= r.flip_score <= 1
        assert r.flip_score == f1_score(r.inferred_instruction, prompt).f1
    # A chat prompt gives the same reward as the same plain prompt (greedy).
    assert results[4].flip_score == results[0].flip_score
    rewards = scorer(prompts=prompts, completions=completions)
    assert rewards == [r.flip_score for r in results[:5]] + [0.0]
    raw = scorer.generator.generate([rows[0]["response"]])[0]
    assert parse_inferred_instruction(raw.texts[0]).instruction == results[0].inferred_instruction


def test_render_truncates_to_the_window(llm):
    from flip_ray.engine import FlipGenerator
    from flip_ray.records import RowError

    gen = FlipGenerator(llm, max_tokens=64)
    ids, truncated = gen.render("word " * 2000)
    assert truncated and len(ids) <= 512 - 64
    context = [{"role": "user", "content": "old " * 600}, {"role": "assistant", "content": "reply"}]
    ids, truncated = gen.render("short answer", context)
    assert truncated and len(ids) <= 512 - 64
    ids, truncated = gen.render("short answer")
    assert not truncated
    tight = FlipGenerator(llm, max_tokens=400)  # the prompt template alone does not fit in 112 tokens
    with pytest.raises(RowError, match="does not fit"):
        tight.render("anything")
