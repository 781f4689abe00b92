"""The answer store: answers engines gave before, kept where a later job finds them (Parquet files).

Keyed by what decides an answer: the request body (after the job's defaults, as the engine gets it),
the fingerprints and weight samples of the model it names (the base model's, and an adapter's own),
the engine settings that change numerics, the request defaults the engine holds, and the versions of
vLLM and this project (job/provenance.py's `store_context`). The folder is named by what every row
shares (`context`); each row's key adds its model's.
Only answers the body decides are stored (greedy or seeded rows: engine/shared_answers.py), and only
responses, never an error record. A changed model file behind the same path, another adapter, an
engine argument that changes answers, another vLLM or pipeline version: another key, a miss.

Layout: `<path>/<context hash[:16]>/part-<uuid>.parquet`, one file per shard that answered something
new, written atomically (storage.write_bytes), with the columns of STORE_SCHEMA. Any tool that reads
Parquet reads it; deleting the folder clears it. A file that cannot be read (cut short, not Parquet)
is skipped, and its answers are answered again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io.records import RESPONSE_TYPE, response_body
from pipeline.io.storage import filesystem, join, redact, write_bytes

log = logging.getLogger(__name__)
STORE_SCHEMA = pa.schema([
    ("key", pa.string()),  # sha256 of the context and the canonical request body
    ("response", RESPONSE_TYPE),  # the response body, as the records' `response` column holds it
    ("body", pa.string()),  # the request body, JSON (for people and tools; not read back)
    ("stored_at", pa.float64()),
])


@dataclass
class _Index:
    files: set[str] = field(default_factory=set)  # the store files this process has read the keys of
    where: dict[str, str] = field(default_factory=dict)  # key -> the file holding its answer
    lock: threading.Lock = field(default_factory=threading.Lock)  # shards look up at once, in threads


_INDEXES: dict[str, _Index] = {}  # by store folder, in this process


@dataclass(frozen=True)
class AnswerStore:
    path: str  # the store's folder (local or any URI the output accepts)
    context: str  # canonical JSON of what besides the body and its model decides an answer
    mode: str = "read_write"  # read_write | read
    models: dict[str, str | None] = field(default_factory=dict)  # by the body's `model`: its fingerprints,
    # JSON; None: a model without any (not readable here), whose answers are not kept
    other_model: str | None = ""  # a `model` not in `models`

    @property
    def folder(self) -> str:
        return join(self.path, hashlib.sha256(self.context.encode()).hexdigest()[:16])

    def key(self, body: dict[str, Any]) -> str | None:
        """The body's key; None when its model has no fingerprint (its answers are not kept)."""
        model = self.models.get(body.get("model"), self.other_model)
        if model is None:
            return None
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(f"{self.context}\n{model}\n{canonical}".encode("utf-8", "surrogatepass")).hexdigest()

    def lookup(self, keys: set[str]) -> dict[str, dict[str, Any]]:
        """The stored responses of `keys` that the store has. Each process keeps an index of the keys of
        the files it has read (a file is read for its keys once), so a shard costs one listing of the
        folder and a read of the files holding its hits."""
        if not keys:
            return {}
        fs, folder = filesystem(self.folder, "read the answer store")
        index = _INDEXES.setdefault(self.folder, _Index())
        try:
            listing = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except FileNotFoundError:
            return {}
        with index.lock:  # a file is indexed whole before another shard's lookup may skip it
            for info in listing:
                name = info.base_name
                if info.type == pafs.FileType.File and name.endswith(".parquet") and not name.startswith(".") \
                        and info.path not in index.files:
                    index.files.add(info.path)
                    try:
                        for key in pq.read_table(info.path, columns=["key"], filesystem=fs)["key"].to_pylist():
                            index.where.setdefault(key, info.path)
                    except Exception as exc:  # noqa: BLE001 - a damaged file is skipped: answered again
                        log.warning("answer store file %s cannot be read (%s: %s); skipped", redact(info.path),
                                    type(exc).__name__, exc)
            by_file: dict[str, list[str]] = {}
            for key in keys & index.where.keys():
                by_file.setdefault(index.where[key], []).append(key)
        found: dict[str, dict[str, Any]] = {}
        for path, wanted in by_file.items():
            try:
                table = pq.read_table(path, columns=["key", "response"], filesystem=fs)
                table = table.filter(pc.is_in(table["key"], value_set=pa.array(wanted, pa.string())))
                responses = table["response"].to_pylist()
                if table.schema.field("response").type == pa.string():  # a store written before 2026-12-05: JSON
                    found.update((k, json.loads(r)) for k, r in zip(table["key"].to_pylist(), responses))
                else:
                    found.update((k, response_body(r)) for k, r in zip(table["key"].to_pylist(), responses))
            except Exception as exc:  # noqa: BLE001 - gone or damaged since it was indexed: answered again
                log.warning("answer store file %s cannot be read (%s: %s); skipped", redact(path),
                            type(exc).__name__, exc)
        return found

    def write(self, keys: list[str], bodies: list[dict[str, Any]], responses: pa.Array) -> None:
        """Store answers as one new file: each key's body and response (`responses`: RESPONSE_TYPE, as
        records.result_arrays makes them for the records: stored as they are, not encoded again)."""
        if not keys or self.mode != "read_write":
            return
        table = pa.table({"key": keys, "response": responses, "body": [_json(b) for b in bodies],
                          "stored_at": [time.time()] * len(keys)}, schema=STORE_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        write_bytes(join(self.folder, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue())


def _json(value: Any) -> str:
    """`value` as JSON: by msgspec (vLLM's; a 5-shot prompt's 1,000 token ids in a seventh of
    json.dumps's time), else by json.dumps (a string msgspec refuses, e.g. a lone surrogate)."""
    try:
        return _ENCODER.encode(value).decode()
    except Exception:  # noqa: BLE001 - anything msgspec cannot encode, json can or says why
        return json.dumps(value, ensure_ascii=False, default=str)


_ENCODER = msgspec.json.Encoder(enc_hook=str)
