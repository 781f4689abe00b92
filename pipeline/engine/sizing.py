"""How the work meets the cluster: the shard size, the engine actor pool, and how many shards each
actor works on at once so that its engine stays full whatever the shard size.

A shard is the unit of output, of resume and of retry; an engine wants `max_num_seqs` rows running and
more waiting. The two are decoupled here: shards are sized so every actor gets several (small jobs
too), and an actor takes as many shards at once as it needs to hold `rows_in_flight` rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from pipeline.config import EngineConfig

SHARDS_PER_ACTOR = 4  # so the last shards leave little idle at the tail, and a lost actor redoes little
MIN_SHARD_ROWS = 16
MAX_SHARD_ROWS = 4096  # a sensible file: 4,096 records of a few KiB each
MAX_SHARDS_AT_ONCE = 64


def shard_rows(rows: int, actors: int) -> int:
    """The default rows per shard for `rows` input rows and at most `actors` engine actors."""
    wanted = math.ceil(rows / (max(actors, 1) * SHARDS_PER_ACTOR))
    return max(MIN_SHARD_ROWS, min(MAX_SHARD_ROWS, wanted))


def rows_in_flight(engine: EngineConfig) -> int:
    """Rows an actor keeps in its engine: by default `max_num_seqs` running and as many waiting."""
    return engine.rows_in_flight or 2 * engine.max_num_seqs


def shards_at_once(engine: EngineConfig, mean_shard_rows: float) -> int:
    """Shards one actor works on together: enough to hold `rows_in_flight` rows, and at least 2 so
    the next shard's rows are already in the engine while a shard's last rows finish."""
    if engine.shards_in_flight is not None:
        return engine.shards_in_flight
    needed = math.ceil(rows_in_flight(engine) / max(mean_shard_rows, 1)) + 1
    return max(2, min(MAX_SHARDS_AT_ONCE, needed))


def actor_pool(engine: EngineConfig, work_items: int, mean_shard_rows: float) -> Any:
    """Ray Data's actor pool: fixed, or elastic between `num_actors: [min, max]`; never more actors than
    work items. Each actor takes `shards_at_once` calls concurrently (the actor is async)."""
    from ray.data import ActorPoolStrategy

    low, high = engine.actor_range()
    high = max(1, min(high, work_items))
    low = min(low, high)
    at_once = shards_at_once(engine, mean_shard_rows)
    bounds = {"size": high} if low == high else {"min_size": low, "max_size": high}
    return ActorPoolStrategy(**bounds, max_tasks_in_flight_per_actor=at_once,
                             max_concurrent_calls_per_actor=at_once)


def vllm_value(engine: EngineConfig, name: str) -> Any:
    """An `engine.vllm` argument by its underscore name, however it was spelled (dashes or underscores)."""
    return next((v for k, v in engine.vllm.items() if k.replace("-", "_") == name), None)


def parallel(engine: EngineConfig) -> tuple[int, int]:
    """(tensor parallel, pipeline parallel): the GPU processes of one engine are their product."""
    return engine.tensor_parallel_size, int(vllm_value(engine, "pipeline_parallel_size") or 1)


def executor(engine: EngineConfig) -> str | None:
    """vLLM's executor for the engine's processes when the job chooses it: `ray` for a GPU engine that
    spans pipeline stages (its stages may sit on other nodes) or that the user put on Ray's executor;
    None (vLLM's choice: one process, or its multiprocessing executor for tensor parallel within the
    actor's node, which costs no Ray round trips) otherwise."""
    chosen = vllm_value(engine, "distributed_executor_backend")
    if engine.resolved_device() != "gpu":
        return chosen
    return chosen or ("ray" if parallel(engine)[1] > 1 else None)


def placement(engine: EngineConfig) -> dict[str, Any] | None:
    """The placement group one GPU engine on vLLM's Ray executor reserves, as ray.data.llm does: a bundle
    of 1 GPU and 1 CPU per process (TP x PP), PACK: Ray fills a node before it uses the next, so a
    tensor-parallel group shares a node and pipeline stages spread over nodes when one cannot hold them
    all (vLLM's Ray executor gives ranks by node, the driver's node first). None: the engine's GPUs are
    the actor's own reservation (one node)."""
    if engine.resolved_device() != "gpu" or executor(engine) != "ray":
        return None
    tp, pp = parallel(engine)
    return {"bundles": [{"GPU": 1, "CPU": 1} for _ in range(tp * pp)], "strategy": "PACK"}


def actor_resources(engine: EngineConfig) -> dict[str, Any]:
    """What each engine actor asks Ray for (Ray Data's `map_batches` arguments)."""
    layout = placement(engine)
    if layout is not None:
        # The actor and vLLM's workers (placement_group_capture_child_tasks) live in a placement group
        # made for each actor; a replaced actor gets a new one. The actor takes a CPU of a bundle.
        return {"num_gpus": 0, "num_cpus": 1, "ray_remote_args_fn": functools.partial(engine_placement_group, layout)}
    if engine.resolved_device() == "gpu":
        # One GPU per tensor-parallel rank; vLLM's TP workers share the actor's reservation.
        return {"num_gpus": engine.tensor_parallel_size, "num_cpus": 1}
    return {"num_cpus": engine.cpus_per_actor}


def engine_placement_group(layout: dict[str, Any]) -> dict[str, Any]:
    """A new placement group for one engine actor (called by Ray Data as it starts each actor)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group(**layout)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def describe(engine: EngineConfig) -> str:
    """What each engine reserves and where it may go, in a line (`validate` prints it)."""
    low, high = engine.actor_range()
    if low != high:
        count = f"{low} to {high} engines (elastic)"
    else:
        count = f"{low} engine" if low == 1 else f"{low} engines"
    tp, pp = parallel(engine)
    if engine.resolved_device() != "gpu":
        return f"{count}, each 1 actor of {engine.cpus_per_actor:g} CPU on any node (CPU engine)"
    layout = placement(engine)
    if layout is None:
        if tp == 1:
            return f"{count}, each 1 actor of 1 GPU + 1 CPU on any node"
        return f"{count}, each 1 actor of {tp} GPU + 1 CPU on one node (tensor parallel {tp}, vLLM's multiprocessing executor)"
    return (f"{count}, each a placement group of {tp * pp} bundles {{GPU: 1, CPU: 1}}, PACK "
            f"(tensor parallel {tp} x pipeline parallel {pp}: a node holds a TP group, stages may go to "
            f"other nodes), vLLM's Ray executor; the actor takes 1 CPU of it")


def accelerators(engine: EngineConfig) -> tuple[float, str]:
    """What one engine reserves, for its cost: (count, kind): GPUs on a GPU engine (tensor x pipeline
    parallel), CPU cores on the CPU engine."""
    if engine.resolved_device() == "gpu":
        tp, pp = parallel(engine)
        return float(tp * pp), "GPU"
    return float(engine.cpus_per_actor), "CPU core"


def hardware(engine: EngineConfig) -> dict[str, Any]:
    """What this process's engine runs on (the actor reports it with its engine): the GPUs' model and
    count, or the CPU's model and the cores this process may use."""
    import os
    import platform

    if engine.resolved_device() == "gpu":
        try:
            import torch

            count = torch.cuda.device_count()
            return {"device": "gpu", "gpus": count, "model": torch.cuda.get_device_name(0) if count else "none visible"}
        except Exception as exc:  # noqa: BLE001 - a description, never a reason to fail
            return {"device": "gpu", "error": f"{type(exc).__name__}: {exc}"}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": "cpu", "cpu": model, "cores_usable": cores, "cores_reserved": engine.cpus_per_actor}
