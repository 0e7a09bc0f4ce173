"""What an engine stage needs, each in one frozen value: the engine, the prompt, the sampling.

Built once from the config (`*.from_config`) and passed whole to every stage that builds an engine
(the scoring stage, the per-pair judges) and to the in-process scorer, so that an engine argument or
a prompt choice lives in one place. Adding an engine argument: a field here and in
`config.ModelConfig` (same name and default, checked by tests/test_defaults.py; `from_config` copies
it), plus the fingerprint list
in `job/store.py` if it cannot change a score. Importing this module loads no vLLM; `EngineSpec.build` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from omegaconf import DictConfig, OmegaConf

from flip_ray.text.prompts import DEFAULT_PROMPT_VARIANT

_VLLM_ONLY = ("max_model_len",)  # passed to vLLM only when set

# `model.engine_kwargs` that set only how much the engine runs at once, not what a request computes:
# left out of the output's fingerprint (a rerun may change them).
THROUGHPUT_ONLY = frozenset(
    {
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_num_partial_prefills",
        "max_long_partial_prefills",
        "long_prefill_token_threshold",
        "enable_chunked_prefill",
        "swap_space",
        "cpu_offload_gb",
        "block_size",
        "num_gpu_blocks_override",
        "disable_log_stats",
        "scheduling_policy",
        "stream_interval",
    }
)


def check_engine_kwargs(kwargs: dict) -> str | None:
    """What is wrong with `model.engine_kwargs` (a sentence), or None. A name must be a field of
    vLLM's own `EngineArgs` (vLLM is imported only when there are any) and not one flip_ray sets
    from its own key (`model.<name>`)."""
    if not kwargs:
        return None
    own = {f.name for f in fields(EngineSpec)} - {"engine_kwargs"}
    mine = sorted(set(kwargs) & own)
    if mine:
        return f"`model.engine_kwargs.{mine[0]}`: set it as `model.{mine[0]}` (flip_ray's own key for it)"
    import difflib
    from dataclasses import fields as dc_fields

    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dc_fields(EngineArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"`model.engine_kwargs.{unknown[0]}` is not an argument of vLLM's engine (vllm EngineArgs){hint}"
    return None


@dataclass(frozen=True)
class EngineSpec:
    """A `vllm.LLM` and the environment of the process that holds it.

    `model` is a checkpoint directory, or None for the embedded model (each engine's node prepares
    it); the other fields are resolved (no `auto`): `from_config` decides dtype and eager mode from
    the device.
    """

    # Defaults equal `config.ModelConfig`'s (tests/test_defaults.py checks it; this module is below
    # `config`, which the rewards' validation needs); those resolved from the device are CPU's.
    model: str | None
    device: str = "cpu"  # cpu | gpu
    dtype: str = "auto"
    max_model_len: int | None = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    trust_remote_code: bool = False
    load_format: str = "auto"
    seed: int = 0
    # The vLLM engine in its own process (vLLM's default on GPU) or inside the actor's (CPU default).
    multiprocessing: bool = False
    cpu_threads: int | None = None
    cpu_kvcache_space_gib: int = 1
    # Any other vLLM engine argument, passed through (`check_engine_kwargs`).
    engine_kwargs: dict = field(default_factory=dict)
    # Logits processors the engine loads (`logits_processors`), by fully qualified class name.
    logits_processors: tuple[str, ...] = ()

    # Fields that are not `vllm.LLM` arguments: they set the device and the process environment.
    _PROCESS = ("device", "multiprocessing", "cpu_threads", "cpu_kvcache_space_gib", "engine_kwargs")

    @classmethod
    def from_config(
        cls, model_cfg: DictConfig, *, device: str, seed: int, logits_processors: tuple[str, ...] = ()
    ) -> EngineSpec:
        """The engine of `cfg.model` (`model.path`) on `device` ("cpu" or "gpu"), loading
        `logits_processors` (`logits_processors(cfg.reward)`)."""
        own = ("model", "device", "seed", "multiprocessing")  # not copied by name
        values = {f.name: model_cfg[f.name] for f in fields(cls) if f.name in model_cfg and f.name not in own}
        if "engine_kwargs" in values:
            values["engine_kwargs"] = OmegaConf.to_container(model_cfg.engine_kwargs, resolve=True) or {}
        values["dtype"] = values["dtype"] if values["dtype"] != "auto" or device == "gpu" else "float32"
        if values.get("enforce_eager") is None:
            values["enforce_eager"] = device == "cpu"  # torch.compile costs minutes on CPU for no gain
        mp = str(model_cfg.get("engine_multiprocessing", "auto")).lower()
        values["multiprocessing"] = device == "gpu" if mp == "auto" else mp == "true"
        return cls(model=model_cfg.path, device=device, seed=seed, logits_processors=logits_processors, **values)

    def llm_kwargs(self) -> dict:
        """Keyword arguments of `vllm.LLM`."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._PROCESS}
        for name in _VLLM_ONLY:
            if kwargs[name] is None:
                del kwargs[name]
        if kwargs["logits_processors"]:
            kwargs["logits_processors"] = list(kwargs["logits_processors"])
        else:
            del kwargs["logits_processors"]
        return {**kwargs, **self.engine_kwargs}

    def env(self) -> dict[str, str]:
        """Environment of the engine's process (through Ray's runtime_env; never set at import)."""
        env = {
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_LOOPBACK_IP": "127.0.0.1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # flip_ray never downloads weights: a checkpoint directory or the local HF cache.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if self.multiprocessing else "0",
        }
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_space_gib)
            env["OMP_NUM_THREADS"] = str(self.cpu_threads or os.cpu_count() or 1)
        return env

    def build(self):
        """The `vllm.LLM` (imports vLLM), keeping vLLM's scheduler statistics (unless
        `model.engine_kwargs.disable_log_stats` says otherwise) for the run's occupancy figures
        (`engine.queue.SchedulerTap`: read, not logged)."""
        from vllm import LLM

        from flip_ray.engine.queue import SchedulerTap

        llm = LLM(**{"disable_log_stats": False, **self.llm_kwargs()})
        SchedulerTap.install(llm.llm_engine)
        return llm


