"""Every input file is checked before any engine starts (its columns, their types), and row keys are
unique across the whole input (input.repeated_keys: stop, the default), without an engine."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.io.plan import InputError, plan_input
from pipeline.io.tally import Tally
from pipeline.reporting.summary import error_share_failure


def _day(folder, name, ids, prompt_column="prompt"):
    pq.write_table(pa.table({"id": ids, prompt_column: [f"p{i}" for i in range(len(ids))]}), folder / name)


def test_a_file_without_the_prompt_column_stops_a_folder_naming_the_file(tmp_path):
    _day(tmp_path, "day-1.parquet", ["a", "b"])
    _day(tmp_path, "day-2.parquet", ["c", "d"], prompt_column="text")
    for path in (tmp_path, f"{tmp_path}/*.parquet"):
        with pytest.raises(InputError) as caught:
            plan_input(InputConfig(path=str(path), id_column="id"))
        message = str(caught.value)
        assert f"input file {tmp_path}/day-2.parquet has no `prompt` column" in message
        assert "its columns: id, text" in message and "move it out of the input" in message
        assert "day-1" not in message
    _day(tmp_path, "day-2.parquet", ["c", "d"])  # fixed: the folder plans
    assert plan_input(InputConfig(path=str(tmp_path), id_column="id")).rows == 4


@pytest.mark.parametrize("config, missing", [
    ({"template": "Q: {question}"}, "`question` column (used by input.template)"),
    ({"columns": {"max_tokens": "budget"}}, "`budget` column (input.columns.max_tokens)"),
    ({"id_column": "key"}, "`key` column (input.id_column)"),
])
def test_each_file_has_every_column_the_job_reads(tmp_path, config, missing):
    pq.write_table(pa.table({"prompt": ["x"], "question": ["q"], "budget": [3], "key": ["k1"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["y"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=f"input file {tmp_path}/b.parquet has no {missing}".replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        plan_input(InputConfig(path=str(tmp_path), **config))


def test_a_file_whose_prompt_is_not_text_is_named(tmp_path):
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": pa.array([{"t": "y"}])}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: column `prompt` is struct"):
        plan_input(InputConfig(path=str(tmp_path)))


def test_repeated_ids_across_files_stop_naming_files_and_keys(tmp_path):
    _day(tmp_path, "day-1.parquet", [f"sample-{i}" for i in range(10)])
    _day(tmp_path, "day-2.parquet", [f"sample-{i}" for i in range(8)] + ["new-1", "new-2"])
    with pytest.raises(InputError) as caught:
        plan_input(InputConfig(path=str(tmp_path), id_column="id"))
    message = str(caught.value)
    assert message.startswith(f"8 rows of {tmp_path} repeat an earlier row's input.id_column `id` value")
    assert f"in {tmp_path}/day-2.parquet:" in message
    assert f"'sample-0' in {tmp_path}/day-2.parquet, first in {tmp_path}/day-1.parquet" in message
    assert message.count("first in") == 5  # a few keys, not all
    assert "input.repeated_keys: keep_first" in message
    kept = plan_input(InputConfig(path=str(tmp_path), id_column="id", repeated_keys="keep_first"))
    assert [f.duplicates.tolist() for f in kept.files] == [[], list(range(8))]


def test_a_key_repeated_within_one_file_stops_too(tmp_path):
    _day(tmp_path, "in.parquet", ["a", "b", "a"])
    with pytest.raises(InputError, match=rf"'a' in {tmp_path}/in.parquet, first in {tmp_path}/in.parquet"):
        plan_input(InputConfig(path=str(tmp_path / "in.parquet"), id_column="id"))


def test_repeated_custom_ids_stop_a_batch_input(tmp_path):
    line = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    (tmp_path / "a.jsonl").write_text(json.dumps({"custom_id": "r1", **line}) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"custom_id": c, **line}) + "\n" for c in ("r2", "r1")))
    with pytest.raises(InputError, match=rf"1 rows of .* repeat an earlier row's custom_id(.|\n)*'r1' in "
                                         rf"{tmp_path}/b.jsonl, first in {tmp_path}/a.jsonl"):
        plan_input(InputConfig(path=str(tmp_path)))


def test_the_error_share_fails_a_run_above_the_threshold_only():
    def tally(rows, errors):
        return Tally(rows=rows, completions=rows - errors, errors_by_type={"BadRequestError (400)": errors} if errors else {})

    assert error_share_failure(tally(320, 320), 0, 0.9).startswith(
        "320 of the 320 rows this run answered are error records (100%, more than output.max_error_share 90%): "
        "320 BadRequestError (400).")
    assert error_share_failure(tally(20, 10), 0, 0.9) is None  # half: data, not a failed run
    assert error_share_failure(tally(10, 9), 0, 0.9) is None  # at the threshold, not above it
    assert error_share_failure(tally(10, 1), 0, 0.0) is not None  # 0: any error fails
    assert error_share_failure(tally(10, 10), 0, 1.0) is None  # 1: never
    assert error_share_failure(tally(10, 10), 10, 0.9) is None  # all of them keep_first's repeats
    assert error_share_failure(tally(0, 0), 0, 0.9) is None  # nothing answered: nothing to judge
