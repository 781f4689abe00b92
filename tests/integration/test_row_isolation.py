"""No row fails a shard, and no shard that cannot be read fails the others."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.job.run import run
from tests.integration.conftest import CONTEXT

pytestmark = pytest.mark.engine


def corrupt_row_groups(path, first: int) -> None:
    """Overwrite the pages of row group `first` (the footer stays readable, so planning succeeds)."""
    column = pq.read_metadata(path).row_group(first).column(0)
    data = bytearray(path.read_bytes())
    for i in range(column.data_page_offset + 20, column.data_page_offset + column.total_compressed_size - 4):
        data[i] = 0xAB
    path.write_bytes(bytes(data))


def test_an_unreadable_shard_is_reported_and_the_other_shards_are_written(run_job, tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"Hello number {i} " * 10 for i in range(200)]}), path,
                   row_group_size=50, compression="snappy")
    corrupt_row_groups(path, 2)
    readable = []
    file = pq.ParquetFile(path)
    for group in range(4):
        try:
            file.read_row_group(group)
            readable.append(group)
        except OSError:
            pass
    assert readable and len(readable) < 4
    config = JobConfig.model_validate({
        "input": str(path), "output": {"path": str(tmp_path / "out"), "rows_per_file": 50},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
        "defaults": {"max_tokens": 4},
    })
    summary = run(config)
    assert summary.rows_out == 50 * len(readable) < summary.records_expected == 200
    assert len(summary.shards_failed) == 4 - len(readable)
    for why in summary.shards_failed.values():
        assert "reading shard" in why and "failed 3 times" in why and "OSError" in why
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert (tmp_path / "out" / "summary.json").exists()
    assert "FAILED: " in summary.render()
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 50 * len(readable)
