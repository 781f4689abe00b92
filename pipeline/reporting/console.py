"""What a job prints on the terminal, and where everything else goes.

By default (`quiet`) the terminal shows the job's own lines: its progress line, what needs the user's
attention (the pipeline's warnings and errors, anyone's errors) and the summary. Everything else goes
to the job's log file: Ray's and Ray Data's logs, anything written to the process's stderr (Ray's C++
core, library warnings and progress bars, tracebacks that were handled), and the driver's own INFO
lines. The engine actors' output (vLLM's warnings and start-up lines) stays in Ray's logs, on each
node, instead of being forwarded to the driver; the command says where both are. Libraries that print on their own
(vLLM's and lm-eval's loggers have a handler of their own and do not propagate) are taken into the
session (`adopt`, or vLLM's `configure_logging=False` in `validate`). `--verbose` shows everything as
Ray and vLLM print it, and keeps the log file.

How: the process's file descriptor 2 and `sys.stderr` are pointed at the log file for the session (so
a line written by C++, or by a library holding the old `sys.stderr`, lands there too), and the terminal is reached through a
copy of the descriptor taken first. Leaving the session puts descriptor 2 back, so an exception that
ends the job prints its traceback on the terminal.

A job run as a library (`pipeline.job.run.run`, as the tests and the harness do) without a session
prints as it always did: `verbose()` is True until a quiet session starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state: dict[str, object] = {"verbose": True, "terminal": None, "file": None, "adopted": []}


def verbose() -> bool:
    """Whether Ray and vLLM print on the terminal (the actors' output forwarded, Ray Data's progress)."""
    return bool(_state["verbose"])


def terminal() -> IO[str]:
    """Where the user's lines go: the terminal's stderr (a copy of it, in a quiet session)."""
    return _state["terminal"] or sys.stderr  # type: ignore[return-value]


def say(message: str) -> None:
    """A line the user must read (an error that stops the job, where the log is)."""
    print(message, file=terminal(), flush=True)


class _Attention(logging.Filter):
    """The terminal's share of the log: the pipeline's warnings and errors, and every error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING
                                                   and record.name.split(".")[0] == "pipeline")


def default_log_path() -> Path:
    folder = Path(os.environ.get("PIPELINE_LOG_DIR") or Path(tempfile.gettempdir()) / "batch-completions")
    return folder / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"


@contextlib.contextmanager
def session(verbose: bool = False, path: Path | None = None) -> Iterator[Path]:
    """The job's terminal and log file, for the `with` block; yields the log file's path."""
    path = path or default_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8")
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter(FORMAT))
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    term = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    to_term = logging.StreamHandler(term)
    to_term.setFormatter(logging.Formatter(FORMAT))
    saved_stderr = sys.stderr
    if not verbose:
        to_term.addFilter(_Attention())
        os.dup2(log.fileno(), 2)  # what C++ and libraries write on stderr: the log
        sys.stderr = log
    root.handlers = [to_file, to_term]
    root.setLevel(logging.INFO)
    _state.update(verbose=verbose, terminal=term, file=to_file, adopted=[])
    try:
        yield path
    finally:
        sys.stderr.flush()
        sys.stderr = saved_stderr
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        root.handlers, root.level = saved_handlers, saved_level
        for logger, handlers, propagate in reversed(_state["adopted"]):  # type: ignore[call-overload]
            logger.handlers, logger.propagate = handlers, propagate
        _unhook(log, saved_stderr)
        _state.update(verbose=True, terminal=None, file=None, adopted=[])
        term.close()
        log.close()


def _unhook(log: IO[str], stderr: IO[str]) -> None:
    """Handlers a library made during the session on `sys.stderr` (the log file) write to stderr
    after it, not to a closed file."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream is log:
                handler.setStream(stderr)


def adopt(*names: str) -> None:
    """In a quiet session, loggers that print on their own (a handler of their own on the terminal,
    not propagating: lm-eval's) go through the session's handlers instead, like anyone's: the log
    file, and the terminal for their errors. Call it once the library has set its logging up; the
    session's end gives them their own back. In a verbose session (or none) they print as they do."""
    if verbose():
        return
    for name in names:
        logger = logging.getLogger(name)
        _state["adopted"].append((logger, list(logger.handlers), logger.propagate))  # type: ignore[attr-defined]
        logger.handlers, logger.propagate = [], True
