"""flip_ray: FLIP backward-inference rewards as a distributed batch job on Ray Data + vLLM.

Packages, from the bottom up (each imports only those below it): `text` (prompts, parsing, metrics,
flags, row rules), `engine` (vLLM), `rewards` (the reward registry), `schema`, `input`, `config`, `job`
(the scoring job's steps), `downstream` (filter, best-of-N, pairs, report), `recipe` (the scoring run),
`evaluation`, and at the top `scorer` (`FlipScorer`, the in-process API) and `cli`. Importing any of
them loads no vllm, torch or transformers: the engine imports them inside the actor.
"""

__version__ = "0.1.0"
