"""A real Prometheus server for a test: it scrapes a Ray cluster through Ray's service-discovery file,
as docs/observability.md tells an operator to, and is stopped by its own process id.

Debian's `prometheus` package provides the binary (`.ci/run` installs it when it can); `available()`
says whether it is there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.ray_cluster import free_port


def available() -> bool:
    return shutil.which("prometheus") is not None


class Prometheus:
    def __init__(self, service_discovery_file: str, scrape_interval_s: int = 2) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="prom-"))
        self.port = free_port()
        (self.folder / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {scrape_interval_s}s\n  scrape_timeout: {scrape_interval_s}s\n"
            f"scrape_configs:\n  - job_name: ray\n    file_sd_configs:\n      - files: ['{service_discovery_file}']\n")
        self.log = self.folder / "prometheus.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={self.folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.query("up")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Prometheus did not start:\n{self.log.read_text()[-2000:]}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step_s: float = 5.0) -> list[dict[str, Any]]:
        """A range query's result: [{"metric": {labels}, "values": [[t, "v"], ...]}, ...]."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": promql, "start": start, "end": end, "step": step_s})
        with urllib.request.urlopen(url, timeout=30) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
