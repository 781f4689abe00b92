"""The job summary, computed from what was written (so it counts records, not intentions)."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc
from pydantic import BaseModel, Field

from pipeline import datasets


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
    wall_s: float = 0.0
    engine_startup_s: list[float] = Field(default_factory=list, description="One per engine actor.")
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
            f"wall time:           {self.wall_s:.1f}s",
            f"output tokens/s:     {self.output_tokens_per_s:.0f}",
        ]
        return "\n".join(lines)


def summarize_output(data_dir: str, *, rows_in: int, wall_s: float,
                     engine_startup_s: list[float]) -> JobSummary:
    table = datasets.read_table(data_dir, columns=["response", "error"])
    response, error = table.column("response"), table.column("error")
    usage = pc.struct_field(response, "usage")
    choices = pc.list_flatten(pc.struct_field(response, "choices"))
    errors = Counter(
        f"{t} ({c})" for t, c in zip(pc.struct_field(error, "type").to_pylist(),
                                      pc.struct_field(error, "code").to_pylist()) if t is not None)
    finish = Counter(r for r in pc.struct_field(choices, "finish_reason").to_pylist())
    completion_tokens = int(pc.sum(pc.struct_field(usage, "completion_tokens")).as_py() or 0)
    return JobSummary(
        rows_in=rows_in,
        rows_out=table.num_rows,
        completions=table.num_rows - response.null_count,
        choices=len(choices),
        errors=table.num_rows - error.null_count,
        errors_by_type=dict(errors),
        finish_reasons=dict(finish),
        prompt_tokens=int(pc.sum(pc.struct_field(usage, "prompt_tokens")).as_py() or 0),
        completion_tokens=completion_tokens,
        wall_s=round(wall_s, 3),
        engine_startup_s=[round(s, 3) for s in engine_startup_s],
        output_tokens_per_s=round(completion_tokens / wall_s, 1) if wall_s else 0.0,
    )
