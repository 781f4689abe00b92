"""`python -m pipeline eval` and `validate` are as quiet as `run` (reporting/console.py): the terminal
shows the command's own lines (the harness's results table, the validation block), errors, and where
the log file is; Ray's and the libraries' lines are in that log file, the engine actors' in Ray's logs
(as a `run`'s). Each command
runs as users run it: a subprocess, its own local Ray, the real engine."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.reporting import console

ROOT = Path(__file__).resolve().parents[2]
# what only Ray, vLLM, Triton, lm-eval or the `datasets` library print
NOISE = ("INFO", "WARNING", "EngineActor", "MainProcess", "Triton", "core_worker", "Generating ",
         "it/s]", "Started a local Ray")


def command(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "PIPELINE_LOG_DIR": str(tmp_path / "logs"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=ROOT)
    return result, (result.stdout + result.stderr).splitlines()


def log_file(tmp_path: Path, result: subprocess.CompletedProcess) -> str:
    """The log file the last line of stdout names, under PIPELINE_LOG_DIR."""
    last = result.stdout.splitlines()[-1] if result.stdout else ""
    assert last.startswith("log: "), result.stdout[-2000:]
    path = Path(last.split()[1])
    assert path.parent == tmp_path / "logs"
    return path.read_text()


def noise(terminal: list[str]) -> list[str]:
    return [line for line in terminal if any(mark in line for mark in NOISE)]


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory) -> tuple[Path, Path]:
    """The local harness tasks (data/make_harness_tasks.py) and a pipeline config for them."""
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(ROOT / "data"))
    from make_harness_tasks import make

    folder = tmp_path_factory.mktemp("harness")
    include_path = make(folder / "tasks")
    config = folder / "pipeline.yaml"
    config.write_text(json.dumps({  # JSON is YAML; configs/harness-local.yaml's engine
        "output": str(folder / "records"), "model": {"path": "builtin:tiny-llama", "served_name": "tiny-llama"},
        "engine": {"device": "cpu", "num_actors": 1, "cpus_per_actor": 1, "dtype": "float32", "max_model_len": 256,
                   "gpu_memory_utilization": 0.5, "cpu_kvcache_space_gb": 1},
    }))
    return config, include_path


@pytest.mark.engine
def test_eval_shows_its_own_lines_and_the_results_table_the_libraries_lines_are_in_its_log(tmp_path, harness_tasks):
    config, include_path = harness_tasks
    result, terminal = command(tmp_path, "eval", "--config", str(config), "--include_path", str(include_path),
                               "--tasks", "tiny_qa", "--limit", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(terminal) <= 40, terminal
    assert not noise(terminal), noise(terminal)[:5]
    assert any(line.startswith("generate_until: 4 records in ") for line in terminal), terminal
    assert any(re.match(r"\|tiny_qa *\|.*\|exact_match *\|", line) for line in terminal), terminal  # the table
    text = log_file(tmp_path, result)
    # Ray's lines and the harness's own logging; the engine actors' stay in Ray's logs, as a run's do
    assert "Started a local Ray instance" in text
    assert "lm_eval" in text and "Selected Tasks" in text
    assert "EngineActor pid=" not in text


@pytest.mark.engine
def test_eval_takes_verbose_for_itself_and_shows_an_argument_error_of_the_harness(tmp_path, harness_tasks):
    """`--verbose` is the pipeline's (lm_eval is not given it): Ray's lines are on the terminal; a
    mistake in lm_eval's arguments is too, quiet or verbose."""
    config, include_path = harness_tasks
    args = ("eval", "--config", str(config), "--include_path", str(include_path), "--tasks", "tiny_qa",
            "--no_such_argument", "1")
    for verbose in (True, False):
        result, terminal = command(tmp_path, *args, *(["--verbose"] if verbose else []), timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        (error,) = [line for line in terminal if "unrecognized arguments" in line]
        assert "--no_such_argument" in error and "--verbose" not in error
        assert ("Started a local Ray instance" in result.stderr) == verbose, terminal


def test_validate_shows_the_validation_block_and_vllm_lines_are_in_its_log(tmp_path):
    result, terminal = command(tmp_path, "validate", "--config", "configs/local-cpu.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "" and not noise(terminal), terminal
    assert terminal[:2] == ["", "== validation =="] and terminal[2].startswith("input: ")
    assert terminal[-2].startswith("checked in: ") and len(terminal) < 20, terminal  # the block, the log line
    text = log_file(tmp_path, result)
    assert "vllm" in text and "Resolved architecture" in text  # vLLM's lines, as its logger wrote them


def test_validate_verbose_shows_vllm_and_keeps_its_exit_code(tmp_path):
    rows = ["a fine prompt", "another one"]
    pq.write_table(pa.table({"prompt": rows, "max_tokens": [4, -1]}), tmp_path / "in.parquet")  # one invalid row
    result, terminal = command(tmp_path, "validate", "--config", "configs/local-cpu.yaml",
                               "--input", str(tmp_path / "in.parquet"), "--verbose")
    assert result.returncode == 1, result.stderr[-3000:]  # some rows invalid
    assert "invalid rows:     1" in result.stdout
    assert any("Resolved architecture" in line for line in terminal), terminal  # vLLM's, as it prints it
    log_file(tmp_path, result)  # still named at the end


def test_a_library_printing_on_its_own_goes_through_a_quiet_session(tmp_path, capfd):
    """What `eval` does with lm-eval's logger (a handler of its own, not propagating), and a handler a
    library makes on stderr during the session (the `datasets` library's)."""
    library = logging.getLogger("a_library")
    own = logging.StreamHandler(sys.stdout)
    library.handlers, library.propagate = [own], False
    log = tmp_path / "job.log"
    try:
        with console.session(verbose=False, path=log):
            console.adopt("a_library")
            console.adopt("a_library")  # adopted again (every variant of a sweep): still given back once
            library.info("Selected Tasks")
            library.error("the task failed")
            made = logging.StreamHandler()  # on sys.stderr: the log file
            logging.getLogger("another_library").addHandler(made)
        assert library.handlers == [own] and library.propagate is False
        assert made.stream is sys.stderr  # not the closed log file
    finally:
        library.handlers, library.propagate = [], True
        logging.getLogger("another_library").handlers = []
    captured = capfd.readouterr()
    assert "Selected Tasks" in log.read_text() and "Selected Tasks" not in captured.out + captured.err
    assert "the task failed" in captured.err and "the task failed" in log.read_text()
