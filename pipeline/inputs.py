"""Where rows come from: files found through pyarrow's filesystems, read as Parquet or OpenAI batch JSONL.

Every row gets a `row_key`: the configured id column's value, the OpenAI batch line's `custom_id`, or
`<file name>:<row number>`. Job-level problems (nothing at the path, an unreadable or corrupt file,
no prompt column, a template naming a column the data lacks) raise InputError before any engine
starts; row-level problems become error records later.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.protocol import error_body

ROW_KEY = "row_key"
LINE_ERROR = "InvalidBatchLine"  # error type of an OpenAI batch line that never became a request
INPUT_ERROR = "__input_error"  # internal: a row-level problem found while reading (dropped on output)
BATCH_COLUMNS = pa.schema([("custom_id", pa.string()), ("method", pa.string()), ("url", pa.string()),
                           ("body", pa.string())])
ERROR_STRUCT = pa.struct([("message", pa.string()), ("type", pa.string()), ("param", pa.string()),
                          ("code", pa.int64())])


class InputError(ValueError):
    """The input cannot be read as a prompt dataset. The message says what to fix."""


@dataclass
class InputPlan:
    """What a job will read: the files, their format, the unified schema and the row count."""

    config: InputConfig
    format: Literal["parquet", "openai_batch"]
    filesystem: pafs.FileSystem
    files: list[str]
    schema: pa.Schema  # the rows as the reader yields them, row_key first, INPUT_ERROR excluded
    rows: int
    duplicates: dict[str, list[int]] = field(default_factory=dict)  # batch file -> duplicate lines


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI (s3://, gs://, hdfs://, file://) or a local path."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError) as exc:
            raise InputError(f"cannot open {uri}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def list_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The files a path names: itself, the files under a folder, or the files a glob matches."""
    fs, path = filesystem(uri)
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        if not files:
            raise InputError(f"input {uri} matches no files")
        return fs, sorted(files)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist; pass --input with a file, a folder or a glob")
    if info.type == pafs.FileType.File:
        return fs, [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _visible(i.path))
    if not files:
        raise InputError(f"input folder {uri} holds no files")
    return fs, files


def _format(config: InputConfig, files: list[str]) -> Literal["parquet", "openai_batch"]:
    if config.format != "auto":
        return config.format
    return "openai_batch" if all(f.endswith((".jsonl", ".jsonl.gz")) for f in files) else "parquet"


def plan_input(config: InputConfig) -> InputPlan:
    """Check the input without reading its rows (Parquet) or with one pass (JSONL); raise InputError."""
    fs, files = list_files(config.path)
    fmt = _format(config, files)
    plan = _plan_parquet(config, fs, files) if fmt == "parquet" else _plan_batch(config, fs, files)
    if plan.rows == 0:
        raise InputError(f"input {config.path} holds no rows; nothing to do")
    _check_columns(plan)
    return plan


def _plan_parquet(config: InputConfig, fs: pafs.FileSystem, files: list[str]) -> InputPlan:
    schemas, rows = [], 0
    for path in files:
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"input file {path} is not a readable Parquet file ({exc}); remove or "
                             "replace it, nothing was processed") from None
        schemas.append(meta.schema.to_arrow_schema().remove_metadata())
        rows += meta.num_rows
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"the files of {config.path} disagree on column types: {exc}") from None
    if ROW_KEY in schema.names:
        raise InputError(f"input column `{ROW_KEY}` is reserved for the row key; rename it")
    schema = pa.schema([pa.field(ROW_KEY, pa.string())] + list(schema))
    return InputPlan(config, "parquet", fs, files, schema, rows)


def _plan_batch(config: InputConfig, fs: pafs.FileSystem, files: list[str]) -> InputPlan:
    """One pass over the JSONL files: count lines and find repeated custom_ids (first one wins)."""
    seen: set[str] = set()
    duplicates: dict[str, list[int]] = {}
    rows = 0
    for path in files:
        for number, line in enumerate(_lines(fs, path)):
            rows += 1
            try:
                custom_id = json.loads(line).get("custom_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(custom_id, str):
                if custom_id in seen:
                    duplicates.setdefault(path, []).append(number)
                seen.add(custom_id)
    schema = pa.schema([pa.field(ROW_KEY, pa.string())] + list(BATCH_COLUMNS))
    return InputPlan(config, "openai_batch", fs, files, schema, rows, duplicates)


def _check_columns(plan: InputPlan) -> None:
    config, names = plan.config, plan.schema.names
    listing = ", ".join(n for n in names if n != ROW_KEY)

    def need(column: str, what: str) -> None:
        if column not in names:
            raise InputError(f"input {config.path} has no `{column}` column ({what}); its columns: {listing}")

    if plan.format == "openai_batch":
        return
    if config.body_column:
        need(config.body_column, "input.body_column")
    elif not config.template:
        need(config.prompt_column, "the prompt: set input.prompt_column, input.template or "
                                   "input.body_column")
        prompt_type = plan.schema.field(config.prompt_column).type
        ok = (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)
              or pa.types.is_null(prompt_type)
              or (pa.types.is_list(prompt_type) and (pa.types.is_string(prompt_type.value_type)
                                                     or pa.types.is_integer(prompt_type.value_type))))
        if not ok:
            raise InputError(f"input column `{config.prompt_column}` is {prompt_type}; the prompt must be "
                             "a string or a list of strings")
    if config.template:
        from pipeline.templates import placeholders

        for column in placeholders(config.template):
            need(column, f"used by input.template")
    for request_field, column in config.columns.items():
        need(column, f"input.columns.{request_field}")
    if config.id_column:
        need(config.id_column, "input.id_column")