@dataclass(frozen=True)
class PromptSpec:
    """The FLIP prompt: variant (`prompts.PROMPT_VARIANTS`), worked examples, chat-template
    arguments (e.g. `{"enable_thinking": False}` for Qwen3), and JSON-constrained decoding."""

    variant: str = DEFAULT_PROMPT_VARIANT
    few_shot: int = 0
    chat_template_kwargs: dict = field(default_factory=dict)
    guided_json: bool = False
    # k > 0: the answer may not copy k tokens of the response in a row; n > 0: nor repeat an n-gram
    # of its own (`copy_block`; the engine needs its logits processor, `logits_processors`).
    block_copy: int = 0
    no_repeat_ngram: int = 0

    @classmethod
    def from_config(cls, model_cfg: DictConfig, reward_cfg: DictConfig) -> PromptSpec:
        kwargs = OmegaConf.to_container(model_cfg.chat_template_kwargs, resolve=True) or {}
        return cls(
            reward_cfg.prompt,
            reward_cfg.few_shot,
            dict(kwargs),
            reward_cfg.guided_json,
            reward_cfg.get("block_copy", 0),
            reward_cfg.get("no_repeat_ngram", 0),
        )


# `reward.block_copy`'s logits processor, by the name vLLM loads it from (the driver never imports it).
BLOCK_COPY_PROCESSOR = "flip_ray.engine.copy_block:BlockCopy"


def logits_processors(reward_cfg: DictConfig) -> tuple[str, ...]:
    """The logits processors an engine needs for the `reward` settings (by name: vLLM loads them)."""
    wanted = reward_cfg.get("block_copy", 0) or reward_cfg.get("no_repeat_ngram", 0)
    return (BLOCK_COPY_PROCESSOR,) if wanted else ()


@dataclass(frozen=True)
class SamplingSpec:
    """Decoding of `flip` (greedy by default; `n` samples need temperature > 0). Defaults are
    `config.SamplingConfig`'s."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    n: int = 1
    # Generate exactly max_tokens tokens (throughput benchmarks; never for real scoring).
    ignore_eos: bool = False

    @classmethod
    def from_config(cls, sampling_cfg: DictConfig) -> SamplingSpec:
        return cls(**{f.name: sampling_cfg[f.name] for f in fields(cls)})
