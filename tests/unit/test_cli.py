"""Job-level problems stop the job before Ray or an engine starts: exit code 2, no traceback."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/complete.py", *args], capture_output=True, text=True,
                          timeout=120)


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_bad_config_names_the_key(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("input: x.parquet\noutput: out\nengine:\n  num_actors: 0\n  tensor_paralel_size: 2\n")
    assert_clean_failure(run_job("--config", str(config)),
                         "engine.num_actors", "greater than or equal to 1", "engine.tensor_paralel_size",
                         "unknown key")


def test_bad_override_value(tmp_path):
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--set", "engine.max_model_len=abc"),
                         "engine.max_model_len")


def test_missing_input_path(tmp_path):
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "nope"),
                                 "--output", str(tmp_path / "out")),
                         "does not exist")


def test_missing_prompt_column(tmp_path):
    pq.write_table(pa.table({"question": ["a", "b"]}), tmp_path / "in.parquet")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "in.parquet"),
                                 "--output", str(tmp_path / "out")),
                         "no `prompt` column", "question")


def test_not_parquet(tmp_path):
    (tmp_path / "in.parquet").write_text("this is not parquet")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "in.parquet"),
                                 "--output", str(tmp_path / "out")),
                         "is not a readable Parquet file")
