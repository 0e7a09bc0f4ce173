"""The GPU regime by SIMULATION (no GPU ran this): how the engine is driven, one synchronous call per
reward per block (flip_ray before the engine queue) against blocks in flight with every reward in one
queue (today), fed into a step-time model of one H100 running vLLM's continuous batching.

    python benchmarks/gpu_sim.py [--rows 4096] [--block 64] [--in-flight 8] [--max-tokens 256]

Workload, measured here: FLIP prompt lengths from the response lengths of the bundled corpora
(`gpu/response_lengths.json`, words x 1.35 tokens + 150 template tokens, capped at 4096 - max_tokens),
inferred-instruction lengths from the demo run's `n_output_tokens` (`OUTPUT_TOKENS`: the bundled
sample, embedded model, max_tokens 128; the 9 rows that hit the cap loop until it, so they run to
`--max-tokens` here). Each row has a generation (flip) and one likelihood request (flip_logprob:
its FLIP prompt read from the prefix cache once its twin has prefilled, plus ~30 instruction tokens).

Step-time model (a Llama-3.1-8B-sized model in bf16 on one H100 SXM): a step reads the weights and
the KV cache of its running sequences from HBM, or is bound by compute on the tokens it runs,
whichever is longer, plus a fixed per-step overhead:

    t = OVERHEAD + max((WEIGHTS + KV_PER_TOKEN x context tokens) / (BW x MEM_EFF),
                       2 x PARAMS x tokens / (FLOPS x COMPUTE_EFF))

BW = 3.35 TB/s and FLOPS = 989 TFLOP/s are NVIDIA's H100 SXM figures; MEM_EFF = 0.77 is the share of
the memory roofline vLLM reached at one request per step in a published sweep (Llama-3.1-8B on an
A100, "vLLM throughput-latency sweep on NVIDIA A100", johnmusgrave.com: 75 tokens/s, about 77% of the
bandwidth ceiling); COMPUTE_EFF = 0.5 and OVERHEAD = 2 ms are assumptions, stated as such. The
scheduler: at most 256 sequences and 8192 tokens per step (vLLM's defaults), chunked prefill,
first come first served, no preemption (the KV cache of an H100 holds these sequences).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# n_output_tokens of `make demo` (24 rows of flip_ray/samples, SmolLM2-135M, max_tokens 128)
OUTPUT_TOKENS = [11, 14, 14, 18, 22, 32, 49, 57, 58, 58, 70, 78, 84, 97, 108] + [128] * 9

PARAMS, WEIGHTS = 8.0e9, 16.0e9  # Llama-3.1-8B in bf16
KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16: 131 KB
BW, FLOPS = 3.35e12, 989e12  # H100 SXM
MEM_EFF, COMPUTE_EFF, OVERHEAD = 0.77, 0.5, 0.002
MAX_SEQS, MAX_TOKENS_PER_STEP = 256, 8192
INSTRUCTION_TOKENS = 30


@dataclass(eq=False)
class Req:
    row: int
    prompt: int  # tokens to prefill
    output: int  # tokens to decode (0: a likelihood request, done at the end of its prefill)
    context: int = 0  # tokens in its KV cache (cached prefix included)
    prefilled: int = 0
    decoded: int = 0

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt

    @property
    def done(self) -> bool:
        return not self.in_prefill and self.decoded >= self.output


def step_time(tokens: int, context: int) -> float:
    memory = (WEIGHTS + KV_PER_TOKEN * context) / (BW * MEM_EFF)
    compute = 2 * PARAMS * tokens / (FLOPS * COMPUTE_EFF)
    return OVERHEAD + max(memory, compute)


class Engine:
    def __init__(self):
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.clock = 0.0
        self.seq_steps = 0.0  # running sequences x steps

    def add(self, r: Req) -> None:
        self.waiting.append(r)

    def step(self) -> list[tuple[str, Req]]:
        """One engine step: every decoding sequence gets a token, prefills fill the rest of the token
        budget. Returns ("prefilled", r) for each prefill that ended (its first token sampled) and
        ("done", r) for each request that finished."""
        while self.waiting and len(self.running) < MAX_SEQS:
            self.running.append(self.waiting.pop(0))
        decoding = [r for r in self.running if not r.in_prefill]
        budget = MAX_TOKENS_PER_STEP - len(decoding)
        tokens = len(decoding)
        events = []
        for r in self.running:
            if r.in_prefill and budget > 0:
                chunk = min(budget, r.prompt - r.prefilled)
                r.prefilled += chunk
                r.context += chunk
                budget -= chunk
                tokens += chunk
                if not r.in_prefill:
                    events.append(("prefilled", r))
                    if r.output:
                        r.decoded += 1  # the step that ends a prefill samples the first token
        for r in decoding:
            r.decoded += 1
            r.context += 1
        self.clock += step_time(tokens, sum(r.context for r in self.running))
        self.seq_steps += len(self.running)
        events += [("done", r) for r in self.running if r.done]
        self.running = [r for r in self.running if not r.done]
        return events


def workload(rows: int, max_tokens: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    words = json.loads((HERE / "gpu" / "response_lengths.json").read_text())["words"]
    out = []
    for _ in range(rows):
        prompt = min(int(rng.choice(words) * 1.35) + 150, 4096 - max_tokens)
        n = rng.choice(OUTPUT_TOKENS)
        out.append((prompt, max_tokens if n == 128 else n))
    return out


def sync_per_block(rows: list[tuple[int, int]], block: int) -> tuple[float, float]:
    """flip_ray before the queue: per block, the generations (one call, until the slowest ends), then
    the likelihoods (one call), then the next block."""
    engine = Engine()
    steps = 0
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        for call in (
            [Req(start + k, p, n) for k, (p, n) in enumerate(part)],
            [Req(start + k, INSTRUCTION_TOKENS, 0, context=p) for k, (p, n) in enumerate(part)],
        ):
            for r in call:
                engine.add(r)
            left = len(call)
            while left:
                left -= sum(1 for kind, _ in engine.step() if kind == "done")
                steps += 1
    return len(rows) / engine.clock, engine.seq_steps / steps


def in_flight(rows: list[tuple[int, int]], block: int, blocks: int) -> tuple[float, float]:
    """Today: `blocks` blocks in the queue at once; a likelihood enters when its twin has prefilled
    (the FLIP prompt is then in the prefix cache); a new block enters when one ends."""
    engine = Engine()
    starts = list(range(0, len(rows), block))
    pending: dict[int, int] = {}  # block start -> requests left
    twin: dict[Req, Req] = {}
    steps = 0

    def admit() -> None:
        while starts and len(pending) < blocks:
            start = starts.pop(0)
            part = rows[start : start + block]
            pending[start] = 2 * len(part)
            for k, (p, n) in enumerate(part):
                g = Req(start + k, p, n)
                twin[g] = Req(start + k, INSTRUCTION_TOKENS, 0, context=p)
                engine.add(g)

    admit()
    while pending:
        for kind, r in engine.step():
            if kind == "prefilled" and r in twin:
                engine.add(twin.pop(r))
            if kind == "done":
                start = r.row - r.row % block
                pending[start] -= 1
                if not pending[start]:
                    del pending[start]
        steps += 1
        admit()
    return len(rows) / engine.clock, engine.seq_steps / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = workload(args.rows, args.max_tokens, args.seed)
    a_rate, a_occ = sync_per_block(rows, args.block)
    one_rate, one_occ = in_flight(rows, args.block, 1)
    b_rate, b_occ = in_flight(rows, args.block, args.in_flight)
    print(f"SIMULATION: {args.rows} rows, blocks of {args.block}, max_tokens {args.max_tokens}, 8B model on one H100")
    print(f"one call per reward per block   : {a_rate:7.1f} rows/s, {a_occ:6.1f} sequences per step")
    print(f"1 block at a time, one queue    : {one_rate:7.1f} rows/s, {one_occ:6.1f} sequences per step")
    print(f"{args.in_flight} blocks in flight, one queue   : {b_rate:7.1f} rows/s, {b_occ:6.1f} sequences per step")
    print(f"ratio, in flight / one call per reward per block: {b_rate / a_rate:.2f}x")


if __name__ == "__main__":
    main()
