"""An S3 endpoint on 127.0.0.1 for tests and benchmarks: moto's standalone server, started as a
subprocess on a free port and stopped by its pid whatever happens."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

import pyarrow.fs as pafs

# moto accepts any credentials; these are recognisable, so a test can look for them where they must not be
ACCESS_KEY = "AKIAMOTOTESTKEY12345"
SECRET_KEY = "moto-secret-never-in-logs-7f3a9c"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server(log: str = "/dev/null", authenticate: bool = False) -> Iterator[str]:
    """Yield the endpoint (`127.0.0.1:PORT`) of a fresh moto S3 server. `authenticate`: it checks
    credentials (moto's IAM: every access key is unknown to it, so every request is refused)."""
    port = _free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {})}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {port}; see {log}") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def environment(endpoint: str) -> dict[str, str]:
    """What a process (the driver, and through it the Ray workers it starts) needs to reach the server."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{endpoint}"}


def admin_filesystem(endpoint: str) -> pafs.S3FileSystem:
    """A filesystem on the server that may create buckets (the pipeline's never does)."""
    return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                             endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
