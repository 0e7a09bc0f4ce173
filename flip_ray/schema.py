"""The output schema, written down once, and the internal columns that travel between stages.

Output rows are `id`, the kept input columns, then `scored_fields(methods)`: the columns of the rewards
that ran (declared by each reward, `rewards`), the shared engine and row columns, the rewards' error
columns and `error`. Internal columns start with `_flip_` and are dropped by the last stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa

from flip_ray import rewards
from flip_ray.text.flags import FLAG_NAMES
from flip_ray.text.rows import InputError

ID = "id"
# How scored outputs are laid out; part of the output fingerprint, so that a rerun never mixes parts of
# two layouts. 2: only the columns of the rewards that ran (1 held every reward's columns); 3: flip's
# copy and echo measures (copy_span, copy_fraction, flag_copied_response, flag_echoed_template).
OUTPUT_LAYOUT = 3

# Internal columns, set by the reader and the engine stage, removed before writing.
INSTRUCTION = "_flip_instruction"  # the real instruction (prompt, or the last user turn)
RESPONSE = "_flip_response"  # the response to read backwards
CONTEXT = "_flip_context"  # earlier turns as a JSON list of {role, content}, or null
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


# Columns every scored output holds whatever rewards ran: what the engine did with the row (set by
# the rewards that ran, `rewards.RowScore`), then the flags of the row's texts. The rewards' own
# columns (`rewards`) come before these, their error columns after, `error` last.
ENGINE_SHARED = (
    pa.field("finish_reason", pa.string()),
    pa.field("n_prompt_tokens", pa.int64()),
    pa.field("n_output_tokens", pa.int64()),
    pa.field("truncated", pa.bool_()),
)
ROW_FIELDS = (
    pa.field("prompt_copy_fraction", pa.float64()),
    pa.field("response_words", pa.int64()),
    *(pa.field(name, pa.bool_()) for name in FLAG_NAMES),
)
ERROR = pa.field("error", pa.string())  # set when the row could not be read, or every reward failed on it


def _methods(methods: Iterable[str | rewards.RewardMethod] | None) -> tuple[rewards.RewardMethod, ...]:
    """Rewards by name (looked up in this process's registry) or as given: the actors get the
    `RewardMethod` objects from the driver, whose registry may hold rewards theirs does not."""
    if methods is None:
        return rewards.every()
    methods = list(methods)
    if all(isinstance(m, rewards.RewardMethod) for m in methods):
        return tuple(methods)
    return rewards.resolve(methods)


def scored_fields(methods: Iterable[str | rewards.RewardMethod] | None = None) -> pa.Schema:
    """The columns a run of `methods` (None: every registered reward) adds to each row: the rewards'
    own, the shared engine and row columns, the rewards' `<method>_error` columns, then `error`."""
    ms = _methods(methods)
    return pa.schema(
        [f for m in ms for f in m.fields]
        + [*ENGINE_SHARED, *ROW_FIELDS]
        + [pa.field(m.error_column, pa.string()) for m in ms]
        + [ERROR]
    )


def engine_fields(methods: Iterable[str | rewards.RewardMethod]) -> pa.Schema:
    """The columns the engine stage adds for a run of `methods`; the similarity stage reads them."""
    ms = _methods(methods)
    return pa.schema(
        [f for m in ms for f in m.engine_columns()]
        + list(ENGINE_SHARED)
        + [pa.field(m.error_column, pa.string()) for m in ms]
        + [ERROR]
    )


def known_flags() -> tuple[str, ...]:
    """Every flag column an output can hold: the row flags, then the registered rewards' own."""
    return (*FLAG_NAMES, *(f for m in rewards.every() for f in m.flags))


def reserved() -> set[str]:
    """Output names no kept input column may take as they are (whatever rewards run, so that the
    renaming of input columns never depends on the rewards)."""
    return {ID, *scored_fields(None).names}


# What the writer reports to the driver for each part file it wrote (or each shard marker it saw):
# sums, and JSON objects of counts, that the driver adds up per shard (done records) and per run.
PART_SUMS = ("rows", "scored", "errors", "output_tokens", "truncated", "dedup_saved")
PART_COUNTS = (
    "flagged",
    "statuses",
    "error_kinds",
    "method_errors",
    "method_scored",
    "method_error_kinds",
    "reward_sums",
    "reward_counts",
)
PART_META = pa.schema(
    [
        pa.field("shard_id", pa.string()),
        pa.field("file", pa.string()),
        *(pa.field(k, pa.int64()) for k in PART_SUMS),
        # flagged: flag -> rows; statuses: "<method>: <status>" -> rows (a reward's status column);
        # error_kinds: kind -> rows; method_errors: method -> rows it could not score; method_scored:
        # method -> rows it scored; method_error_kinds: "<method>: <kind>" -> rows; reward_sums and
        # reward_counts: method -> sum and count of the column it ranks by (rows without error)
        *(pa.field(k, pa.string()) for k in PART_COUNTS),
        pa.field("total", pa.int64()),  # marker only
        pa.field("shard_error", pa.string()),  # marker only
    ]
)


def output_column_name(input_name: str, reserved_names: set[str] | None = None) -> str:
    """Kept input columns whose names clash with output columns (`reserved()`) get an `input_` prefix."""
    return f"input_{input_name}" if input_name in (reserved_names or reserved()) else input_name


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
    taken = reserved()
    for name in kept:
        if name.startswith(INTERNAL_PREFIX):
            raise InputError(
                f"input column {name!r} is named like flip_ray's internal columns ({INTERNAL_PREFIX}...); rename "
                "it in the input, or list the columns to keep in input.keep_columns without it"
            )
        out = output_column_name(name, taken)
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


def output_schema(kept: pa.Schema, methods: Iterable[str]) -> pa.Schema:
    """`id`, the kept input columns (renamed on clashes), then the columns of a run of `methods`
    (`scored_fields`)."""
    taken = reserved()
    fields = [pa.field(ID, pa.string())]
    fields += [pa.field(output_column_name(f.name, taken), f.type) for f in kept]
    return pa.schema(fields + list(scored_fields(methods)))


def normalized_schema(kept: pa.Schema) -> pa.Schema:
    """Rows as the reader emits them: id, kept input columns, internal columns, error, control."""
    taken = reserved()
    fields = [pa.field(ID, pa.string())]
    fields += [pa.field(output_column_name(f.name, taken), f.type) for f in kept]
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