def _lines(fs: pafs.FileSystem, path: str) -> list[str]:
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as stream:
        data = stream.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.decode("utf-8", errors="replace") for line in lines]


# --- reading (runs in Ray tasks) ----------------------------------------------------------------------


def read_parquet_file(plan: InputPlan, path: str) -> pa.Table:
    """One Parquet file as rows of the plan's schema, with row keys and UTF-8 checks."""
    table, errors = _utf8_errors(pq.read_table(path, filesystem=plan.filesystem))
    name = path.rsplit("/", 1)[-1]
    if plan.config.id_column:
        keys = pa.array([None if v is None else str(v) for v in table.column(plan.config.id_column).to_pylist()],
                        pa.string())
    else:
        keys = pa.array([f"{name}:{i}" for i in range(table.num_rows)], pa.string())
    columns = {f.name: _conform(table, f) for f in plan.schema if f.name != ROW_KEY}
    out = pa.table({ROW_KEY: keys, **columns}, schema=plan.schema)
    return out.append_column(pa.field(INPUT_ERROR, ERROR_STRUCT), pa.array(errors, ERROR_STRUCT))


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


def read_batch_file(plan: InputPlan, path: str) -> pa.Table:
    """One OpenAI batch JSONL file: a row per line; a bad line is a row with its error."""
    name = path.rsplit("/", 1)[-1]
    duplicates = set(plan.duplicates.get(path, ()))
    rows, errors = [], []
    for number, line in enumerate(_lines(plan.filesystem, path)):
        row, error = _batch_line(line, number in duplicates)
        row[ROW_KEY] = row["custom_id"] if row.get("custom_id") and error is None else f"{name}:{number}"
        rows.append(row)
        errors.append(error)
    table = pa.Table.from_pylist(rows, schema=plan.schema)
    return table.append_column(pa.field(INPUT_ERROR, ERROR_STRUCT), pa.array(errors, ERROR_STRUCT))


def _batch_line(line: str, duplicate: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    def fail(message: str, param: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        return row, error_body(message, LINE_ERROR, 400, param)

    row: dict[str, Any] = {"custom_id": None, "method": None, "url": None, "body": None}
    try:
        data = json.loads(line)
    except ValueError as exc:
        return fail(f"the line is not valid JSON ({exc}); was the file cut short?", None)
    if not isinstance(data, dict):
        return fail("the line must be a JSON object with custom_id, method, url and body", None)
    custom_id, body = data.get("custom_id"), data.get("body")
    row.update(custom_id=custom_id if isinstance(custom_id, str) else None,
               method=data.get("method") if isinstance(data.get("method"), str) else None,
               url=data.get("url") if isinstance(data.get("url"), str) else None,
               body=json.dumps(body) if body is not None else None)
    if not isinstance(custom_id, str) or not custom_id:
        return fail("custom_id must be a non-empty string", "custom_id")
    if duplicate:
        return fail(f"custom_id {custom_id!r} appears on an earlier line; custom_ids must be unique",
                    "custom_id")
    if data.get("method") != "POST":
        return fail(f"method must be POST, not {data.get('method')!r}", "method")
    if data.get("url") != "/v1/completions":
        return fail(f"url must be /v1/completions, not {data.get('url')!r}", "url")
    if not isinstance(body, dict):
        return fail("body must be a JSON object (the /v1/completions request)", "body")
    return row, None


def python_rows(table: pa.Table, problems: list[dict | None]) -> list[dict[str, Any] | None]:
    """The rows as Python values; a row with a reading problem is not converted (None)."""
    if not any(problems):
        return table.to_pylist()
    good = [i for i, p in enumerate(problems) if p is None]
    converted = iter(table.take(good).to_pylist())
    return [None if p is not None else next(converted) for p in problems]


def read_file(plan: InputPlan, path: str) -> pa.Table:
    """One input file's rows, with row keys and the INPUT_ERROR column, in the plan's format."""
    return (read_parquet_file if plan.format == "parquet" else read_batch_file)(plan, path)


def read(plan: InputPlan):
    """The input as a Ray dataset of rows: one read task per file."""
    import ray

    files = ray.data.from_items([{"path": f} for f in plan.files], override_num_blocks=len(plan.files))

    def read_files(batch: dict[str, Any]) -> pa.Table:
        return pa.concat_tables([read_file(plan, path) for path in batch["path"]])

    return files.map_batches(read_files, batch_size=1, batch_format="numpy")
