"""Shards and the output folder's resume state, without an engine: ids, reading ranges, job identity."""

import gzip
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.plan import INPUT_ERROR, InputError, cut_shards, list_files, plan_input
from pipeline.io.read import read_shard
from pipeline.io import outputs, storage
from pipeline.config import InputConfig, JobConfig, OutputConfig
from pipeline.io.records import output_schema
from pipeline.io.tally import Tally


def plan(path, rows_per_shard, **input_config):
    # repeated custom_ids are error records here (keep_first): the default stops the run (test_input_checks.py)
    return plan_input(InputConfig(path=str(path), **{"repeated_keys": "keep_first", **input_config}), rows_per_shard)


def test_parquet_shards_cover_every_row_once_reading_only_their_row_groups(tmp_path):
    table = pa.table({"prompt": [f"p{i}" for i in range(1000)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=128)
    p = plan(tmp_path / "a.parquet", 300)
    assert [(s.start, s.stop) for s in p.shards] == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    read = pa.concat_tables(read_shard(p, s) for s in p.shards)
    assert read.column("prompt").to_pylist() == table.column("prompt").to_pylist()
    assert read.column("row_key").to_pylist() == [f"a.parquet:{i}" for i in range(1000)]


def test_shard_ids_are_stable_and_new_files_add_shards(tmp_path):
    pq.write_table(pa.table({"prompt": ["x"] * 10}), tmp_path / "a.parquet")
    before = [s.id for s in plan(tmp_path, 4).shards]
    assert before == [s.id for s in plan(tmp_path, 4).shards]  # the same input plans the same ids
    pq.write_table(pa.table({"prompt": ["y"] * 3}), tmp_path / "b.parquet")
    after = [s.id for s in plan(tmp_path, 4).shards]
    assert after[:3] == before and len(after) == 4 and after[3].startswith("b-")
    assert before[0].startswith("a-") and before[1].endswith("-000000004")
    # a glob over the same folder names the same shards
    assert [s.id for s in plan(f"{tmp_path}/*.parquet", 4).shards] == after


def test_jsonl_shards_read_byte_ranges_with_duplicates_and_bad_lines(tmp_path):
    lines = [json.dumps({"custom_id": f"c{i % 7}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": "é" * i}}) for i in range(10)]
    lines[3] = '{"custom_id": "cut'
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    p = plan(tmp_path / "b.jsonl", 4)
    assert [(s.start, s.stop) for s in p.shards] == [(0, 4), (4, 8), (8, 10)]
    assert [s.duplicates for s in p.shards] == [(), (7,), (8, 9)]  # c0, c1, c2 again
    read = pa.concat_tables(read_shard(p, s) for s in p.shards)
    assert read.column("row_key").to_pylist()[:4] == ["c0", "c1", "c2", "b.jsonl:3"]
    errors = read.column(INPUT_ERROR).to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3, 7, 8, 9]
    assert json.loads(read.column("body")[9].as_py()) == {"prompt": "é" * 9}


def test_counting_is_apart_from_cutting_and_streams_lines_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "READ_CHUNK", 7)  # lines straddle the chunks the planner reads
    lines = [json.dumps({"custom_id": f"c{i % 5}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": "é" * i}}) for i in range(8)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:6]) + "\n\n")  # an empty line is a row too
    (tmp_path / "b.jsonl").write_text("\n".join(lines[6:]))  # no final newline
    counted = plan_input(InputConfig(path=str(tmp_path), repeated_keys="keep_first"))
    assert [(f.rows, f.duplicates.tolist()) for f in counted.files] == [(7, [5]), (2, [0, 1])]  # c0, c1 (a.jsonl)
    assert counted.rows == 9 and counted.shards == []
    for size in (1, 3, 4, 100):
        assert cut_shards(counted, size) == plan(tmp_path, size).shards
    shards = cut_shards(counted, 3)
    assert [(s.file.rsplit("/", 1)[-1], s.start, s.stop, s.duplicates) for s in shards] == [
        ("a.jsonl", 0, 3, ()), ("a.jsonl", 3, 6, (5,)), ("a.jsonl", 6, 7, ()), ("b.jsonl", 0, 2, (0, 1))]
    read = pa.concat_tables(read_shard(counted, s) for s in shards)
    assert read.column("row_key").to_pylist() == ["c0", "c1", "c2", "c3", "c4", "a.jsonl:5", "a.jsonl:6",
                                                  "b.jsonl:0", "b.jsonl:1"]
    assert json.loads(read.column("body")[4].as_py()) == {"prompt": "é" * 4}
    assert pickle.loads(pickle.dumps(counted.for_readers())).files == []  # actors get no per-file counts


