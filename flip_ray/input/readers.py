"""Input: reading a shard's rows (Parquet, JSONL, HF `save_to_disk`; finding shards is `files.py`).

Reading a shard yields blocks of normalised rows: `id`, the internal
columns `_flip_instruction`, `_flip_response`, `_flip_context`, the kept input columns, and `error`
for rows that cannot be scored (null or empty text, malformed JSON line, bad `messages`). Such rows
are kept, never dropped, so every input row reaches the output exactly once.

A row that cannot be decoded (invalid UTF-8, an unpaired surrogate escape) is such a row too, with
its file and line; the file's other rows are read.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from flip_ray import schema
from flip_ray.input.files import HF, JSONL, PARQUET, InputError, Shard, open_file
from flip_ray.text.rows import RowError, conversation_parts, derive_id, text_field

_JSONL_PEEK_ROWS = 100
# A JSON escape of a UTF-16 surrogate: json.loads pairs valid ones and keeps a lone one as a Python
# str that cannot be encoded (Arrow and the tokenizer refuse it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_ESCAPE_TEXT = re.compile(_SURROGATE_ESCAPE.pattern.decode())
# What reading a corrupt or unreadable file raises: pyarrow on a damaged Parquet file or Arrow stream
# (ArrowInvalid, or OSError "Couldn't deserialize thrift", "Corrupt snappy compressed data"), gzip on
# a damaged .gz (BadGzipFile is an OSError; EOFError when cut short, zlib.error inside), the file
# system (missing file, a directory, permission; s3fs turns S3 errors into OSError). Anything else
# raised while reading is a bug in the reader and propagates.
UNREADABLE = (OSError, EOFError, zlib.error, pa.ArrowException, UnicodeDecodeError, json.JSONDecodeError)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnMapping:
    prompt: str = "prompt"
    response: str = "response"
    id: str | None = None
    messages: str | None = None
    # Input columns copied to the output, in order.
    keep: tuple[str, ...] = ()

    def required(self) -> list[str]:
        cols = [self.messages] if self.messages else [self.prompt, self.response]
        return cols + ([self.id] if self.id else [])

    def source_columns(self) -> list[str]:
        return list(dict.fromkeys(self.required() + list(self.keep)))


def peek_columns(shard: Shard) -> pa.Schema:
    """The columns of a shard and their types (JSONL: keys of the first records, all strings)."""
    try:
        if shard.format == PARQUET:
            with open_file(shard.uri) as f:
                return pq.read_schema(f)
        if shard.format == HF:
            with open_file(shard.uri) as f:
                return pa.ipc.open_stream(f).schema
        names: dict[str, None] = {}
        # A small block: object-store files are otherwise fetched 5 MB at a time for a few lines.
        with open_file(shard.uri, compression="infer", block_size=1 << 18) as f:
            for n, (_, line) in enumerate(_json_lines(f, shard)):
                if n >= _JSONL_PEEK_ROWS:
                    break
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict):
                    names.update(dict.fromkeys(record))
        return pa.schema([(name, pa.string()) for name in names])
    except UNREADABLE as e:
        raise InputError(f"cannot read {shard.uri}: {type(e).__name__}: {e}") from e


@dataclass
class SourceBatch:
    """Rows as read from a shard, before the row rules are applied."""

    start: int  # index of the first row in the shard
    values: dict[str, list]  # the mapped columns as Python values
    kept: dict[str, pa.Array]  # the kept columns, typed as in the output
    errors: list[str | None]  # read errors (e.g. a malformed JSON line), one per row

    def __len__(self) -> int:
        return len(self.errors)


def _jsonl_batches(shard: Shard, mapping: ColumnMapping, batch_rows: int, limit: int | None) -> Iterator[SourceBatch]:
    cols = mapping.source_columns()
    start = 0
    records: list[dict | None] = []
    errors: list[str | None] = []

    def flush() -> SourceBatch:
        values = {c: [None if r is None else r.get(c) for r in records] for c in cols}
        kept = {}
        for c in mapping.keep:
            kept[c] = pa.array([_as_text(v) for v in values[c]], pa.string())
        return SourceBatch(start, values, kept, list(errors))

    index = 0
    with open_file(shard.uri, compression="infer") as f:
        lines = _json_lines(f, shard) if shard.byte_start == 0 and shard.byte_stop is None else _range_lines(f, shard)
        for lineno, raw in lines:
            if not raw.strip():
                continue
            if limit is not None and index >= limit:
                break
            record, error = decode_json_line(raw, shard.file_key, lineno)
            records.append(record)
            errors.append(error)
            index += 1
            if len(records) >= batch_rows:
                yield flush()
                start += len(records)
                records, errors = [], []
    if records:
        yield flush()


def decode_json_line(raw: bytes, key: str, lineno: int) -> tuple[dict | None, str | None]:
    """One JSONL line as (record, None), or (None, why) naming the file and line. A record whose
    text cannot be stored (an unpaired surrogate escape) comes back with its clean fields (its id
    among them) and the reason."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"{key} line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"{key} line {lineno}: malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"{key} line {lineno}: expected a JSON object, got {type(obj).__name__}"
    if _SURROGATE_ESCAPE.search(raw) and (bad := _unencodable(obj)):
        return {k: v for k, v in obj.items() if _unencodable(v) is None}, f"{key} line {lineno}: {bad}"
    return obj, None


