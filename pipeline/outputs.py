"""Where records go: Parquet (the records schema) or OpenAI Batch output JSONL, named stably.

A job's output folder holds `data/` (the records), `summary.json`, and `_SUCCESS`, written last: a
reader that sees `_SUCCESS` sees a complete output. Data files are named `part-<task>.parquet` /
`part-<task>.jsonl`, so a rerun over the same input writes the same names.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.inputs import LINE_ERROR, ROW_KEY, filesystem
from pipeline.records import response_body

MARKER = "_SUCCESS"


def data_dir(output: str) -> str:
    return output.rstrip("/") + "/data"


def summary_path(output: str) -> str:
    return output.rstrip("/") + "/summary.json"


def marker_path(output: str) -> str:
    return output.rstrip("/") + "/" + MARKER


def write_text(uri: str, text: str) -> None:
    """Write a small file atomically where the filesystem allows (local: rename)."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    temp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
    with fs.open_output_stream(temp) as out:
        out.write(text.encode())
    fs.move(temp, path)


def clear(output: str) -> None:
    """Remove a previous run's data, summary and marker (the marker first)."""
    fs, path = filesystem(output)
    for leftover in (MARKER, "summary.json"):
        try:
            fs.delete_file(posixpath.join(path, leftover))
        except (FileNotFoundError, OSError):
            pass
    if fs.get_file_info(posixpath.join(path, "data")).type == pafs.FileType.Directory:
        fs.delete_dir(posixpath.join(path, "data"))


def _filename_provider(extension: str):
    from ray.data.datasource import FilenameProvider

    class StableNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}.{extension}"

        def get_filename_for_block(self, block: Any, write_uuid: str, task_index: int,
                                   block_index: int) -> str:
            return f"part-{task_index:05d}-{block_index:04d}.{extension}"

    return StableNames()


def write_parquet(records, output: str, schema: pa.Schema) -> None:
    from ray.data._internal.savemode import SaveMode

    records.write_parquet(data_dir(output), schema=schema, mode=SaveMode.OVERWRITE,
                          filename_provider=_filename_provider("parquet"))


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


def write_openai_batch(records, output: str) -> None:
    from ray.data._internal.savemode import SaveMode
    from ray.data.block import BlockAccessor
    from ray.data.datasource import BlockBasedFileDatasink

    class BatchJsonlSink(BlockBasedFileDatasink):
        def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
            for row in block.to_arrow().to_pylist():
                file.write((json.dumps(batch_output_line(row), ensure_ascii=False) + "\n").encode())

    records.write_datasink(BatchJsonlSink(data_dir(output), mode=SaveMode.OVERWRITE,
                                          filename_provider=_filename_provider("jsonl")))
