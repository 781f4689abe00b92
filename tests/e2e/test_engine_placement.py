"""A GPU engine over pipeline stages reserves its placement group on a real two-node Ray cluster.

No GPU here: each node declares two logical GPUs (`ray start --num-gpus 2`), which is all Ray's
scheduler sees. The job's own `ray_remote_args_fn` (pipeline/engine/sizing.py) makes the group as Ray
Data would call it for an engine actor; an actor placed with it, and a task it starts (as vLLM's Ray
executor starts its workers), run inside the group. vLLM itself is not started (its Ray executor needs a
GPU platform): tests/unit/test_sizing.py checks what the engine asks of vLLM.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.config import EngineConfig
from pipeline.engine import sizing
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow  # two `ray start` nodes

PROBE = r"""
import json, sys
import ray
from pipeline.config import EngineConfig
from pipeline.engine import sizing

ray.init(address=sys.argv[1])
engine = EngineConfig(device="gpu", tensor_parallel_size=2, vllm={"pipeline_parallel_size": 2})
asked = sizing.actor_resources(engine)
options = asked.pop("ray_remote_args_fn")()
group = options["scheduling_strategy"].placement_group
ray.get(group.ready(), timeout=120)


@ray.remote(num_cpus=0)
class Barrier:  # the four workers hold their GPUs together, as vLLM's do: none reuses a bundle another left
    def __init__(self):
        import asyncio
        self.arrived, self.all = 0, asyncio.Event()

    async def arrive(self):
        self.arrived += 1
        if self.arrived == 4:
            self.all.set()
        await self.all.wait()


@ray.remote
def worker_node(barrier):  # as vLLM's Ray executor places a worker: a GPU of a bundle of the actor's group
    ray.get(barrier.arrive.remote(), timeout=120)
    return ray.get_runtime_context().get_node_id()


@ray.remote
class Engine:
    def where(self):
        current = ray.util.get_current_placement_group()
        barrier = Barrier.remote()
        gpus = [worker_node.options(num_gpus=1, num_cpus=0).remote(barrier) for _ in range(4)]
        return {"node": ray.get_runtime_context().get_node_id(), "actor_group": current.id.hex() if current else None,
                "workers": sorted(ray.get(gpus, timeout=120))}


actor = Engine.options(**asked, **options).remote()
seen = ray.get(actor.where.remote(), timeout=120)
table = ray.util.placement_group_table(group)
print(json.dumps({"asked": asked, "group": group.id.hex(), "strategy": table["strategy"],
                  "bundles": list(table["bundles"].values()), "bundle_nodes": list(table["bundles_to_node_id"].values()),
                  **seen}))
"""


def test_tp2_x_pp2_engine_packs_a_tp_group_per_node_and_its_workers_run_inside(tmp_path):
    engine = EngineConfig(device="gpu", tensor_parallel_size=2, vllm={"pipeline_parallel_size": 2})
    assert sizing.placement(engine) == {"bundles": [{"GPU": 1, "CPU": 1}] * 4, "strategy": "PACK"}
    cluster = RayCluster()
    try:
        cluster.start_head(cpus=2, gpus=2)
        cluster.add_node(cpus=2, gpus=2)
        done = subprocess.run([sys.executable, "-c", PROBE, f"127.0.0.1:{cluster.port}"], capture_output=True,
                              text=True, env=cluster.env, timeout=600)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["asked"] == {"num_gpus": 0, "num_cpus": 1}  # the actor's own share: a CPU of a bundle
    assert seen["strategy"] == "PACK" and seen["bundles"] == [{"GPU": 1.0, "CPU": 1.0}] * 4
    nodes = seen["bundle_nodes"]
    assert len(set(nodes)) == 2 and sorted(nodes.count(n) for n in set(nodes)) == [2, 2]  # 2 GPUs per node
    assert seen["actor_group"] == seen["group"]  # the actor runs in the group made for it
    assert seen["node"] in nodes
    # the four GPU workers it starts land in its group's bundles: two on each node
    assert sorted(seen["workers"]) == sorted(nodes)