def read_records(shard: Shard) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row index, record, read error) for every row of a shard, nested values as Python objects:
    for small inputs read whole on the driver (evaluation sets). Same line rules as the scoring
    reader; a Parquet row Python cannot decode is an error of its own."""
    if shard.format == JSONL:
        with open_file(shard.uri, compression="infer") as f:
            index = 0
            for lineno, raw in _json_lines(f, shard):
                if raw.strip():
                    record, error = decode_json_line(raw, shard.key, lineno)
                    yield index, None if error else record, error
                    index += 1
        return
    with open_file(shard.uri) as f:
        table = pq.read_table(f) if shard.format == PARQUET else pa.ipc.open_stream(f).read_all()
    try:
        yield from ((i, record, None) for i, record in enumerate(table.to_pylist()))
        return
    except UnicodeDecodeError:
        pass
    for i in range(table.num_rows):  # only when some row is not valid UTF-8: find it
        try:
            yield i, table.slice(i, 1).to_pylist()[0], None
        except UnicodeDecodeError as e:
            yield i, None, f"{shard.key} row {i}: not valid UTF-8 ({e.reason} at byte {e.start})"


def _range_lines(f, shard: Shard) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the lines that start in the shard's byte range: the reader seeks to
    it and never reads, let alone parses, a line before it (`sharding.py` cuts at line starts)."""
    f.seek(shard.byte_start)
    pos, lineno = shard.byte_start, shard.first_line
    for line in f:
        if shard.byte_stop is not None and pos >= shard.byte_stop:
            return
        yield lineno, line[3:] if pos == 0 and line.startswith(b"\xef\xbb\xbf") else line
        pos += len(line)
        lineno += 1


def _json_lines(f, shard: Shard) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a JSONL file. A UTF-8 byte-order mark is dropped; a file holding one
    JSON array (alpaca_data.json style) yields its elements, numbered by position."""
    first = f.readline()
    if first.startswith(b"\xef\xbb\xbf"):
        first = first[3:]
    if first.lstrip().startswith(b"["):
        try:
            items = json.loads(first + f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{shard.uri} starts with '[' but is not a valid JSON array: {e}") from e
        for n, item in enumerate(items, start=1):
            yield n, json.dumps(item).encode()
        return
    yield 1, first
    yield from enumerate(f, start=2)


def _unencodable(obj) -> str | None:
    """Why a decoded JSON record cannot be stored as UTF-8 text (an unpaired surrogate escape such
    as "\\ud800", valid JSON but not valid Unicode), or None when it can."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"holds an unpaired UTF-16 surrogate (\\u{ord(e.object[e.start]):04x}), which is not valid Unicode text"


