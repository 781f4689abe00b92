"""The job summary, computed from what was written (so it counts records, not intentions)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterator

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from pydantic import BaseModel, Field

from pipeline.config import OutputConfig
from pipeline.inputs import filesystem
from pipeline.outputs import data_dir


class RequestCounts(BaseModel):
    """As OpenAI's Batch API reports them."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class JobSummary(BaseModel):
    output: str = ""
    rows_in: int = 0
    rows_out: int = 0
    completions: int = Field(0, description="Rows answered with a response body.")
    choices: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = Field(default_factory=dict, description="`error.type (code)`: rows.")
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    wall_s: float = 0.0
    engine_startup_s: list[float] = Field(default_factory=list, description="One per engine start.")
    engine_restarts: int = Field(0, description="Engines started again after one died.")
    rows_retried: int = Field(0, description="Requests answered again because their engine died.")
    output_tokens_per_s: float = Field(0.0, description="completion_tokens / wall_s (start-up included).")

    def render(self) -> str:
        lines = [
            f"output:              {self.output}",
            f"rows in / out:       {self.rows_in} / {self.rows_out}",
            f"completions:         {self.completions} ({self.choices} choices)",
            f"errors:              {self.errors} {self.errors_by_type or ''}".rstrip(),
            f"finish reasons:      {self.finish_reasons}",
            f"tokens:              {self.prompt_tokens} prompt, {self.completion_tokens} completion",
            f"engine start-up:     {', '.join(f'{s:.1f}s' for s in self.engine_startup_s) or 'n/a'}",
            f"engine restarts:     {self.engine_restarts} ({self.rows_retried} requests retried)",
            f"wall time:           {self.wall_s:.1f}s",
            f"output tokens/s:     {self.output_tokens_per_s:.0f}",
        ]
        return "\n".join(lines)


class _Tally:
    def __init__(self) -> None:
        self.rows = self.completions = self.choices = self.prompt = self.completion = 0
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()

    def response(self, usage: dict[str, int], finish_reasons: list[str]) -> None:
        self.rows += 1
        self.completions += 1
        self.choices += len(finish_reasons)
        self.finish.update(finish_reasons)
        self.prompt += usage["prompt_tokens"]
        self.completion += usage["completion_tokens"]

    def error(self, type_: str, code: Any) -> None:
        self.rows += 1
        self.errors[f"{type_} ({code})"] += 1


def _tally_parquet(path: str) -> _Tally:
    fs, folder = filesystem(path)
    table = pads.dataset(folder, filesystem=fs, format="parquet").to_table(columns=["response", "error"])
    tally = _Tally()
    response, error = table.column("response"), table.column("error")
    usage = pc.struct_field(response, "usage")
    choices = pc.list_flatten(pc.struct_field(response, "choices"))
    tally.rows = table.num_rows
    tally.completions = table.num_rows - response.null_count
    tally.choices = len(choices)
    tally.finish.update(pc.struct_field(choices, "finish_reason").to_pylist())
    tally.prompt = int(pc.sum(pc.struct_field(usage, "prompt_tokens")).as_py() or 0)
    tally.completion = int(pc.sum(pc.struct_field(usage, "completion_tokens")).as_py() or 0)
    tally.errors.update(f"{t} ({c})" for t, c in zip(pc.struct_field(error, "type").to_pylist(),
                                                     pc.struct_field(error, "code").to_pylist())
                        if t is not None)
    return tally


def _jsonl_lines(path: str) -> Iterator[dict[str, Any]]:
    fs, folder = filesystem(path)
    for info in sorted(fs.get_file_info(pafs.FileSelector(folder)), key=lambda i: i.path):
        if info.type == pafs.FileType.File and info.path.endswith(".jsonl"):
            with fs.open_input_stream(info.path) as stream:
                for line in stream.read().decode().splitlines():
                    yield json.loads(line)


def _tally_openai_batch(path: str) -> _Tally:
    tally = _Tally()
    for line in _jsonl_lines(path):
        response = line["response"]
        if response is not None and response["status_code"] == 200:
            body = response["body"]
            tally.response(body["usage"], [c["finish_reason"] for c in body["choices"]])
        elif response is not None:
            error = response["body"]["error"]
            tally.error(error["type"], error["code"])
        else:
            tally.error(line["error"]["code"], 400)
    return tally


def summarize_output(output: OutputConfig, *, rows_in: int, wall_s: float,
                     engine_startup_s: list[float]) -> JobSummary:
    folder = data_dir(output.path)
    tally = _tally_parquet(folder) if output.format == "parquet" else _tally_openai_batch(folder)
    errors = tally.rows - tally.completions
    return JobSummary(
        output=folder,
        rows_in=rows_in,
        rows_out=tally.rows,
        completions=tally.completions,
        choices=tally.choices,
        errors=errors,
        errors_by_type=dict(tally.errors),
        finish_reasons=dict(tally.finish),
        prompt_tokens=tally.prompt,
        completion_tokens=tally.completion,
        request_counts=RequestCounts(total=tally.rows, completed=tally.completions, failed=errors),
        wall_s=round(wall_s, 3),
        engine_startup_s=[round(s, 3) for s in engine_startup_s],
        output_tokens_per_s=round(tally.completion / wall_s, 1) if wall_s else 0.0,
    )
