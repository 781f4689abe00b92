"""The pool's keeper: a detached, named Ray actor that owns a pool's engine actors.

    python -m pipeline engines start --name NAME   -> PoolKeeper `NAME` (namespace NAMESPACE, detached)
                                                        owns engine.num_actors EngineActors (and their
                                                        placement groups), restarted by Ray when killed
    a job with engine.pool: NAME                    -> asks the keeper for its engines (attach), hands
                                                        them its shards itself (engine/shard_calls.py)
    engines stop NAME, or idle for idle_stop_s      -> engines stopped, actors and placement groups gone

Why detached actors and not a Ray Serve deployment (ray.data.llm's ServeDeploymentProcessorConfig):
a job's engine actor already is the unit that keeps every guarantee (a shard answered and written
once, poison rows isolated, a dead or stalled engine replaced, the job's meter and metrics); a
standing pool is the same actors, outliving their job, called the same way. Serve would put an HTTP
proxy and a request router between the job and those actors, route rows one by one (a shard's
records and tally are written by the actor that answered them), and add a dependency the CPU and
GPU installs do not carry. What a pool holds while idle is what `engines status` shows: its engine
actors, their accelerators and (GPU layouts) placement groups, and this keeper (0 CPUs).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.engine.shard_calls import standing_actors
from pipeline.engine.work import EngineJob

log = logging.getLogger(__name__)
NAMESPACE = "batch-completions-pools"  # the pools' keepers are named actors in this Ray namespace
IDLE_CHECK_S = 5.0
STATUS_WAIT_S = 5.0  # an engine that does not answer `status` in this long is starting (or lost)


@dataclass(frozen=True)
class PoolSpec:
    """What `engines start` hands the keeper."""

    name: str
    job: EngineJob  # the engines' model, engine settings and request defaults (no input or output)
    idle_stop_s: float | None  # stop after this long without a shard in flight; None: never


@dataclass(frozen=True)
class EngineStatus:
    actor: str  # its place in the pool: "1 of 2"
    ready: bool
    engine: str = ""
    model: str = ""
    node: str = ""
    pid: int = 0  # the actor's process
    busy_share: float = 0.0  # of its time since its actor started
    jobs_served: int = 0
    shards_in_flight: int = 0
    idle_s: float = 0.0
    alive_s: float = 0.0


@dataclass(frozen=True)
class PoolStatus:
    name: str
    model: str
    adapters: list[str]
    idle_stop_s: float | None
    up_s: float
    jobs_attached: int  # jobs that attached since the pool started
    engines: list[EngineStatus]

    def idle_s(self) -> float:
        """How long no engine of the pool has had a shard in flight (0 while any has, or is starting)."""
        if not self.engines or not all(e.ready for e in self.engines):
            return 0.0
        return min(e.idle_s for e in self.engines)


class PoolKeeper:
    """A threaded actor (its calls may overlap: status while a stop goes on)."""

    def __init__(self, spec: PoolSpec) -> None:
        self._spec = spec
        self._started_at = time.time()
        self._attached = 0
        self._stopped = False
        # owned by this detached actor: they, and their placement groups, live as long as it does
        self._engines, self._groups = standing_actors(spec.job)
        if spec.idle_stop_s is not None:
            threading.Thread(target=self._stop_when_idle, daemon=True, name="idle-stop").start()

    def spec(self) -> PoolSpec:
        return self._spec

    def attach(self) -> list[Any] | None:
        """The engine actors, for a job that will call them; None once the pool is stopping."""
        if self._stopped:
            return None
        self._attached += 1
        return list(self._engines)

    def wait_ready(self, timeout_s: float) -> list[EngineStatus]:
        """Block until every engine has started (or `timeout_s`); their status."""
        import ray

        ray.wait([e.status.remote() for e in self._engines], num_returns=len(self._engines), timeout=timeout_s)
        return self.status().engines

    def status(self) -> PoolStatus:
        import ray

        calls = {e: e.status.remote() for e in self._engines}
        ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=STATUS_WAIT_S)
        engines = []
        for number, call in enumerate(calls.values(), start=1):
            name = f"{number} of {len(calls)}"
            try:
                figures = ray.get(call, timeout=0) if call in ready else None
            except Exception:  # noqa: BLE001 - an actor being restarted: starting
                figures = None
            if figures is None:
                engines.append(EngineStatus(actor=name, ready=False))
                continue
            engines.append(EngineStatus(actor=name, ready=True, **{k: figures[k] for k in (
                "engine", "model", "node", "pid", "busy_share", "jobs_served", "shards_in_flight", "idle_s", "alive_s")}))
        model = self._spec.job.config.model
        return PoolStatus(name=self._spec.name, model=model.resolved_served_name(), adapters=sorted(model.adapters),
                          idle_stop_s=self._spec.idle_stop_s, up_s=round(time.time() - self._started_at, 1),
                          jobs_attached=self._attached, engines=engines)

    def stop(self) -> None:
        """Stop the engines, kill their actors, remove their placement groups. The caller kills the
        keeper itself (`ray.kill`) once this returns."""
        import ray

        self._stopped = True
        try:
            ray.get([e.stop.remote() for e in self._engines], timeout=120)
        except Exception:  # noqa: BLE001 - an actor that cannot stop its engine is killed all the same
            log.warning("an engine actor did not stop its engine", exc_info=True)
        for engine in self._engines:
            ray.kill(engine, no_restart=True)
        for group in self._groups:
            ray.util.remove_placement_group(group)
        self._engines, self._groups = [], []

    def _stop_when_idle(self) -> None:
        import ray

        while not self._stopped:
            time.sleep(IDLE_CHECK_S)
            try:
                idle = self.status().idle_s()
            except Exception:  # noqa: BLE001 - look again next time
                log.debug("could not read the pool's status", exc_info=True)
                continue
            if idle >= self._spec.idle_stop_s and not self._stopped:
                log.info("pool %s idle for %.0f s (idle-stop %.0f s): stopping", self._spec.name, idle,
                         self._spec.idle_stop_s)
                self.stop()
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
