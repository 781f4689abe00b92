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


def write_prompts(path, n=3):
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(n)]}), path)


def test_corrupt_file_among_good_ones_stops_before_work(tmp_path):
    (tmp_path / "in").mkdir()
    write_prompts(tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 truncated")
    write_prompts(tmp_path / "in" / "c.parquet")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "in"),
                                 "--output", str(tmp_path / "out")), "b.parquet", "not a readable Parquet")
    assert not (tmp_path / "out").exists()


def test_empty_dataset_and_empty_files(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "empty.parquet"),
                                 "--output", str(tmp_path / "out")), "holds no rows")
    (tmp_path / "empty.jsonl").write_text("")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "empty.jsonl"),
                                 "--output", str(tmp_path / "out")), "holds no rows")
    (tmp_path / "folder").mkdir()
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "folder"),
                                 "--output", str(tmp_path / "out")), "holds no files")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "*.nope"),
                                 "--output", str(tmp_path / "out")), "matches no files")


def test_wrong_prompt_type_and_missing_columns(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2], "q": ["a", "b"]}), tmp_path / "in.parquet")
    common = ("--config", "configs/local-cpu.yaml", "--input", str(tmp_path / "in.parquet"),
              "--output", str(tmp_path / "out"))
    assert_clean_failure(run_job(*common), "`prompt` is int64", "string or a list of strings")
    assert_clean_failure(run_job(*common, "--set", 'input.template="Q: {question}"'),
                         "no `question` column", "input.template")
    assert_clean_failure(run_job(*common, "--set", "input.prompt_column=q", "--set", "input.columns={max_tokens: budget}"),
                         "no `budget` column")
    assert_clean_failure(run_job(*common, "--set", "input.prompt_column=q", "--set", "output.columns=[nope]"),
                         "output.columns", "nope")
    assert_clean_failure(run_job(*common, "--set", 'input.template="{q.__class__}"'), "plain column name")


def test_conflicting_column_types_across_files(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "max_tokens": [3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "max_tokens": [{"x": 1}]}), tmp_path / "b.parquet")
    assert_clean_failure(run_job("--config", "configs/local-cpu.yaml", "--input", str(tmp_path),
                                 "--output", str(tmp_path / "out")), "disagree on column types")


def test_a_python_without_the_dependencies_says_how_to_start_ray():
    # `ray job submit ... -- python jobs/complete.py` on a head whose PATH has another Python: -S (no
    # site-packages) and -E (no PYTHONPATH) give this one the same lack
    result = subprocess.run([sys.executable, "-E", "-S", "jobs/complete.py", "--config", "configs/local-cpu.yaml"],
                            capture_output=True, text=True, timeout=120)
    assert_clean_failure(result, "cannot import", ". .venv/bin/activate && ray start --head",
                         "/path/to/.venv/bin/python jobs/complete.py")


def test_an_evaluation_with_a_bad_engine_argument_stops_before_ray(tmp_path):
    """`pipeline eval` starts its engines first thing (job/early_engines.py): what a job checks before Ray
    starts is checked before those engines start."""
    config = tmp_path / "eval.yaml"
    config.write_text("output: out\nmodel:\n  path: builtin:tiny-llama\nengine:\n  device: cpu\n"
                      "  vllm:\n    no_such_argument: 1\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--config", str(config), "--tasks", "x"],
                            capture_output=True, text=True, timeout=300)
    assert_clean_failure(result, "no_such_argument")


def test_the_command_line_exits_with_its_code_after_its_threads_exit_handlers_and_output(tmp_path):
    """`python -m pipeline` ends without the interpreter's teardown (cli.skip_teardown, cli.exit_now), and
    nothing is lost: a thread still running is waited for, exit handlers run, buffered output is written,
    logging is flushed; the modules are not torn down (an object's __del__ at teardown never runs)."""
    script = tmp_path / "exits.py"
    script.write_text(f"""
import atexit, logging, sys, threading, time
from pathlib import Path
from pipeline.job.cli import exit_now, skip_teardown
skip_teardown()

class TornDown:
    def __del__(self):
        Path({str(tmp_path / "teardown")!r}).write_text("ran")

kept = TornDown()
logging.basicConfig(filename={str(tmp_path / "log")!r})

def late():
    time.sleep(0.5)
    Path({str(tmp_path / "thread")!r}).write_text("done")

threading.Thread(target=late).start()
atexit.register(lambda: Path({str(tmp_path / "atexit")!r}).write_text("ran"))
sys.stdout.write("buffered, no newline")
sys.stderr.write("to stderr")
logging.getLogger().warning("logged")
exit_now(3)
print("never")
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == "buffered, no newline" and result.stderr == "to stderr"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"
    assert "logged" in (tmp_path / "log").read_text() and not (tmp_path / "teardown").exists()
