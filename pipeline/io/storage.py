"""Files wherever they live: a URI (s3://, gs://, hdfs://, file://) or a local path, through pyarrow's
filesystems. What reading inputs and writing outputs share: resolving a URI, naming a file below it,
keeping credentials out of messages, writing atomically, reading a small JSON file, deleting.

A URI may carry filesystem options as a query (`s3://bucket/out?endpoint_override=host:port&scheme=http`);
`join` keeps the query on the end, so every file below such a folder opens with the same options.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs


READ_CHUNK = 1 << 20  # bytes of a line-by-line read (JSONL) in memory at once


class StorageError(ValueError):
    """A URI names no filesystem pyarrow can open. The message says which (without its credentials)."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI (s3://, gs://, hdfs://, file://) or a local path, and the path in it."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError) as exc:
            raise StorageError(f"cannot open {redact(uri)}: {str(exc).replace(uri, redact(uri))}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """`uri/part/part`, the URI's query (filesystem options) kept at the end."""
    base, query = (uri.split("?", 1) + [""])[:2] if "://" in uri else (uri, "")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def redact(uri: str) -> str:
    """A URI fit for logs and summaries: credentials (user:secret@, ?secret_key=...) removed."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically where the filesystem allows: a hidden temporary name, then a rename
    (object stores: the upload completes as a whole)."""
    fs, path = filesystem(uri)
    folder = posixpath.dirname(path)
    fs.create_dir(folder, recursive=True)
    temp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open_output_stream(temp) as out:
        out.write(data)
    fs.move(temp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_json(uri: str) -> Any | None:
    """A small JSON file's content, or None when there is no such file."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def delete(uri: str) -> None:
    """Remove a file or a folder with everything in it; nothing there is fine."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def open_lines(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    """A text file as a buffered stream to read line by line (`.gz`: decompressed)."""
    compression = "gzip" if path.endswith(".gz") else None
    return fs.open_input_stream(path, compression=compression, buffer_size=READ_CHUNK)


def iter_lines(stream: pa.NativeFile) -> Iterator[bytes]:
    """The lines of a stream, without their `\\n`, a chunk in memory at a time (a last line without a
    `\\n` counts; nothing after a final `\\n` does)."""
    rest = b""
    while chunk := stream.read(READ_CHUNK):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest
