"""Input that changed is noticed: a rerun into the same output finds each done shard's input file as it
was when the shard was answered (`size:mtime_ns`, recorded in the shard's tally) and redoes the shards
of a file rewritten under the same name, dropping those of rows it no longer has, or stops and names the
files (input.when_changed). On local files and on moto's S3 server (object size and LastModified).
The engines are not involved: what a rerun would answer is what this decides (pipeline/job/run.py)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.io import outputs
from pipeline.io.plan import InputError, cut_shards, plan_input
from pipeline.io.records import output_schema
from pipeline.io.tally import Tally
from pipeline.io.resume import WorkItem, changed_inputs as _changed_inputs
from tests.s3_server import admin_filesystem, environment, s3_server


def _records(rows: int) -> pa.Table:
    schema = output_schema(pa.schema([("row_key", pa.string())]))
    return pa.table({"row_key": [f"k{i}" for i in range(rows)], "response": [None] * rows,
                     "error": [{"message": "m", "type": "BadRequestError", "param": None, "code": 400}] * rows},
                    schema=schema)


def _answer_all(config: JobConfig) -> set[str]:
    """What a run leaves: every planned shard written, its tally recording its input file."""
    plan = plan_input(config.input)
    done = outputs.prepare(config.output, config.identity())
    for shard in cut_shards(plan, 2):
        tally = Tally.of_records(_records(shard.rows))
        tally.source = shard.source
        outputs.write_shard(config.output, shard.id, _records(shard.rows), tally)
    return done


def _rerun(config: JobConfig) -> tuple[set[str], set[str]]:
    """A rerun's view: the done shards, and those it forgets because their input changed."""
    plan = plan_input(config.input)
    plan.shards = cut_shards(plan, 2)
    done = outputs.prepare(config.output, config.identity())
    items = [WorkItem(v, s) for v in config.variants() for s in plan.shards]
    forgotten = _changed_inputs(config, plan, items, set(done))
    return done, forgotten


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    """(write(name, table), input URI, output URI) on a local folder or an S3 bucket."""
    if request.param == "local":
        (tmp_path / "in").mkdir()
        yield (lambda name, table: pq.write_table(table, tmp_path / "in" / name)), str(tmp_path / "in"), \
            str(tmp_path / "out")
        return
    with s3_server() as endpoint:
        for key, value in environment(endpoint).items():
            monkeypatch.setenv(key, value)
        fs = admin_filesystem(endpoint)
        fs.create_dir("bucket")

        def write(name: str, table: pa.Table) -> None:
            with fs.open_output_stream(f"bucket/in/{name}") as out:
                pq.write_table(table, out)

        yield write, "s3://bucket/in/", "s3://bucket/out/"


def test_a_rewritten_file_is_answered_again_and_its_vanished_rows_dropped(store):
    write, input_uri, output_uri = store
    write("a.parquet", pa.table({"prompt": ["one", "two", "three", "four"]}))
    write("b.parquet", pa.table({"prompt": ["five", "six"]}))
    config = JobConfig.model_validate({"input": input_uri, "output": output_uri})
    _answer_all(config)
    done, forgotten = _rerun(config)
    assert len(done) == 3 and forgotten == set()  # nothing changed: nothing to do

    time.sleep(1.1)  # S3's LastModified has whole seconds
    write("a.parquet", pa.table({"prompt": ["ONE", "TWO"]}))  # same name, other rows, fewer of them
    done, forgotten = _rerun(config)
    a_shards = sorted(n for n in done if n.startswith("a-"))
    assert len(a_shards) == 2 and forgotten == set(a_shards)  # the first answered again, the second dropped
    assert outputs.done_shards(config.output) == {n for n in done if n.startswith("b-")}
    (b_tally,) = outputs.read_tallies(config.output.path, sorted(outputs.done_shards(config.output)))
    assert b_tally.rows == 2 and b_tally.source


def test_stop_names_the_changed_files_and_forgets_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["one", "two"]}), tmp_path / "in" / "a.parquet")
    config = JobConfig.model_validate({"input": {"path": str(tmp_path / "in"), "when_changed": "stop"},
                                       "output": str(tmp_path / "out")})
    _answer_all(config)
    time.sleep(0.01)
    pq.write_table(pa.table({"prompt": ["uno", "dos"]}), tmp_path / "in" / "a.parquet")  # same rows, new text
    with pytest.raises(InputError) as stopped:
        _rerun(config)
    assert "1 input file changed since 1 of the output's shards were answered" in str(stopped.value)
    assert "a.parquet" in str(stopped.value) and "input.when_changed: redo" in str(stopped.value)
    assert len(outputs.done_shards(config.output)) == 1  # kept: nothing was forgotten


def test_an_output_written_before_sources_were_recorded_keeps_its_shards(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["one", "two"]}), tmp_path / "in" / "a.parquet")
    config = JobConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")})
    plan = plan_input(config.input)
    outputs.prepare(config.output, config.identity())
    (shard,) = cut_shards(plan, 2)
    outputs.write_shard(config.output, shard.id, _records(2), Tally.of_records(_records(2)))  # no source
    pq.write_table(pa.table({"prompt": ["uno", "dos"]}), tmp_path / "in" / "a.parquet")
    assert _rerun(config)[1] == set()
    assert pafs.LocalFileSystem().get_file_info(str(tmp_path / "out" / "data")).type == pafs.FileType.Directory
