"""Preference data for the evaluation job: `{id, prompt, chosen, rejected[, subset]}` rows read into
`Item`s (bad rows kept aside with their reason), and the one-row-per-response table the scoring job
reads. `prompt` is a string, a chat, or an HH-RLHF transcript (`text/rows.prompt_parts`); `rejected`
is a string or a list (best-of-N)."""

from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass, field

import pyarrow as pa
from omegaconf import DictConfig

from flip_ray.input.files import InputError, list_shards
from flip_ray.input.readers import read_records
from flip_ray.text.rows import RowError, prompt_parts, text_field


@dataclass
class Item:
    """One preference item: candidates[0] is the chosen response, the rest were rejected."""

    id: str
    instruction: str
    context: list[dict]
    candidates: list[str]
    subset: str
    prompt_text: str = ""
    extra: dict = field(default_factory=dict)


def _candidates(row: dict, chosen_col: str, rejected_col: str) -> list[str]:
    chosen = text_field(row.get(chosen_col), chosen_col)
    rejected = row.get(rejected_col)
    if isinstance(rejected, (list, tuple)):
        if not rejected:
            raise RowError(f"{rejected_col} is an empty list")
        rejected = [text_field(r, f"{rejected_col}[{k}]") for k, r in enumerate(rejected)]
    else:
        rejected = [text_field(rejected, rejected_col)]
    if any(r == chosen for r in rejected):
        raise RowError(f"{rejected_col} repeats the chosen response; the pair cannot be ranked")
    return [chosen, *rejected]


def _item(row: dict, where: str, i: DictConfig, subset_from: str, file_subset: str) -> Item:
    """One preference item from a record. Raises RowError (the row goes to errors.jsonl)."""
    pid = row.get(i.id_column) if i.id_column else where
    if i.id_column and (pid is None or (isinstance(pid, str) and not pid.strip())):
        raise RowError(f"{i.id_column} is missing")
    instruction, context = prompt_parts(row.get(i.prompt_column))
    candidates = _candidates(row, i.chosen_column, i.rejected_column)
    column_subset = row.get(i.subset_column)
    use_column = subset_from == "column" or (subset_from == "auto" and column_subset not in (None, ""))
    prompt = row.get(i.prompt_column)
    return Item(
        str(pid),
        instruction,
        context,
        candidates,
        str(column_subset) if use_column else file_subset,
        prompt if isinstance(prompt, str) else instruction,
    )


def load_items(i: DictConfig, subset_from: str = "auto") -> tuple[list[Item], list[dict]]:
    """Reads and checks every pair of the evaluation job's `input` section. Returns (good items,
    bad rows with their reason). `subset_from`: `evaluation.subset_from`.

    Raises:
        InputError: No input, or a pair id that repeats.
    """
    items: list[Item] = []
    bad: list[dict] = []
    for shard in list_shards(i.path, i.format):
        rows = list(read_records(shard))
        if i.sample_per_file is not None and len(rows) > i.sample_per_file:
            rows = sorted(random.Random(f"{i.sample_seed}:{shard.key}").sample(rows, i.sample_per_file))
        file_subset = posixpath.basename(shard.key).split(".")[0] if "/" not in shard.key else shard.key.split("/")[0]
        for index, row, error in rows:
            where = f"{shard.key}:{index}"
            if error is not None:
                bad.append({"row": where, "id": None, "error": error})
                continue
            try:
                items.append(_item(row, where, i, subset_from, file_subset))
            except RowError as e:
                pid = row.get(i.id_column) if i.id_column else where
                bad.append({"row": where, "id": None if pid is None else str(pid), "error": str(e)})
    seen: dict[str, int] = {}
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
    repeated = [k for k, n in seen.items() if n > 1]
    if repeated:
        raise InputError(
            f"input.id_column {i.id_column!r} repeats ids ({', '.join(map(repr, repeated[:5]))}); "
            "deduplicate the input or set input.id_column=null to use <file>:<row> ids"
        )
    return items, bad


def response_id(item_id: str, candidate: int) -> str:
    return f"{item_id}#{candidate}"


def responses_table(items: list[Item]) -> pa.Table:
    """One row per response: id, pair id, candidate index (0 = chosen), subset, and the chat
    (earlier turns, the instruction, the response) that the scoring job reads."""
    rows = {"id": [], "pair_id": [], "candidate": [], "subset": [], "messages": []}
    for item in items:
        for k, text in enumerate(item.candidates):
            rows["id"].append(response_id(item.id, k))
            rows["pair_id"].append(item.id)
            rows["candidate"].append(k)
            rows["subset"].append(item.subset)
            rows["messages"].append(
                [*item.context, {"role": "user", "content": item.instruction}, {"role": "assistant", "content": text}]
            )
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "pair_id": pa.array(rows["pair_id"], pa.string()),
            "candidate": pa.array(rows["candidate"], pa.int64()),
            "subset": pa.array(rows["subset"], pa.string()),
            "messages": pa.array(rows["messages"], pa.list_(turn)),
        }
    )
