"""Stopping an engine stops vLLM's output handler first, whichever thread asks (completion_engine.py).

A handler still reading when the engine process exits logs that exit as an EngineDeadError with a
traceback although nothing failed (the actor's log of a successful job, tests/integration/test_clean_exit.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.engine.completion_engine import _stop_output_handler


class _Processor:
    """vLLM's OutputProcessor as the handler's stop uses it: the error the requests in flight get."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def propagate_error(self, exc: Exception) -> None:
        self.errors.append(type(exc).__name__)


@pytest.fixture
def loop_in_a_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _reading_handler(loop: asyncio.AbstractEventLoop) -> asyncio.Task:
    async def read_forever() -> None:
        await asyncio.Event().wait()

    return asyncio.run_coroutine_threadsafe(_create(read_forever()), loop).result(5)


async def _create(coro) -> asyncio.Task:
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)  # it is reading
    return task


def test_from_another_thread_the_handler_is_cancelled_and_done_on_return(loop_in_a_thread):
    handler = _reading_handler(loop_in_a_thread)
    processor = _Processor()
    _stop_output_handler(handler, processor)
    assert handler.done() and handler.cancelled()  # before the engine process is told to go
    assert processor.errors == ["EngineDeadError"]


def test_in_the_handlers_own_loop_it_is_cancelled_at_once(loop_in_a_thread):
    handler = _reading_handler(loop_in_a_thread)
    processor = _Processor()

    async def stop_here() -> bool:
        _stop_output_handler(handler, processor)
        return handler.cancelling() > 0  # done once the loop runs it, after the caller's shutdown

    assert asyncio.run_coroutine_threadsafe(stop_here(), loop_in_a_thread).result(5)
    assert processor.errors == ["EngineDeadError"]


def test_a_loop_that_no_longer_runs_is_not_waited_for():
    loop = asyncio.new_event_loop()
    handler = loop.create_task(asyncio.Event().wait())  # never started: the loop is not running
    processor = _Processor()
    _stop_output_handler(handler, processor)  # returns at once, no timeout
    assert processor.errors == [] and not handler.done()
    handler.cancel()
    loop.run_until_complete(asyncio.gather(handler, return_exceptions=True))
    loop.close()
