"""Planning the input, before Ray starts: the files found through pyarrow's filesystems, their format
(Parquet or OpenAI batch JSONL), the rows' schema, each file's rows, and the shards cut from them
(read.py reads a shard's rows, in the engine actors).

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
from array import array
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import InputConfig
from pipeline.io.storage import (NO_BUCKET, StorageError, bucket_missing, explain, filesystem, is_store_failure, iter_lines, open_lines,
                                 explained_store_errors, redact)

ROW_KEY = "row_key"
LINE_ERROR = "InvalidBatchLine"  # error type of an OpenAI batch line that never became a request
INPUT_ERROR = "__input_error"  # internal: a row-level problem found while reading (dropped on output)
BATCH_COLUMNS = pa.schema([("custom_id", pa.string()), ("method", pa.string()), ("url", pa.string()),
                           ("body", pa.string())])
ERROR_STRUCT = pa.struct([("message", pa.string()), ("type", pa.string()), ("param", pa.string()),
                          ("code", pa.int64())])
FOOTER_READERS = 32  # Parquet footers read at once while planning (object stores: round trips in flight)


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
    byte_start: int = -1  # JSONL: where line `start` begins (-1: stream the file from its start, e.g. gzip)
    byte_stop: int = -1
    duplicates: tuple[int, ...] = ()  # rows in the shard whose custom_id (or input.id_column) an earlier row has
    source: str = ""  # its file as planning found it (`size:mtime_ns`): recorded with the shard's tally

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class InputFile:
    """One input file as planning counted it: enough to cut it at any row without reading it again."""

    path: str
    rows: int
    # uncompressed JSONL: the byte where each line begins, then one past the last line (rows + 1 entries,
    # 8 bytes each); None for Parquet (row groups are found by the reader) and for gzip (streamed)
    line_starts: array | None = None
    duplicates: array = field(default_factory=lambda: array("q"))  # rows whose custom_id / id_column value an earlier row has
    fingerprint: str = ""  # `size:mtime_ns` from the listing: a file rewritten under the same name differs


@dataclass
class InputPlan:
    """What a job will read: the files and their rows, their format, the unified schema, and (once cut)
    the shards."""

    config: InputConfig
    format: Literal["parquet", "openai_batch"]
    filesystem: pafs.FileSystem
    root: str  # the folder shard ids are relative to
    files: list[InputFile]
    schema: pa.Schema  # the rows as the reader yields them, row_key first, INPUT_ERROR excluded
    rows: int
    shards: list[Shard] = field(default_factory=list)

    def for_readers(self) -> InputPlan:
        """What a shard's reader needs (format, filesystem, schema, config), without the per-file counts
        and the shard list, which can be large and each reader gets its own shards."""
        return replace(self, files=[], shards=[])


def file_fingerprint(info: pafs.FileInfo) -> str:
    """`size:mtime_ns` as the listing gives them (an object store: the object's size and LastModified)."""
    return f"{info.size}:{info.mtime_ns}"


def shard_id(root: str, path: str, start: int) -> str:
    """`<file stem>-<hash of its path below the root>-<first row>`: readable, unique, stable."""
    relative = os.path.relpath(path, root) if root else path
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.rsplit("/", 1)[-1].split(".")[0])[:40] or "file"
    return f"{stem}-{hashlib.sha256(relative.encode()).hexdigest()[:8]}-{start:09d}"


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def list_files(uri: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """The files a path names (itself, the files under a folder, or the files a glob matches), with
    their sizes as the listing gave them, and their root: the folder, the glob's fixed part, or the
    file's folder."""
    try:
        with explained_store_errors(uri, "read the input"):
            return _list_files(uri)
    except StorageError as exc:
        raise InputError(str(exc)) from None


def _list_files(uri: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    fs, path = filesystem(uri, "read the input")
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        if not files:
            raise InputError(f"input {redact(uri)} matches no files")
        return fs, base, sorted(files, key=lambda i: i.path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if bucket_missing(fs, uri, path):
            raise InputError(f"cannot read the input {redact(uri)}: {NO_BUCKET}")
        raise InputError(f"input {redact(uri)} does not exist; pass --input with a file, a folder or a glob")
    if info.type == pafs.FileType.File:
        return fs, path.rsplit("/", 1)[0], [info]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File and _visible(i.path)), key=lambda i: i.path)
    if not files:
        raise InputError(f"input folder {redact(uri)} holds no files")
    return fs, path.rstrip("/"), files


def _format(config: InputConfig, files: list[str]) -> Literal["parquet", "openai_batch"]:
    if config.format != "auto":
        return config.format
    return "openai_batch" if all(f.endswith((".jsonl", ".jsonl.gz")) for f in files) else "parquet"


def plan_input(config: InputConfig, rows_per_shard: int | None = None) -> InputPlan:
    """Find the input's files, check them and count their rows without reading them into memory
    (Parquet: the footers, several at a time; JSONL: one streamed pass); raise InputError.

    With `rows_per_shard`, the plan's shards are cut too; without, `cut_shards` does it later (the
    shard size may depend on the row count)."""
    fs, root, infos = list_files(config.path)
    fmt = _format(config, [i.path for i in infos])
    plan = (_plan_parquet(config, fs, root, infos) if fmt == "parquet"
            else _plan_batch(config, fs, root, [i.path for i in infos]))
    for file, info in zip(plan.files, infos):
        file.fingerprint = file_fingerprint(info)
    if plan.rows == 0:
        raise InputError(f"input {redact(config.path)} holds no rows; nothing to do")
    _check_columns(config, plan.format, plan.schema, f"input {redact(config.path)}")
    if plan.format == "parquet" and config.id_column:
        _find_repeated_ids(plan)
    if config.repeated_keys == "stop" and any(f.duplicates for f in plan.files):
        raise InputError(_repeated_keys_message(plan))
    if rows_per_shard is not None:
        plan.shards = cut_shards(plan, rows_per_shard)
    return plan


def cut_shards(plan: InputPlan, rows_per_shard: int) -> list[Shard]:
    """Each file's rows in runs of `rows_per_shard` (the last run of a file may be shorter), from the
    counts planning kept: no file is read again."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, not {rows_per_shard}")
    shards = []
    for file in plan.files:
        starts, repeated = file.line_starts, file.duplicates
        for start in range(0, file.rows, rows_per_shard):
            stop = min(start + rows_per_shard, file.rows)
            duplicates = tuple(repeated[bisect_left(repeated, start):bisect_left(repeated, stop)])
            shards.append(Shard(shard_id(plan.root, file.path, start), file.path, start, stop,
                                starts[start] if starts is not None else -1,
                                starts[stop] if starts is not None else -1, duplicates, file.fingerprint))
    return shards


def _plan_parquet(config: InputConfig, fs: pafs.FileSystem, root: str, infos: list[pafs.FileInfo]) -> InputPlan:
    """The footers, FOOTER_READERS at a time. On an object store each is one ranged GET: the file's
    size comes from the listing, so no HEAD request is needed to find the footer."""
    import pyarrow.dataset as pads  # here, not above: 55 MB the engine actors, which import this module, never use

    parquet = pads.ParquetFileFormat()

    def footer(info: pafs.FileInfo) -> tuple[pa.Schema, int]:
        try:
            fragment = parquet.make_fragment(info.path, filesystem=fs, file_size=info.size)
            fragment.ensure_complete_metadata()
            return fragment.physical_schema.remove_metadata(), fragment.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            if isinstance(exc, OSError) and is_store_failure(exc):
                raise InputError(str(explain(exc, info.path, "read the input file"))) from None
            raise InputError(f"input file {info.path} is not a readable Parquet file ({exc}); remove or "
                             "replace it, nothing was processed") from None

    paths = [i.path for i in infos]
    pool = ThreadPoolExecutor(min(FOOTER_READERS, len(infos)))
    try:
        footers = list(pool.map(footer, infos))  # in file order: the first bad file is the one reported
    finally:
        pool.shutdown(cancel_futures=True)
    if len(infos) > 1:  # each file on its own: the unified schema has a column if any file has it
        for path, (file_schema, _) in zip(paths, footers):
            _check_columns(config, "parquet", file_schema, f"input file {path}", " Fix the file or move it "
                           "out of the input (nothing was processed); the next run answers it.")
    try:
        schema = pa.unify_schemas(list({s: None for s, _ in footers}), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"the files of {redact(config.path)} disagree on column types: {exc}") from None
    if ROW_KEY in schema.names:
        raise InputError(f"input column `{ROW_KEY}` is reserved for the row key; rename it")
    schema = pa.schema([pa.field(ROW_KEY, pa.string())] + list(schema))
    files = [InputFile(path, rows) for path, (_, rows) in zip(paths, footers)]
    return InputPlan(config, "parquet", fs, root, files, schema, sum(f.rows for f in files))


def _find_repeated_ids(plan: InputPlan) -> None:
    """Rows whose `input.id_column` value an earlier row has (across files, in order): they become error
    records, as repeated custom_ids do, so that every row key names one record. Reads that column only."""
    ids = _CustomIds()
    for file in plan.files:
        for key in _row_keys_of(plan, file):
            ids.add_key(key)
    for file, duplicates in zip(plan.files, ids.repeated([f.rows for f in plan.files])):
        file.duplicates = duplicates


def _plan_batch(config: InputConfig, fs: pafs.FileSystem, root: str, paths: list[str]) -> InputPlan:
    """One streamed pass over the JSONL files, in order: count lines, note where each begins, and find
    repeated custom_ids (the first line keeps it; the others become error records)."""
    ids = _CustomIds()
    files = []
    for path in paths:
        compressed = path.endswith(".gz")
        starts = None if compressed else array("q", [0])
        rows = 0
        with open_lines(fs, path) as stream:
            for line in iter_lines(stream):
                if starts is not None:
                    starts.append(starts[-1] + len(line) + 1)
                ids.add(line)
                rows += 1
        files.append(InputFile(path, rows, starts))
    for file, duplicates in zip(files, ids.repeated([f.rows for f in files])):
        file.duplicates = duplicates
    schema = pa.schema([pa.field(ROW_KEY, pa.string())] + list(BATCH_COLUMNS))
    return InputPlan(config, "openai_batch", fs, root, files, schema, sum(f.rows for f in files))


class _CustomIds:
    """The custom_id of every line, kept as a 128-bit digest (24 bytes a line, not a Python string
    each), to find the lines that repeat an earlier line's custom_id. Two different ids share a digest
    with a chance of about lines² / 2¹²⁹ (1e-27 for a million lines): never, in practice."""

    def __init__(self) -> None:
        self._lines = 0
        self._numbers = array("q")  # lines (counted across files) with a string custom_id
        self._digests = bytearray()  # their custom_ids' digests, 16 bytes each

    def add(self, line: bytes) -> None:
        try:
            custom_id = json.loads(line).get("custom_id")
        except (ValueError, AttributeError, RecursionError):  # the reader makes it the line's error
            custom_id = None
        self.add_key(custom_id)

    def add_key(self, key: Any) -> None:
        """The next row's key; a null or empty one is the reader's error, never a repeat."""
        if isinstance(key, str) and key:
            self._numbers.append(self._lines)
            self._digests += hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        self._lines += 1

    def repeated(self, rows_per_file: list[int]) -> list[array]:
        """Per file, its lines (numbered within the file, ascending) whose custom_id an earlier line has."""
        import numpy as np

        if not self._numbers:
            return [array("q") for _ in rows_per_file]
        digests = np.frombuffer(self._digests, dtype=[("high", "<u8"), ("low", "<u8")])
        first = np.zeros(len(digests), dtype=bool)
        first[np.unique(digests, return_index=True)[1]] = True  # the first line with each custom_id
        numbers = np.frombuffer(self._numbers, dtype=np.int64)[~first]  # ascending
        bounds = np.cumsum([0] + rows_per_file)
        cuts = np.searchsorted(numbers, bounds)
        return [array("q", (numbers[a:b] - lo).tolist()) for a, b, lo in zip(cuts[:-1], cuts[1:], bounds[:-1])]




def _check_columns(config: InputConfig, fmt: str, schema: pa.Schema, where: str, advice: str = "") -> None:
    """The columns the job reads, there and of a usable type (the unified schema, or one file's)."""
    names = schema.names
    listing = ", ".join(n for n in names if n != ROW_KEY)

    def need(column: str, what: str) -> None:
        if column not in names:
            raise InputError(f"{where} has no `{column}` column ({what}); its columns: {listing}.{advice}")

    if fmt == "openai_batch":
        return
    if config.body_column:
        need(config.body_column, "input.body_column")
    elif not config.template:
        need(config.prompt_column, "the prompt: set input.prompt_column, input.template or "
                                   "input.body_column")
        prompt_type = schema.field(config.prompt_column).type
        ok = (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)
              or pa.types.is_null(prompt_type)
              or (pa.types.is_list(prompt_type) and (pa.types.is_string(prompt_type.value_type)
                                                     or pa.types.is_integer(prompt_type.value_type))))
        if not ok:
            raise InputError(f"{where}: column `{config.prompt_column}` is {prompt_type}; the prompt must be "
                             f"a string or a list of strings.{advice}")
    if config.template:
        from pipeline.templates import placeholders

        for column in placeholders(config.template):
            need(column, "used by input.template")
    for request_field, column in config.columns.items():
        need(column, f"input.columns.{request_field}")
    if config.id_column:
        need(config.id_column, "input.id_column")


def _row_keys_of(plan: InputPlan, file: InputFile) -> list[str | None]:
    """Every row's key as the input gives it (input.id_column's value, or the line's custom_id)."""
    if plan.format == "parquet":
        import pyarrow.parquet as pq

        with plan.filesystem.open_input_file(file.path) as handle:
            values = pq.ParquetFile(handle).read(columns=[plan.config.id_column]).column(0).to_pylist()
        return [None if v is None else str(v) for v in values]
    keys: list[str | None] = []
    with open_lines(plan.filesystem, file.path) as stream:
        for line in iter_lines(stream):
            try:
                key = json.loads(line).get("custom_id")
            except (ValueError, AttributeError, RecursionError):
                key = None
            keys.append(key if isinstance(key, str) else None)
    return keys


def _repeated_keys_message(plan: InputPlan, shown: int = 5) -> str:
    """What input.repeated_keys: stop says: how many rows repeat a key, in which files, a few keys and
    where each first appeared. Reads the keys again, only on this path."""
    what = "custom_id" if plan.format == "openai_batch" else f"input.id_column `{plan.config.id_column}` value"
    repeats = sum(len(f.duplicates) for f in plan.files)
    examples: dict[str, str] = {}  # key -> the file it repeats in
    for file in plan.files:
        if file.duplicates and len(examples) < shown:
            keys = _row_keys_of(plan, file)
            for row in file.duplicates[: shown - len(examples)]:
                examples.setdefault(keys[row], file.path)
    first: dict[str, str] = {}
    for file in plan.files:
        if len(first) == len(examples):
            break
        for key in _row_keys_of(plan, file):
            if key in examples and key not in first:
                first[key] = file.path
    files = [f.path for f in plan.files if f.duplicates]
    lines = [f"{repeats} rows of {redact(plan.config.path)} repeat an earlier row's {what} (row keys must be "
             f"unique across the input, and files earlier runs answered are part of it); in "
             f"{', '.join(files[:5])}{' ...' if len(files) > 5 else ''}:"]
    lines += [f"  {key!r} in {path}, first in {first.get(key, '?')}" for key, path in examples.items()]
    lines.append("Give the new rows keys of their own, remove the repeats, or set input.repeated_keys: keep_first "
                 "to answer the first row with each key and record the others as errors; nothing was processed")
    return "\n".join(lines)
