"""How busy the engines are, while the job runs and in its summary.

Each engine actor keeps an `EngineMeter`: the rows it answered, the output tokens, and the time its
engine had at least one row in it (busy). A thread sends the figures every few seconds to the job's
`JobStats` actor, which lives on the driver's node: nothing the job needs at its end lives in a
process that a lost node takes with it, and if the stats are lost anyway the job still finishes (the
records and their tallies are on disk; only these figures are missing).

The driver prints a progress line from the same figures (rows done/total, output tokens/s, engine
busy share, ETA) and, at the end, each engine's busy share and the job's engine utilisation.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from pipeline.reporting import metrics

log = logging.getLogger(__name__)
BEAT_S = 2.0  # how often an engine actor reports
PROGRESS_S = 5.0  # how often the driver prints a progress line (rewrites it, on a terminal)
SAME_S = 30.0  # in a log (not a terminal), a line that says nothing new is printed this often at most
QUIET_S = 60.0  # the progress line says so when no row was answered for this long


class EngineUse(BaseModel):
    """One engine (a vLLM engine process; an actor that restarts its engine has several)."""

    engine: str = Field(description="`<actor>-<n>`: the actor's id and its n-th engine.")
    node: str = Field("", description="The Ray node it ran on.")
    startup_s: float = 0.0
    rows: int = Field(0, description="Rows it answered (a row answered again after a death counts again).")
    completion_tokens: int = 0
    prompt_tokens_computed: int = Field(0, description="Prompt tokens of its rows it computed.")
    prompt_tokens_cached: int = Field(0, description=(
        "Prompt tokens of its rows it read from its prefix cache (docs/evaluation.md#a-shared-context-computed-once)."))
    busy_s: float = Field(0.0, description="Time with at least one row in the engine.")
    hardware: dict[str, Any] = Field(default_factory=dict, description=(
        "What it ran on: GPU model and count, or CPU model and cores (pipeline/engine/sizing.py)."))
    alive_s: float = Field(0.0, description="Time from its start-up's end to its end (or the job's).")
    busy_share: float = Field(0.0, description="busy_s / alive_s.")
    pool: str = Field("", description=(
        "The standing pool the engine belongs to (pool/): the job is charged busy_s, its share of the "
        "engine's busy time, not the engine's life."))

    def charged_s(self) -> float:
        """The engine time the job is charged: its own engine's start-up and life, or its share of a
        pool's engine's busy time."""
        return self.busy_s if self.pool else self.startup_s + self.alive_s


class EngineMeter:
    """Counts one actor's engine work and reports it to the job's stats actor (actor side)."""

    def __init__(self, stats: Any, actor_id: str, node: str, labels: dict[str, str] | None = None,
                 share: "EngineMeter | None" = None) -> None:
        """`labels` (job, model): the actor's live Ray metrics (reporting/metrics.py) carry them; none
        without. `share`: the meter of an actor that answers several jobs at once (an engine of a pool,
        or started before its jobs); this job's busy time is then its share of the engine's: each moment
        the engine is busy is divided between the jobs with rows in it, in proportion to their rows."""
        self._stats = stats
        self._share = share
        self._guests: dict[EngineMeter, int] = {}  # the jobs' meters sharing this one, by their rows in the engine
        self._settled_at = 0.0  # when the guests' busy time was last credited
        self._actor = actor_id
        self._node = node
        self._labels = labels
        self._generation = 0
        self._lock = threading.Lock()
        self._figures = self._fresh()
        self._in_engine = 0
        self._busy_since: float | None = None
        self._exported = self._fresh()  # this engine's figures the metrics have counted (at each beat)
        self._stopped = False
        if stats is not None:
            threading.Thread(target=self._beat_forever, daemon=True, name="engine-meter").start()

    @staticmethod
    def _fresh() -> dict[str, Any]:
        return {"rows": 0, "completion_tokens": 0, "prompt_tokens_computed": 0, "prompt_tokens_cached": 0,
                "busy_s": 0.0}

    @property
    def engine_id(self) -> str:
        return f"{self._actor}-{self._generation}"

    def _tags(self, generation: int | None = None) -> dict[str, str] | None:
        """The live metrics' labels of this actor's current engine (or its `generation`-th)."""
        if self._labels is None:
            return None
        engine = f"{self._actor}-{generation}" if generation is not None else self.engine_id
        return metrics.labels(**self._labels, engine=engine, node=self._node)

    def next_engine_tags(self) -> dict[str, str] | None:
        """The labels of the next engine this actor starts (its live metrics', and vLLM's metrics' for
        it: pipeline/engine/vllm_metrics.py); None without labels."""
        return self._tags(self._generation + 1)

    def engine_starting(self) -> None:
        """The next engine is being started (its live metrics start at 0)."""
        if (tags := self.next_engine_tags()) is not None:
            metrics.engine_starting(tags)

    def engine_started(self, startup_s: float, hardware: dict[str, Any] | None = None, counted: bool = True,
                       pool: str = "") -> None:
        """A new engine is ready: its figures start from zero. `counted=False`: an engine started
        before this job (an actor that outlives its jobs), which the live metrics counted then.
        `pool`: the standing pool it belongs to; the job is charged its share of the busy time."""
        now = time.time()
        with self._lock:
            if self._generation:
                self._send("stopped", self.engine_id, now)
            self._generation += 1
            self._figures = self._fresh()
            self._busy_since = now if self._in_engine and self._share is None else None
            self._exported = self._fresh()
        self._send("engine", self.engine_id, {"node": self._node, "startup_s": startup_s, "ready_at": now,
                                              "hardware": hardware or {}, "pool": pool})
        if counted and (tags := self._tags()) is not None:
            metrics.engine_started(tags, restart=self._generation > 1)

    def enter(self) -> None:
        if self._share is not None:
            self._share.guest_rows(self, +1)
            with self._lock:
                self._in_engine += 1
            return
        with self._lock:
            if self._in_engine == 0:
                self._busy_since = time.time()
            self._in_engine += 1

    def leave(self) -> None:
        if self._share is not None:
            self._share.guest_rows(self, -1)
            with self._lock:
                self._in_engine -= 1
            return
        with self._lock:
            self._in_engine -= 1
            if self._in_engine == 0 and self._busy_since is not None:
                self._figures["busy_s"] += time.time() - self._busy_since
                self._busy_since = None

    def guest_rows(self, guest: "EngineMeter", step: int) -> None:
        """A row of `guest`'s job entered (+1) or left (-1) the engine this meter counts."""
        with self._lock:
            self._settle(time.time())
            rows = self._guests.get(guest, 0) + step
            if rows:
                self._guests[guest] = rows
            else:
                self._guests.pop(guest, None)
        self.enter() if step > 0 else self.leave()

    def _settle(self, now: float) -> None:
        """Credit the time since the last change to the jobs with rows in the engine, in proportion to
        their rows in it (with this meter's lock held)."""
        rows = sum(self._guests.values())
        for guest, own in self._guests.items():
            guest.add_busy((now - self._settled_at) * own / rows)
        self._settled_at = now

    def settle_guests(self) -> None:
        """Credit the jobs sharing this engine with their busy time up to now."""
        with self._lock:
            self._settle(time.time())

    def add_busy(self, seconds: float) -> None:
        """This job's share of a busy stretch of the engine it shares."""
        with self._lock:
            self._figures["busy_s"] += seconds

    def busy_s(self) -> float:
        """The engine's busy time so far (a shared engine's: this job's share, as last credited)."""
        with self._lock:
            return self._figures["busy_s"] + (time.time() - self._busy_since if self._busy_since is not None else 0.0)

    def answered(self, completion_tokens: int, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """A row the engine answered: its completion tokens, and its prompt tokens, of which
        `cached_tokens` were read from the prefix cache."""
        with self._lock:
            self._figures["rows"] += 1
            self._figures["completion_tokens"] += completion_tokens
            self._figures["prompt_tokens_computed"] += prompt_tokens - cached_tokens
            self._figures["prompt_tokens_cached"] += cached_tokens

    def shard_started(self, name: str) -> None:
        self._send("shard_started", name)

    def beat(self) -> Any:
        """Send the engine's figures to the job's stats actor; returns the call's ObjectRef (None
        without a stats actor), which a caller may await to know the figures arrived."""
        if self._share is not None:  # this job's share, up to now
            self._share.settle_guests()
        now = time.time()
        with self._lock:
            figures = dict(self._figures)
            if self._busy_since is not None:
                figures["busy_s"] += now - self._busy_since
            engine = self.engine_id
            new = {name: figures[name] - self._exported[name] for name in figures}
            self._exported, in_engine = figures, self._in_engine
        sent = self._send("beat", engine, figures, now)
        if (tags := self._tags()) is not None:  # the live metrics, from the figures kept for the beat
            metrics.engine_work(tags, new["rows"], new["completion_tokens"], new["busy_s"], in_engine)
        return sent

    def stop(self) -> None:
        """No more beats (the actor took another job's meter, or stops)."""
        self._stopped = True

    def _beat_forever(self) -> None:
        while not self._stopped:
            time.sleep(BEAT_S)
            if self._generation and not self._stopped:
                self.beat()

    def _send(self, method: str, *args: Any) -> Any:
        if self._stats is None:
            return None
        try:
            return getattr(self._stats, method).remote(*args)
        except Exception:  # noqa: BLE001 - figures are best effort; the records are what matters
            log.debug("could not report %s to the job's stats actor", method, exc_info=True)


class _Stats:
    """The job's stats actor (driver's node): the latest figures of every engine."""

    def __init__(self) -> None:
        self.engines: dict[str, dict[str, Any]] = {}
        self.shard_starts: list[str] = []

    def engine(self, engine: str, info: dict[str, Any]) -> None:
        self.engines.setdefault(engine, {}).update(info, last_at=info["ready_at"])

    def beat(self, engine: str, figures: dict[str, Any], at: float) -> None:
        entry = self.engines.setdefault(engine, {})
        if at >= entry.get("last_at", 0):
            entry.update(figures, last_at=at)

    def stopped(self, engine: str, at: float) -> None:
        self.engines.setdefault(engine, {})["stopped_at"] = at

    def shard_started(self, name: str) -> None:
        self.shard_starts.append(name)

    def snapshot(self) -> dict[str, Any]:
        return {"engines": self.engines, "shard_starts": self.shard_starts}


STATS_ACTOR_PREFIX = "pipeline-stats-"


def start_stats() -> Any:
    """The stats actor, pinned to this (the driver's) node; named `pipeline-stats-<id>` so a tool (or a
    test) on the driver can read the live figures too."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(_Stats)
    return actor.options(name=STATS_ACTOR_PREFIX + uuid.uuid4().hex[:8],
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


def snapshot(stats: Any, last: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stats actor's figures; the last ones known (or none) if it cannot answer."""
    import ray

    try:
        return ray.get(stats.snapshot.remote(), timeout=30)
    except Exception as exc:  # noqa: BLE001 - the job does not depend on these figures
        log.warning("the job's engine statistics are incomplete (%s); the records are not affected", exc)
        return last or {"engines": {}, "shard_starts": []}


@dataclass(frozen=True)
class EngineRun:
    """What one model's engine actors reported in a run, beyond the records and tallies they wrote."""

    engines: list[EngineUse]
    shard_starts: list[str]  # one per attempt: a shard started twice was redone after its actor died
    failed: dict[str, str]  # shard -> why it has no records
    first_ready_at: float | None

    @classmethod
    def of(cls, snap: dict[str, Any], end: float, failed: dict[str, str]) -> "EngineRun":
        """From the stats actor's last figures (`snapshot`)."""
        ready = [e["ready_at"] for e in snap["engines"].values() if "ready_at" in e]
        return cls(engine_use(snap["engines"], end), snap["shard_starts"], failed, min(ready) if ready else None)


def engine_use(engines: dict[str, dict[str, Any]], end: float) -> list[EngineUse]:
    """Each engine's busy share. An engine still reporting near the end was alive until the end; one
    that stopped (replaced after a death) or went silent (its actor or node was lost) until then."""
    used = []
    for name, e in sorted(engines.items()):
        if "ready_at" not in e:
            continue
        until = e.get("stopped_at") or (end if end - e["last_at"] <= 3 * BEAT_S else e["last_at"])
        alive = max(until - e["ready_at"], 0.0)
        busy = min(e.get("busy_s", 0.0), alive)
        used.append(EngineUse(engine=name, node=e.get("node", ""), startup_s=round(e.get("startup_s", 0.0), 3),
                              hardware=e.get("hardware", {}),
                              rows=e.get("rows", 0), completion_tokens=e.get("completion_tokens", 0),
                              prompt_tokens_computed=e.get("prompt_tokens_computed", 0),
                              prompt_tokens_cached=e.get("prompt_tokens_cached", 0),
                              busy_s=round(busy, 3), alive_s=round(alive, 3),
                              busy_share=round(busy / alive, 4) if alive else 0.0, pool=e.get("pool", "")))
    return used


def utilisation(used: list[EngineUse]) -> float:
    """The job's engine utilisation: busy time over alive time, all engines together."""
    alive = sum(u.alive_s for u in used)
    return round(sum(u.busy_s for u in used) / alive, 4) if alive else 0.0


class ProgressLine:
    """Prints `rows done/total, output tokens/s, engines busy, ETA` every few seconds (driver side)."""

    def __init__(self, stats: Any, total_rows: int, done_rows: int = 0, interval_s: float = PROGRESS_S,
                 started: float | None = None) -> None:
        """`done_rows` of `total_rows` were answered before this line started (a sweep's earlier models),
        at `started` (the job's start: the clock the line shows; default now)."""
        self._stats = stats
        self._total = total_rows
        self._done_before = done_rows
        self._interval = interval_s
        self._stop = threading.Event()
        self._started = started if started is not None else time.time()
        self._history: list[tuple[float, int, int]] = []  # (time, rows, tokens)
        self._moved_at = (time.time(), done_rows)  # when the rows done last changed, and to what
        self.last: dict[str, Any] | None = None
        self._key: tuple = ()  # what the last line rendered says, without its clock and rates
        self._printed: tuple[float, tuple] = (float("-inf"), ())
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress-line")

    def __enter__(self) -> "ProgressLine":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        in_place = sys.stdout.isatty()
        while not self._stop.wait(self._interval):
            self.last = snapshot(self._stats, self.last)
            now = time.time()
            line = self.render(self.last, now)
            if in_place:
                print("\r\x1b[K" + line, end="", flush=True)
            elif self.news(now):
                print(line, flush=True)
        if in_place:
            print(flush=True)

    def news(self, now: float) -> bool:
        """Whether the line just rendered is worth a line of its own: rows moved, engines came or went,
        or SAME_S passed (start-up, a long stretch without an answer)."""
        if self._key != self._printed[1] or now - self._printed[0] >= SAME_S:
            self._printed = (now, self._key)
            return True
        return False

    def render(self, snap: dict[str, Any], now: float) -> str:
        engines = snap["engines"].values()
        rows = min(self._total, self._done_before + sum(e.get("rows", 0) for e in engines))
        tokens = sum(e.get("completion_tokens", 0) for e in engines)
        self._history = [h for h in self._history if now - h[0] <= 30] + [(now, rows, tokens)]
        # the rates are from the moment the first engine came up (what was done then: the last line
        # before it), or over the last 30 s, whichever is later
        ready = min((e["ready_at"] for e in snap["engines"].values() if "ready_at" in e), default=None)
        before = [h for h in self._history if ready is not None and h[0] < ready]
        since = [h for h in self._history if ready is not None and h[0] >= ready]
        first = (ready, *before[-1][1:]) if before else since[0] if since else self._history[-1]
        span = now - first[0]
        tok_s = (tokens - first[2]) / span if span > 0 else 0.0
        row_s = (rows - first[1]) / span if span > 0 else 0.0
        eta = f"{int((self._total - rows) / row_s) // 60}:{int((self._total - rows) / row_s) % 60:02d}" \
            if row_s > 0 else "--"
        used = engine_use(snap["engines"], now)
        live = [u for u in used if u.alive_s and now - snap["engines"][u.engine].get("last_at", 0) <= 3 * BEAT_S]
        engines = (f"{len(live)} engine{'s' if len(live) != 1 else ''} {utilisation(live):.0%} busy" if live
                   else "engines starting")
        restarts = sum(1 for name in snap["engines"] if not name.endswith("-1"))
        if restarts:
            engines += f" | {restarts} engine restart{'s' if restarts != 1 else ''}"
        if rows != self._moved_at[1]:
            self._moved_at = (now, rows)
        quiet = now - max(self._moved_at[0], ready or now)
        if quiet >= QUIET_S and rows < self._total:
            engines += f" | nothing answered for {quiet:.0f}s"
        self._key = (rows, len(live), restarts, quiet >= QUIET_S)
        pct = rows / self._total if self._total else 1.0
        return (f"progress: {rows:,}/{self._total:,} rows ({pct:.0%}) | {tok_s:,.0f} output tok/s | {engines} | "
                f"ETA {eta} | {now - self._started:.0f}s")
