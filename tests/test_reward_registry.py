"""The reward registry: a reward declared once, in one place, is scored by the job, counted in the
manifest, shown in the report and evaluated, with no other module naming its columns.

The toy reward here is registered by the test itself (as a user's own reward would be): its engine part
counts the response's tokens with the engine's own tokenizer, its CPU part divides them by the words,
and it ranks by that ratio, lower better."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flip_ray import rewards, schema
from flip_ray.config.base import ConfigError, load_config, validate_score_config
from flip_ray.evaluation.stats import pair_outcome

SAMPLE = Path("flip_ray/samples/alpacaeval_sample.jsonl")
EVAL_SAMPLE = Path("flip_ray/samples/preference_pairs_sample.jsonl")
ENGINE = ["model.device=cpu", "model.dtype=float32", "model.max_model_len=1024", "resources.batch_size=8"]

# -- the toy reward: one module's worth, registered by the test --------------------------------------

FIELDS = (
    pa.field("toy_tokens", pa.int64()),
    pa.field("toy_tokens_per_word", pa.float64()),
    pa.field("toy_status", pa.string()),
)


class ToyEngine:
    """Engine part: the response's tokens, counted by the engine's tokenizer (no generation)."""

    def __init__(self, llm, setup):
        self.tokenizer = llm.get_tokenizer()

    def score(self, rows, earlier):
        out = []
        for response in rows.responses:
            n = len(self.tokenizer.encode(response, add_special_tokens=False))
            out.append(rewards.RowScore({"toy_tokens": n}) if n < 400 else rewards.RowScore(error="too long for toy"))
        return out


class ToyFinish:
    """CPU part: tokens per word, from the engine part's column."""

    def __init__(self, setup):
        pass

    def __call__(self, batch, instructions, responses, rows):
        counts = batch.column("toy_tokens").to_pylist()
        cols = {"toy_tokens_per_word": [None] * len(batch), "toy_status": [None] * len(batch)}
        for i in rows:
            cols["toy_tokens_per_word"][i] = counts[i] / max(1, len(responses[i].split()))
            cols["toy_status"][i] = "counted"
        return cols


TOY = rewards.RewardMethod(
    name="toy_length",
    about="response tokens per word (a toy)",
    fields=FIELDS,
    rank_column="toy_tokens_per_word",
    engine=ToyEngine,
    engine_fields=(pa.field("toy_tokens", pa.int64()),),
    finish=ToyFinish,
    higher_is_better=False,
    status_column="toy_status",
)


