"""The engine supervisor's plumbing, with a fake engine: deaths, hangs, isolation runs, start failures.

A fake engine is the right tool here only because it can die in the worst way on cue: when a poison
row runs, the engine dies and every other request in it waits forever (what vLLM does when its output
handler never sees the death: issue 21's hang). The real engine's deaths are in
tests/integration/test_poison_rows.py.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time

import pytest

from pipeline.engine import supervisor as supervisor_module
from pipeline.engine.completion_engine import Answer, EngineDeadError
from pipeline.engine.supervisor import EngineSupervisor, EngineUnavailable, Row


class Meter:
    def enter(self) -> None: ...
    def leave(self) -> None: ...


class Fleet:
    """Every fake engine started, and what the poison rows met."""

    def __init__(self, *, noticed: bool = True, start_failures: int = 0, hang_on: str | None = None) -> None:
        self.engines: list[FakeEngine] = []
        self.noticed = noticed  # the poison row's own request raises EngineDeadError (else only `errored` tells)
        self.start_failures = start_failures
        self.hang_on = hang_on  # a prompt that makes the engine stop giving output, alive
        self.fatal_runs: list[tuple[str, int]] = []  # (poison prompt, requests in the engine when it died)
        self.most_in_engine = 0

    def start(self) -> "FakeEngine":
        if self.start_failures:
            self.start_failures -= 1
            raise RuntimeError("no memory for the KV cache")
        engine = FakeEngine(self)
        self.engines.append(engine)
        return engine


class FakeEngine:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.errored = False
        self.last_output_at = time.monotonic()
        self.in_engine = 0
        self.answered = 0
        self._dead = asyncio.Event()

    async def load_adapters(self) -> None:
        return None

    async def complete(self, body: dict, request: object = None) -> Answer:
        if self.errored:
            raise EngineDeadError("vLLM engine died: dead already")
        self.in_engine += 1
        self.fleet.most_in_engine = max(self.fleet.most_in_engine, self.in_engine)
        try:
            await asyncio.sleep(random.uniform(0.001, 0.01))
            if body["prompt"].startswith("poison"):
                self.fleet.fatal_runs.append((body["prompt"], self.in_engine))
                self.errored = True
                self._dead.set()
                if self.fleet.noticed:
                    raise EngineDeadError("vLLM engine died: EngineCore encountered an issue")
            if body["prompt"] == self.fleet.hang_on or self.errored:
                await asyncio.Event().wait()  # never answered: the engine is dead or stuck
            if body["prompt"] == "500":
                return Answer(error={"message": "internal", "type": "InternalServerError", "param": None, "code": 500})
            self.last_output_at = time.monotonic()
            self.answered += 1
            return Answer(response={"text": body["prompt"]})
        finally:
            self.in_engine -= 1

    def shutdown(self) -> None:
        self.errored = True


def supervise(fleet: Fleet, stall_timeout_s: float = 60.0, row_retries: int = 2) -> EngineSupervisor:
    return EngineSupervisor(fleet.start(), fleet.start, row_retries=row_retries, retry_backoff_s=0.001,
                            stall_timeout_s=stall_timeout_s, meter=Meter())


async def answer_all(supervisor: EngineSupervisor, prompts: list[str]) -> list[tuple[Answer, bool]]:
    rows = [Row({"prompt": p}) for p in prompts]
    return await asyncio.wait_for(asyncio.gather(*(supervisor.answer(r) for r in rows)), timeout=60)


@pytest.fixture(autouse=True)
def quick_watchdog(monkeypatch):
    monkeypatch.setattr(supervisor_module, "WATCH_S", 0.02)


@pytest.mark.parametrize("noticed", [True, False], ids=["death-raised", "death-seen-by-the-watchdog"])
def test_poison_rows_are_the_only_500s_and_each_died_alone(noticed):
    random.seed(1)
    prompts = [f"row {i}" for i in range(400)]
    for n, at in enumerate((17, 201, 388)):
        prompts[at] = f"poison {n}"
    fleet = Fleet(noticed=noticed)
    answers = asyncio.run(answer_all(supervise(fleet), prompts))
    failed = {p for p, (a, _) in zip(prompts, answers) if a.error is not None}
    assert failed == {"poison 0", "poison 1", "poison 2"}
    assert all(a.response == {"text": p} for p, (a, _) in zip(prompts, answers) if not p.startswith("poison"))
    # each poison row's last run was alone in its engine, and convicted it
    for n in range(3):
        runs = [in_engine for prompt, in_engine in fleet.fatal_runs if prompt == f"poison {n}"]
        assert runs[-1] == 1
    # deaths grow with k x log2(N), not with N: at most 1 + ceil(log2(400)) per poison row
    deaths = len(fleet.engines) - 1
    assert deaths <= 3 * (1 + math.ceil(math.log2(400))), deaths
    message = next(a.error["message"] for p, (a, _) in zip(prompts, answers) if p == "poison 1")
    assert "kills the engine" in message and "ran alone" in message
    # it counts every engine that died while it was in it (another poison row's deaths too)
    assert int(re.search(r"(\d+) engines? died while it was in them", message)[1]) >= \
        len([run for run in fleet.fatal_runs if run[0] == "poison 1"])


def test_the_hang_a_dead_engine_leaves_is_broken_without_the_watchdog_too(monkeypatch):
    """The issue-21 hang: the first row to notice a death notices it by `errored`, and every request in
    the dead engine waits forever. The rows are taken out of the engine by the death itself."""
    fleet = Fleet(noticed=True)
    prompts = [f"row {i}" for i in range(50)] + ["poison"]
    supervisor = supervise(fleet)
    monkeypatch.setattr(supervisor_module, "WATCH_S", 3600)  # no watchdog: only the death noticed by the poison row
    answers = asyncio.run(answer_all(supervisor, prompts))
    assert [a.error is None for a, _ in answers] == [True] * 50 + [False]


def test_a_row_arriving_while_the_engine_is_replaced_waits_and_is_not_a_try():
    fleet = Fleet()
    slow_start = fleet.start

    def start_slowly():
        time.sleep(0.3)
        return slow_start()

    supervisor = EngineSupervisor(fleet.start(), start_slowly, row_retries=0, retry_backoff_s=0,
                                  stall_timeout_s=60, meter=Meter())

    async def scenario():
        died = asyncio.ensure_future(supervisor.answer(Row({"prompt": "poison"})))
        await asyncio.sleep(0.1)  # the poison row killed the engine; the new one is starting
        late = Row({"prompt": "late"})
        answer, retried = await supervisor.answer(late)
        return answer, retried, late.deaths, await died

    answer, retried, deaths, (poison, _) = asyncio.run(scenario())
    assert answer.response == {"text": "late"} and not retried and deaths == 0
    assert poison.error["code"] == 500 and "1 engine died" in poison.error["message"]


def test_an_engine_that_gives_no_output_is_replaced_and_its_rows_answered():
    fleet = Fleet(hang_on="stuck")
    supervisor = supervise(fleet, stall_timeout_s=0.3)
    prompts = [f"row {i}" for i in range(30)] + ["stuck"]
    answers = asyncio.run(answer_all(supervisor, prompts))
    assert all(a.error is None for a, _ in answers[:30])
    stuck = answers[30][0].error
    assert stuck["code"] == 500 and "gave no output" in stuck["message"]
    assert "engine.stall_timeout_s" in stuck["message"]


def test_rows_waiting_for_an_engine_that_cannot_start_are_not_answered():
    # the other rows are still in the engine when the poison row kills it (they wait there), so
    # they need another engine: were they all answered first, the poison row would be alone in the
    # engine it killed and a 500 at once, with no engine to wait for (1 time in 11 with random timing)
    fleet = Fleet(start_failures=10, hang_on="waiting")
    supervisor = EngineSupervisor(FakeEngine(fleet), fleet.start, row_retries=0, retry_backoff_s=0,
                                  stall_timeout_s=60, meter=Meter())
    with pytest.raises(EngineUnavailable, match="no memory for the KV cache"):
        asyncio.run(answer_all(supervisor, ["poison"] + ["waiting"] * 10))

    fleet.start_failures = 0  # the next shard tries again, and gets an engine

    async def next_shard():
        await supervisor.load_adapters()
        return await supervisor.answer(Row({"prompt": "later"}))

    answer, _ = asyncio.run(next_shard())
    assert answer.response == {"text": "later"}


def test_a_500_is_tried_again_row_retries_times():
    fleet = Fleet()
    (answer, retried), = asyncio.run(answer_all(supervise(fleet, row_retries=2), ["500"]))
    assert retried and answer.error["code"] == 500 and "tried 3 times" in answer.error["message"]
    assert len(fleet.engines) == 1  # a 500 is no death


def test_deaths_of_one_poison_row_among_many_in_flight_are_logarithmic():
    counts = {}
    for rows in (16, 256):
        random.seed(2)
        fleet = Fleet()
        prompts = [f"row {i}" for i in range(rows)]
        prompts[rows // 3] = "poison"
        asyncio.run(answer_all(supervise(fleet), prompts))
        counts[rows] = len(fleet.engines) - 1
    assert counts[256] <= counts[16] + 5, counts  # 16x the rows in flight: a handful more deaths at most
    assert all(n <= 1 + math.ceil(math.log2(rows)) for rows, n in counts.items()), counts

