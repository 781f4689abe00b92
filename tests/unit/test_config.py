import re

import pytest
import yaml

from pipeline.config import ConfigError, JobConfig, load_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_demo_config_is_valid():
    for name in ("local-cpu", "gpu-cluster", "sweep-local", "enrich-local", "adapters-local"):
        load_config(f"configs/{name}.yaml")
    config = load_config("configs/local-cpu.yaml")
    assert config.engine.device == "cpu"
    assert config.defaults.sampling_defaults() == {"max_tokens": 1024, "temperature": 0.2, "top_p": 0.7}


def test_gpu_example_config_is_valid():
    config = load_config("configs/gpu-cluster.yaml")
    assert config.engine.device == "gpu" and config.engine.actor_range() == (2, 8)


def test_spec_defaults_when_not_configured():
    config = JobConfig(input="in", output="out")
    assert config.defaults.sampling_defaults() == {"max_tokens": 1024, "temperature": 0.2, "top_p": 0.7}
    assert config.defaults.body_defaults() == {}
    assert config.model.resolved_served_name() == "tiny-llama"


def test_overrides_and_direct_flags(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nengine:\n  num_actors: 1\n")
    config = load_config(path, ["engine.max_model_len=2048", 'defaults.stop=["\\n"]', "engine.num_actors=3"],
                         input="other.parquet", output=None)
    assert config.engine.max_model_len == 2048
    assert config.engine.num_actors == 3
    assert config.input.path == "other.parquet" and config.output.path == "b"
    assert config.defaults.body_defaults() == {"stop": ["\n"]}


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nengine:\n  num_actor: 2\n")
    with pytest.raises(ConfigError, match=r"engine\.num_actor: unknown key"):
        load_config(path)


def test_bad_value_names_key_and_value(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\ndefaults:\n  temperature: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "defaults.temperature" in str(err.value) and "5" in str(err.value)


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"input: Field required"):
        load_config(write(tmp_path, "output: b\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(None, ["engine.num_actors"], input="a", output="b")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "input: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_input_shorthand_takes_section_overrides(tmp_path):
    path = write(tmp_path, "input: a.parquet\noutput: b\n")
    config = load_config(path, ["input.body_column=body"], input="c.parquet")
    assert (config.input.path, config.input.body_column) == ("c.parquet", "body")


def test_sweep_expands_models_and_grid_into_named_variants():
    config = JobConfig.model_validate({
        "input": "in", "output": "out",
        "sweep": {"models": [{"path": "builtin:tiny-llama"}, {"path": "builtin:tiny-llama-b"}],
                  "grid": {"temperature": [0, 0.7], "max_tokens": 16},
                  "variants": [{"name": "short", "stop": ["\n"]}, {"seed": 3}]}})
    variants = config.variants()
    assert len(variants) == 2 * 2 * 2
    assert variants[0].name == "tiny-llama_short_temperature0_max_tokens16"
    assert variants[0].params == {"stop": ["\n"], "temperature": 0, "max_tokens": 16}
    assert variants[-1].name == "tiny-llama-b_seed3_temperature0.7_max_tokens16"
    assert variants[-1].folder() == "variant=tiny-llama-b_seed3_temperature0.7_max_tokens16/"
    assert config.identity()["variants"][variants[-1].name]["params"] == {"seed": 3, "temperature": 0.7,
                                                                          "max_tokens": 16}
    assert JobConfig.model_validate({"input": "in", "output": "out"}).variants()[0].folder() == ""


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"temprature": [0, 1]}}, "sweep.grid names ['temprature']"),
    ({"grid": {"prompt": ["a"]}}, "sweep.grid names ['prompt']"),
    ({"variants": [{"name": "a", "seed": 1}, {"name": "a", "seed": 2}]}, "share a name"),
    ({"grid": {"seed": []}}, "sweep.grid.seed has no values"),
])
def test_bad_sweeps_are_config_errors(tmp_path, sweep, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "in", "output": "out", "sweep": sweep}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(path))
