"""`pipeline eval`'s harness thread yields the CPU to engines starting beside it (job/harness.py)."""

import os
import sys
import threading

import pytest

from pipeline.job import harness


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority: Linux")
def test_the_harness_thread_yields_to_the_engines_and_only_it():
    seen = {}

    def harness_thread() -> None:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        harness.yield_to_engines()
        seen["before"], seen["after"] = before, os.getpriority(os.PRIO_PROCESS, 0)

    main_before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=harness_thread)
    thread.start()
    thread.join()
    assert seen["after"] == min(19, seen["before"] + harness.HARNESS_NICENESS)
    assert seen["after"] > seen["before"] or seen["before"] == 19
    # the process's other threads (Ray's, in a real evaluation) keep their priority
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_before