@pytest.fixture
def toy():
    """The toy reward, registered for one test; Ray pickles this module by value so that its engine
    and similarity actors get the classes without importing the test."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rewards.register(TOY)
    yield TOY
    rewards.unregister(TOY.name)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# -- fast: the registry itself ---------------------------------------------------------------------


def test_registry_order_columns_and_refusals():
    assert rewards.names() == ("flip", "flip_logprob", "flip_logprob_lexical", "pmi_forward", "judge_pointwise")
    assert [m.name for m in rewards.resolve(["flip_logprob_lexical", "flip_logprob"])] == [
        "flip_logprob",
        "flip_logprob_lexical",
    ]  # the registry's order: a reward that uses another comes after it
    assert rewards.get("flip_logprob").ranked_by({"logprob_distractors": 2}) == "flip_logprob_contrast"
    assert rewards.owner_of("judge_score").name == "judge_pointwise" and rewards.owner_of("id") is None
    with pytest.raises(KeyError, match="no reward named 'nope'; known: flip, flip_logprob"):
        rewards.get("nope")
    with pytest.raises(ValueError, match="registered already"):
        rewards.register(rewards.get("flip"))
    clash = rewards.RewardMethod("other", "x", (pa.field("flip_score", pa.float64()),), "flip_score", finish=ToyFinish)
    with pytest.raises(ValueError, match=r"column\(s\) \['flip_score'\] belong to another reward"):
        rewards.register(clash)
    with pytest.raises(ValueError, match="neither an engine part nor a CPU part"):
        rewards.RewardMethod("empty", "x", (), "x")


def test_the_output_holds_the_columns_of_the_rewards_that_ran():
    kept = pa.schema([("prompt", pa.string())])
    only_flip = schema.output_schema(kept, ["flip"]).names
    assert only_flip[:3] == ["id", "prompt", "inferred_instruction"]
    assert "flip_logprob_mean" not in only_flip and "judge_score" not in only_flip
    assert only_flip[-2:] == ["flip_error", "error"]
    both = schema.output_schema(kept, ["flip_logprob", "flip"]).names  # registry order, whatever the config's
    assert both.index("flip_score") < both.index("flip_logprob_mean") < both.index("finish_reason")
    assert both[-3:] == ["flip_error", "flip_logprob_error", "error"]
    # An input column named like any reward's column is renamed whatever rewards run.
    assert "input_judge_score" in schema.output_schema(pa.schema([("judge_score", pa.float64())]), ["flip"]).names


def test_a_registered_reward_is_a_config_choice_and_its_settings_are_checked(toy):
    cfg = load_config(None, ["input.path=x", "output.path=y", "reward.methods=[toy_length,flip]"])
    validate_score_config(cfg)
    cfg = load_config(None, ["input.path=x", "output.path=y", "reward.methods=[toy]"])
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['toy'\].*'toy_length'"):
        validate_score_config(cfg)
    cfg = load_config(None, ["input.path=x", "output.path=y", "reward.lexical_control=reverse"])
    with pytest.raises(ConfigError, match="`reward.lexical_control` must be one of"):
        validate_score_config(cfg)


# -- slow: end to end with the real engine -----------------------------------------------------------


@pytest.mark.slow
def test_a_reward_registered_by_a_user_is_scored_reported_and_evaluated(tmp_path, toy, ray_local, embedded_model):
    from transformers import AutoTokenizer

    from flip_ray.config.jobs import EvalJobConfig
    from flip_ray.downstream.report import build_report
    from flip_ray.evaluation.run import run_evaluate
    from flip_ray.recipe import run_score

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:6]
    rows[5]["response"] = "word " * 500  # the toy's own error: kept on the row, the row not lost
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = load_config(
        None, [f"input.path={src}", f"output.path={out}", "input.id_column=id", "reward.methods=[toy_length]", *ENGINE]
    )
    manifest = run_score(cfg)

    table = pq.read_table(out / "data")
    fields = [f.name for f in FIELDS]
    assert table.schema.names == ["id", "prompt", "response", "model", *schema.scored_fields(["toy_length"]).names]
    assert table.schema.names[4:7] == fields and "flip_score" not in table.schema.names
    assert manifest["output"]["types"]["toy_tokens"] == "int64"
    by_id = {r["id"]: r for r in table.to_pylist()}
    tok = AutoTokenizer.from_pretrained(embedded_model)
    for r in rows[:5]:
        got = by_id[r["id"]]
        n = len(tok.encode(r["response"], add_special_tokens=False))
        assert got["toy_tokens"] == n and got["toy_tokens_per_word"] == pytest.approx(n / len(r["response"].split()))
        assert got["toy_status"] == "counted" and got["error"] is None
    long = by_id[rows[5]["id"]]
    assert long["toy_length_error"] == "too long for toy" and long["error"] == "too long for toy"
    assert long["toy_tokens"] is None and long["toy_tokens_per_word"] is None
    summary = manifest["counts"]["rewards"]["toy_length"]
    expected = sum(by_id[r["id"]]["toy_tokens_per_word"] for r in rows[:5]) / 5
    assert summary["column"] == "toy_tokens_per_word" and summary["scored"] == 5
    assert summary["mean"] == pytest.approx(expected) and summary["status"] == {"counted": 5}
    assert manifest["counts"]["method_errors"] == {"toy_length": 1}

    page = Path(build_report(str(out))).read_text()
    assert "<h2>toy_tokens_per_word</h2>" in page and "response tokens per word (a toy) (toy_length): 5 rows" in page

    ev = tmp_path / "eval"
    eval_cfg = load_config(
        None,
        [
            f"input.path={EVAL_SAMPLE}",
            f"output.path={ev}",
            "evaluation.methods=[toy_length,shorter]",
            "evaluation.bootstrap=200",
            *ENGINE,
        ],
        schema=EvalJobConfig,
    )
    result = run_evaluate(eval_cfg)["summary"]
    assert list(result) == ["toy_length", "shorter"]
    toy_summary = result["toy_length"]
    scores = pq.read_table(ev / "scores" / "toy_length" / "data").to_pylist()
    ratio = {r["id"]: r["toy_tokens_per_word"] for r in scores}
    assert toy_summary["parse_status"] == {"counted": sum(v is not None for v in ratio.values())}
    # Lower is better: the reported accuracy is what the stored ratios give with the lowest winning.
    outcomes = []
    for line in EVAL_SAMPLE.read_text().splitlines():
        it = json.loads(line)
        rejected = it["rejected"] if isinstance(it["rejected"], list) else [it["rejected"]]
        values = [ratio.get(f"{it['id']}#{k}") for k in range(len(rejected) + 1)]
        if all(v is not None for v in values):
            outcomes.append(pair_outcome(-values[0], [-v for v in values[1:]]))
    assert toy_summary["n"] == len(outcomes) > 0
    assert toy_summary["accuracy"] == pytest.approx(sum(outcomes) / len(outcomes), abs=1e-4)