def _as_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _arrow_batches(shard: Shard, mapping: ColumnMapping, batch_rows: int, limit: int | None) -> Iterator[SourceBatch]:
    start = 0
    with open_file(shard.uri) as f:
        if shard.format == PARQUET:
            pf = pq.ParquetFile(f)
            _check_columns(shard, pf.schema_arrow, mapping)
            # Kept columns this file lacks are left out here and null in the output (stages.conform).
            cols = [c for c in mapping.source_columns() if c in pf.schema_arrow.names]
            groups, skip = _row_groups(pf.metadata, shard)
            batches = _window(pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=cols), skip, shard)
        else:
            reader = pa.ipc.open_stream(f)
            _check_columns(shard, reader.schema, mapping)
            batches = _rechunk(_window(map(_check_structure, reader), shard.first_row, shard), batch_rows)
        for rb in batches:
            if limit is not None and start >= limit:
                break
            if limit is not None and start + rb.num_rows > limit:
                rb = rb.slice(0, limit - start)
            errors: list[str | None] = [None] * rb.num_rows
            where = (shard.file_key, shard.first_row + start)
            values = {c: _values_rowwise(rb.column(c), c, errors, where) for c in mapping.required()}
            kept = {c: _valid_column(rb.column(c), c, errors, where) for c in mapping.keep if c in rb.schema.names}
            yield SourceBatch(start, values, kept, errors)
            start += rb.num_rows


def _check_structure(rb: pa.RecordBatch) -> pa.RecordBatch:
    """`rb` once its buffers are checked. An Arrow stream is read without validation, and reading a
    value through a damaged offset crashes the process (SIGSEGV) instead of raising; text is
    checked as bytes here, since invalid UTF-8 is one row's error (`_values_rowwise`).

    Raises:
        pa.ArrowInvalid: The batch is damaged.
    """
    for column in rb.columns:
        column.view(_as_binary(column.type)).validate(full=True)
    return rb


def _as_binary(t: pa.DataType) -> pa.DataType:
    """`t` with its string types as binary ones of the same layout (nested in lists and structs)."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_as_binary(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_as_binary(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_as_binary(f.type)) for f in t])
    return t


def _row_groups(md: pq.FileMetaData, shard: Shard) -> tuple[list[int], int]:
    """The row groups a row range of the file overlaps, and how many rows of the first to skip."""
    if shard.first_row == 0 and shard.rows is None:
        return list(range(md.num_row_groups)), 0
    stop = shard.first_row + (shard.rows if shard.rows is not None else md.num_rows)
    groups, skip, at = [], 0, 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if at + n > shard.first_row and at < stop:
            if not groups:
                skip = shard.first_row - at
            groups.append(i)
        at += n
    return groups, skip


def _window(batches, skip: int, shard: Shard) -> Iterator[pa.RecordBatch]:
    """The record batches of `batches` after its first `skip` rows, up to the shard's row count."""
    left = shard.rows
    for rb in batches:
        if skip >= rb.num_rows:
            skip -= rb.num_rows
            continue
        rb, skip = rb.slice(skip), 0
        if left is not None:
            if left <= 0:
                return
            rb, left = rb.slice(0, left), left - min(left, rb.num_rows)
        if rb.num_rows:
            yield rb


def _values_rowwise(array: pa.Array, name: str, errors: list[str | None], where: tuple[str, int]) -> list:
    """`array.to_pylist()`, except that a value Python cannot decode (invalid UTF-8 written by some
    other tool) becomes None and its row's error, instead of failing the whole batch."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        pass
    out = []
    for i in range(len(array)):
        try:
            out.append(array[i].as_py())
        except UnicodeDecodeError as e:
            out.append(None)
            key, start = where
            errors[i] = errors[i] or f"{key} row {start + i}: {name} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return out


def _valid_column(array: pa.Array, name: str, errors: list[str | None], where: tuple[str, int]) -> pa.Array:
    """A kept column as is when its text is valid UTF-8; otherwise with the bad values nulled and
    their rows' errors set (Parquet readers downstream would fail on them)."""
    try:
        array.validate(full=True)
        return array
    except pa.ArrowInvalid:
        return pa.array(_values_rowwise(array, name, errors, where), array.type)


def _rechunk(reader, rows: int) -> Iterator[pa.RecordBatch]:
    pending: list[pa.RecordBatch] = []
    count = 0
    for rb in reader:
        pending.append(rb)
        count += rb.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, rows).to_batches()[0]
            rest = table.slice(rows)
            pending, count = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _check_columns(shard: Shard, sch: pa.Schema, mapping: ColumnMapping) -> None:
    missing = [c for c in mapping.required() if c not in sch.names]
    if missing:
        raise InputError(
            f"{shard.uri} has no column {', '.join(map(repr, missing))}; columns present: {', '.join(sch.names)}"
        )
    text_cols = [] if mapping.messages else [mapping.prompt, mapping.response]
    for c in text_cols:
        t = sch.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise InputError(f"{shard.uri}: column {c!r} has type {t}, expected string")
    if mapping.messages:
        t = sch.field(mapping.messages).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_string(t)):
            raise InputError(
                f"{shard.uri}: column {mapping.messages!r} has type {t}, expected a list of {{role, content}}"
            )


