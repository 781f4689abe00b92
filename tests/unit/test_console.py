"""The job's terminal: its own lines and what needs attention; the rest in the job's log file."""

import logging
import os
import sys

from pipeline.reporting import console


def test_a_quiet_session_sends_everything_else_to_the_log(tmp_path, capfd):
    log = tmp_path / "job.log"
    with console.session(verbose=False, path=log) as path:
        assert path == log and not console.verbose()
        os.write(2, b"[E core_worker.cc] a line from C++\n")  # what Ray's core writes on stderr
        print("a library's warning", file=sys.stderr)
        logging.getLogger("some.library").info("Starting execution of Dataset")
        logging.getLogger("pipeline.job.run").info("4 of 4 shards to run")
        logging.getLogger("pipeline.job.run").warning("shard s-0 has no records")
        logging.getLogger("some.library").error("an actor died")
        console.say("error: the input is gone")
    assert console.verbose()  # a library caller's default: everything shown
    err = capfd.readouterr().err
    text = log.read_text()
    for line in ("a line from C++", "a library's warning", "Starting execution", "4 of 4 shards", "shard s-0"):
        assert line in text
    for line in ("a line from C++", "a library's warning", "Starting execution", "4 of 4 shards"):
        assert line not in err
    for line in ("shard s-0 has no records", "an actor died", "error: the input is gone"):
        assert line in err
    os.write(2, b"stderr is the terminal again\n")
    assert "stderr is the terminal again" in capfd.readouterr().err


def test_a_verbose_session_shows_everything_and_keeps_the_log(tmp_path, capfd):
    log = tmp_path / "job.log"
    with console.session(verbose=True, path=log):
        assert console.verbose()
        os.write(2, b"a line from C++\n")
        logging.getLogger("some.library").info("Starting execution of Dataset")
    err = capfd.readouterr().err
    assert "a line from C++" in err and "Starting execution" in err
    assert "Starting execution" in log.read_text()
