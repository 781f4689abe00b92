"""Real datasets in and out, end to end with the real engine: mapping, templates, bodies, OpenAI batch
files, folders, globs and URIs, bad input per row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.io.records import response_body
from pipeline.job.run import run
from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5}
TEMPLATE = "Question: {question}\nAnswer:"


def job(input_: dict, output: dict, **config) -> JobConfig:
    return JobConfig.model_validate({"input": input_, "output": output, "engine": ENGINE, **config})


def invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string column whose bytes are not all UTF-8 (as a foreign writer can produce)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]),
                                  pa.py_buffer(b"".join(values))])


# --- Parquet: a folder of files by glob and file:// URI, mapped columns, a template, passthrough ------

META = pa.struct([("source", pa.string()), ("score", pa.float64())])


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("mapped")
    (folder / "in").mkdir()
    a = pa.table({
        "qid": pa.array(["q1", "q2", "q3", "q4"]),
        "question": pa.array(["What is the capital of France?", None, "Why is the sky blue?",
                              " ".join(["the river runs past the old mill"] * 40)]),
        "budget": pa.array([5, None, 7, 5], pa.int64()),
        "meta": pa.array([{"source": "a", "score": 1.0}, None, {"source": "c", "score": 3.0},
                          {"source": "d", "score": 4.0}], META),
        "tags": pa.array([[1, 2], [], None, [4]], pa.list_(pa.int64())),
        "temperature": pa.nulls(4, pa.float64()),
    })
    b = pa.table({
        "qid": pa.array(["q5", "q6"]),
        "question": invalid_utf8([b"How do plants grow?", b"bad \xff\xfe bytes"]),
        "budget": pa.array([6, 6], pa.int64()),
        "meta": pa.array([{"source": "e", "score": 5.0}, None], META),
        "tags": pa.array([[5], [6]], pa.list_(pa.int64())),
        "temperature": pa.array([0.0, 0.0]),
    })
    pq.write_table(a, folder / "in" / "a.parquet")
    pq.write_table(b, folder / "in" / "b.parquet")
    pq.write_table(a.slice(0, 0), folder / "in" / "empty.parquet")  # a file without rows
    (folder / "in" / "_notes.txt").write_text("ignored: names starting with _ or . are not data")
    config = job({"path": f"file://{folder}/in/*.parquet", "template": TEMPLATE, "id_column": "qid",
                  "columns": {"max_tokens": "budget"}},
                 {"path": str(folder / "out")}, defaults={"temperature": 0.0})
    summary = run(config)
    table = pq.read_table(folder / "out" / "data")
    return summary, table, {r["row_key"]: r for r in table.to_pylist()}, folder, config


def test_every_row_once_with_its_key_and_columns_unchanged(mapped):
    summary, table, rows, folder, _ = mapped
    assert sorted(rows) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert summary.rows_in == summary.rows_out == 6
    assert table.schema.names == ["row_key", "qid", "question", "budget", "meta", "tags", "temperature",
                                  "response", "error"]
    assert table.schema.field("meta").type == META
    assert rows["q1"]["meta"] == {"source": "a", "score": 1.0} and rows["q1"]["tags"] == [1, 2]
    assert rows["q3"]["tags"] is None and rows["q2"]["meta"] is None
    assert (folder / "out" / "_SUCCESS").exists() and (folder / "out" / "summary.json").exists()
    # one file per shard, named after its input file; the empty file has no shard
    names = sorted(p.name for p in (folder / "out" / "data").iterdir())
    assert [n.split("-")[0] for n in names] == ["a", "b"]
    assert all(n.endswith("-000000000.parquet") for n in names)


def test_template_fills_the_prompt_and_mapped_budget(mapped, tokenizer):
    _, _, rows, _, _ = mapped
    body = response_body(rows["q1"]["response"])
    prompt = TEMPLATE.format(question="What is the capital of France?")
    assert body["usage"]["prompt_tokens"] == len(tokenizer(prompt).input_ids)
    assert body["usage"]["completion_tokens"] == 5  # from the mapped `budget` column
    assert response_body(rows["q3"]["response"])["usage"]["completion_tokens"] == 7


def test_row_problems_become_error_records(mapped):
    _, _, rows, _, _ = mapped
    assert rows["q2"]["error"]["param"] == "prompt" and "{question}" in rows["q2"]["error"]["message"]
    assert rows["q4"]["error"]["code"] == 400  # far over the context
    assert "maximum context length" in rows["q4"]["error"]["message"] or "context" in rows["q4"]["error"]["message"]
    assert rows["q6"]["error"]["param"] == "question" and "UTF-8" in rows["q6"]["error"]["message"]
    assert rows["q5"]["error"] is None  # the good row of the same file is kept


# --- OpenAI batch files: JSONL in, JSONL out ------------------------------------------------------

def batch_line(custom_id, body, url="/v1/completions", method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


GOOD = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0.0}
LINES = [
    batch_line("ok-1", GOOD),
    batch_line("ok-2", {**GOOD, "prompt": ["a", "b"], "n": 2, "temperature": 1.0, "seed": 3}),
    batch_line("wrong-url", GOOD, url="/v1/chat/completions"),
    batch_line("wrong-method", GOOD, method="GET"),
    batch_line("ok-1", GOOD),  # a duplicate custom_id
    batch_line("bad-types", {**GOOD, "temperature": "hot"}),
    batch_line("not-object", ["prompt"]),
    json.dumps({"method": "POST", "url": "/v1/completions", "body": GOOD}),  # no custom_id
    batch_line("ok-3", {**GOOD, "max_tokens": 3}),
    batch_line("cut", GOOD)[:30],  # a line cut in half
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("batch")
    (folder / "requests.jsonl").write_text("\n".join(LINES) + "\n")
    summary = run(job({"path": str(folder / "requests.jsonl"), "repeated_keys": "keep_first"},
                      {"path": str(folder / "out"), "format": "openai_batch"}))
    files = sorted((folder / "out" / "data").glob("*.jsonl"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    return summary, lines, folder


def test_batch_output_has_one_line_per_input_line(batch):
    summary, lines, folder = batch
    assert len(lines) == len(LINES)
    assert summary.request_counts.model_dump() == {"total": 10, "completed": 3, "failed": 7}
    assert len({line["id"] for line in lines}) == len(lines)
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert (line["response"] is None) != (line["error"] is None)
    saved = json.loads((folder / "out" / "summary.json").read_text())
    assert saved["request_counts"] == {"total": 10, "completed": 3, "failed": 7}


def test_batch_lines_answered_or_rejected(batch):
    from openai.types import Completion

    _, lines, _ = batch
    by_id: dict = {}
    for line in lines:
        by_id.setdefault(line["custom_id"], []).append(line)
    for custom_id in ("ok-2", "ok-3"):
        (line,) = by_id[custom_id]
        assert line["response"]["status_code"] == 200
        Completion.model_validate(line["response"]["body"])
        assert line["response"]["request_id"] == line["response"]["body"]["id"]
    first, duplicate = by_id["ok-1"]
    assert first["response"]["status_code"] == 200
    assert duplicate["error"]["code"] == "invalid_custom_id" and "earlier line" in duplicate["error"]["message"]
    assert by_id["wrong-url"][0]["error"]["code"] == "invalid_url"
    assert by_id["wrong-method"][0]["error"]["code"] == "invalid_method"
    bad = by_id["bad-types"][0]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "body.temperature"
    assert by_id["not-object"][0]["error"]["code"] == "invalid_body"
    cut = [line for line in lines if line["error"] and "not valid JSON" in line["error"]["message"]]
    assert len(cut) == 1 and cut[0]["custom_id"] == "requests.jsonl:9"
    assert by_id["requests.jsonl:7"][0]["error"]["code"] == "invalid_custom_id"  # none given


# --- request bodies in a Parquet column, written as OpenAI batch output; and JSONL in, Parquet out ---

def test_body_column_json_and_struct_with_overrides(tmp_path):
    bodies = pa.table({
        "id": ["json", "struct-ish", "override", "bad-json", "array"],
        "body": [json.dumps(GOOD), json.dumps({"prompt": "Hi", "max_tokens": 2}),
                 json.dumps({**GOOD, "max_tokens": 9}), '{"prompt": "cut', "[1, 2]"],
        "max_tokens": pa.array([None, None, 3, None, None], pa.int64()),
    })
    pq.write_table(bodies, tmp_path / "bodies.parquet")
    structs = pa.table({"id": ["s1"], "body": pa.array(
        [{"prompt": "Hello there", "max_tokens": 4, "temperature": 0.0, "n": None}],
        pa.struct([("prompt", pa.string()), ("max_tokens", pa.int64()), ("temperature", pa.float64()),
                   ("n", pa.int64())]))})
    pq.write_table(structs, tmp_path / "structs.parquet")
    for name in ("bodies", "structs"):
        run(job({"path": str(tmp_path / f"{name}.parquet"), "body_column": "body", "id_column": "id"},
                {"path": str(tmp_path / name)}))
    rows = {r["row_key"]: r for r in pq.read_table(tmp_path / "bodies" / "data").to_pylist()}
    assert response_body(rows["override"]["response"])["usage"]["completion_tokens"] == 3
    assert response_body(rows["json"]["response"])["usage"]["completion_tokens"] == 4
    assert rows["bad-json"]["error"]["param"] == "body" and "not valid JSON" in rows["bad-json"]["error"]["message"]
    assert rows["array"]["error"]["param"] == "body"
    (struct_row,) = pq.read_table(tmp_path / "structs" / "data").to_pylist()
    # the same body as a struct column answers exactly as the JSON string did (greedy)
    assert response_body(struct_row["response"])["choices"] == response_body(rows["json"]["response"])["choices"]


def test_jsonl_in_parquet_out_and_parquet_in_jsonl_out(batch, tmp_path):
    _, _, folder = batch
    run(job({"path": str(folder / "requests.jsonl"), "repeated_keys": "keep_first"}, {"path": str(tmp_path / "pq")}))
    rows = {r["row_key"]: r for r in pq.read_table(tmp_path / "pq" / "data").to_pylist()}
    assert len(rows) == len(LINES)
    assert rows["ok-3"]["url"] == "/v1/completions" and json.loads(rows["ok-3"]["body"])["max_tokens"] == 3
    assert response_body(rows["ok-3"]["response"])["usage"]["completion_tokens"] == 3
    assert rows["requests.jsonl:2"]["error"]["type"] == "InvalidBatchLine"


def test_validate_agrees_with_the_job_row_by_row(mapped):
    """`validate` (no engine) finds exactly the rows the job recorded as errors, with the same error."""
    from pipeline.job.validate import check_rows, validate

    _, _, rows, _, config = mapped
    verdicts = {check.key: check.error for check in check_rows(config)}
    assert verdicts.keys() == rows.keys()
    for key, row in rows.items():
        if row["error"] is None:
            assert verdicts[key] is None, (key, verdicts[key])
        else:
            assert verdicts[key] is not None, key
            assert {k: verdicts[key][k] for k in ("type", "code", "param")} == \
                {k: row["error"][k] for k in ("type", "code", "param")}
    report = validate(config)
    assert (report.rows, report.valid_rows) == (6, 3)
    assert report.max_new_tokens == 5 + 7 + 6
    assert report.prompt_tokens["min"] > 0
    assert "q2" in report.examples["BadRequestError (400) param=prompt"]
    assert "engines:          1 engine, each 1 actor of 1 CPU on any node (CPU engine)" in report.render()
