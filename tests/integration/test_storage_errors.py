"""Storage errors speak explained_store_errors: an object store that cannot be reached, a bucket that does not exist,
credentials it refuses, for the input, the output and adapters, end in one message naming the URI
(without credentials), what failed and what to check, before Ray starts (exit 2), never a traceback.
Against moto's S3 server on 127.0.0.1 (tests/s3_server.py) and a port nothing listens on."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig, ModelConfig, OutputConfig
from pipeline.io import outputs
from pipeline.io.plan import InputError, plan_input
from pipeline.io.storage import StorageError
from pipeline.models.adapters import AdapterError, discover
from tests.ray_cluster import free_port
from tests.s3_server import ACCESS_KEY, SECRET_KEY, admin_filesystem, environment, s3_server

@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    for key, value in environment("unused").items():
        if key != "AWS_ENDPOINT_URL":  # each URI names its endpoint
            monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as found:
        fs = admin_filesystem(found)
        fs.create_dir("inputs")
        with fs.open_output_stream("inputs/in/a.parquet") as out:
            pq.write_table(pa.table({"prompt": ["Hi"]}), out)
        yield found


def uri(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


def one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    assert SECRET_KEY not in message and ACCESS_KEY not in message, message
    return message


def test_a_readable_input_still_plans(endpoint):
    assert plan_input(InputConfig(path=uri(endpoint, "inputs/in/"))).rows == 1


@pytest.mark.parametrize("where, what, check", [
    ("missing bucket", "the bucket does not exist", "the bucket's name"),
    ("stopped server", "the storage endpoint could not be reached", "the endpoint"),
])
def test_input_output_and_adapters_on_a_store_that_fails(endpoint, where, what, check):
    server = endpoint if where == "missing bucket" else f"127.0.0.1:{free_port()}"
    bucket = "nope-bucket" if where == "missing bucket" else "inputs"
    with pytest.raises(InputError) as caught:
        plan_input(InputConfig(path=uri(server, f"{bucket}/in/")))
    message = one_line(str(caught.value))
    assert message.startswith(f"cannot read the input s3://{bucket}/in/: {what}; check {check}"), message
    with pytest.raises(StorageError) as caught:
        outputs.prepare(OutputConfig(path=uri(server, f"{bucket}/out/")), {"variants": {}})
    message = one_line(str(caught.value))
    assert message.startswith(f"cannot use the output s3://{bucket}/out/: {what}"), message
    with pytest.raises((AdapterError, StorageError)) as caught:
        discover(ModelConfig(adapters={"a": uri(server, f"{bucket}/adapters/a")}))
    assert what in one_line(str(caught.value))


def test_credentials_the_store_refuses(tmp_path):
    with s3_server(authenticate=True) as guarded:
        with pytest.raises(InputError) as caught:
            plan_input(InputConfig(path=uri(guarded, "inputs/in/")))
    message = one_line(str(caught.value))
    # moto's IAM knows no key; a HEAD request's 403 has no body to tell unknown keys from missing rights
    assert "access was denied; check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message, message


def test_the_command_stops_before_ray_with_one_line_and_exit_2(tmp_path):
    """The issue's case: an s3:// input on a store that cannot be reached (here: nothing listens)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID=ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY, PIPELINE_LOG_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", "configs/local-cpu.yaml",
                           "--input", "s3://nope-bucket/in/", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [next(line for line in lines if line.startswith("error: cannot read the input s3://nope-bucket/in/"))]
    assert "could not be reached" in errors[0] and "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
