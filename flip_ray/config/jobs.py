"""The schemas of the jobs on a scored output and of the evaluation job: `filter`, `pairs`,
`evaluate` (the loader and the scoring job's sections are in `config.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

from flip_ray import rewards
from flip_ray.config.base import (
    INPUT_FORMATS,
    DedupConfig,
    FlagsConfig,
    LimitsConfig,
    ModelConfig,
    RayConfig,
    ResourcesConfig,
    RewardConfig,
    SamplingConfig,
    ScoreConfig,
    StorageConfig,
    require,
    validate_reward,
)
from flip_ray.schema import FLAG_NAMES, known_flags


@dataclass
class ScoredInputConfig:
    # A scoring run's output.path (or its data/ directory), local or s3://.
    path: str = MISSING
    # Read an output whose scoring run did not finish or has failed shards (only finished shards).
    allow_incomplete: bool = False


@dataclass
class ColumnsConfig:
    # Column names in the scored output; None: taken from the scoring run's config.
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None
    id: str = "id"
    # Column that groups responses to the same prompt; None: a hash of the prompt text (or chat).
    prompt_key: str | None = None
    score: str = "flip_score"


@dataclass
class SelectionOutputConfig:
    path: str = MISSING
    format: str = "parquet"  # parquet | jsonl
    overwrite: bool = False


@dataclass
class EligibilityConfig:
    # Rows with `error` set are left out unless this is true.
    include_errors: bool = False
    # Rows with any of these flags set are left out. The rewards' own flags (flip's
    # flag_copied_response, flag_echoed_template) can be added; they are not excluded by default.
    exclude_flags: list[str] = field(default_factory=lambda: list(FLAG_NAMES))


@dataclass
class FilterConfig:
    # threshold: score >= threshold; quantile: score >= the q-quantile of the eligible scores
    # (linearly interpolated; 0 keeps every eligible row, 1 the rows with the highest score);
    # top_k: the k best responses per prompt; best_of_n: the best response per prompt.
    mode: str = "threshold"
    threshold: float = 0.2
    quantile: float = 0.5
    top_k: int = 1


@dataclass
class FilterJobConfig:
    input: ScoredInputConfig = field(default_factory=ScoredInputConfig)
    output: SelectionOutputConfig = field(default_factory=SelectionOutputConfig)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# How DPO pairs are drawn from a prompt's responses (`downstream.selection.make_pairs`).
STRATEGIES = ("best_vs_worst", "all_pairs", "best_vs_random")


@dataclass
class PairsConfig:
    # best_vs_worst | all_pairs | best_vs_random
    strategy: str = "best_vs_worst"
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None
    seed: int = 0


@dataclass
class PairsJobConfig:
    input: ScoredInputConfig = field(default_factory=ScoredInputConfig)
    output: SelectionOutputConfig = field(default_factory=SelectionOutputConfig)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    ray: RayConfig = field(default_factory=RayConfig)


FILTER_MODES = ("threshold", "quantile", "top_k", "best_of_n")
OUTPUT_FORMATS = ("parquet", "jsonl")


def _validate_selection(cfg: DictConfig) -> None:
    for key in ("input.path", "output.path"):
        require(bool(OmegaConf.select(cfg, key)), f"`{key}` is required: pass it as an override ({key}=...)")
    require(cfg.output.format in OUTPUT_FORMATS, f"`output.format` must be one of {OUTPUT_FORMATS}")
    known = known_flags()
    unknown = [f for f in cfg.eligibility.exclude_flags if f not in known]
    require(not unknown, f"`eligibility.exclude_flags` has unknown flags {unknown}; known: {list(known)}")


def validate_filter_config(cfg: DictConfig) -> None:
    _validate_selection(cfg)
    f = cfg.filter
    require(f.mode in FILTER_MODES, f"`filter.mode` must be one of {FILTER_MODES}, got {f.mode!r}")
    require(math.isfinite(f.threshold), f"`filter.threshold` must be a finite number, got {f.threshold}")
    require(0 <= f.quantile <= 1, "`filter.quantile` must be in [0, 1]")
    require(f.top_k >= 1, "`filter.top_k` must be >= 1")


def validate_pairs_config(cfg: DictConfig) -> None:
    _validate_selection(cfg)
    p = cfg.pairs
    require(p.strategy in STRATEGIES, f"`pairs.strategy` must be one of {STRATEGIES}, got {p.strategy!r}")
    require(math.isfinite(p.min_margin) and p.min_margin >= 0, "`pairs.min_margin` must be a finite number >= 0")
    require(p.max_pairs_per_prompt is None or p.max_pairs_per_prompt >= 1, "`pairs.max_pairs_per_prompt` must be >= 1")


# Evaluation methods: the per-response rewards of the scoring job, the per-pair judges (run on the
# same engine) and the trivial baselines.
PAIR_JUDGES = ("judge_pairwise", "judge_listwise")
BASELINES = ("longer", "shorter", "prompt_overlap")
# Label-free combinations: the mean of the candidates' ranks (within each item, i.e. within a prompt
# group) under two rewards that fail differently; both must be evaluated too.
COMBINATIONS = {"flip_lexical_rank": ("flip", "flip_logprob_lexical"), "flip_pmi_rank": ("flip", "pmi_forward")}


def eval_methods() -> tuple[str, ...]:
    """Every evaluation method: the registered rewards (`rewards`), the per-pair judges, the
    baselines and the combinations."""
    return (*rewards.names(), *PAIR_JUDGES, *BASELINES, *COMBINATIONS)


SUBSET_SOURCES = ("auto", "column", "file")


@dataclass
class PairsInputConfig:
    # Preference data: a file, directory or glob; local or s3://; Parquet, JSONL, .json arrays, HF save_to_disk.
    path: str = MISSING
    format: str = "auto"
    # Pair id column; None: "<file>:<row>".
    id_column: str | None = "id"
    # A string, a chat (list of {role, content} ending with the user turn), or an HH-RLHF
    # "Human: ... Assistant: ..." transcript (its last Human turn is the instruction).
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    # A string, or a list of strings (best-of-N: correct only if chosen outscores every one).
    rejected_column: str = "rejected"
    subset_column: str = "subset"
    # Evaluate a seeded random sample of at most this many pairs per file; None: all of them.
    sample_per_file: int | None = None
    sample_seed: int = 0


@dataclass
class EvalOutputConfig:
    # Directory (local or s3://): summary.json, summary.md, pairs.parquet, errors.jsonl, and one
    # scoring run per engine method under scores/<method>/ (resumable like any scoring run).
    path: str = MISSING
    overwrite: bool = False


@dataclass
class EvaluationConfig:
    # flip, flip_logprob, judge_pointwise (per response, through the scoring job); judge_pairwise
    # (both orders), judge_listwise (per pair, through the same engine); longer, shorter, prompt_overlap
    # (trivial baselines).
    methods: list[str] = field(
        default_factory=lambda: ["flip", "flip_logprob", "judge_pointwise", "longer", "shorter", "prompt_overlap"]
    )
    # per_subset key: auto (the subset column where present, else the file), column, or file.
    subset_from: str = "auto"
    bootstrap: int = 2000
    seed: int = 0
    # Tokens for pairwise/listwise verdicts.
    judge_max_tokens: int = 256


@dataclass
class EvalJobConfig:
    input: PairsInputConfig = field(default_factory=PairsInputConfig)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=128))
    # reward.methods is set per pass from evaluation.methods; the other reward keys apply.
    reward: RewardConfig = field(default_factory=RewardConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def validate_eval_config(cfg: DictConfig) -> None:
    for key in ("input.path", "output.path"):
        require(bool(OmegaConf.select(cfg, key)), f"`{key}` is required: pass it as an override ({key}=...)")
    require(cfg.input.format in INPUT_FORMATS, f"`input.format` must be one of {INPUT_FORMATS}")
    require(cfg.input.sample_per_file is None or cfg.input.sample_per_file >= 1, "`input.sample_per_file` must be >= 1")
    e = cfg.evaluation
    validate_reward(
        OmegaConf.merge(cfg.reward, {"methods": list(e.methods)}), allowed=eval_methods(), key="evaluation.methods"
    )
    require(e.subset_from in SUBSET_SOURCES, f"`evaluation.subset_from` must be one of {SUBSET_SOURCES}")
    for combo, parts in COMBINATIONS.items():
        missing = [m for m in parts if combo in e.methods and m not in e.methods]
        require(not missing, f"`evaluation.methods` has {combo}, which combines {parts}: add {missing} too")
    require(e.bootstrap >= 100, "`evaluation.bootstrap` must be >= 100")
    require(e.judge_max_tokens >= 1, "`evaluation.judge_max_tokens` must be >= 1")


JOB_SCHEMAS = {"score": ScoreConfig, "filter": FilterJobConfig, "pairs": PairsJobConfig, "evaluate": EvalJobConfig}


def schema_for_yaml(path: str | Path) -> type:
    """The schema of a YAML in configs/, from the job its first line runs (`jobs/<job>.py`)."""
    first = Path(path).read_text().splitlines()[0] if Path(path).is_file() else ""
    for job, schema in JOB_SCHEMAS.items():
        if f"jobs/{job}.py" in first or f"flip-ray {job}" in first:
            return schema
    return ScoreConfig
