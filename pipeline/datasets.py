"""Where rows come from and records go: Parquet in, Parquet out, through pyarrow's filesystems."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.config import InputConfig


class InputError(ValueError):
    """The input cannot be read as a prompt dataset. The message says what to fix."""


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):  # a plain relative path
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)


def check_input(config: InputConfig) -> tuple[pa.Schema, int]:
    """Open the input's Parquet metadata (no rows), check it holds prompts; returns (schema, rows)."""
    uri = config.path
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist; pass --input with a Parquet file or folder")
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        schema = dataset.schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"input {uri} cannot be read as Parquet: {exc}") from None
    if not dataset.files:
        raise InputError(f"input {uri} holds no Parquet files")
    columns = ", ".join(schema.names) or "none"
    if config.body_column is not None and config.body_column not in schema.names:
        raise InputError(f"input {uri} has no `{config.body_column}` column (input.body_column); "
                         f"its columns: {columns}")
    if config.body_column is None and "prompt" not in schema.names:
        raise InputError(
            f"input {uri} has no `prompt` column (columns: {columns}); add one holding a string or a "
            "list of strings, or name a column of request bodies with input.body_column")
    try:
        rows = dataset.count_rows()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"input {uri} has an unreadable Parquet file: {exc}") from None
    return schema, rows


def read(uri: str):
    import ray

    return ray.data.read_parquet(uri)


def data_dir(output: str) -> str:
    return output.rstrip("/") + "/data"


def summary_path(output: str) -> str:
    return output.rstrip("/") + "/summary.json"


def write_text(uri: str, text: str) -> None:
    fs, path = _filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = _filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)
