from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flip_ray.config.base import ConfigError, ScoreConfig, load_config, validate_score_config
from flip_ray.config.jobs import (
    EvalJobConfig,
    FilterJobConfig,
    PairsJobConfig,
    schema_for_yaml,
    validate_eval_config,
    validate_filter_config,
    validate_pairs_config,
)

VALIDATORS = {
    ScoreConfig: validate_score_config,
    FilterJobConfig: validate_filter_config,
    PairsJobConfig: validate_pairs_config,
    EvalJobConfig: validate_eval_config,
}

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads_through_the_schema(path):
    text = path.read_text()
    assert text.startswith("# Run:"), f"{path} must begin with the command that runs it"
    schema = schema_for_yaml(path)
    cfg = load_config(path, schema=schema)
    if not OmegaConf.missing_keys(cfg):
        VALIDATORS[schema](cfg)


def test_defaults_need_only_paths():
    cfg = load_config(None, ["input.path=x.jsonl", "output.path=out"])
    validate_score_config(cfg)
    assert cfg.model.path is None and cfg.model.device == "auto"


@pytest.mark.parametrize(
    "override,key",
    [("input.nope=1", "input.nope"), ("nope.path=1", "nope"), ("modle.dtype=float32", "modle")],
)
def test_unknown_keys_are_refused_with_their_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sampling:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"sampling\.temprature"):
        load_config(p)


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampling.n=three", "sampling.n"),
        ("model.enforce_eager=maybe", "model.enforce_eager"),
        ("resources.batch_size=1.5", "resources.batch_size"),
    ],
)
def test_wrong_types_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides,match",
    [
        ([], "input.path"),
        (["input.path=x"], "output.path"),
        (["input.path=x", "output.path=y", "sampling.n=4"], "temperature"),
        (["input.path=x", "output.path=y", "input.format=csv"], "input.format"),
        (["input.path=x", "output.path=y", "model.max_model_len=100", "sampling.max_tokens=128"], "max_model_len"),
        (["input.path=x", "output.path=y", "sampling.aggregate=median"], "aggregate"),
        (["input.path=x", "output.path=y", "reward.methods=[flip,longer]"], r"reward\.methods.*longer"),
        (["input.path=x", "output.path=y", "reward.methods=[]"], "at least one"),
        (["input.path=x", "output.path=y", "reward.methods=[flip,flip]"], "twice"),
        (["input.path=x", "output.path=y", "reward.prompt=short"], r"reward\.prompt"),
        (["input.path=x", "output.path=y", "reward.few_shot=5"], r"reward\.few_shot"),
        (["input.path=x", "output.path=y", "reward.similarity=cosine"], r"reward\.similarity"),
        (["input.path=x", "output.path=y", "reward.logprob_format=xml"], r"reward\.logprob_format"),
        (["input.path=x", "output.path=y", "reward.logprob_distractors=99"], r"reward\.logprob_distractors"),
        (["input.path=x", "output.path=y", "input.keep_columns=[prompt,model,prompt]"], "'prompt' more than once"),
        (["input.path=x", "output.path=y", "resources.concurrency=0"], r"resources\.concurrency"),
        (["input.path=x", "output.path=y", "resources.concurrency=[3,1]"], r"resources\.concurrency.*\[3, 1\]"),
        (["input.path=x", "output.path=y", "resources.concurrency=[1,2,3]"], r"resources\.concurrency"),
        (["input.path=x", "output.path=y", "resources.max_concurrent_batches=0"], "max_concurrent_batches"),
        (["input.path=x", "output.path=y", "resources.max_concurrent_batches=many"], "max_concurrent_batches"),
        (["input.path=x", "output.path=y", "model.engine_kwargs.dtype=half"], r"set it as `model\.dtype`"),
    ],
)
def test_semantic_checks(overrides, match):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=match):
        validate_score_config(cfg)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["input.path"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_schema_has_fixed_keys():
    cfg = OmegaConf.structured(ScoreConfig)
    # Declared, and required (MISSING) until a YAML or override sets them.
    assert OmegaConf.is_missing(cfg.input, "path") and OmegaConf.is_missing(cfg.output, "path")


def test_filter_and_pairs_configs_refuse_bad_values():
    cfg = load_config(None, ["input.path=x", "output.path=y", "filter.mode=median"], schema=FilterJobConfig)
    with pytest.raises(ConfigError, match="filter.mode"):
        validate_filter_config(cfg)
    cfg = load_config(None, ["input.path=x", "output.path=y", "pairs.strategy=nope"], schema=PairsJobConfig)
    with pytest.raises(ConfigError, match="pairs.strategy"):
        validate_pairs_config(cfg)
    cfg = load_config(
        None, ["input.path=x", "output.path=y", "eligibility.exclude_flags=[flag_typo]"], schema=PairsJobConfig
    )
    with pytest.raises(ConfigError, match="flag_typo"):
        validate_pairs_config(cfg)


def test_keep_columns_each_named_once_pass():
    cfg = load_config(None, ["input.path=x", "output.path=y", "input.keep_columns=[prompt,model,error]"])
    validate_score_config(cfg)


def test_spec_defaults_are_the_config_defaults():
    """`specs` sits below `config` (the rewards' validation needs it there), so its defaults are
    written twice: they must agree, field by field (the fields resolved from the device aside)."""
    from dataclasses import MISSING, fields

    from flip_ray.config.base import ModelConfig, RewardConfig, SamplingConfig
    from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec

    def defaults(cls):
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    model, engine = defaults(ModelConfig), defaults(EngineSpec)
    shared = sorted((set(model) & set(engine)) - {"enforce_eager", "device"})
    assert len(shared) >= 8 and {k: engine[k] for k in shared} == {k: model[k] for k in shared}
    assert defaults(SamplingSpec) == {k: v for k, v in defaults(SamplingConfig).items() if k in defaults(SamplingSpec)}
    assert len(defaults(SamplingSpec)) == 6 and EngineSpec.seed == SamplingConfig.seed
    reward = defaults(RewardConfig)
    assert (PromptSpec.variant, PromptSpec.few_shot, PromptSpec.guided_json) == (
        reward["prompt"],
        reward["few_shot"],
        reward["guided_json"],
    )


@pytest.mark.parametrize("value,pool", [("2", 2), ("[1,4]", (1, 4)), ("[2,2]", (2, 2))])
def test_engine_pool_is_n_or_min_max(value, pool):
    from flip_ray.config.base import engine_pool
    from flip_ray.engine.specs import EngineSpec
    from flip_ray.job.runtime import engine_actor_options

    cfg = load_config(None, ["input.path=x", "output.path=y", f"resources.concurrency={value}"])
    validate_score_config(cfg)
    assert engine_pool(cfg.resources.concurrency) == pool
    compute = engine_actor_options(EngineSpec(None, device="gpu"), cfg.resources)["compute"]
    assert (compute.min_size, compute.max_size) == ((pool, pool) if isinstance(pool, int) else pool)
    assert compute.max_concurrent_calls_per_actor == 8 and compute.enable_true_multi_threading
    # auto: one block at a time on CPU, where blocks in flight were slower (docs/BENCHMARKS.md)
    assert engine_actor_options(EngineSpec(None), cfg.resources)["compute"].max_concurrent_calls_per_actor == 1


def test_engine_kwargs_pass_through_and_only_scoring_ones_are_fingerprinted():
    from flip_ray.engine.specs import EngineSpec
    from flip_ray.job.store import fingerprint, scoring_settings

    def settings(*overrides):
        cfg = load_config(None, ["input.path=x", "output.path=y", *overrides])
        return cfg, scoring_settings(OmegaConf.to_container(cfg, resolve=True))

    _, plain = settings()
    cfg, throughput = settings("model.engine_kwargs.max_num_seqs=512", "model.engine_kwargs.block_size=32")
    _, quantized = settings("model.engine_kwargs.quantization=fp8")
    assert fingerprint(throughput) == fingerprint(plain)  # how much runs at once changes no score
    assert fingerprint(quantized) != fingerprint(plain) and quantized["model.engine_kwargs.quantization"] == "fp8"
    kwargs = EngineSpec.from_config(cfg.model, device="gpu", seed=0).llm_kwargs()
    assert kwargs["max_num_seqs"] == 512 and kwargs["block_size"] == 32
