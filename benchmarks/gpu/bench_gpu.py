"""GPU throughput: bare vLLM vs the flip_ray pipeline on one GPU, no network, no weights.

    python benchmarks/gpu/bench_gpu.py --shape qwen3-0.6b --rows 12000 --max-tokens 128
    python benchmarks/gpu/bench_gpu.py --shape qwen3-1.7b
    python benchmarks/gpu/bench_gpu.py --shape tiny --device cpu --rows 16   # a smoke test on CPU
    python benchmarks/gpu/bench_gpu.py --likelihood   # also flip_logprob beside flip, prefix cache on/off

The model is a real architecture (Qwen3 shapes written below) with random weights
(`load_format="dummy"`), so nothing is downloaded. The tokenizer is a word-level one built here from
the bundled sample texts, with a ChatML template. FLIP prompts get realistic lengths: responses are
drawn from `response_lengths.json` (lengths of real answers in ../shared/data) and filled with
sample text; every answer is exactly `--max-tokens` long (`ignore_eos`). Prints output tokens/s of
(a) one `LLM.generate` over all prompts (engine already built) and (b) the full pipeline (Ray Data,
one engine actor, CPU similarity stage, Parquet) as the marginal rate between N/2 and N rows, so
that start-up cancels; their ratio, and the roofline (2 x params FLOPs per token at the
chip's bf16 peak). Meant to finish in under 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLE = REPO / "flip_ray" / "samples" / "alpacaeval_sample.jsonl"
H200_BF16_FLOPS = 989e12

SHAPES = {
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sample_words() -> list[str]:
    return [w for line in SAMPLE.read_text().splitlines() for w in json.loads(line)["response"].split()]


def build_model_dir(target: Path, shape: str) -> int:
    """config.json (Qwen3 architecture) + a word-level tokenizer; returns the parameter count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sample_words()
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    prompt_text = json.dumps({"x": 1}) + " ".join(words) + " [Response] [Your Inferred Instruction] Respond in JSON"
    for w in sorted(set(prompt_text.split()) | set(" ".join(words).lower().split())):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(target)
    dims = SHAPES[shape]
    vocab_size = 151936 if shape != "tiny" else 4096
    vocab_size = max(vocab_size, len(vocab))
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **dims,
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    h, i, n = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    attn = h * dims["head_dim"] * (dims["num_attention_heads"] * 2 + dims["num_key_value_heads"] * 2)
    return n * (attn + 3 * h * i) + vocab_size * h


def make_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    lengths = json.loads((HERE / "response_lengths.json").read_text())["words"]
    words = sample_words()
    rows = []
    for k in range(n):
        length = max(1, rng.choice(lengths))
        start = rng.randrange(len(words))
        text = " ".join(words[(start + j) % len(words)] for j in range(length))
        rows.append({"id": f"r{k}", "prompt": "Write about the topic.", "response": text})
    return rows


def bare(model_dir: Path, rows: list[dict], args) -> dict:
    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.specs import EngineSpec, PromptSpec, SamplingSpec

    t0 = time.perf_counter()
    llm = EngineSpec(
        str(model_dir),
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        load_format="dummy",
        enforce_eager=args.device == "cpu",
        gpu_memory_utilization=0.9,
    ).build()
    start = time.perf_counter() - t0
    gen = FlipGenerator(llm, PromptSpec("flip"), SamplingSpec(max_tokens=args.max_tokens, ignore_eos=True))
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=gen.render(r["response"])[0]) for r in rows]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, gen.params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    del llm
    return {"engine_start_s": start, "generate_s": elapsed, "output_tokens": tokens, "prompt_tokens": prompt_tokens}


def pipeline(model_dir: Path, rows: list[dict], args, tmp: Path) -> dict:
    from flip_ray.config.base import load_config
    from flip_ray.recipe import run_score

    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"input.path={src}",
            f"output.path={tmp}/out",
            "input.id_column=id",
            f"model.path={model_dir}",
            f"model.device={args.device}",
            f"model.dtype={args.dtype}",
            f"model.max_model_len={args.max_model_len}",
            "model.load_format=dummy",
            f"sampling.max_tokens={args.max_tokens}",
            "sampling.ignore_eos=true",
            "reward.methods=[flip]",  # the same work as the bare run: generation only,
            "reward.prompt=flip",  # with the authors' prompt
            f"resources.batch_size={args.batch_size}",
            "output.report=false",
            "dedup.enabled=false",
            "input.check_duplicate_ids=false",
        ],
    )
    t0 = time.perf_counter()
    manifest = run_score(cfg)
    return {"total_s": time.perf_counter() - t0, "output_tokens": manifest["counts"]["output_tokens"]}


