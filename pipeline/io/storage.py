"""Files wherever they live: a URI (s3://, gs://, hdfs://, file://) or a local path, through pyarrow's
filesystems. What reading inputs and writing outputs share: resolving a URI, naming a file below it,
keeping credentials out of messages, writing atomically, reading a small JSON file, deleting.

A URI may carry filesystem options as a query (`s3://bucket/out?endpoint_override=host:port&scheme=http`);
`join` keeps the query on the end, so every file below such a folder opens with the same options.
"""

from __future__ import annotations

import contextlib
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


def filesystem(uri: str, doing: str = "open") -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI (s3://, gs://, hdfs://, file://) or a local path, and the path in it.
    (For s3:// without a region, pyarrow asks the store for the bucket's region here: an unreachable
    store or a missing bucket is a StorageError already.)"""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError) as exc:
            raise StorageError(f"cannot open {redact(uri)}: {str(exc).replace(uri, redact(uri))}") from None
        except OSError as exc:
            raise explain(exc, uri, doing) from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


# What an object store's error says, as (words in pyarrow's / the SDK's message, what failed, what to check).
_FAILURES = [
    (("network_connection", "couldn't connect", "could not connect", "connection refused", "failed to connect",
      "could not resolve host", "timed out", "timeout", "curl error", "connection reset"),
     "the storage endpoint could not be reached",
     "the endpoint (AWS_ENDPOINT_URL, or ?endpoint_override= in the URI), the network and any proxy, and "
     "that the service is up"),
    (("nosuchbucket", "no_such_bucket", "bucket does not exist", "bucket not found", "to create buckets"),
     "the bucket does not exist", "the bucket's name (and region: AWS_DEFAULT_REGION or ?region=)"),
    (("invalidaccesskeyid", "invalid_access_key_id", "signaturedoesnotmatch", "signature_does_not_match",
      "security token", "expiredtoken", "no credentials", "unable to find credentials"),
     "the credentials were refused",
     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the node's role) for this store"),
    (("access_denied", "accessdenied", "access denied", "forbidden", "http response code 403"),
     "access was denied", "the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the node's role; "
     "a HEAD request cannot tell unknown keys from missing rights) and that they may list, read and write this "
     "bucket and path"),
]


def explain(exc: OSError, uri: str, doing: str) -> StorageError:
    """An object store's (or filesystem's) OSError as one line: the URI without credentials, what
    failed and what to check. pyarrow's own text follows in brackets, first line only."""
    text = str(exc).replace(uri, redact(uri))
    lowered = text.lower()
    if isinstance(exc, FileNotFoundError):
        what, check = "it does not exist", "the path"
    elif isinstance(exc, PermissionError):
        what, check = "permission was denied", "the path's permissions"
    else:
        what, check = next(((w, c) for words, w, c in _FAILURES if any(word in lowered for word in words)),
                           ("the storage refused", "the URI and the store's settings"))
    detail = (text.strip().splitlines() or [type(exc).__name__])[0]
    detail = detail if len(detail) <= 240 else detail[:237] + "..."
    return StorageError(f"cannot {doing} {redact(uri)}: {what}; check {check} [{detail}]")


@contextlib.contextmanager
def explained_store_errors(uri: str, doing: str) -> Iterator[None]:
    """A block whose OSErrors become StorageErrors that say what failed (see `explain`)."""
    try:
        yield
    except OSError as exc:
        raise explain(exc, uri, doing) from None


def bucket_missing(fs: pafs.FileSystem, uri: str, path: str) -> bool:
    """For a path an object store says is not there: whether its bucket is what is missing."""
    bucket = path.split("/", 1)[0]
    return "://" in uri and bucket != path and fs.get_file_info(bucket).type == pafs.FileType.NotFound


NO_BUCKET = "the bucket does not exist; check the bucket's name (and region: AWS_DEFAULT_REGION or ?region=)"


def is_store_failure(exc: OSError) -> bool:
    """Whether an OSError is the store's (unreachable, no bucket, credentials, access), not the file's."""
    lowered = str(exc).lower()
    return any(word in lowered for words, _, _ in _FAILURES for word in words)


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
