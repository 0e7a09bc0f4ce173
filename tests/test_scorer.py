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
    from flip_ray.engine.specs import BLOCK_COPY_PROCESSOR, EngineSpec

    # With reward.block_copy's logits processor loaded: requests that do not ask for it are untouched.
    return EngineSpec(
        embedded_model,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        logits_processors=(BLOCK_COPY_PROCESSOR,),
    ).build()


@pytest.fixture(scope="module")
def hf_model(embedded_model):
    """The same checkpoint in transformers: the independent computation the likelihoods are checked against."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model, torch_dtype=torch.float32)


def hf_logprobs(model, ids: list[int], n_last: int) -> list[float]:
    """log P of each of the last `n_last` tokens of `ids` given the tokens before it, in transformers."""
    import torch

    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    start = len(ids) - n_last
    return [float(logprobs[start - 1 + k, ids[start + k]]) for k in range(n_last)]


def test_scorer_matches_metric_and_handles_chat_and_bad_rows(llm):
    from flip_ray.scorer import FlipScorer
    from flip_ray.text.metrics import f1_score
    from flip_ray.text.parsing import parse_inferred_instruction
    from flip_ray.text.rows import RowError

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
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.specs import SamplingSpec
    from flip_ray.text.rows import RowError

    gen = FlipGenerator(llm, sampling=SamplingSpec(max_tokens=64))
    ids, truncated = gen.render("word " * 2000)
    assert truncated and len(ids) <= 512 - 64
    context = [{"role": "user", "content": "old " * 600}, {"role": "assistant", "content": "reply"}]
    ids, truncated = gen.render("short answer", context)
    assert truncated and len(ids) <= 512 - 64
    ids, truncated = gen.render("short answer")
    assert not truncated
    tight = FlipGenerator(
        llm, sampling=SamplingSpec(max_tokens=400)
    )  # the prompt template alone does not fit in 112 tokens
    with pytest.raises(RowError, match="does not fit"):
        tight.render("anything")


def test_flip_likelihood_equals_a_transformers_forward_pass(llm, hf_model):
    """flip_logprob is the log-probability of the real instruction's tokens after the FLIP prompt,
    checked against an independent forward pass of the same checkpoint in transformers."""
    from flip_ray.engine.likelihood import FlipLikelihood

    lk = FlipLikelihood(llm)
    instruction = "Write a haiku about autumn leaves."
    responses = ["Crimson leaves drift down,\nthe maple lets go at last,\nwind carries the year.", "2 + 2 = 4."]
    out = lk.score([instruction] * 2, responses)
    ids, target, truncated = lk._render(instruction, responses[0], None)
    assert not truncated and out[0].tokens == len(target) and out[0].error is None
    expected = sum(hf_logprobs(hf_model, ids + target, len(target)))
    assert abs(out[0].logprob_sum - expected) < 1e-2 * len(target)
    assert out[0].logprob_mean == pytest.approx(out[0].logprob_sum / len(target))
    # The haiku explains the instruction better than an arithmetic answer does.
    assert out[0].logprob_mean > out[1].logprob_mean


def test_flip_likelihood_truncates_long_responses_and_records_errors(llm):
    from flip_ray.engine.likelihood import FlipLikelihood

    lk = FlipLikelihood(llm, logprob_format="json")
    out = lk.score(["Summarise this.", "x " * 600], ["word " * 2000, "fine"])
    assert out[0].error is None and out[0].truncated and out[0].n_prompt_tokens <= 512
    assert out[1].error is not None and "too long" in out[1].error


def test_judge_and_prompt_levers_on_the_real_engine(llm):
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.judge import Judge
    from flip_ray.engine.specs import PromptSpec, SamplingSpec
    from flip_ray.engine.verdicts import parse_pairwise, parse_pointwise
    from flip_ray.text.parsing import parse_inferred_instruction

    judge = Judge(llm, PromptSpec(guided_json=True), max_tokens=160)
    g = judge.pointwise(["Name a primary colour."], ["Red is a primary colour."])[0]
    score, status = parse_pointwise(g.texts[0])
    assert status == "json" and 1 <= score <= 10, g.texts[0]
    g = judge.pairwise(["Name a primary colour."], [("Red.", "Bananas are yellow fruit.")])[0]
    choice, status = parse_pairwise(g.texts[0])
    assert status == "json" and choice in ("A", "B"), g.texts[0]
    g = judge.listwise(["Name a primary colour."], [["Red.", "Green tea.", "Blue."]])[0]
    assert json.loads(g.texts[0])["BEST_RESPONSE_INDEX"] in (0, 1, 2)
    # Guided decoding always yields the JSON the prompt asks for, with or without the reasoning key.
    for variant in ("flip", "no_reasoning"):
        gen = FlipGenerator(llm, PromptSpec(variant, few_shot=1, guided_json=True), SamplingSpec(max_tokens=128))
        g = gen.generate(["Crimson leaves drift down,\nthe maple lets go at last."])[0]
        assert g.error is None, g.error
        text = g.texts[0]
        parsed = parse_inferred_instruction(text)
        assert parsed.status in ("json", "partial_json"), text
        assert ("REASONING" in text) == (variant == "flip") or parsed.status == "partial_json"


def test_flip_likelihood_contrast_subtracts_generic_instructions(llm):
    from flip_ray.engine.likelihood import FlipLikelihood
    from flip_ray.text.prompts import distractors_for

    instruction, response = "Write a haiku about autumn leaves.", "Crimson leaves drift down,\nthe maple lets go."
    contrasted = FlipLikelihood(llm, distractors=3).score([instruction], [response])[0]
    plain = FlipLikelihood(llm)
    own = plain.score([instruction], [response])[0]
    others = plain.score(distractors_for(instruction, 3), [response] * 3)
    assert contrasted.logprob_mean == pytest.approx(own.logprob_mean, abs=1e-4)
    expected = own.logprob_mean - sum(o.logprob_mean for o in others) / 3
    assert contrasted.contrast == pytest.approx(expected, abs=1e-4)
    assert distractors_for(instruction, 3) == distractors_for(instruction, 3)
    assert instruction not in distractors_for(instruction, 30) and len(distractors_for(instruction, 30)) == 24


def test_scorer_likelihood_reward(llm):
    from flip_ray.engine.likelihood import FlipLikelihood
    from flip_ray.engine.specs import PromptSpec
    from flip_ray.scorer import FlipScorer

    scorer = FlipScorer(llm, likelihood=True, variant="no_reasoning")
    prompts = [
        "Write a haiku about autumn leaves.",
        [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    ]
    completions = ["Crimson leaves drift down,\nthe maple lets go.", [{"role": "assistant", "content": ""}]]
    rewards = scorer(prompts=prompts, completions=completions)
    direct = FlipLikelihood(llm, PromptSpec("no_reasoning")).score([prompts[0]], [completions[0]])[0]
    assert rewards[0] == pytest.approx(direct.logprob_mean) and rewards[0] < 0
    assert rewards[1] == 0.0  # an empty completion gets error_reward


def _long_responses(tag: str, n: int = 24) -> list[str]:
    # Distinct long responses: together they exceed one engine step, so prefills are split.
    rows = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
    return [f"[{tag} {k}] " + rows[k % len(rows)]["response"] for k in range(n)]


def test_sampling_on_cpu_uses_the_engine_seed(llm):
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.specs import PromptSpec, SamplingSpec

    gen = FlipGenerator(llm, PromptSpec("flip"), SamplingSpec(temperature=0.7, max_tokens=4, seed=0))
    assert gen.params.seed is None  # vLLM's CPU backend fails on per-request seeds with split prefills
    out = gen.generate(_long_responses("sampled"))
    assert [g.error for g in out] == [None] * len(out)
    assert all(g.texts and g.n_output_tokens for g in out)


def test_a_failed_batch_leaves_no_request_behind(llm, monkeypatch, caplog):
    import flip_ray.engine.generation as engine
    from flip_ray.engine.specs import PromptSpec, SamplingSpec

    # Force the per-request seed the CPU backend cannot honour: an engine step fails, the requests in
    # the engine are run again one by one, and none is left behind.
    monkeypatch.setattr(engine, "request_seed", lambda seed, temperature: seed)
    # The authors' longer prompt: the batch's prefills then exceed one engine step and are split.
    gen = engine.FlipGenerator(llm, PromptSpec("flip"), SamplingSpec(temperature=0.7, max_tokens=2, seed=0))
    with caplog.at_level("WARNING", logger="flip_ray.engine.queue"):
        out = gen.generate(_long_responses("forced"))
    assert "running its 24 requests again one by one" in caplog.text
    assert [g.error for g in out] == [None] * len(out)
    assert not llm.llm_engine.has_unfinished_requests()


def test_flip_logprob_reads_the_prefix_cache_with_identical_scores(llm, caplog):
    """The likelihood prefill reuses the KV cache the generation pass left for the FLIP prompt, and
    gives the scores of a full prefill (the path before) to float tolerance; an instruction whose own
    tokens were cached (the same request again) is prefilled again, logged, with the same score."""
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.likelihood import FlipLikelihood
    from flip_ray.scorer import FlipScorer

    rows = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
    prompts, responses = [r["prompt"] for r in rows[:6]], [r["response"] for r in rows[:6]]
    llm.reset_prefix_cache()
    full = FlipLikelihood(llm, reuse_prefix=False).score(prompts, responses)
    assert all(r.cached_tokens == 0 for r in full)
    llm.reset_prefix_cache()
    FlipGenerator(llm).generate(responses)  # the generation pass, as in the engine stage
    reused = FlipLikelihood(llm).score(prompts, responses)
    for a, b in zip(full, reused, strict=True):
        assert b.cached_tokens > 0 and b.tokens == a.tokens
        assert b.logprob_sum == pytest.approx(a.logprob_sum, abs=1e-4)
    # Contrast instructions after the same response share its prefix too.
    contrast_full = FlipLikelihood(llm, distractors=2, reuse_prefix=False).score(prompts[:2], responses[:2])
    contrast = FlipLikelihood(llm, distractors=2).score(prompts[:2], responses[:2])
    assert [c.contrast for c in contrast] == pytest.approx([c.contrast for c in contrast_full], abs=1e-4)
    # A long instruction scored twice: the second request finds its own tokens cached.
    long_instruction = "Explain, step by step and with examples, " * 12 + "how tides work."
    first = FlipLikelihood(llm).score([long_instruction], [responses[0]])[0]
    with caplog.at_level("INFO", logger="flip_ray.engine.likelihood"):
        second = FlipLikelihood(llm).score([long_instruction], [responses[0]])[0]
    assert "prefilled again without the prefix cache" in caplog.text
    assert second.logprob_sum == pytest.approx(first.logprob_sum, abs=1e-4)
    # In process: the likelihood reward after the F1 reward reuses the same cache (both prompts fit
    # this 512-token window whole, so they share their token ids). Fresh rows: the requests above
    # left these rows' instruction tokens cached, which sends them to a full prefill.
    llm.reset_prefix_cache()
    scorer = FlipScorer(llm, likelihood=True, max_tokens=64)
    scorer.score(prompts[:2], responses[:2])
    after = scorer.lk.score(prompts[:2], responses[:2])
    assert after[0].cached_tokens > 0 and after[0].logprob_sum == pytest.approx(full[0].logprob_sum, abs=1e-4)


ROWS = [
    ("Write a haiku about autumn leaves.", "Crimson leaves drift down,\nthe maple lets go,\nwind takes the year."),
    ("Write a haiku about autumn leaves.", "Here is a haiku about autumn leaves: autumn leaves, a haiku."),
    ("What is the capital of France?", "The capital of France is Paris. It is also its largest city."),
]


@pytest.mark.parametrize("control", ["shuffle", "overlap"])
def test_flip_logprob_lexical_equals_transformers_with_its_control(llm, hf_model, control):
    """flip_logprob_lexical = the instruction's mean log-probability after the response minus after
    its lexical control, each term checked against transformers; the own term reused from
    flip_logprob gives the same reward."""
    from flip_ray.engine.controls import LexicalLikelihood
    from flip_ray.engine.likelihood import FlipLikelihood
    from flip_ray.text.prompts import lexical_control

    lexical = LexicalLikelihood(llm, control=control)
    instructions, responses = [r[0] for r in ROWS], [r[1] for r in ROWS]
    out = lexical.score(instructions, responses)
    own = FlipLikelihood(llm).score(instructions, responses)
    reused = lexical.score(instructions, responses, own=own)
    for (instruction, response), got, again in zip(ROWS, out, reused, strict=True):
        assert got.error is None and not got.truncated
        means = []
        for text in (response, lexical_control(response, instruction, control)):
            ids, target, _ = lexical.likelihood._render(instruction, text, None)
            means.append(sum(hf_logprobs(hf_model, ids + target, len(target))) / len(target))
        assert got.contrast == pytest.approx(means[0] - means[1], abs=1e-2)
        assert again.contrast == pytest.approx(got.contrast, abs=1e-4)


def test_pmi_forward_equals_transformers_and_rewards_the_matching_instruction(llm, hf_model):
    """pmi_forward = mean log P(response | instruction) - mean log P(response | generic instruction)
    over the same response tokens, each term checked against transformers."""
    from flip_ray.engine.controls import ForwardLikelihood

    forward = ForwardLikelihood(llm)
    instructions, responses = [r[0] for r in ROWS], [r[1] for r in ROWS]
    out = forward.score(instructions, responses)
    for (instruction, response), got in zip(ROWS, out, strict=True):
        assert got.error is None and not got.truncated
        means = []
        for condition in ("instruction", "generic"):
            ids, _, target = forward._render(instruction, response, None, condition)
            means.append(sum(hf_logprobs(hf_model, ids, len(target))) / len(target))
        assert got.logprob_mean == pytest.approx(means[0], abs=1e-2)
        assert got.contrast == pytest.approx(means[0] - means[1], abs=1e-2)
    # Paris is better explained by the question about France than by the haiku request.
    swapped = forward.score([ROWS[0][0]], [ROWS[2][1]])[0]
    assert out[2].contrast > swapped.contrast
    # A response longer than the window is cut (same tokens in both terms) and flagged; an
    # instruction that leaves no room is the row's error.
    cut, failed = forward.score(["Summarise this.", "x " * 600], ["word " * 2000, "fine"])
    assert cut.error is None and cut.truncated and cut.n_prompt_tokens <= 512
    assert failed.error is not None and "no room" in failed.error


def _sample_rows(n: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
    rows = [rows[k % len(rows)] for k in range(n)]
    return [r["prompt"] for r in rows], [f"({k}) " + r["response"] for k, r in enumerate(rows)]


def test_the_engine_queue_generates_what_llm_generate_does(llm):
    """Requests through the engine queue (deltas merged, a step thread) give the texts, token counts
    and finish reasons of one `LLM.generate` call on the same prompts (the path before)."""
    from vllm.inputs import TokensPrompt

    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.specs import SamplingSpec

    _, responses = _sample_rows(12)
    gen = FlipGenerator(llm, sampling=SamplingSpec(max_tokens=24))
    queued = gen.generate(responses)
    prompts = [TokensPrompt(prompt_token_ids=gen.render(r)[0]) for r in responses]
    direct = llm.generate(prompts, gen.params.clone(), use_tqdm=False)
    assert [g.texts for g in queued] == [[c.text for c in o.outputs] for o in direct]
    assert [g.n_output_tokens for g in queued] == [len(o.outputs[0].token_ids) for o in direct]
    assert [g.finish_reason for g in queued] == [o.outputs[0].finish_reason for o in direct]


def test_rewards_and_blocks_share_one_engine_queue_with_identical_scores(llm):
    """flip and flip_logprob of several blocks at once (threads, as Ray Data calls an engine actor
    with max_concurrent_batches): every request in the one engine queue at the same time, more of
    them in the engine than one block has; each likelihood request waits for its row's generation to
    prefill and reads the FLIP prompt from the prefix cache; every value equal to the rewards run
    one after the other, block by block."""
    from concurrent.futures import ThreadPoolExecutor

    from flip_ray.engine.queue import EngineQueue
    from flip_ray.engine.specs import PromptSpec, SamplingSpec
    from flip_ray.job.engine_stage import score_together
    from flip_ray.job.occupancy import summarize
    from flip_ray.rewards import EngineRows, EngineSetup, get

    prompts, responses = _sample_rows(24)
    blocks = [EngineRows(prompts[k : k + 6], responses[k : k + 6], [None] * 6, [None] * 6) for k in range(0, 24, 6)]
    setup = EngineSetup(PromptSpec(), SamplingSpec(max_tokens=24), {}, dedup_cache_size=0)
    parts = [(get(name), get(name).engine(llm, setup)) for name in ("flip", "flip_logprob")]

    llm.reset_prefix_cache()
    one_by_one = [{m.name: part.score(rows, {}) for m, part in parts} for rows in blocks]
    llm.reset_prefix_cache()
    queue = EngineQueue.of(llm)
    counts_before = queue.occupancy.counts()
    before = summarize({"actor": counts_before})
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda rows: score_together(parts, rows), blocks))
    counts_after = queue.occupancy.counts()
    after = summarize({"actor": counts_after})

    # The answers are computed in other batches (fp32 on CPU may round a logit differently there): a
    # near-tie may decode otherwise, so one row in 24 may differ; the rest are equal.
    pairs = [
        (x.values, y.values)
        for a, b in zip(one_by_one, together, strict=True)
        for x, y in zip(a["flip"], b["flip"], strict=True)
    ]
    assert sum(x != y for x, y in pairs) <= 1, [p for p in pairs if p[0] != p[1]]
    for a, b in zip(one_by_one, together, strict=True):
        for x, y in zip(a["flip_logprob"], b["flip_logprob"], strict=True):
            assert x.error is None and y.error is None
            assert y.values["flip_logprob_sum"] == pytest.approx(x.values["flip_logprob_sum"], abs=1e-3)
            assert y.values["flip_logprob_mean"] == pytest.approx(x.values["flip_logprob_mean"], abs=1e-4)
    # A row's FLIP prompt was prefilled once: its likelihood read it from the cache its generation
    # left, or (the likelihood sent first) the other way round.
    for block in together:
        for g, lk in zip(block["flip"], block["flip_logprob"], strict=True):
            assert g.raw.cached_tokens > 0 or lk.raw.cached_tokens > 0
    assert after["prefix_held"] > before["prefix_held"]
    assert after["max_requests_in_engine"] > 12  # more than one block's generations and likelihoods
    # vLLM's own scheduler statistics: a synchronous call per 6-row block never averages more than 6
    # running requests; with the blocks in flight it must (over this test's steps).
    running_s, busy_s = (counts_after[k] - counts_before[k] for k in ("running_seconds", "busy_s"))
    assert running_s / busy_s > 6 and after["max_running_requests"] > 12, (running_s / busy_s, after)
    assert after["preempted_requests"] == 0 and after["prefix_cache_hit_rate"] > 0, after


def copied_runs(ids: list[int], source: list[int], k: int) -> list[int]:
    """Brute force: every position of `ids` that starts k tokens found in a row in `source`."""
    return [
        i
        for i in range(len(ids) - k + 1)
        if any(source[j : j + k] == ids[i : i + k] for j in range(len(source) - k + 1))
    ]


def test_block_copy_never_copies_k_tokens_of_the_response(llm):
    """reward.block_copy's logits processor against a brute-force check of the generated tokens: with
    it no generation holds k tokens of its response in a row; without it the same rows do copy (so the
    check can fail), and a row that copied nothing decodes the same either way."""
    from vllm.inputs import TokensPrompt

    from flip_ray.engine.copy_block import request_params
    from flip_ray.engine.generation import FlipGenerator, generate_isolated
    from flip_ray.engine.specs import PromptSpec, SamplingSpec
    from flip_ray.text.copying import measure_copying

    rows = [json.loads(line) for line in Path("flip_ray/samples/alpacaeval_sample.jsonl").read_text().splitlines()]
    responses = [r["response"] for r in rows[:12]]
    generator = FlipGenerator(llm, PromptSpec(), SamplingSpec(max_tokens=48))
    prompts = [TokensPrompt(prompt_token_ids=generator.render(r)[0]) for r in responses]
    sources = [generator.fitter.encode(r) for r in responses]
    k = 4
    free = generate_isolated(llm, prompts, generator.params)
    blocked = generate_isolated(llm, prompts, [request_params(generator.params, k, s) for s in sources])
    copying = [copied_runs(list(o.outputs[0].token_ids), s, k) for o, s in zip(free, sources, strict=True)]
    assert sum(map(bool, copying)) >= 3, "the model should copy its response on some of these rows"
    for o, s in zip(blocked, sources, strict=True):
        assert copied_runs(list(o.outputs[0].token_ids), s, k) == [], o.outputs[0].text
    for f, b, c in zip(free, blocked, copying, strict=True):
        if not c:
            assert f.outputs[0].text == b.outputs[0].text
    # The word-level copy measure falls with it.
    before = sum(measure_copying(o.outputs[0].text, r).copy_fraction for o, r in zip(free, responses, strict=True))
    after = sum(measure_copying(o.outputs[0].text, r).copy_fraction for o, r in zip(blocked, responses, strict=True))
    assert after < before
    # Repeats blocked (reward.no_repeat_ngram): no 4 tokens of an answer occur twice in it.
    unrepeated = generate_isolated(llm, prompts, [request_params(generator.params, 0, [], 4) for _ in sources])
    for o in unrepeated:
        ids = list(o.outputs[0].token_ids)
        grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
        assert len(grams) == len(set(grams)), o.outputs[0].text
    # Through the generator as the job calls it: the same answers.
    assert [
        g.texts[0]
        for g in FlipGenerator(llm, PromptSpec(block_copy=k), SamplingSpec(max_tokens=48)).generate(responses)
    ] == [o.outputs[0].text for o in blocked]


def test_copy_blocker_state_against_brute_force():
    """The per-request state alone, on random token streams: the banned tokens at each step are
    exactly those that would complete a k-run of the source or repeat an n-gram of the output."""
    import random

    import torch

    from flip_ray.engine.copy_block import CopyBlocker

    rng = random.Random(0)
    for _ in range(200):
        vocab, k, n = rng.randint(2, 6), rng.choice([0, 2, 3, 4]), rng.choice([0, 2, 3])
        source = [rng.randrange(vocab) for _ in range(rng.randint(0, 20))]
        blocker, output = CopyBlocker(source, k, n), []
        for _ in range(15):
            logits = blocker(output, torch.zeros(vocab))
            for t in range(vocab):
                run = output[len(output) - k + 1 :] + [t] if k and len(output) >= k - 1 else None
                copies = run is not None and any(source[j : j + k] == run for j in range(len(source) - k + 1))
                gram = output[len(output) - n + 1 :] + [t] if n and len(output) >= n - 1 else None
                repeats = gram is not None and any(output[j : j + n] == gram for j in range(len(output) - n + 1))
                assert (logits[t] == float("-inf")) == (copies or repeats), (source, output, k, n, t)
            allowed = [t for t in range(vocab) if logits[t] != float("-inf")]
            if not allowed:
                break
            output.append(rng.choice(allowed))
