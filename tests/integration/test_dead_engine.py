"""Issue 21's hang, on the real engine: requests in an engine that died and was shut down must end.

Before the fix, shutting down an engine whose death vLLM's output handler had not read yet left every
request in it waiting forever (`waiting: 256`); a job then never ended. Now each fails with the
engine-death error, which the actor's supervisor answers by trying the row on a new engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_requests_in_a_dead_engine_end_when_it_is_shut_down():
    probe = Path(__file__).parents[1] / "dead_engine_probe.py"
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errored"] and result["in_engine"] > 0, result  # it died with requests in it
    assert result["waiting"] == 0 and result["ended"] == 256, result
    assert result["errors"] == ["EngineDeadError"], result
