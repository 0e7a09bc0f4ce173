"""The output schema, written down once, and the internal columns that travel between stages.

Output rows are `id`, the kept input columns, then `FLIP_COLUMNS`. Internal columns start with
`_flip_` and are dropped by the last stage.
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"

# Internal columns, set by the reader and the engine stage, removed before writing.
INSTRUCTION = "_flip_instruction"  # the real instruction (prompt, or the last user turn)
RESPONSE = "_flip_response"  # the response to read backwards
CONTEXT = "_flip_context"  # earlier turns as a JSON list of {role, content}, or null
GENERATIONS = "_flip_generations"  # raw engine answers, one per sample (list<string>)

FLIP_COLUMNS = pa.schema(
    [
        pa.field("inferred_instruction", pa.string()),
        pa.field("reasoning", pa.string()),
        pa.field("flip_score", pa.float64()),
        pa.field("flip_precision", pa.float64()),
        pa.field("flip_recall", pa.float64()),
        pa.field("parse_status", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("n_prompt_tokens", pa.int64()),
        pa.field("n_output_tokens", pa.int64()),
        pa.field("truncated", pa.bool_()),
        pa.field("error", pa.string()),
    ]
)
FLIP_COLUMN_NAMES = tuple(FLIP_COLUMNS.names)
RESERVED = {ID, *FLIP_COLUMN_NAMES}

# Columns the engine stage adds; the similarity stage reads them.
ENGINE_COLUMNS = pa.schema(
    [
        pa.field(GENERATIONS, pa.list_(pa.string())),
        pa.field("finish_reason", pa.string()),
        pa.field("n_prompt_tokens", pa.int64()),
        pa.field("n_output_tokens", pa.int64()),
        pa.field("truncated", pa.bool_()),
        pa.field("error", pa.string()),
    ]
)


def output_column_name(input_name: str) -> str:
    """Kept input columns whose names clash with output columns get an `input_` prefix."""
    return f"input_{input_name}" if input_name in RESERVED else input_name


def output_schema(kept: pa.Schema) -> pa.Schema:
    """`id`, the kept input columns (renamed on clashes), then the FLIP columns."""
    fields = [pa.field(ID, pa.string())]
    fields += [pa.field(output_column_name(f.name), f.type) for f in kept]
    return pa.schema(fields + list(FLIP_COLUMNS))
