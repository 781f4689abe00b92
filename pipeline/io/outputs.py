"""Where records go, one file per shard, so that a rerun resumes and no record is written twice.

An output folder holds:

    _job.json            what the records depend on (the job's identity); a rerun must match it
    data/<shard>.parquet the records of one shard (or data/<shard>.jsonl: OpenAI Batch output lines)
    shards/<shard>.json  that shard's tally, written just before its data file
    runs/<time>.json     each run's summary (the run log)
    summary.json         the latest run's summary of the whole output
    _SUCCESS             written last, when every shard of the input is in data/

A data file is written under a hidden temporary name and renamed into place, so a reader never sees
half a file and a shard's file exists exactly when the shard is done: the list of `data/` is the
resume state, one name per shard, whatever the number of rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.io.plan import LINE_ERROR, ROW_KEY
from pipeline.io.records import response_body
from pipeline.io.storage import delete, exists, filesystem, join, explained_store_errors, read_json, redact, write_bytes, write_text
from pipeline.io.tally import Tally

MARKER = "_SUCCESS"
JOB_FILE = "_job.json"
EXTENSIONS = {"parquet": ".parquet", "openai_batch": ".jsonl"}


class OutputError(ValueError):
    """The output folder holds something this job must not add to. The message says what to do."""


def data_dir(output: str) -> str:
    return join(output, "data")


def summary_path(output: str) -> str:
    return join(output, "summary.json")


def marker_path(output: str) -> str:
    return join(output, MARKER)


def clear(output: str) -> None:
    """Remove a previous run's output (the marker first, so no reader trusts what is left)."""
    for name in (MARKER, "summary.json", JOB_FILE, "data", "shards", "runs"):
        delete(join(output, name))


def unmark(output: str) -> None:
    """The output is about to change: it is not complete until the marker is written again."""
    delete(marker_path(output))


PROVENANCE = "provenance"  # in _job.json beside the identity: how the output was made, never compared


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def prepare(config: OutputConfig, identity: dict[str, Any], provenance: dict[str, Any] | None = None) -> set[str]:
    """Make the output folder ready and return the shards earlier runs finished.

    A new folder gets `_job.json`: the identity, and how the output was made (`provenance`, never
    compared). A folder of the same job resumes. A folder another job wrote (other request defaults,
    model or adapter fingerprints, answer-changing engine arguments, columns, shard size...) is refused:
    mixing them would give one dataset two meanings.
    """
    with explained_store_errors(config.path, "use the output"):
        return _prepare(config, identity, provenance)


def _comparable(recorded: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """The recorded identity as it compares with `identity`: without its provenance; a fingerprint
    missing on either side (an output written before fingerprints, a model the driver cannot read) is
    taken as equal."""
    recorded = {k: v for k, v in recorded.items() if k != PROVENANCE}
    if isinstance(recorded.get("input"), dict):  # outputs of 0.1 recorded it: what a rerun does, not how rows were answered
        recorded["input"] = {k: v for k, v in recorded["input"].items() if k != "when_changed"}
    if "fingerprints" not in identity:
        return recorded
    if "fingerprints" not in recorded:
        recorded["fingerprints"] = identity["fingerprints"]

    def fill(old: Any, new: Any) -> Any:
        if isinstance(old, dict) and isinstance(new, dict):
            if "sha256" in old and "sha256" in new and (old["sha256"] is None or new["sha256"] is None):
                return new
            return {k: fill(old.get(k), new.get(k)) if k in new else old[k] for k in old}
        return old

    recorded["fingerprints"] = fill(recorded["fingerprints"], identity["fingerprints"])
    return recorded


def _prepare(config: OutputConfig, identity: dict[str, Any], provenance: dict[str, Any] | None) -> set[str]:
    if config.mode == "overwrite":
        clear(config.path)
    recorded = recorded_identity(config)  # None after an overwrite cleared the folder
    if recorded is not None:
        recorded = _comparable(recorded, identity)
    done = done_shards(config)
    if recorded is None and done:
        raise OutputError(f"output {redact(config.path)} holds records but no {JOB_FILE}, so it was not written by "
                          "this version of the job; choose a new output.path, or set output.mode: overwrite "
                          "to replace it")
    if recorded is not None:
        # a sweep may gain (or drop) variants; one it had must still mean what it meant
        had, has = recorded.get("variants", {}), identity["variants"]
        both = [name for name in has if name in had]
        changed = _differences({**recorded, "variants": {n: had[n] for n in both}},
                               {**identity, "variants": {n: has[n] for n in both}})
        if changed:
            raise OutputError(f"output {redact(config.path)} holds records of a different job; what changed:\n  "
                              + "\n  ".join(changed) + "\nRerun with the earlier settings to resume it, choose a "
                              "new output.path, or set output.mode: overwrite to replace it")
        identity = {**identity, "variants": {**had, **has}}
    if recorded != identity or provenance is not None:
        write_text(join(config.path, JOB_FILE),
                   json.dumps({**identity, PROVENANCE: provenance or {}}, indent=2, sort_keys=True))
    return done


def recorded_identity(config: OutputConfig) -> dict[str, Any] | None:
    """The identity in the output's _job.json (None: a new output, or one about to be overwritten)."""
    if config.mode == "overwrite":
        return None
    return read_json(join(config.path, JOB_FILE))


def data_path(config: OutputConfig, name: str) -> str:
    """A shard's data file (`data/<shard>.parquet`, or `.jsonl` for OpenAI Batch output)."""
    return join(data_dir(config.path), name + EXTENSIONS[config.format])


def shard_written(config: OutputConfig, name: str) -> bool:
    """Whether a shard's data file is in place (its records are done)."""
    return exists(data_path(config, name))


def done_shards(config: OutputConfig) -> set[str]:
    """The shards whose data file is in place (`<shard>` or `variant=<name>/<shard>`): one listing of
    data/, no file read."""
    fs, folder = filesystem(data_dir(config.path))
    extension = EXTENSIONS[config.format]
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, folder)[: -len(extension)] for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(extension)
            and not posixpath.basename(i.path).startswith(".")}


