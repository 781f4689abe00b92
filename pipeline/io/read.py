"""Reading a shard's rows (in the engine actors): Parquet row groups or OpenAI batch JSONL lines, each
row with its row key and, where reading it found a problem, that row's error (the INPUT_ERROR column).
A row-level problem never fails the shard: it becomes the row's error record."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io.plan import ERROR_STRUCT, INPUT_ERROR, LINE_ERROR, ROW_KEY, InputPlan, Shard
from pipeline.io.storage import iter_lines, open_lines
from pipeline.protocol import MAX_BODY_DEPTH, error_body, value_problem

def _parquet_slice(plan: InputPlan, shard: Shard) -> pa.Table:
    """The shard's rows, reading only the row groups they lie in."""
    file = pq.ParquetFile(shard.file, filesystem=plan.filesystem)
    groups, first, offset = [], 0, 0
    for index in range(file.num_row_groups):
        size = file.metadata.row_group(index).num_rows
        if offset < shard.stop and offset + size > shard.start:
            if not groups:
                first = offset
            groups.append(index)
        offset += size
    return file.read_row_groups(groups).slice(shard.start - first, shard.rows)


def read_parquet_shard(plan: InputPlan, shard: Shard) -> pa.Table:
    """A Parquet shard as rows of the plan's schema, with row keys and UTF-8 checks."""
    table, errors = _utf8_errors(_parquet_slice(plan, shard))
    name = shard.file.rsplit("/", 1)[-1]
    if plan.config.id_column:
        keys = pa.array(_row_keys(plan.config.id_column, table.column(plan.config.id_column).to_pylist(), shard,
                                  name, errors), pa.string())
    else:
        keys = pa.array([f"{name}:{i}" for i in range(shard.start, shard.stop)], pa.string())
    columns = {f.name: _conform(table, f) for f in plan.schema if f.name != ROW_KEY}
    out = pa.table({ROW_KEY: keys, **columns}, schema=plan.schema)
    return out.append_column(pa.field(INPUT_ERROR, ERROR_STRUCT), pa.array(errors, ERROR_STRUCT))


def _row_keys(column: str, values: list[Any], shard: Shard, name: str, errors: list[Any]) -> list[str]:
    """Each row's key from `input.id_column`. A null or empty value, or one an earlier row has, is the
    row's error (a 400 naming the column) and its key is `<file>:<row>`, so every key names one record."""
    keys, duplicates = [], set(shard.duplicates)
    for i, value in enumerate(values):
        number = shard.start + i
        key = None if value is None else str(value)
        problem = None
        if not key:
            problem = f"input.id_column `{column}` is {'null' if key is None else 'empty'} on this row; row keys " \
                      "must be non-empty and unique"
        elif number in duplicates:
            shown = key if len(key) <= 80 else key[:77] + "..."
            problem = f"input.id_column `{column}` value {shown!r} appears on an earlier row; row keys must be unique"
        if problem is not None:
            key = f"{name}:{number}"
            if errors[i] is None:
                errors[i] = error_body(problem, "BadRequestError", 400, column)
        keys.append(key)
    return keys


def _conform(table: pa.Table, field: pa.Field) -> pa.ChunkedArray:
    if field.name not in table.column_names:  # a column only other files have
        return pa.chunked_array([pa.nulls(table.num_rows, field.type)])
    column = table.column(field.name)
    return column if column.type == field.type else column.cast(field.type)


def _utf8_errors(table: pa.Table) -> tuple[pa.Table, list[dict[str, Any] | None]]:
    """Per row: a 400 error for a string cell whose bytes are not UTF-8, else None.

    Parquet strings must be UTF-8, so such a cell is carried to the output with the bad bytes replaced
    by U+FFFD (the error record says where they were); every other cell is unchanged.
    """
    errors: list[dict[str, Any] | None] = [None] * table.num_rows
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if not pa.types.is_string(column.type):
            continue
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        repaired = []
        for i, value in enumerate(column.cast(pa.binary()).to_pylist()):
            if value is None:
                repaired.append(None)
                continue
            try:
                repaired.append(value.decode("utf-8"))
            except UnicodeDecodeError as exc:
                repaired.append(value.decode("utf-8", errors="replace"))
                if errors[i] is None:
                    errors[i] = error_body(f"column `{name}` holds bytes that are not UTF-8 ({exc.reason} at "
                                           f"byte {exc.start}); the output shows them as U+FFFD",
                                           "BadRequestError", 400, name)
        table = table.set_column(index, table.field(index), pa.array(repaired, pa.string()))
    return table, errors


def read_batch_shard(plan: InputPlan, shard: Shard) -> pa.Table:
    """An OpenAI batch JSONL shard: a row per line; a bad line is a row with its error."""
    name = shard.file.rsplit("/", 1)[-1]
    lines = _shard_lines(plan.filesystem, shard)
    duplicates = set(shard.duplicates)
    rows, errors = [], []
    for number, raw in enumerate(lines, start=shard.start):
        row, error = _batch_line(raw, number in duplicates)
        row[ROW_KEY] = row["custom_id"] if row.get("custom_id") and error is None else f"{name}:{number}"
        rows.append(row)
        errors.append(error)
    table = pa.Table.from_pylist(rows, schema=plan.schema)
    return table.append_column(pa.field(INPUT_ERROR, ERROR_STRUCT), pa.array(errors, ERROR_STRUCT))


