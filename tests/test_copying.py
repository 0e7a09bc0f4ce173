"""Copy and echo measures of an inferred instruction (`text.copying`), and where they show: flip's
output columns, the part counts and run summary, the summary line, the report and the evaluation table."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from flip_ray import rewards, schema
from flip_ray.text.copying import (
    COPY_FLAGS,
    SCAFFOLDING,
    echoes_template,
    longest_copied_span,
    looped,
    measure_copying,
)
from flip_ray.text.prompts import build_flip_messages


def brute_force_span(a: list[str], b: list[str]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_longest_copied_span_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        vocab = [f"w{k}" for k in range(rng.randint(1, 6))]
        a = [rng.choice(vocab) for _ in range(rng.randint(0, 15))]
        b = [rng.choice(vocab) for _ in range(rng.randint(0, 40))]
        assert longest_copied_span(a, b) == brute_force_span(a, b), (a, b)


RESPONSE = (
    "Python is a high-level programming language known for its readability. It supports several "
    "programming paradigms and has a large standard library."
)


def test_a_copied_opening_is_flagged_and_an_inferred_instruction_is_not():
    copied = measure_copying("Python is a high-level programming language known for its readability.", RESPONSE)
    assert copied.copy_span == 9 and copied.copy_fraction == 1.0 and copied.flag_copied_response
    inferred = measure_copying("Describe the Python programming language and its main strengths.", RESPONSE)
    assert inferred.copy_span < 4 and inferred.copy_fraction == 0.0 and not inferred.flag_copied_response
    # Quoting a short term of the response is not copying it.
    quoted = measure_copying("What is meant by 'a large standard library' when people talk about Python?", RESPONSE)
    assert quoted.copy_span == 3 and not quoted.flag_copied_response
    # Half an instruction copied: measured, below the flag's bar.
    half = measure_copying(
        "Python is a high-level programming language: write an essay on its history, its creator and "
        "its community over three decades",
        RESPONSE,
    )
    assert 0 < half.copy_fraction < 0.6 and not half.flag_copied_response


@pytest.mark.parametrize(
    "answer",
    [
        "<instruction>",
        "< Instruction >",
        "[Inferred Instruction]\n[Inferred Instruction]\n[Inferred Instruction]",
        "[Your Inferred Instruction] Write a poem",
        "[Response] The capital of France is Paris.",
        "INFERRED INSTRUCTION: write a haiku",
        "### Task Description\nPlease act as an instruction reconstructor.",
        "Write a haiku. Write a haiku. Write a haiku. Write a haiku. Write a haiku. Write a haiku.",
    ],
)
def test_echoes_of_the_prompt_and_loops_are_flagged(answer):
    assert echoes_template(answer)
    assert measure_copying(answer, RESPONSE).flag_echoed_template


@pytest.mark.parametrize(
    "answer",
    [
        "Write a haiku about autumn leaves.",
        "Explain your reasoning: why is the sky blue?",
        "Summarise the response below in three bullet points, one per paragraph.",
        "List the planets of the solar system in order from the sun, with one fact about each planet.",
        "",
    ],
)
def test_ordinary_instructions_are_not_echoes(answer):
    assert not echoes_template(answer)


def test_the_scaffolding_is_read_from_the_prompts_themselves():
    # Every placeholder and header the model is shown is caught as an echo.
    messages = build_flip_messages("RESPONSE TEXT", variant="flip")
    prompt_text = "\n".join(m["content"] for m in messages)
    for marker in ("<instruction>", "<explanation>", "[Response]", "[Your Inferred Instruction]"):
        assert marker in prompt_text and SCAFFOLDING.search(marker), marker


def test_looped_needs_many_repeated_words():
    assert looped(("a b c " * 6).split()) and not looped("a b c a b c".split())
    assert not looped("one two three four five six seven eight nine ten eleven twelve thirteen".split())


def test_flip_writes_the_measures_and_declares_its_flags():
    flip = rewards.get("flip")
    names = [f.name for f in flip.fields]
    assert {"copy_span", "copy_fraction", *COPY_FLAGS} <= set(names) and flip.flags == COPY_FLAGS
    assert set(COPY_FLAGS) <= set(schema.known_flags())
    finish = flip.finish(rewards.FinishSetup(settings={}))
    answers = [
        ['{"INFERRED INSTRUCTION": "Python is a high-level programming language known for its readability."}'],
        ['{"INFERRED INSTRUCTION": "<instruction>"}'],
        ['{"INFERRED INSTRUCTION": "Describe Python."}'],
        None,  # a row the engine failed on: no measures
    ]
    batch = pa.table({"_flip_generations": pa.array(answers, pa.list_(pa.string()))})
    cols = finish(batch, ["Tell me about Python."] * 4, [RESPONSE] * 4, [0, 1, 2])
    assert cols["flag_copied_response"] == [True, False, False, None]
    assert cols["flag_echoed_template"] == [False, True, False, None]
    assert cols["copy_span"][0] == 9 and cols["copy_fraction"][2] == 0.0


def test_a_reward_flag_must_be_a_boolean_column():
    with pytest.raises(ValueError, match="not boolean columns"):
        rewards.RewardMethod("bad", "x", (pa.field("v", pa.float64()),), "v", finish=lambda setup: None, flags=("v",))


def test_flags_are_counted_summarized_and_printed():
    from flip_ray.cli import format_summary
    from flip_ray.job.stages import part_stats
    from flip_ray.job.tracker import summarize

    names = schema.output_schema(pa.schema([]), ("flip",)).names
    cols = {name: [None] * 4 for name in names}
    cols |= {
        "n_output_tokens": [1] * 4,
        "truncated": [False] * 4,
        "flip_score": [0.1, 0.2, 0.3, None],
        **{f: [False] * 4 for f in schema.FLAG_NAMES},
        "flag_copied_response": [True, True, False, None],
        "flag_echoed_template": [False, False, True, None],
    }
    cols["error"] = [None, None, None, "bad row"]
    stats = part_stats(pa.table(cols), [rewards.get("flip")])
    assert json.loads(stats["flagged"])["flag_copied_response"] == 2
    record = {k: json.loads(v) if isinstance(v, str) else v for k, v in stats.items()}
    counts = summarize({"s": record})
    assert counts["rewards"]["flip"]["flags"] == {"flag_copied_response": 2, "flag_echoed_template": 1}
    manifest = {
        "counts": {**counts},
        "timings": {"rows_this_run": 4, "rows_per_s": 1, "output_tokens_per_s": 1, "pipeline_s": 1, "total_s": 1},
        "shards": {"done": 1, "total": 1, "skipped_already_done": 0, "scored_this_run": 1, "failed": []},
        "input": {},
        "output": {"data": "d", "path": "p"},
    }
    text = format_summary(manifest)
    assert "flip answers flagged: copied_response 2 (67%), echoed_template 1 (33%)" in text
    # The row flags' line no longer repeats flip's flags.
    assert "flagged {'flag_language_mismatch': 0" in text and "'flag_copied_response'" not in text


def test_the_evaluation_table_shows_flag_rates_per_method_and_set():
    from flip_ray.evaluation.stats import markdown_table, summarize

    s = summarize([1.0, 0.0, 1.0], ["a", "b", "a"], n_boot=10)
    flip = {
        **s,
        "flags": {
            "flag_copied_response": {"rate": 0.5, "n": 6, "per_subset": {"a": 0.25, "b": 1.0}},
            "flag_echoed_template": {"rate": 0.0, "n": 6, "per_subset": {"a": 0.0, "b": 0.0}},
        },
    }
    md = markdown_table({"flip": flip, "longer": s})
    assert "| method | answers flagged % | all | a | b |" in md
    assert "| flip | copied_response | 50.0 | 25.0 | 100.0 |" in md
    assert "| flip | echoed_template | 0.0 | 0.0 | 0.0 |" in md
    assert "| longer | copied" not in md


def test_the_report_counts_and_shows_flagged_answers():
    from flip_ray.downstream.report import ReportStats, _flag_section

    present = [*schema.output_schema(pa.schema([("prompt", pa.string()), ("response", pa.string())]), ("flip",)).names]
    stats = ReportStats({"prompt": "prompt", "response": "response"}, present)
    n = 3
    batch = {name: [None] * n for name in present}
    batch |= {
        "id": ["r0", "r1", "r2"],
        "prompt": ["Tell me about Python."] * n,
        "response": [RESPONSE] * n,
        "flip_score": [0.1, 0.2, 0.3],
        "inferred_instruction": ["Python is a high-level programming language", "<instruction>", "Describe Python."],
        "flag_copied_response": [True, False, False],
        "flag_echoed_template": [False, True, False],
    }
    stats.add(batch)
    assert stats.flags["flag_copied_response"] == 1 and stats.flags["flag_echoed_template"] == 1
    page = _flag_section(stats)
    assert "1 of the 3 rows flip scored (33%)" in page
    assert "Python is a high-level programming language" in page and "&lt;instruction&gt;" in page


@pytest.mark.parametrize("key", ["block_copy", "no_repeat_ngram"])
@pytest.mark.parametrize("value", ["1", "-2", "true", "2.5"])
def test_block_copy_must_be_off_or_a_run_of_two_tokens_or_more(key, value):
    from flip_ray.config.base import ConfigError, load_config, validate_score_config

    with pytest.raises(ConfigError, match=f"reward.{key}"):  # refused on load (its type) or on checking
        validate_score_config(load_config(None, ["input.path=x", "output.path=y", f"reward.{key}={value}"]))


def test_block_copy_loads_its_logits_processor_on_the_engine():
    from flip_ray.config.base import load_config
    from flip_ray.engine.specs import BLOCK_COPY_PROCESSOR, EngineSpec, PromptSpec, logits_processors

    off = load_config(None, ["input.path=x", "output.path=y"])
    assert logits_processors(off.reward) == () and "logits_processors" not in EngineSpec("m").llm_kwargs()
    on = load_config(None, ["input.path=x", "output.path=y", "reward.block_copy=4"])
    spec = EngineSpec.from_config(on.model, device="cpu", seed=0, logits_processors=logits_processors(on.reward))
    assert spec.llm_kwargs()["logits_processors"] == [BLOCK_COPY_PROCESSOR]
    assert PromptSpec.from_config(on.model, on.reward).block_copy == 4
    repeat = load_config(None, ["input.path=x", "output.path=y", "reward.no_repeat_ngram=3"])
    assert logits_processors(repeat.reward) == (BLOCK_COPY_PROCESSOR,)
    module, name = BLOCK_COPY_PROCESSOR.split(":")
    assert (Path(__file__).parents[1] / (module.replace(".", "/") + ".py")).read_text().count(f"class {name}(") == 1


# Qwen3's chat template, reduced to what decides a generation prompt (its guard is verbatim).
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@pytest.mark.slow
def test_the_gpu_example_config_turns_qwen3_thinking_off(embedded_model):
    """configs/gpu.yaml (Qwen3 on GPUs): its chat-template arguments reach the template that renders
    the FLIP prompt, so the answer starts after an empty think block, which the parser drops."""
    from transformers import AutoTokenizer

    from flip_ray.config.base import load_config, validate_score_config
    from flip_ray.engine.generation import PromptFitter
    from flip_ray.engine.specs import PromptSpec
    from flip_ray.text.parsing import parse_inferred_instruction
    from flip_ray.text.prompts import build_flip_messages

    cfg = load_config("configs/gpu.yaml", ["model.path=/models/Qwen3-0.6B", "input.path=x", "output.path=y"])
    validate_score_config(cfg)
    spec = PromptSpec.from_config(cfg.model, cfg.reward)
    assert spec.chat_template_kwargs == {"enable_thinking": False}
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    messages = build_flip_messages("Paris is the capital of France.")
    rendered = tokenizer.decode(PromptFitter(tokenizer, spec.chat_template_kwargs).ids(messages))
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = tokenizer.decode(PromptFitter(tokenizer, {}).ids(messages))
    assert thinking.endswith("<|im_start|>assistant\n")
    answer = parse_inferred_instruction(
        '<think>\n\n</think>\n\n{"INFERRED INSTRUCTION": "Name the capital of France."}'
    )
    assert answer.instruction == "Name the capital of France."


def test_an_answer_about_the_prompts_format_is_an_echo():
    """A small model asked for JSON may describe the request for JSON instead of inferring one."""
    meta = "The user requested a JSON object with the requested instruction."
    assert measure_copying(meta, RESPONSE).flag_echoed_template
    assert measure_copying('The user asked for the key "Inferred Instruction".', RESPONSE).flag_echoed_template
    # A response that is about JSON may well come from an instruction that asks for it.
    json_response = 'Here is the data as JSON: {"name": "Ada", "born": 1815}'
    assert not measure_copying(
        "Give me Ada Lovelace's name and birth year as a JSON object.", json_response
    ).flag_echoed_template
    assert not echoes_template(meta)  # without the response, only the scaffolding itself counts
