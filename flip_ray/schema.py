"""The output schema, written down once, and the internal columns that travel between stages.

Output rows are `id`, the kept input columns, then `FLIP_COLUMNS`. Internal columns start with
`_flip_` and are dropped by the last stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from flip_ray.shards import InputError

ID = "id"

# Internal columns, set by the reader and the engine stage, removed before writing.
INSTRUCTION = "_flip_instruction"  # the real instruction (prompt, or the last user turn)
RESPONSE = "_flip_response"  # the response to read backwards
CONTEXT = "_flip_context"  # earlier turns as a JSON list of {role, content}, or null
GENERATIONS = "_flip_generations"  # raw engine answers, one per sample (list<string>)
SHARD = "_flip_shard"  # id of the shard the row came from (store.shard_id)
# Each shard ends with one marker row (no data): SHARD_TOTAL = rows read from the shard, and
# SHARD_ERROR = why it could not be read to the end, if so. Stages pass markers through untouched.
SHARD_TOTAL = "_flip_shard_total"
SHARD_ERROR = "_flip_shard_error"
DEDUP = "_flip_dedup"  # true when the engine result was reused from an identical earlier row
CONTROL_COLUMNS = pa.schema(
    [
        pa.field(SHARD, pa.string()),
        pa.field(SHARD_TOTAL, pa.int64()),
        pa.field(SHARD_ERROR, pa.string()),
        pa.field(DEDUP, pa.bool_()),
    ]
)

# Per-row rewards the scoring job computes, in one engine pass, and the column each ranks by.
SCORE_METHODS = ("flip", "flip_logprob", "flip_logprob_lexical", "pmi_forward", "judge_pointwise")
SCORE_COLUMN = {
    "flip": "flip_score",
    "flip_logprob": "flip_logprob_mean",
    "flip_logprob_lexical": "flip_logprob_lexical",
    "pmi_forward": "pmi_forward",
    "judge_pointwise": "judge_score",
}
# Per reward method: why that method could not score a row (its columns are then null). A row's
# `error` is set only when every requested method failed, or the row could not be read at all.
METHOD_ERROR = {m: f"{m}_error" for m in SCORE_METHODS}
# Reward-hacking and weak-spot flags (`flags.compute_flags`), one boolean column each.
FLAG_NAMES = ("flag_restates_prompt", "flag_too_short", "flag_language_mismatch")

FLIP_COLUMNS = pa.schema(
    [
        pa.field("inferred_instruction", pa.string()),
        pa.field("reasoning", pa.string()),
        pa.field("flip_score", pa.float64()),
        pa.field("flip_precision", pa.float64()),
        pa.field("flip_recall", pa.float64()),
        pa.field("parse_status", pa.string()),
        pa.field("flip_logprob_mean", pa.float64()),
        pa.field("flip_logprob_sum", pa.float64()),
        pa.field("flip_logprob_tokens", pa.int64()),
        pa.field("flip_logprob_contrast", pa.float64()),
        pa.field("flip_logprob_lexical", pa.float64()),
        pa.field("pmi_forward", pa.float64()),
        pa.field("judge_score", pa.float64()),
        pa.field("judge_parse_status", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("n_prompt_tokens", pa.int64()),
        pa.field("n_output_tokens", pa.int64()),
        pa.field("truncated", pa.bool_()),
        pa.field("prompt_copy_fraction", pa.float64()),
        pa.field("response_words", pa.int64()),
        *(pa.field(name, pa.bool_()) for name in FLAG_NAMES),
        *(pa.field(name, pa.string()) for name in METHOD_ERROR.values()),
        pa.field("error", pa.string()),
    ]
)
FLIP_COLUMN_NAMES = tuple(FLIP_COLUMNS.names)
RESERVED = {ID, *FLIP_COLUMN_NAMES}

# Columns the engine stage adds; the similarity stage reads them.
ENGINE_COLUMNS = pa.schema(
    [
        pa.field(GENERATIONS, pa.list_(pa.string())),
        *(
            FLIP_COLUMNS.field(name)
            for name in (
                "flip_logprob_mean",
                "flip_logprob_sum",
                "flip_logprob_tokens",
                "flip_logprob_contrast",
                "flip_logprob_lexical",
                "pmi_forward",
                "judge_score",
                "judge_parse_status",
                "finish_reason",
                "n_prompt_tokens",
                "n_output_tokens",
                "truncated",
                *METHOD_ERROR.values(),
                "error",
            )
        ),
    ]
)


# What the writer reports to the driver for each part file it wrote (or each shard marker it saw):
# sums, and JSON objects of counts, that the driver adds up per shard (done records) and per run.
PART_SUMS = ("rows", "scored", "errors", "score_sum", "flip_scored", "output_tokens", "truncated", "dedup_saved")
PART_COUNTS = ("flagged", "parse_status", "error_kinds", "method_errors", "method_scored", "method_error_kinds")
PART_META = pa.schema(
    [
        pa.field("shard_id", pa.string()),
        pa.field("file", pa.string()),
        # score_sum: of flip_score over the rows that have one (flip_scored)
        *(pa.field(k, pa.float64() if k == "score_sum" else pa.int64()) for k in PART_SUMS),
        # flagged: flag -> rows; parse_status: status -> rows; error_kinds: kind -> rows;
        # method_errors: method -> rows it could not score; method_scored: method -> rows it scored;
        # method_error_kinds: "<method>: <kind>" -> rows
        *(pa.field(k, pa.string()) for k in PART_COUNTS),
        pa.field("total", pa.int64()),  # marker only
        pa.field("shard_error", pa.string()),  # marker only
    ]
)


def output_column_name(input_name: str) -> str:
    """Kept input columns whose names clash with output columns get an `input_` prefix."""
    return f"input_{input_name}" if input_name in RESERVED else input_name


# Internal columns (above, and the downstream jobs' own) are named with this prefix; they travel
# beside the kept columns and are never renamed, so a kept input column cannot bear it.
INTERNAL_PREFIX = "_flip_"


def check_output_names(kept: Sequence[str]) -> None:
    """Checks that every kept input column gets an output column of its own.

    Raises:
        InputError: A column is kept twice, two kept columns map to one output name (`error` is
            written as `input_error`, the name of another kept column), or a kept column's name
            starts like flip_ray's internal ones (`INTERNAL_PREFIX`).
    """
    by_output: dict[str, str] = {}
    for name in kept:
        if name.startswith(INTERNAL_PREFIX):
            raise InputError(
                f"input column {name!r} is named like flip_ray's internal columns ({INTERNAL_PREFIX}...); rename "
                "it in the input, or list the columns to keep in input.keep_columns without it"
            )
        out = output_column_name(name)
        if out in by_output:
            first = by_output[out]
            if first == name:
                raise InputError(f"input column {name!r} is kept twice; name it once in input.keep_columns")
            raise InputError(
                f"input columns {first!r} and {name!r} would both be written as {out!r} (an input column named like "
                "an output column gets the prefix input_); list the columns to keep in input.keep_columns "
                "without one of them"
            )
        by_output[out] = name


def output_schema(kept: pa.Schema) -> pa.Schema:
    """`id`, the kept input columns (renamed on clashes), then the FLIP columns."""
    fields = [pa.field(ID, pa.string())]
    fields += [pa.field(output_column_name(f.name), f.type) for f in kept]
    return pa.schema(fields + list(FLIP_COLUMNS))


def normalized_schema(kept: pa.Schema) -> pa.Schema:
    """Rows as the reader emits them: id, kept input columns, internal columns, error, control."""
    fields = [pa.field(ID, pa.string())]
    fields += [pa.field(output_column_name(f.name), f.type) for f in kept]
    fields += [
        pa.field(INSTRUCTION, pa.string()),
        pa.field(RESPONSE, pa.string()),
        pa.field(CONTEXT, pa.string()),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields + list(CONTROL_COLUMNS))


def put_column(table: pa.Table, field: pa.Field, array: pa.Array) -> pa.Table:
    """`table` with `field` set to `array`: replaces a column of that name, or appends it."""
    if field.name in table.column_names:
        return table.set_column(table.schema.get_field_index(field.name), field, array)
    return table.append_column(field, array)