def likelihood_pair(model_dir: Path, rows: list[dict], args) -> None:
    """rows/s of [flip], [flip_logprob] and [flip, flip_logprob] with the likelihood prefill reading
    the prefix cache the generation left (after) or not (before), in batches of --batch-size as the
    engine stage runs them, and vLLM's prefix-cache hit rate (its own counters)."""
    from vllm import LLM

    from flip_ray.engine.generation import FlipGenerator
    from flip_ray.engine.likelihood import FlipLikelihood
    from flip_ray.engine.specs import EngineSpec, SamplingSpec

    spec = EngineSpec(
        str(model_dir), device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        load_format="dummy", enforce_eager=args.device == "cpu", gpu_memory_utilization=0.9,
    )  # fmt: skip
    llm = LLM(**spec.llm_kwargs(), disable_log_stats=False)
    gen = FlipGenerator(llm, sampling=SamplingSpec(max_tokens=args.max_tokens, ignore_eos=True))

    def counters():
        got = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
        return got.get("vllm:prefix_cache_queries", 0.0), got.get("vllm:prefix_cache_hits", 0.0)

    warm = rows[: args.batch_size]
    gen.generate([r["response"] for r in warm])
    FlipLikelihood(llm).score([r["prompt"] for r in warm], [r["response"] for r in warm])
    results = {}
    for name, methods, reuse in (
        ("[flip]", {"flip"}, True),
        ("[flip_logprob]", {"flip_logprob"}, True),
        ("[flip, flip_logprob] before", {"flip", "flip_logprob"}, False),
        ("[flip, flip_logprob] after", {"flip", "flip_logprob"}, True),
    ):
        lk = FlipLikelihood(llm, reuse_prefix=reuse)
        llm.reset_prefix_cache()
        q0, h0 = counters()
        t0 = time.perf_counter()
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            if "flip" in methods:
                gen.generate([r["response"] for r in chunk])
            if "flip_logprob" in methods:
                lk.score([r["prompt"] for r in chunk], [r["response"] for r in chunk])
        results[name] = len(rows) / (time.perf_counter() - t0)
        q1, h1 = counters()
        hit = (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0
        print(f"{name:<30} {results[name]:8.1f} rows/s   prefix-cache hit rate {hit:.1%}", flush=True)
    for name in ("[flip, flip_logprob] before", "[flip, flip_logprob] after"):
        print(f"{name}: costs {results['[flip]'] / results[name]:.2f}x [flip] alone (target after: <= 1.15x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    # Enough rows that the marginal half (N/2 rows x max_tokens) takes far longer than start-up jitter.
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--likelihood", action="store_true", help="also time flip_logprob beside flip (prefix cache before/after)"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = tmp / "model"
        model_dir.mkdir()
        params = build_model_dir(model_dir, args.shape)
        rows = make_rows(args.rows)
        if args.likelihood:
            likelihood_pair(model_dir, rows[: max(args.batch_size * 4, 64)], args)
        a = bare(model_dir, rows, args)
        a_rate = a["output_tokens"] / a["generate_s"]
        print(
            f"shape {args.shape}: {params / 1e9:.2f} B params, {args.rows} rows, "
            f"{a['prompt_tokens'] / args.rows:.0f} prompt tokens/row, {args.max_tokens} output tokens/row"
        )
        print(
            f"(a) bare vLLM: {a_rate:,.0f} output tok/s ({args.rows / a['generate_s']:.1f} rows/s), "
            f"engine start {a['engine_start_s']:.1f} s",
            flush=True,
        )
        # Marginal rate over N/2 and N rows: actor and engine start-up cancel out (Ray is started
        # first so that neither run pays for it).
        from omegaconf import OmegaConf

        from flip_ray.config.base import RayConfig
        from flip_ray.job.runtime import init_ray

        init_ray(OmegaConf.structured(RayConfig))
        b1 = pipeline(model_dir, rows[: args.rows // 2], args, tmp / "half")
        b2 = pipeline(model_dir, rows, args, tmp / "full")
        dt = b2["total_s"] - b1["total_s"]
        if dt <= 0:
            raise SystemExit(f"the second half took no measurable time ({dt:.1f} s): raise --rows")
        b_rate = (b2["output_tokens"] - b1["output_tokens"]) / dt
        print(
            f"(b) pipeline: {b_rate:,.0f} output tok/s marginal over {args.rows // 2} -> {args.rows} rows "
            f"({b1['total_s']:.1f} s and {b2['total_s']:.1f} s end to end)"
        )
        print(f"(b)/(a): {b_rate / a_rate:.3f}")
        roofline = H200_BF16_FLOPS / (2 * params)
        print(
            f"roofline (2 x params FLOPs/token at 989 TFLOP/s): {roofline:,.0f} tok/s; "
            f"bare reaches {a_rate / roofline:.1%} of it (decode is memory-bound)"
        )


if __name__ == "__main__":
    main()
