"""What copy-blocking decoding (`reward.block_copy`, `reward.no_repeat_ngram`) costs per token.

    .venv/bin/python benchmarks/copy_block_cost.py [--rows 64] [--tokens 64] [--repeats 2]

One engine (the embedded model on CPU, the job's engine settings) with the copy-blocking logits
processor loaded; the same FLIP requests of the bundled corpus rows, each generating exactly
`--tokens` tokens (`ignore_eos`, so that blocking cannot change how much is generated), run as one
block with plain sampling parameters and with block_copy=4 + no_repeat_ngram=4, alternating, each
`--repeats` times. Prints output tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

from datadir import DATA  # benchmarks/datadir.py: $FLIP_RAY_DATA or ../shared/data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from dataclasses import replace

    from flip_ray.engine.embedded import prepare_default_model
    from flip_ray.engine.specs import BLOCK_COPY_PROCESSOR, EngineSpec, PromptSpec, SamplingSpec

    spec = replace(EngineSpec(str(prepare_default_model()), dtype="float32"), logits_processors=(BLOCK_COPY_PROCESSOR,))
    for key, value in spec.env().items():
        os.environ.setdefault(key, value)
    from vllm.inputs import TokensPrompt

    from flip_ray.engine.copy_block import request_params
    from flip_ray.engine.generation import FlipGenerator, generate_isolated

    with gzip.open(DATA / "alpacaeval_outputs" / "data.jsonl.gz", "rt") as f:
        responses = [json.loads(line)["response"] for _, line in zip(range(args.rows), f, strict=False)]
    llm = spec.build()
    generator = FlipGenerator(llm, PromptSpec(), SamplingSpec(max_tokens=args.tokens, ignore_eos=True))
    prompts = [TokensPrompt(prompt_token_ids=generator.render(r)[0]) for r in responses]
    blocked = [request_params(generator.params, 4, generator.fitter.encode(r), 4) for r in responses]
    generate_isolated(llm, prompts[:4], generator.params)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "block_copy=4 + no_repeat_ngram=4": []}
    for _ in range(args.repeats):
        for name, params in zip(times, (generator.params, blocked), strict=True):
            t0 = time.perf_counter()
            outs = generate_isolated(llm, prompts, params)
            times[name].append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
    tokens = args.rows * args.tokens
    rates = {name: tokens / min(ts) for name, ts in times.items()}
    print(f"{args.rows} rows x {args.tokens} tokens, best of {args.repeats}:")
    for name, rate in rates.items():
        print(f"  {name}: {rate:.1f} output tokens/s ({min(times[name]):.1f} s)")
    plain, blocked_rate = rates.values()
    print(f"  blocked / plain: {blocked_rate / plain:.3f}")


if __name__ == "__main__":
    main()
