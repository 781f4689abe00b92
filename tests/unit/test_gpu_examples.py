"""The GPU example configs (configs/gpu/): each loads, its engine.vllm passes vLLM's own parser, and it
reserves what its comments say. No GPU runs them here; tests/e2e/test_engine_placement.py places the
two-node layout's placement group on a real Ray cluster."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.engine import sizing
from pipeline.engine.engine_args import engine_args, vllm_args

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "gpu"


@pytest.mark.parametrize("name, describes, resources", [
    ("70b-tp8-node.yaml", "1 engine, each 1 actor of 8 GPU + 1 CPU on one node", {"num_gpus": 8, "num_cpus": 1}),
    ("405b-tp8-pp2-two-nodes.yaml", "1 engine, each a placement group of 16 bundles", {"num_gpus": 0, "num_cpus": 1}),
    ("many-small-engines.yaml", "4 to 16 engines (elastic), each 1 actor of 1 GPU + 1 CPU on any node",
     {"num_gpus": 1, "num_cpus": 1}),
])
def test_each_gpu_example_loads_parses_and_reserves_what_it_says(name, describes, resources):
    config = load_config(str(EXAMPLES / name), [])
    text = (EXAMPLES / name).read_text()
    assert sizing.describe(config.engine).startswith(describes)
    asked = sizing.actor_resources(config.engine)
    asked.pop("ray_remote_args_fn", None)
    assert asked == resources
    assert vllm_args(config.engine)  # each shows an engine.vllm argument, accepted by vLLM's parser
    args = engine_args(config.engine, config.model.path, config.model.resolved_served_name(), {})
    assert args.tensor_parallel_size == config.engine.tensor_parallel_size
    if "pipeline_parallel_size" in text:
        assert args.pipeline_parallel_size == 2 and args.distributed_executor_backend == "ray"
        assert len(sizing.placement(config.engine)["bundles"]) == 16
        assert sizing.accelerators(config.engine) == (16.0, "GPU")  # its cost counts every GPU it holds
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(
        ["70b-tp8-node.yaml", "405b-tp8-pp2-two-nodes.yaml", "many-small-engines.yaml"])
