"""One engine actor's vLLM engine: kept alive, replaced when it dies, and rows that kill it found.

Every row's try runs on the engine through `EngineSupervisor.answer`. The supervisor

- **replaces a dead engine once**, in a thread (the event loop goes on), and every row that was in the
  engine when it died is taken out of it at once (none waits on a dead engine);
- **counts a try only when the row ran**: a row that arrives while the engine is dead or being
  replaced waits for the new engine;
- **treats an engine that makes no progress as dead**: rows in it and no output for `stall_timeout_s`;
- **finds rows that kill every engine in few deaths**: the rows in an engine when it died are suspects.
  They are split in PARTS parts, and each part runs *alone* (new rows held back, what is in flight
  finished first); a part that dies again is split again, down to single rows; the last part, when
  its siblings all ran clean, is split without being run. A row in an engine that dies while it is
  the only row in it is convicted: its record is a 500 that says so, and no other row's is. k such
  rows among N in flight cost at most about k x (1 + log4(N)) engine deaths, not N.

The engine itself is anything with `complete(body, request)`, `load_adapters()`, `errored`,
`last_output_at` and `shutdown()` (pipeline.engine.CompletionEngine), started by a blocking function
the actor gives; the supervisor imports no vLLM.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from pipeline.engine.completion_engine import Answer, EngineDeadError
from pipeline.protocol import error_body

log = logging.getLogger(__name__)
WATCH_S = 1.0  # how often the watchdog looks at the engine


class EngineUnavailable(RuntimeError):
    """No engine could be started: the rows waiting for one are not answered (their shards fail and a
    rerun answers them), never recorded as errors."""


@dataclass(eq=False)
class Row:
    """One row's request as it goes through engines; `request` is what `prepared_by`'s prepare made."""

    body: dict[str, Any]
    request: Any = None
    prepared_by: Any = None
    deaths: int = 0  # engines that died while this row was in them
    last_death: str = ""
    verdict: asyncio.Future | None = None  # while a suspect: its answer, from the isolation runs
    convicted: bool = False  # it killed an engine it was alone in: its answer is the 500 that says so
    meter: Any = None  # its job's meter on this actor (an actor that answers several jobs); None: the actor's


_DIED = object()  # a try's outcome: the engine died while the row was in it


@dataclass
class _Gate:
    """Who may put rows into the engine: everyone (shared), or one isolation run (exclusive), and only
    while an engine is up. State changes wake every waiter, which looks again."""

    up: bool = True
    shared: int = 0
    exclusive: bool = False
    wanted: bool = False  # an isolation run is waiting or running: new shared rows are held back
    broken: BaseException | None = None
    _waiters: list[asyncio.Future] = field(default_factory=list)

    def changed(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self.broken is not None:
                raise EngineUnavailable(
                    f"no vLLM engine could be started on this actor ({type(self.broken).__name__}: {self.broken}); "
                    "the rows waiting for it were not answered (a rerun answers them)")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class EngineSupervisor:
    """The actor's engine, its replacements, and the rows in it (see the module's docstring)."""

    def __init__(self, engine: Any, start: Callable[[], Any], *, row_retries: int, retry_backoff_s: float,
                 stall_timeout_s: float, meter: Any) -> None:
        self.engine = engine
        self.generation = 1
        self._start = start  # blocking: starts an engine (with its own retries) or raises
        self._row_retries = row_retries
        self._backoff = retry_backoff_s
        self._stall_timeout = stall_timeout_s
        self._meter = meter
        self._gate = _Gate()
        self._in_engine: dict[asyncio.Future, tuple[Row | None, asyncio.Future]] = {}
        self._busy_since = time.monotonic()  # when the engine last went from empty to busy
        self._isolated = -1  # the generation an isolation run is on
        self._suspects: collections.deque[_SuspectGroup] = collections.deque()
        self._isolating: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._replacing: asyncio.Task | None = None

    # --- a row ------------------------------------------------------------------------------------

    async def answer(self, row: Row) -> tuple[Answer, bool]:
        """The row's answer, and whether it took more than one try. A 500 from a live engine is tried
        `row_retries` times again after a jittered backoff; an engine death makes the row a suspect."""
        retried = False
        answered_500 = 0
        while True:
            outcome = await self._shared_try(row)
            if outcome is _DIED:
                retried = True
                outcome = await row.verdict
                row.verdict = None
            answer: Answer = outcome
            if answer.error is None or answer.error["code"] < 500 or row.convicted:
                return answer, retried
            if answered_500 == self._row_retries:
                if answered_500:
                    answer.error["message"] += f" (this request was tried {answered_500 + 1} times)"
                return answer, retried
            answered_500 += 1
            retried = True
            await asyncio.sleep(self._backoff * 2 ** (answered_500 - 1) * random.uniform(0.5, 1.5))

    async def load_adapters(self) -> None:
        """Load the model's adapters into the engine (once per engine); an engine that dies meanwhile
        is replaced and the loading tried on the new one, `row_retries` times."""
        for _ in range(self._row_retries + 1):
            await self.ready()
            async with self._shared():
                outcome = await self._on_engine(self.engine, self.generation, None, lambda e: e.load_adapters())
            if outcome is not _DIED:
                return
        raise EngineUnavailable(f"the engine died while loading the adapters, {self._row_retries + 1} times")

    async def ready(self) -> None:
        """Wait for an engine; one whose start failed for an earlier shard is started again."""
        if self._gate.broken is not None and self._replacing is None:
            self._gate.broken = None
            self._gate.up = False
            self._replacing = asyncio.ensure_future(self._replace(None))
        await self._gate.until(lambda: self._gate.up)

    async def _shared_try(self, row: Row) -> Any:
        async with self._shared():
            return await self._on_engine(self.engine, self.generation, row, self._completion(row))

    def _shared(self) -> "_SharedEntry":
        return _SharedEntry(self)

    @staticmethod
    def _completion(row: Row) -> Callable[[Any], Awaitable[Any]]:
        return lambda engine: engine.complete(row.body, row.request if row.prepared_by is engine else None)

    async def _on_engine(self, engine: Any, generation: int, row: Row | None,
                         call: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `call(engine)` as a task the supervisor can take out of a dead engine: its result, or
        _DIED. The row waits on `settled`, which a death settles at once, whatever the task still does."""
        self._start_watchdog()
        if not self._in_engine:
            self._busy_since = time.monotonic()
        task = asyncio.ensure_future(call(engine))
        settled = asyncio.get_running_loop().create_future()
        task.add_done_callback(lambda t: _settle(settled, t))
        self._in_engine[task] = (row, settled)
        meter = row.meter if row is not None and row.meter is not None else self._meter
        meter.enter()
        try:
            return await settled
        except EngineDeadError as exc:
            self._died(generation, str(exc))
            if row is not None and row.verdict is None:  # it failed after its engine's death was handled
                row.deaths += 1
                self._suspect([row])
            return _DIED
        except asyncio.CancelledError:
            task.cancel()  # the row itself was cancelled (its shard failed): nothing is left running
            raise
        finally:
            meter.leave()
            self._in_engine.pop(task, None)

    # --- deaths ------------------------------------------------------------------------------------

    def _died(self, generation: int, reason: str) -> None:
        """The engine of `generation` died (once per engine, whoever noticed): every row still in it is
        taken out and becomes a suspect, and a new engine is started."""
        if generation != self.generation or self._replacing is not None:
            return
        taken = [(task, row, settled) for task, (row, settled) in self._in_engine.items()
                 if not settled.done() or (not settled.cancelled()
                                           and isinstance(settled.exception(), EngineDeadError))]
        suspects = [row for _, row, _ in taken if row is not None]
        log.warning("the vLLM engine died (%s) with %d rows in it; starting a new one", reason, len(suspects))
        for task, row, settled in taken:
            if row is not None:
                row.deaths += 1
                row.last_death = reason
                if row.verdict is None:  # a suspect in an isolation run keeps the one its row awaits
                    row.verdict = asyncio.get_running_loop().create_future()
            if not settled.done():
                settled.set_result(_DIED)
            task.cancel()
        if len(suspects) == 1:  # the only row in the engine when it died
            self._convict(suspects[0])
        elif generation != self._isolated:  # an isolation run splits its own group when it ends
            self._suspects.extend(_split(suspects))
        self._gate.up = False
        self._gate.changed()
        self._replacing = asyncio.ensure_future(self._replace(self.engine))
        self._start_isolating()

    def _suspect(self, group: list[Row]) -> None:
        for row in group:
            row.verdict = asyncio.get_running_loop().create_future()
        self._suspects.append(_SuspectGroup(group))
        self._start_isolating()

    def _convict(self, row: Row) -> None:
        answer = Answer(error=error_body(
            f"this request kills the engine that answers it: {row.deaths} engine{'s' if row.deaths > 1 else ''} "
            f"died while it was in them, the last while it ran alone ({row.last_death}). It was not tried "
            "again; the other rows in those engines were answered.", "InternalServerError", 500))
        row.convicted = True
        if not row.verdict.done():
            row.verdict.set_result(answer)

    async def _replace(self, dead: Any) -> None:
        """Stop the dead engine and start a new one, both in threads: the event loop goes on."""
        try:
            if dead is not None:
                await asyncio.to_thread(_quietly_shut_down, dead)
            self.engine = await asyncio.to_thread(self._start)
            self.generation += 1
            self._gate.up = True
        except Exception as exc:  # noqa: BLE001 - whatever failed, no engine: the waiting rows must know
            log.error("no vLLM engine could be started: %s", exc)
            self._gate.broken = exc
        finally:
            self._replacing = None
            self._gate.changed()

    # --- isolation runs --------------------------------------------------------------------------

    def _start_isolating(self) -> None:
        if self._suspects and (self._isolating is None or self._isolating.done()):
            self._isolating = asyncio.ensure_future(self._isolate())
            self._gate.wanted = True
            self._gate.changed()

    async def _isolate(self) -> None:
        """Run each group of suspects alone on a live engine, one group after another."""
        gate = self._gate
        try:
            while self._suspects:
                part = self._suspects.popleft()
                group = part.rows
                if part.implicated() and len(group) > 1:
                    self._suspects.extendleft(reversed(_split(group)))  # its siblings ran clean: no need to run it whole
                    continue
                try:
                    await gate.until(lambda: gate.up and gate.shared == 0)
                except EngineUnavailable as exc:
                    for row in group:
                        row.verdict.set_exception(exc)
                    continue
                engine, generation = self.engine, self.generation
                verdicts = [row.verdict for row in group]  # a row clears its own once it has it
                gate.exclusive, self._isolated = True, generation
                try:
                    outcomes = await asyncio.gather(*(self._on_engine(engine, generation, row, self._completion(row))
                                                      for row in group), return_exceptions=True)
                finally:
                    gate.exclusive, self._isolated = False, -1
                died = []
                for row, verdict, outcome in zip(group, verdicts, outcomes):
                    if verdict.done():
                        continue  # convicted: it died alone
                    if outcome is _DIED:
                        died.append(row)
                    elif isinstance(outcome, BaseException):
                        verdict.set_exception(outcome)  # a bug: the row's own 500, as in a shared try
                    else:
                        verdict.set_result(outcome)
                if part.family is not None:
                    part.family.ran(died=bool(died))
                self._suspects.extendleft(reversed(_split(died)))  # next: each part alone
        finally:
            gate.wanted = False
            gate.changed()

    # --- the watchdog ----------------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Every WATCH_S: an engine vLLM knows is dead, or one with rows in it that gave no output for
        `stall_timeout_s`, is treated as dead (rows taken out, engine replaced)."""
        while True:
            await asyncio.sleep(WATCH_S)
            if not self._in_engine or self._replacing is not None:
                continue
            engine, generation = self.engine, self.generation
            if engine.errored:
                self._died(generation, "vLLM engine died: its engine core process exited")
                continue
            quiet = time.monotonic() - max(engine.last_output_at, self._busy_since)
            if quiet > self._stall_timeout:
                log.error("the vLLM engine gave no output for %.0f s with %d rows in it; replacing it",
                          quiet, len(self._in_engine))
                self._died(generation, f"the engine gave no output for {quiet:.0f} s "
                                       f"(engine.stall_timeout_s is {self._stall_timeout:g})")

    def shutdown(self) -> None:
        _quietly_shut_down(self.engine)


class _SharedEntry:
    """`async with supervisor._shared()`: a row enters the engine with others, once no isolation run is
    waiting or running and an engine is up."""

    def __init__(self, supervisor: EngineSupervisor) -> None:
        self._gate = supervisor._gate

    async def __aenter__(self) -> None:
        gate = self._gate
        await gate.until(lambda: gate.up and not gate.wanted and not gate.exclusive)
        gate.shared += 1

    async def __aexit__(self, *exc: Any) -> None:
        self._gate.shared -= 1
        if self._gate.shared == 0 and self._gate.wanted:
            self._gate.changed()


PARTS = 4  # a group of suspects that killed an engine is tried again in this many parts, each alone


@dataclass
class _SuspectSplit:
    """The parts one group of suspects was split into. When all but the last ran without a death, the
    death that split them is the last part's, so it is split at once rather than run whole (one death
    fewer). If the death was not a row's (a kill from outside), that only costs runs: a row is
    convicted only by dying alone."""

    parts: int
    clean: int = 0
    died: bool = False

    def ran(self, died: bool) -> None:
        self.died |= died
        self.clean += not died


@dataclass(eq=False)
class _SuspectGroup:
    rows: list[Row]
    family: _SuspectSplit | None = None
    last: bool = False

    def implicated(self) -> bool:
        f = self.family
        return self.last and f is not None and not f.died and f.clean == f.parts - 1


def _split(rows: list[Row]) -> list[_SuspectGroup]:
    """`rows` in up to PARTS groups of near-equal size (each row alone once they are few)."""
    count = min(PARTS, len(rows))
    if count == 0:
        return []
    size, extra = divmod(len(rows), count)
    family = _SuspectSplit(count) if count > 1 else None
    groups, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        groups.append(_SuspectGroup(rows[start:end], family, last=i == count - 1))
        start = end
    return groups


def _settle(settled: asyncio.Future, task: asyncio.Future) -> None:
    """Copy a finished task's outcome to the future its row waits on (unless a death settled it)."""
    if settled.done():
        if not task.cancelled():
            task.exception()  # retrieved: a dead engine's requests fail after their rows moved on
        return
    if task.cancelled():
        settled.cancel()
    elif task.exception() is not None:
        settled.set_exception(task.exception())
    else:
        settled.set_result(task.result())


def _quietly_shut_down(engine: Any) -> None:
    try:
        engine.shutdown()
    except Exception:  # noqa: BLE001 - a dead engine is gone either way
        log.debug("shutting down the engine failed", exc_info=True)
