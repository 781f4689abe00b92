"""How work is sized to the cluster: shard sizes, shards an actor takes at once, the actor pool."""

import pytest

from pipeline.engine import sizing
from pipeline.config import ConfigError, EngineConfig, load_config


@pytest.mark.parametrize("rows, actors, expected", [
    (320, 1, 80), (320, 2, 40), (320, 8, 16), (320, 64, 16),
    (10_000, 1, 2500), (10_000, 2, 1250), (10_000, 8, 313), (10_000, 64, 40),
    (1_000_000, 1, 4096), (1_000_000, 2, 4096), (1_000_000, 8, 4096), (1_000_000, 64, 3907),
])
def test_default_shard_size_gives_each_actor_several_shards(rows, actors, expected):
    size = sizing.shard_rows(rows, actors)
    assert size == expected
    shards = -(-rows // size)
    # several shards per actor, unless files would get too small or too large
    assert shards >= (sizing.SHARDS_PER_ACTOR - 1) * actors or size in (sizing.MIN_SHARD_ROWS, sizing.MAX_SHARD_ROWS)


def test_an_actor_takes_enough_shards_to_fill_its_engine():
    engine = EngineConfig(max_num_seqs=256)
    assert sizing.rows_in_flight(engine) == 512
    assert sizing.shards_at_once(engine, 2048) == 2  # one shard holds the engine; the next is ready
    assert sizing.shards_at_once(engine, 40) == 14  # 13 x 40 rows >= 512, plus the next
    assert sizing.shards_at_once(engine, 1) == sizing.MAX_SHARDS_AT_ONCE
    assert sizing.shards_at_once(EngineConfig(rows_in_flight=100), 40) == 4
    assert sizing.shards_at_once(EngineConfig(shards_in_flight=3), 40) == 3  # explicit wins


def test_actor_pool_fixed_and_elastic():
    fixed = sizing.actor_pool(EngineConfig(num_actors=4), work_items=10, mean_shard_rows=40)
    assert (fixed.min_size, fixed.max_size) == (4, 4)
    assert fixed.max_tasks_in_flight_per_actor == fixed.max_concurrent_calls_per_actor == 14
    assert sizing.actor_pool(EngineConfig(num_actors=4), work_items=2, mean_shard_rows=40).max_size == 2
    elastic = sizing.actor_pool(EngineConfig(num_actors=[1, 8]), work_items=100, mean_shard_rows=40)
    assert (elastic.min_size, elastic.max_size) == (1, 8)
    small = sizing.actor_pool(EngineConfig(num_actors=[2, 8]), work_items=1, mean_shard_rows=40)
    assert (small.min_size, small.max_size) == (1, 1)


def test_actor_resources_cpu_and_gpu():
    assert sizing.actor_resources(EngineConfig(device="cpu", cpus_per_actor=2)) == {"num_cpus": 2}
    assert sizing.actor_resources(EngineConfig(device="gpu", tensor_parallel_size=4)) == {"num_gpus": 4, "num_cpus": 1}
    assert sizing.executor(EngineConfig(device="gpu", tensor_parallel_size=8)) is None  # vLLM's choice: mp, one node
    assert "1 actor of 8 GPU + 1 CPU on one node" in sizing.describe(EngineConfig(device="gpu", tensor_parallel_size=8))
    assert "1 CPU on any node (CPU engine)" in sizing.describe(EngineConfig(device="cpu"))


@pytest.mark.parametrize("vllm", [{"pipeline_parallel_size": 2}, {"pipeline-parallel-size": 2}])
def test_an_engine_over_pipeline_stages_reserves_tp_x_pp_bundles_packed_on_vllms_ray_executor(vllm):
    engine = EngineConfig(device="gpu", tensor_parallel_size=8, num_actors=[1, 4], vllm=vllm)
    assert sizing.parallel(engine) == (8, 2) and sizing.executor(engine) == "ray"
    assert sizing.placement(engine) == {"bundles": [{"GPU": 1, "CPU": 1}] * 16, "strategy": "PACK"}
    asked = sizing.actor_resources(engine)
    make = asked.pop("ray_remote_args_fn")
    assert asked == {"num_gpus": 0, "num_cpus": 1}  # the actor: a CPU of its group; Ray Data counts engines
    assert make.func is sizing.engine_placement_group and make.args == (sizing.placement(engine),)
    assert sizing.describe(engine).startswith("1 to 4 engines (elastic), each a placement group of 16 bundles")
    # Ray's executor by choice, tensor parallel only: the group too; on CPU, never (vLLM's CPU build has no Ray executor)
    chosen = EngineConfig(device="gpu", tensor_parallel_size=2, vllm={"distributed_executor_backend": "ray"})
    assert sizing.placement(chosen)["bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert sizing.placement(EngineConfig(device="cpu", vllm={"pipeline_parallel_size": 2})) is None


@pytest.mark.parametrize("value, message", [
    ("0", "greater than or equal to 1"), ("[3, 2]", "[min, max]"), ("[0, 2]", "[min, max]"), ("[1, 2, 3]", "[min, max]"),
])
def test_bad_actor_counts_are_config_errors(value, message):
    with pytest.raises(ConfigError, match="engine.num_actors") as err:
        load_config(None, [f"engine.num_actors={value}"], input="in.parquet", output="out")
    assert message in str(err.value)


def test_actor_range_from_yaml():
    config = load_config(None, ["engine.num_actors=[2, 6]"], input="in.parquet", output="out")
    assert config.engine.actor_range() == (2, 6)
    assert load_config(None, [], input="in.parquet", output="out").engine.actor_range() == (1, 1)
