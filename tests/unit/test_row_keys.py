"""Row keys from `input.id_column` are unique: a null or empty value is that row's 400 error record
(keyed `<file>:<row>`); so is a repeated one under input.repeated_keys: keep_first, as repeated
custom_ids are, and the job and `validate` go on. (The default, stop, is in test_input_checks.py.)"""

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io.plan import INPUT_ERROR, ROW_KEY, cut_shards, plan_input
from pipeline.io.read import read_shard


def _rows(folder, rows_per_shard):
    plan = plan_input(InputConfig(path=str(folder), id_column="id", repeated_keys="keep_first"))
    out = []
    for shard in cut_shards(plan, rows_per_shard):
        table = read_shard(plan, shard)
        out += zip(table.column(ROW_KEY).to_pylist(), table.column(INPUT_ERROR).to_pylist())
    return out


def test_null_empty_and_repeated_ids_are_error_rows_across_shards_and_files(tmp_path):
    pq.write_table(pa.table({"id": ["a", "a", "b", None, ""], "prompt": ["p"] * 5}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"id": ["c", "b"], "prompt": ["p"] * 2}), tmp_path / "2.parquet")
    for rows_per_shard in (1, 2, 5):  # a repeat is found whatever shard its first row is in
        rows = _rows(tmp_path, rows_per_shard)
        keys = [key for key, _ in rows]
        assert keys == ["a", "1.parquet:1", "b", "1.parquet:3", "1.parquet:4", "c", "2.parquet:1"]
        assert len(set(keys)) == len(keys)
        errors = [error for _, error in rows]
        assert [e is None for e in errors] == [True, False, True, False, False, True, False]
        assert "value 'a' appears on an earlier row" in errors[1]["message"] and errors[1]["code"] == 400
        assert errors[1]["param"] == "id"
        assert "is null on this row" in errors[3]["message"] and "is empty on this row" in errors[4]["message"]
        assert "value 'b' appears on an earlier row" in errors[6]["message"]


def test_integer_ids_are_keys_too(tmp_path):
    pq.write_table(pa.table({"id": [7, 8, 7], "prompt": ["p"] * 3}), tmp_path / "in.parquet")
    assert [key for key, _ in _rows(tmp_path / "in.parquet", 2)] == ["7", "8", "in.parquet:2"]