def _shard_lines(fs: pafs.FileSystem, shard: Shard) -> list[bytes]:
    """A JSONL shard's lines: its byte range, or (gzip) the file streamed up to the shard's last line."""
    if shard.byte_start >= 0:
        with fs.open_input_file(shard.file) as file:
            data = file.read_at(shard.byte_stop - shard.byte_start, shard.byte_start)
        return list(iter_lines(pa.BufferReader(data)))
    with open_lines(fs, shard.file) as stream:
        return list(itertools.islice(iter_lines(stream), shard.start, shard.stop))


def _batch_line(raw: bytes, duplicate: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A line's row (its parts as strings, the body as JSON text) and its error, if it has one.

    Problems with the whole line (not UTF-8, not JSON, not an object) have no field to name: their
    `param` is null. Everything else names the part at fault.
    """
    def fail(message: str, param: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        return row, error_body(message, LINE_ERROR, 400, param)

    row: dict[str, Any] = {"custom_id": None, "method": None, "url": None, "body": None}
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return fail(f"the line holds bytes that are not UTF-8 ({exc.reason} at byte {exc.start}); "
                    "JSONL files must be UTF-8", None)
    try:
        data = json.loads(line)
    except RecursionError:
        return fail(f"the line is nested too deeply to read (more than {MAX_BODY_DEPTH} levels of lists "
                    "and objects are refused)", None)
    except ValueError as exc:
        return fail(f"the line is not valid JSON ({exc}); was the file cut short?", None)
    if not isinstance(data, dict):
        return fail("the line must be a JSON object with custom_id, method, url and body", None)
    for part in ("custom_id", "method", "url"):
        if (problem := value_problem(data.get(part), part)) is not None:
            return fail(problem, part)
    custom_id, body = data.get("custom_id"), data.get("body")
    if (problem := value_problem(body, "body", text=False)) is not None:
        return fail(problem, "body")
    row.update(custom_id=custom_id if isinstance(custom_id, str) else None,
               method=data.get("method") if isinstance(data.get("method"), str) else None,
               url=data.get("url") if isinstance(data.get("url"), str) else None,
               body=json.dumps(body) if body is not None else None)
    if not isinstance(custom_id, str) or not custom_id:
        return fail("custom_id must be a non-empty string", "custom_id")
    if duplicate:
        return fail(f"custom_id {_brief(custom_id)} appears on an earlier line; custom_ids must be unique",
                    "custom_id")
    if data.get("method") != "POST":
        return fail(f"method must be POST, not {_brief(data.get('method'))}", "method")
    if data.get("url") != "/v1/completions":
        return fail(f"url must be /v1/completions, not {_brief(data.get('url'))}", "url")
    if not isinstance(body, dict):
        return fail("body must be a JSON object (the /v1/completions request)", "body")
    return row, None


def _brief(value: Any, limit: int = 80) -> str:
    """A value for a message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def python_rows(table: pa.Table, problems: list[dict | None]) -> list[dict[str, Any] | None]:
    """The rows as Python values; a row with a reading problem is not converted (None).

    A row holding a value Python cannot represent (a timestamp past the year 9999, say) gets that
    problem, a 400 naming the column, written into `problems` in place, and is None as well.
    """
    good = [i for i, p in enumerate(problems) if p is None]
    try:
        converted = iter(table.to_pylist() if len(good) == table.num_rows
                         else table.take(pa.array(good, pa.int64())).to_pylist())  # typed: [] may be all
    except _UNCONVERTIBLE:
        converted = iter(_rows_one_by_one(table, good, problems))
    return [None if p is not None else next(converted) for p in problems]


_UNCONVERTIBLE = (pa.ArrowException, ValueError, OverflowError)


def _rows_one_by_one(table: pa.Table, indices: list[int], problems: list[dict | None]) -> list[dict[str, Any]]:
    """The rows that convert; each row that does not gets its problem (the first column at fault)."""
    rows = []
    for i in indices:
        try:
            rows.append(table.slice(i, 1).to_pylist()[0])
            continue
        except _UNCONVERTIBLE:
            pass
        for name in table.column_names:
            try:
                table.column(name).slice(i, 1).to_pylist()
            except _UNCONVERTIBLE as exc:
                problems[i] = error_body(f"column `{name}` holds a value that cannot be read "
                                         f"({type(exc).__name__}: {exc})", "BadRequestError", 400, name)
                break
        else:  # the row as a whole failed although no single column did; report the row
            problems[i] = error_body("the row holds values that cannot be read", "BadRequestError", 400, None)
    return rows


def read_shard(plan: InputPlan, shard: Shard) -> pa.Table:
    """A shard's rows, with row keys and the INPUT_ERROR column, in the plan's format."""
    return (read_parquet_shard if plan.format == "parquet" else read_batch_shard)(plan, shard)