def test_gzip_jsonl_is_streamed_to_each_shard(tmp_path):
    lines = [json.dumps({"custom_id": f"c{i % 4}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": f"p{i}"}}) for i in range(6)]
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as out:
        out.write("\n".join(lines) + "\n")
    p = plan(tmp_path / "g.jsonl.gz", 4)
    assert [(s.start, s.stop, s.byte_start, s.duplicates) for s in p.shards] == [(0, 4, -1, ()), (4, 6, -1, (4, 5))]
    read = pa.concat_tables(read_shard(p, s) for s in p.shards)
    assert [json.loads(b)["prompt"] for b in read.column("body").to_pylist()] == [f"p{i}" for i in range(6)]
    assert read.column("row_key").to_pylist()[3:] == ["c3", "g.jsonl.gz:4", "g.jsonl.gz:5"]


def test_parquet_footers_are_counted_per_file(tmp_path):
    for i in range(40):
        pq.write_table(pa.table({"prompt": ["x"] * (i + 1)}), tmp_path / f"f{i:02d}.parquet")
    counted = plan_input(InputConfig(path=str(tmp_path)))
    assert [f.rows for f in counted.files] == list(range(1, 41)) and counted.rows == 820
    assert len(cut_shards(counted, 8)) == sum(-(-n // 8) for n in range(1, 41))


def _config(tmp_path, **defaults) -> JobConfig:
    return JobConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                     "defaults": defaults})


def _records(keys) -> pa.Table:
    schema = output_schema(pa.schema([("row_key", pa.string())]))
    return pa.table({"row_key": keys, "response": [None] * len(keys),
                     "error": [{"message": "m", "type": "BadRequestError", "param": None, "code": 400}] * len(keys)},
                    schema=schema)


def test_output_resumes_the_same_job_and_refuses_another(tmp_path):
    config = _config(tmp_path)
    assert outputs.prepare(config.output, config.identity()) == set()
    records = _records(["k1", "k2"])
    outputs.write_shard(config.output, "a-1234-000000000", records, Tally.of_records(records))
    assert outputs.prepare(config.output, config.identity()) == {"a-1234-000000000"}
    assert not list((tmp_path / "out" / "data").glob(".*"))  # no temporary file left behind
    (tally,) = outputs.read_tallies(config.output.path, ["a-1234-000000000"])
    assert tally.rows == 2 and tally.errors_by_type == {"BadRequestError (400)": 2}

    other = _config(tmp_path, temperature=0.9, stop=["\n"])
    with pytest.raises(outputs.OutputError) as exc:
        outputs.prepare(other.output, other.identity())
    assert "defaults.temperature: 0.2 -> 0.9" in str(exc.value)
    assert "defaults.stop: None -> ['\\n']" in str(exc.value)
    assert "output.mode: overwrite" in str(exc.value)

    # input.path and resources may change between runs: enrichment over a glob, more actors
    moved = JobConfig.model_validate({**config.model_dump(), "input": {"path": str(tmp_path / "in/*.parquet")},
                                      "engine": {"num_actors": 4}})
    assert outputs.prepare(moved.output, moved.identity()) == {"a-1234-000000000"}

    overwrite = OutputConfig(path=str(tmp_path / "out"), mode="overwrite")
    assert outputs.prepare(overwrite, other.identity()) == set()


def test_output_without_a_job_file_is_not_mixed_into(tmp_path):
    (tmp_path / "out" / "data").mkdir(parents=True)
    pq.write_table(_records(["k"]), tmp_path / "out" / "data" / "part-00000.parquet")
    config = _config(tmp_path)
    with pytest.raises(outputs.OutputError, match="no _job.json"):
        outputs.prepare(config.output, config.identity())


def test_uris_lose_their_credentials_in_messages():
    assert storage.redact("s3://AKIA:s3cr3t@bucket/p?secret_key=x&region=y") == "s3://bucket/p"
    assert storage.redact("/local/path") == "/local/path"
    with pytest.raises(InputError) as exc:
        list_files("nosuchscheme://user:hunter2@host/x")
    assert "hunter2" not in str(exc.value)
    # options in a URI's query stay at its end when files below it are named
    assert storage.join("s3://b/out?endpoint_override=h:1&scheme=http", "data", "x.parquet") == \
        "s3://b/out/data/x.parquet?endpoint_override=h:1&scheme=http"
    assert storage.join("/local/out/", "data") == "/local/out/data"


def test_nothing_from_the_config_runs_through_a_shell():
    from pathlib import Path

    source = "\n".join(p.read_text() for p in Path("pipeline").glob("*.py"))
    for call in ("subprocess", "os.system", "os.popen", "shell=True", "eval(", "exec("):
        assert call not in source, call
