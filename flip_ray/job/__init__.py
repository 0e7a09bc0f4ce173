"""The scoring job, step by step: `plan` (pre-flight and reconciliation with the output), `pipeline`
(the Ray Data pipeline) with its `stages` and `engine_stage`, `tracker` (commits), `store` (the output
directory), `lock`, `runtime` (Ray and the engine actors), `console` and `progress` (the terminal),
and `run`, the recipe that calls them in that order."""