def tally_path(output: str, name: str) -> str:
    return join(output, "shards", f"{name}.json")


def read_tallies(output: str, shard_ids: list[str]) -> list[Tally]:
    """The tallies of finished shards (small files, read a few dozen at a time)."""

    def read(shard_id: str) -> Tally:
        data = read_json(tally_path(output, shard_id))
        if data is None:
            raise OutputError(f"shard {shard_id} of {redact(output)} has records but no tally at "
                              f"{tally_path(output, shard_id)}; set output.mode: overwrite to rewrite the output")
        return Tally.model_validate(data)

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(read, shard_ids))


def changed_shards(output: str, done: set[str], planned: dict[str, str]) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Done shards whose input file changed since they were answered, and done shards of such a file that
    the plan no longer has (it has fewer rows now). `planned`: each planned shard's name -> its file's
    fingerprint now. A shard recorded without one (an earlier version's) counts as unchanged."""
    names = sorted(done & set(planned))
    with ThreadPoolExecutor(32) as pool:
        recorded = dict(zip(names, pool.map(lambda n: (read_json(tally_path(output, n)) or {}).get("source", ""), names)))
    changed = {n: (old, planned[n]) for n, old in recorded.items() if old and planned[n] and old != planned[n]}
    files = {_file_of(n) for n in changed}
    stale = {n for n in done - set(planned) if _file_of(n) in files}
    return changed, stale


def _file_of(name: str) -> str:
    """A shard's name without its first row: the same for every shard of one file (and variant)."""
    return name.rsplit("-", 1)[0]


def forget(config: OutputConfig, names: set[str]) -> None:
    """Remove shards' records and tallies (the data file first: a shard without it is not done)."""
    for name in sorted(names):
        delete(data_path(config, name))
        delete(tally_path(config.path, name))


def shards_with_errors(output: str, names: set[str]) -> set[str]:
    """The shards among `names` whose tally counts error records (output.redo_errors)."""
    ordered = sorted(names)
    return {n for n, tally in zip(ordered, read_tallies(output, ordered)) if tally.completions < tally.rows}


def last_failure(output: str) -> str | None:
    """Why the last run that answered rows failed (summary.json's `failure`), or None."""
    return (read_json(summary_path(output)) or {}).get("failure")


def is_complete(output: str) -> bool:
    return exists(marker_path(output))


def run_log_path(output: str, started: float) -> str:
    """runs/<the run's UTC start time>-<random>.json: one per run that changed the output."""
    return join(output, "runs", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + f"-{uuid.uuid4().hex[:6]}.json")


def write_shard(config: OutputConfig, name: str, records: pa.Table, tally: Tally) -> None:
    """The tally, then the data file (atomically): the shard is done when its data file exists."""
    write_text(tally_path(config.path, name), tally.model_dump_json())
    if config.format == "parquet":
        sink = io.BytesIO()
        pq.write_table(records, sink)
        data = sink.getvalue()
    else:
        # Only the columns a batch output line holds: another input column may hold values Python
        # cannot represent (a timestamp past the year 9999), which the line never shows anyway.
        lines = records.select([c for c in (ROW_KEY, "custom_id", "response", "error")
                                if c in records.column_names])
        data = "".join(json.dumps(batch_output_line(row), ensure_ascii=False) + "\n"
                       for row in lines.to_pylist()).encode()
    write_bytes(data_path(config, name), data)


def batch_output_line(row: dict[str, Any]) -> dict[str, Any]:
    """A record as an OpenAI Batch output line: {id, custom_id, response: {status_code, request_id,
    body}, error}. A line the endpoint answered (200 or an error status) has `response`; a line that
    never became a request (bad JSON, wrong url or method, duplicate custom_id) has `error`."""
    key = row[ROW_KEY]
    line_id = "batch_req_" + hashlib.sha256(key.encode()).hexdigest()[:24]
    # A line without a usable custom_id (cut short, not JSON) is reported under its row key,
    # `<file>:<line>`, so every output line can be joined back to its input.
    custom_id = row.get("custom_id") or key
    if row["response"] is not None:
        body = response_body(row["response"])
        response = {"status_code": 200, "request_id": body["id"], "body": body}
        return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
    error = row["error"]
    if error["type"] == LINE_ERROR:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": f"invalid_{error['param'] or 'line'}", "message": error["message"]}}
    response = {"status_code": error["code"], "request_id": f"req_{line_id[10:]}", "body": {"error": error}}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
