"""python -m pipeline engines {start,status,stop}: standing engine pools (docs/engine-pools.md).

start:   start a pool of `engine.num_actors` engines of the config's model (and adapters, engine
         settings, request defaults), named NAME, on the config's Ray cluster (ray_address, or the
         cluster of `ray job submit`); on a machine without one, on a local Ray head that stays up
         (started once, reused after). Returns once the engines are up; the pool outlives it.
status:  each pool: its model, engines (node, busy share, jobs served, idle time), idle-stop.
stop:    stop a pool: its engines, actors and placement groups; the local head too when no pool is
         left on it.
Exit 0 done, 2 a bad config, a pool name that does not run, or one already running another model.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import Any

from pipeline.config import ConfigError, in_ray_job, load_config
from pipeline.pool import local_head
from pipeline.pool.attached import mismatch
from pipeline.pool.keeper import NAMESPACE, PoolKeeper, PoolSpec, PoolStatus

log = logging.getLogger(__name__)
EXIT_OK, EXIT_BAD_INPUT = 0, 2
READY_TIMEOUT_S = 3600.0  # a 70B model's weights on 8 GPUs take minutes; a CPU engine about 20 s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a named pool of engines that outlives this command")
    start.add_argument("--config", required=True, help="a job YAML: its model, engine and defaults are the pool's")
    start.add_argument("--name", required=True, help="the pool's name (jobs say engine.pool: NAME)")
    start.add_argument("--idle-stop", default=None, metavar="DURATION",
                       help="stop the pool after this long without work: 90s, 30m, 2h (default: never)")
    start.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set engine.num_actors=2 (repeatable)")
    status = sub.add_parser("status", help="the pools and their engines")
    status.add_argument("name", nargs="?", help="one pool (default: all)")
    stop = sub.add_parser("stop", help="stop a pool (its engines, actors and placement groups)")
    stop.add_argument("name", nargs="?", help="the pool's name")
    stop.add_argument("--all", action="store_true", help="every pool, and this machine's local head")
    for cmd in (start, status, stop):
        cmd.add_argument("--address", default=None,
                         help="the Ray cluster (default: ray_address, `ray job submit`'s, or this machine's pool head)")
    return p


def duration_s(text: str) -> float:
    """'90s', '30m', '2h', '1.5h' or a number of seconds; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--idle-stop {text!r}: give a duration such as 90s, 30m or 2h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.action == "start":
            return _start(args)
        if args.action == "stop" and not args.name and not args.all:
            raise ConfigError("name the pool to stop (python -m pipeline engines status lists them), or --all")
        if not _join(args.address, None, start_head=False):
            print("no pools: no Ray cluster with pools runs on this machine "
                  "(python -m pipeline engines start --config CONFIG --name NAME starts one)")
            return EXIT_OK if args.action == "status" else EXIT_BAD_INPUT
        return _status(args.name) if args.action == "status" else _stop(args.name, args.all)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


_joined: list[local_head.LocalHead] = []  # the local head this process joined, if it did


def _join(address: str | None, config_address: str | None, start_head: bool) -> bool:
    """Join the pools' Ray cluster; on a machine without one, the local head (started if `start_head`)."""
    address = address or config_address or ("auto" if in_ray_job() else None)
    if address is None:  # a local head: started before Ray is imported, or its token comes too late
        head = local_head.find()
        if head is None:
            if not start_head:
                return False
            head = local_head.start()
            print(f"started a local Ray head at {head.address} for the pools of this machine; it stays up "
                  f"after this command, and stops with its last pool (python -m pipeline engines stop NAME). "
                  f"Its logs: {head.temp_dir}", flush=True)
        head.join()  # before Ray is imported: it reads its authentication settings once
        address = head.address
        _joined.append(head)
    import ray

    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    return True


def _keeper(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _start(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    idle_stop = duration_s(args.idle_stop) if args.idle_stop else None
    _join(args.address, config.ray_address, start_head=True)  # before anything imports Ray (its token)
    import ray

    from pipeline.job.run import pool_engine_job

    job = pool_engine_job(config, args.name)  # AdapterError, VllmArgsError
    running = _keeper(args.name)
    if running is not None:
        spec = ray.get(running.spec.remote())
        different = mismatch(spec.job.config, config)
        if different:
            raise ConfigError(f"pool {args.name!r} already runs with other settings ({different}); stop it first: "
                              f"python -m pipeline engines stop {args.name}")
        print(f"pool {args.name} is running already", flush=True)
        print(render(ray.get(running.status.remote())), flush=True)
        return EXIT_OK
    started = time.monotonic()
    keeper = ray.remote(PoolKeeper).options(
        name=args.name, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=-1,
        max_concurrency=16).remote(PoolSpec(args.name, job, idle_stop))
    print(f"pool {args.name}: starting {config.engine.actor_range()[0]} engine(s) of "
          f"{config.model.resolved_served_name()} ...", flush=True)
    engines = ray.get(keeper.wait_ready.remote(READY_TIMEOUT_S))
    status = ray.get(keeper.status.remote())
    print(render(status), flush=True)
    ready = sum(e.ready for e in engines)
    print(f"pool {args.name}: {ready} of {len(engines)} engines ready in {time.monotonic() - started:.0f} s. Jobs use it "
          f"with engine.pool: {args.name} (or --pool {args.name}); stop it: python -m pipeline engines stop "
          f"{args.name}", flush=True)
    return EXIT_OK


def _pools() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def _status(name: str | None) -> int:
    import ray

    names = [name] if name else _pools()
    if name and _keeper(name) is None:
        raise ConfigError(f"no pool named {name!r} (pools: {', '.join(_pools()) or 'none'})")
    for head in _joined:
        print(f"local Ray head {head.address} (stops with its last pool, or: python -m pipeline engines stop "
              f"--all; its logs: {head.temp_dir})")
    if not names:
        print("no pools")
    for pool in names:
        print(render(ray.get(_keeper(pool).status.remote())), flush=True)
    return EXIT_OK


def _stop(name: str | None, every: bool) -> int:
    import ray

    names = _pools() if every else [name]
    if not every and _keeper(name) is None:
        raise ConfigError(f"no pool named {name!r} (pools: {', '.join(_pools()) or 'none'})")
    for pool in names:
        keeper = _keeper(pool)
        ray.get(keeper.stop.remote(), timeout=300)
        ray.kill(keeper, no_restart=True)
        print(f"pool {pool} stopped: its engines, actors and placement groups are gone", flush=True)
    for head in [h for h in _joined if not _pools()]:
        ray.shutdown()
        local_head.stop(head)
        print(f"the local Ray head {head.address} held no other pool: stopped", flush=True)
    return EXIT_OK


def render(status: PoolStatus) -> str:
    adapters = f" (adapters: {', '.join(status.adapters)})" if status.adapters else ""
    idle_stop = f"idle-stop {status.idle_stop_s:.0f}s" if status.idle_stop_s else "no idle-stop"
    lines = [f"pool {status.name}: {status.model}{adapters}, {len(status.engines)} engine(s), up {status.up_s:.0f}s, "
             f"idle {status.idle_s():.0f}s, {idle_stop}, {status.jobs_attached} job(s) attached since start"]
    for e in status.engines:
        if not e.ready:
            lines.append(f"  engine {e.actor}: starting")
            continue
        lines.append(f"  engine {e.engine} on node {e.node[:8]} (pid {e.pid}): {e.model}, busy {e.busy_share:.0%}, "
                     f"{e.jobs_served} job(s) served, {e.shards_in_flight} shard(s) in flight, idle {e.idle_s:.0f}s")
    return "\n".join(lines)
