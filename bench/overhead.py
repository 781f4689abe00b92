"""The pipeline's own per-row work, without an engine: what each row costs around the engine.

    .venv/bin/python bench/overhead.py [--rows 20000]

Times, per row, over a realistic shard: reading the shard (Parquet -> Arrow -> Python rows), building
the request body, the stable record id, turning response bodies into Arrow records, the tally, and
writing the shard file. The response bodies are shaped like the engine's (one choice, usage, 64 tokens
of text); their generation is not timed. Compare the total with the engine's time per row in
bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.plan import INPUT_ERROR, plan_input
from pipeline.io.read import python_rows, read_shard
from pipeline.io import outputs
from pipeline.config import JobConfig
from pipeline.protocol import completion_id
from pipeline.io.records import output_schema, result_arrays
from pipeline.job.run import request_builder
from pipeline.io.tally import Tally


def response(i: int) -> dict:
    return {"id": f"cmpl-{i}", "object": "text_completion", "created": 1_700_000_000, "model": "tiny-llama",
            "choices": [{"index": 0, "text": " word" * 64, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None}],
            "system_fingerprint": None, "usage": {"prompt_tokens": 20, "completion_tokens": 64, "total_tokens": 84}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        table = pa.table({"id": [f"r{i}" for i in range(args.rows)],
                          "prompt": [f"Question {i}: what is the colour of the sky over the harbour?" for i in range(args.rows)],
                          "max_tokens": [64] * args.rows, "temperature": [0.7] * args.rows})
        pq.write_table(table, Path(work) / "in.parquet")
        config = JobConfig.model_validate({"input": {"path": f"{work}/in.parquet", "id_column": "id"},
                                           "output": {"path": f"{work}/out", "rows_per_file": args.rows}})
        plan = plan_input(config.input, args.rows)
        builder = request_builder(config, plan.format)
        schema = output_schema(plan.schema)
        outputs.prepare(config.output, config.identity())
        answers = [(response(i), None) for i in range(args.rows)]
        times: dict[str, float] = {}

        def timed(name, fn):
            started = time.perf_counter()
            result = fn()
            times[name] = time.perf_counter() - started
            return result

        shard = timed("read shard", lambda: read_shard(plan, plan.shards[0]))
        rows = timed("Arrow -> Python rows", lambda: python_rows(
            shard.drop_columns([INPUT_ERROR]), shard.column(INPUT_ERROR).to_pylist()))
        bodies = timed("request bodies", lambda: [builder.body(r) for r in rows])
        timed("record ids", lambda: [completion_id(r["row_key"], b) for r, b in zip(rows, bodies)])
        def to_records() -> pa.Table:
            response_column, error_column = result_arrays(answers)
            return (shard.drop_columns([INPUT_ERROR]).append_column("response", response_column)
                    .append_column("error", error_column).select(schema.names).cast(schema))

        records = timed("responses -> Arrow records", to_records)
        tally = timed("tally", lambda: Tally.of_records(records))
        timed("write shard (tally + Parquet)", lambda: outputs.write_shard(config.output, "s", records, tally))
    per_row = {name: round(seconds / args.rows * 1e6, 2) for name, seconds in times.items()}
    total = round(sum(per_row.values()), 2)
    for name, micros in per_row.items():
        print(f"{name:32s} {micros:8.2f} us/row")
    print(f"{'total':32s} {total:8.2f} us/row")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/overhead.json").write_text(json.dumps({"rows": args.rows, "us_per_row": per_row,
                                                               "total_us_per_row": total}, indent=2))


if __name__ == "__main__":
    main()
