"""Rewards: each one declared once, in its own module, as a `RewardMethod` (its columns and their
types, the engine requests it needs for a row and how their results become its columns, the CPU part
that finishes it, the column it ranks by and in which direction, what the report shows, its config
keys and their validation), and the registry that the engine stage, the similarity stage, the output
schema, the report, the downstream jobs and the evaluation iterate over. No module outside a reward's
own names its columns."""

from flip_ray.rewards.base import EngineRows, EngineSetup, FinishSetup, RewardMethod, RowScore, likelihood_score
from flip_ray.rewards.registry import (
    every,
    get,
    names,
    output_fields,
    owner_of,
    rank_columns,
    register,
    resolve,
    unregister,
    validate,
)

__all__ = [
    "EngineRows",
    "EngineSetup",
    "FinishSetup",
    "RewardMethod",
    "RowScore",
    "every",
    "get",
    "likelihood_score",
    "names",
    "output_fields",
    "owner_of",
    "rank_columns",
    "register",
    "resolve",
    "unregister",
    "validate",
]