def check_columns(shard: Shard, mapping: ColumnMapping) -> pa.Schema:
    """Pre-flight: the mapped columns exist in `shard` (listing those present if not)."""
    sch = peek_columns(shard)
    if shard.format == JSONL and len(sch):  # no record at all: an empty shard (or only bad lines, each a row error)
        missing = [c for c in mapping.required() if c not in sch.names]
        if missing:
            raise InputError(
                f"{shard.uri} has no column {', '.join(map(repr, missing))} in its first records; "
                f"columns present: {', '.join(sch.names) or '(none)'}"
            )
    else:
        _check_columns(shard, sch, mapping)
    return sch


def iter_source_batches(shard: Shard, mapping: ColumnMapping, batch_rows: int, limit: int | None = None):
    if shard.format == JSONL:
        return _jsonl_batches(shard, mapping, batch_rows, limit)
    return _arrow_batches(shard, mapping, batch_rows, limit)


def normalize(batch: SourceBatch, shard: Shard, mapping: ColumnMapping) -> pa.Table:
    """Applies the row rules to a source batch: ids, instruction/response/context, row errors."""
    n = len(batch)
    ids, instructions, responses, contexts, errors = [], [], [], [], []
    for i in range(n):
        rid = derive_id(shard.file_key, shard.first_row + batch.start + i)
        raw_id = batch.values[mapping.id][i] if mapping.id else None
        if raw_id is not None:  # also for a row that failed to read, when its id could be read
            rid = str(raw_id)
        instruction = response = context = None
        error = batch.errors[i]
        if error is None:
            try:
                if mapping.id and raw_id is None:
                    raise RowError(f"{mapping.id} (id column) is null")
                if mapping.messages:
                    messages = batch.values[mapping.messages][i]
                    if isinstance(messages, str):
                        text = messages
                        try:
                            messages = json.loads(text)
                        except json.JSONDecodeError as e:
                            raise RowError(f"messages is a string that is not JSON ({e.msg})") from None
                        if _SURROGATE_ESCAPE_TEXT.search(text) and (bad := _unencodable(messages)):
                            raise RowError(f"messages {bad}")
                    instruction, response, ctx = conversation_parts(messages)
                    context = json.dumps(ctx, ensure_ascii=False) if ctx else None
                else:
                    instruction = text_field(batch.values[mapping.prompt][i], mapping.prompt)
                    response = text_field(batch.values[mapping.response][i], mapping.response)
            except RowError as e:
                error = str(e)
                instruction = response = context = None
        ids.append(rid)
        instructions.append(instruction)
        responses.append(response)
        contexts.append(context)
        errors.append(error)
    columns = {schema.ID: pa.array(ids, pa.string())}
    taken = schema.reserved()
    for name, arr in batch.kept.items():
        columns[schema.output_column_name(name, taken)] = arr
    columns[schema.INSTRUCTION] = pa.array(instructions, pa.string())
    columns[schema.RESPONSE] = pa.array(responses, pa.string())
    columns[schema.CONTEXT] = pa.array(contexts, pa.string())
    columns["error"] = pa.array(errors, pa.string())
    return pa.table(columns)


def read_shard(shard: Shard, mapping: ColumnMapping, batch_rows: int, limit: int | None = None) -> Iterator[pa.Table]:
    """Streams a shard as normalised blocks of at most `batch_rows` rows.

    Raises:
        InputError: The file is corrupt or unreadable (`UNREADABLE`): the shard fails, the job goes on.
        ConnectionError, TimeoutError: Storage trouble: the task fails and Ray retries it.
    """
    batches = iter_source_batches(shard, mapping, batch_rows, limit)
    while True:
        try:
            batch = next(batches, None)
        except (ConnectionError, TimeoutError):
            raise
        except UNREADABLE as e:
            raise InputError(f"cannot read {shard.uri}: {type(e).__name__}: {e}") from e
        if batch is None:
            return
        # Outside the handler: the row rules raise RowError into each row, and anything else they
        # raise is a bug that must show itself, not a file that "cannot be read".
        yield normalize(batch, shard, mapping)
