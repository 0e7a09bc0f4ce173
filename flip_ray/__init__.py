"""flip_ray: FLIP backward-inference rewards as a distributed batch job on Ray Data + vLLM.

Importing the package (and its CPU-side modules: config, io, metrics, parsing, prompts, records,
schema, scoring) loads no vllm, torch or transformers; the inference stage imports them inside the
actor.
"""

__version__ = "0.1.0"
