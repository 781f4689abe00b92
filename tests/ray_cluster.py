"""A Ray cluster started with `ray start` for a test, on this machine, and stopped by its own processes.

Each cluster has a temp dir, ports and an auth token of its own, so it never meets another Ray on the
machine; `stop` kills only the processes whose command line names its temp dir, and their children
(`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


class RayCluster:
    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rtc-", dir="/tmp")  # short: Ray's socket paths are limited
        self.port = free_port()
        self.dashboard_port = free_port()
        self.agent_port: int | None = None
        # token authentication, as Ray 2.60 enables it, with a token of the cluster's own (not ~/.ray's)
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CI")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def _start(self, *args: str, cpus: int = 1, gpus: int = 0) -> None:
        """`ray start` with `cpus` CPUs and `gpus` GPUs (logical: Ray schedules what a node declares)."""
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                        "metrics-export-port", "runtime-env-agent-port")]
        if self.agent_port is None:  # the head's, the first node started
            self.agent_port = int(ports[0].split("=")[1])
        started = subprocess.run([RAY, "start", *args, *ports, f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                                  f"--temp-dir={self.temp_dir}", "--disable-usage-stats"], capture_output=True, text=True, env=self.env, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    def start_head(self, dashboard: bool = False, cpus: int = 1, gpus: int = 0) -> None:
        self._start("--head", f"--port={self.port}",
                    *(["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={self.dashboard_port}"] if dashboard else ["--include-dashboard=false"]),
                    cpus=cpus, gpus=gpus)

    def submit(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit` to the head's dashboard once the head's job agent is up (a busy machine can take
        longer than the 10 s Ray's job head waits for it; it then says "No available agent ... try again later")."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.agent_port)) == 0:
                    break
            time.sleep(0.5)
        command = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{self.dashboard_port}", *args]
        for _ in range(6):
            done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout)
            if "No available agent to submit job" not in done.stdout + done.stderr:
                return done
            time.sleep(10)
        return done

    def add_node(self, cpus: int = 1, gpus: int = 0) -> psutil.Process:
        """Start another node (one CPU by default) and return its raylet process."""
        node_port = free_port()
        self._start(f"--address=127.0.0.1:{self.port}", f"--node-manager-port={node_port}", cpus=cpus, gpus=gpus)
        return self.raylet(node_port)

    def raylet(self, node_port: int | None = None) -> psutil.Process:
        """A node's raylet: the one on `node_port`, or the head's (the first started)."""
        raylets = [p for p in psutil.process_iter() if "raylet/raylet" in cmdline(p) and self.temp_dir in cmdline(p)]
        if node_port is not None:
            (found,) = [p for p in raylets if f"--node_manager_port={node_port}" in cmdline(p)]
            return found
        return min(raylets, key=lambda p: p.create_time())

    def stop(self) -> None:
        # the head's Ray client server names only the cluster's address (its parent, `ray start`, is gone)
        mine = [p for p in psutil.process_iter() if self.temp_dir in cmdline(p)
                or ("ray.util.client.server" in cmdline(p) and f":{self.port} " in cmdline(p) + " ")]
        for proc in list(mine):
            try:
                mine += proc.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in mine:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=30)
