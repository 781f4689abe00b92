"""A local Ray head that outlives the command that started it: where a pool lives on a machine with no
Ray cluster (a laptop, `make demo`'s machine).

`python -m pipeline engines start` starts it (or reuses the one it started before) with
`ray start --head --block` in a session of its own, with a token and a temp dir of its own, and writes
where it is to a small record file (`PIPELINE_LOCAL_HEAD`, default ~/.local/state/batch-completions/
ray-head.json, readable by its user only). A job given a pool finds the head from the record, without
the user exporting anything. Stopping it signals that one `ray start` process, which stops the head's
processes and nothing else (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

START_TIMEOUT_S = 120.0


def record_path() -> Path:
    default = Path.home() / ".local" / "state" / "batch-completions" / "ray-head.json"
    return Path(os.environ.get("PIPELINE_LOCAL_HEAD") or default)


@dataclass(frozen=True)
class LocalHead:
    address: str  # 127.0.0.1:PORT, the GCS address `ray.init` takes
    pid: int  # the `ray start --block` process: signalling it stops the head
    token: str  # the head's auth token (Ray's token authentication)
    temp_dir: str
    log: str  # what `ray start` printed

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(2)
            return s.connect_ex((host, int(port))) == 0

    def join(self) -> None:
        """Let this process's `ray.init(address=...)` (and its children) reach the head. Ray reads its
        authentication settings when it is imported: call this before (the command line does, as it
        reads the config)."""
        if "ray" in sys.modules and os.environ.get("RAY_AUTH_TOKEN") != self.token:
            raise RuntimeError("Ray was imported before this process took the local pool head's token: call "
                               "pipeline.pool.attached.join_local_head(config) before anything imports Ray")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = self.token


def find() -> LocalHead | None:
    """The local head `start` started, if it is still up."""
    try:
        head = LocalHead(**json.loads(record_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return head if head.alive() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cpus: int | None = None) -> LocalHead:
    """Start a local head that stays up after this process; returns once it takes clients."""
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rpool-", dir="/tmp")  # short: Ray's socket paths are limited
    port, token = _free_port(), secrets.token_hex(32)
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "metrics-export-port", "runtime-env-agent-port")]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token}
    log = Path(temp_dir) / "ray-start.log"
    command = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}", *ports,
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *([f"--num-cpus={cpus}"] if cpus else [])]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)  # not this command's: it stays up
    head = LocalHead(f"127.0.0.1:{port}", process.pid, token, temp_dir, str(log))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _gcs_answers(head):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(head)
            raise RuntimeError(f"a local Ray head did not start ({log}): {log.read_text()[-1500:]}")
        time.sleep(0.5)
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(asdict(head)))
    return head


def _gcs_answers(head: LocalHead) -> bool:
    return head.alive() and "Ray runtime started" in Path(head.log).read_text()


def stop(head: LocalHead, timeout_s: float = 60.0) -> None:
    """Stop the head: SIGTERM to its `ray start --block`, which stops the processes it started."""
    try:
        os.kill(head.pid, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(head.pid, os.WNOHANG)  # our child: reap it
            if done:
                break
        except ChildProcessError:  # another process's child: it is gone when it takes no signal
            try:
                os.kill(head.pid, 0)
            except OSError:
                break
        time.sleep(0.5)
    try:
        if json.loads(record_path().read_text()).get("pid") == head.pid:
            record_path().unlink()
    except (OSError, ValueError):
        pass
