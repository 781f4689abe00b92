"""Where rows come from: files found through pyarrow's filesystems, read as Parquet or OpenAI batch JSONL.

Every row gets a `row_key`: the configured id column's value, the OpenAI batch line's `custom_id`, or
`<file name>:<row number>`. Job-level problems (nothing at the path, an unreadable or corrupt file,
no prompt column, a template naming a column the data lacks) raise InputError before any engine
starts; row-level problems become error records later.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.protocol import MAX_BODY_DEPTH, error_body, value_problem

ROW_KEY = "row_key"
LINE_ERROR = "InvalidBatchLine"  # error type of an OpenAI batch line that never became a request
INPUT_ERROR = "__input_error"  # internal: a row-level problem found while reading (dropped on output)
BATCH_COLUMNS = pa.schema([("custom_id", pa.string()), ("method", pa.string()), ("url", pa.string()),
                           ("body", pa.string())])
ERROR_STRUCT = pa.struct([("message", pa.string()), ("type", pa.string()), ("param", pa.string()),
                          ("code", pa.int64())])


class InputError(ValueError):
    """The input cannot be read as a prompt dataset. The message says what to fix."""


@dataclass(frozen=True)
class Shard:
    """A run of consecutive rows of one input file: the unit of work, of retry and of resume.

    Its id depends only on the file's path below the input root and the first row, so a rerun (or a
    run after new files landed) plans the same ids for the same rows, and each id is one output file.
    """

    id: str
    file: str
    start: int  # first row (JSONL: line) of the file in the shard
    stop: int  # one past the last
    byte_start: int = -1  # JSONL: where line `start` begins (-1: read the file whole, e.g. gzip)
    byte_stop: int = -1
    duplicates: tuple[int, ...] = ()  # JSONL: lines in the shard whose custom_id an earlier line has

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class InputPlan:
    """What a job will read: the files, their format, the unified schema, the rows and the shards."""

    config: InputConfig
    format: Literal["parquet", "openai_batch"]
    filesystem: pafs.FileSystem
    root: str  # the folder shard ids are relative to
    files: list[str]
    schema: pa.Schema  # the rows as the reader yields them, row_key first, INPUT_ERROR excluded
    rows: int
    shards: list[Shard] = field(default_factory=list)


def shard_id(root: str, path: str, start: int) -> str:
    """`<file stem>-<hash of its path below the root>-<first row>`: readable, unique, stable."""
    relative = os.path.relpath(path, root) if root else path
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.rsplit("/", 1)[-1].split(".")[0])[:40] or "file"
    return f"{stem}-{hashlib.sha256(relative.encode()).hexdigest()[:8]}-{start:09d}"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI (s3://, gs://, hdfs://, file://) or a local path."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError) as exc:
            raise InputError(f"cannot open {redact(uri)}: {str(exc).replace(uri, redact(uri))}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def redact(uri: str) -> str:
    """A URI fit for logs and summaries: credentials (user:secret@, ?secret_key=...) removed."""
    if "://" not in uri:
        return uri
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def list_files(uri: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """The files a path names (itself, the files under a folder, or the files a glob matches) and
    their root: the folder, the glob's fixed part, or the file's folder."""
    fs, path = filesystem(uri)
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        if not files:
            raise InputError(f"input {redact(uri)} matches no files")
        return fs, base, sorted(files)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {redact(uri)} does not exist; pass --input with a file, a folder or a glob")
    if info.type == pafs.FileType.File:
        return fs, path.rsplit("/", 1)[0], [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _visible(i.path))
    if not files:
        raise InputError(f"input folder {redact(uri)} holds no files")
    return fs, path.rstrip("/"), files


def _format(config: InputConfig, files: list[str]) -> Literal["parquet", "openai_batch"]:
    if config.format != "auto":
        return config.format
    return "openai_batch" if all(f.endswith((".jsonl", ".jsonl.gz")) for f in files) else "parquet"


def plan_input(config: InputConfig, rows_per_shard: int = 2048) -> InputPlan:
    """Check the input without reading its rows (Parquet: footers only) or with one pass (JSONL), and
    cut it into shards of `rows_per_shard` rows; raise InputError."""
    fs, root, files = list_files(config.path)
    fmt = _format(config, files)
    plan = (_plan_parquet(config, fs, root, files, rows_per_shard) if fmt == "parquet"
            else _plan_batch(config, fs, root, files, rows_per_shard))
    if plan.rows == 0:
        raise InputError(f"input {redact(config.path)} holds no rows; nothing to do")
    _check_columns(plan)
    return plan


def _plan_parquet(config: InputConfig, fs: pafs.FileSystem, root: str, files: list[str],
                  rows_per_shard: int) -> InputPlan:
    schemas, rows, shards = [], 0, []
    for path in files:
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"input file {path} is not a readable Parquet file ({exc}); remove or "
                             "replace it, nothing was processed") from None
        schemas.append(meta.schema.to_arrow_schema().remove_metadata())
        rows += meta.num_rows
        shards += [Shard(shard_id(root, path, start), path, start, min(start + rows_per_shard, meta.num_rows))
                   for start in range(0, meta.num_rows, rows_per_shard)]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"the files of {redact(config.path)} disagree on column types: {exc}") from None
    if ROW_KEY in schema.names:
        raise InputError(f"input column `{ROW_KEY}` is reserved for the row key; rename it")
    schema = pa.schema([pa.field(ROW_KEY, pa.string())] + list(schema))
    return InputPlan(config, "parquet", fs, root, files, schema, rows, shards)


def _plan_batch(config: InputConfig, fs: pafs.FileSystem, root: str, files: list[str],
                rows_per_shard: int) -> InputPlan:
    """One pass over the JSONL files: count lines, note where each shard's bytes begin, and find
    repeated custom_ids (the first line keeps it; the others become error records)."""
    seen: set[str] = set()
    duplicates: dict[str, list[int]] = {}
    rows, shards = 0, []
    for path in files:
        seekable = not path.endswith(".gz")
        lines = _raw_lines(_read_bytes(fs, path))
        offsets = [0]
        for number, line in enumerate(lines):
            offsets.append(offsets[-1] + len(line) + 1)
            rows += 1
            try:
                custom_id = json.loads(line).get("custom_id")
            except (ValueError, AttributeError, RecursionError):  # the reader makes it the line's error
                continue
            if isinstance(custom_id, str):
                if custom_id in seen:
                    duplicates.setdefault(path, []).append(number)
                seen.add(custom_id)
        for start in range(0, len(lines), rows_per_shard):
            stop = min(start + rows_per_shard, len(lines))
            repeated = tuple(n for n in duplicates.get(path, ()) if start <= n < stop)
            shards.append(Shard(shard_id(root, path, start), path, start, stop,
                                offsets[start] if seekable else -1, offsets[stop] if seekable else -1,
                                repeated))
    schema = pa.schema([pa.field(ROW_KEY, pa.string())] + list(BATCH_COLUMNS))
    return InputPlan(config, "openai_batch", fs, root, files, schema, rows, shards)


def _check_columns(plan: InputPlan) -> None:
    config, names = plan.config, plan.schema.names
    listing = ", ".join(n for n in names if n != ROW_KEY)

    def need(column: str, what: str) -> None:
        if column not in names:
            raise InputError(f"input {redact(config.path)} has no `{column}` column ({what}); its columns: {listing}")

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
            need(column, "used by input.template")
    for request_field, column in config.columns.items():
        need(column, f"input.columns.{request_field}")
    if config.id_column:
        need(config.id_column, "input.id_column")


def _read_bytes(fs: pafs.FileSystem, path: str, start: int = -1, stop: int = -1) -> bytes:
    if start >= 0:
        with fs.open_input_file(path) as file:
            return file.read_at(stop - start, start)
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as stream:
        return stream.read()


def _raw_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


# --- reading (runs in Ray tasks) ----------------------------------------------------------------------


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
        keys = pa.array([None if v is None else str(v) for v in table.column(plan.config.id_column).to_pylist()],
                        pa.string())
    else:
        keys = pa.array([f"{name}:{i}" for i in range(shard.start, shard.stop)], pa.string())
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


def read_batch_shard(plan: InputPlan, shard: Shard) -> pa.Table:
    """An OpenAI batch JSONL shard: a row per line; a bad line is a row with its error."""
    name = shard.file.rsplit("/", 1)[-1]
    lines = _raw_lines(_read_bytes(plan.filesystem, shard.file, shard.byte_start, shard.byte_stop))
    if shard.byte_start < 0:
        lines = lines[shard.start:shard.stop]
    duplicates = set(shard.duplicates)
    rows, errors = [], []
    for number, raw in enumerate(lines, start=shard.start):
        row, error = _batch_line(raw, number in duplicates)
        row[ROW_KEY] = row["custom_id"] if row.get("custom_id") and error is None else f"{name}:{number}"
        rows.append(row)
        errors.append(error)
    table = pa.Table.from_pylist(rows, schema=plan.schema)
    return table.append_column(pa.field(INPUT_ERROR, ERROR_STRUCT), pa.array(errors, ERROR_STRUCT))


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
