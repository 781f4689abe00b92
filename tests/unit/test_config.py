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


# -- where a bad key came from, and what it may have meant ------------------------------------------------

def test_a_bad_set_names_the_set_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config("configs/local-cpu.yaml", ["engine.num_actorz=2"])
    assert str(err.value) == ("invalid config from --set engine.num_actorz=2:\n"
                              "  engine.num_actorz: unknown key; did you mean engine.num_actors?")
    with pytest.raises(ConfigError) as err:
        load_config("configs/local-cpu.yaml", ["engine.num_actors=0"])
    assert str(err.value) == ("invalid config from --set engine.num_actors=0:\n"
                              "  engine.num_actors: Value error, must be greater than or equal to 1 (a number, or "
                              "[min, max]) (got 0)")


def test_a_bad_key_of_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nengine:\n  tensor_paralel_size: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["engine.num_actors=2"])  # a good --set is not named
    assert str(err.value) == (f"invalid config in {path}:\n"
                              "  engine.tensor_paralel_size: unknown key; did you mean engine.tensor_parallel_size?")


def test_bad_keys_from_the_file_and_the_flags_are_grouped_by_where(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nengine:\n  dtyp: float32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["engine.num_actors=0", "engine.id_column=x"], output="")
    assert str(err.value) == (
        "invalid config:\n"
        "  from --output:\n"
        "    output.path: Value error, must not be empty (got '')\n"
        "  from --set engine.num_actors=0:\n"
        "    engine.num_actors: Value error, must be greater than or equal to 1 (a number, or [min, max]) (got 0)\n"
        f"  in {path}:\n"
        "    engine.dtyp: unknown key; did you mean engine.dtype?\n"
        "  from --set engine.id_column=x:\n"
        "    engine.id_column: unknown key; id_column is a key of input")


def test_a_later_flag_replaces_what_it_overrides(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nengine:\n  num_actors: 0\n")
    with pytest.raises(ConfigError) as err:  # a whole section set by --set: its keys are the --set's
        load_config(path, ["engine.num_actors=2", "engine={num_actors: 0}"])
    assert str(err.value).startswith("invalid config from --set engine={num_actors: 0}:\n  engine.num_actors:")
    with pytest.raises(ConfigError) as err:  # --input after --set input.path
        load_config(path, ["input.path=x", "engine.num_actors=1"], input=" ")
    assert str(err.value) == "invalid config from --input:\n  input.path: Value error, must not be empty (got ' ')"
    with pytest.raises(ConfigError) as err:  # the file's bad value, no flag touching it
        load_config(path, ["input.path=x"])
    assert str(err.value).startswith(f"invalid config in {path}:\n  engine.num_actors:")


def test_a_section_error_names_the_flags_that_set_its_keys(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nengine:\n  device: cpu\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["engine.batch_invariant=true"])
    assert str(err.value).startswith(f"invalid config in {path} with --set engine.batch_invariant=true:\n"
                                     "  engine: Value error, batch_invariant needs a GPU engine")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["engine.batch_invariant=true", "engine.device=cpu"], input="a", output="b")
    assert str(err.value).startswith("invalid config from --set engine.batch_invariant=true, --set engine.device=cpu:\n"
                                     "  engine: Value error, batch_invariant needs a GPU engine")
    with pytest.raises(ConfigError) as err:  # nothing gave the key: the file, or without one the command line
        load_config(None, [], input="a")
    assert str(err.value) == "invalid config from the command line:\n  output: Field required"


@pytest.mark.parametrize("override, message", [
    ("engine.num_actorz=2", "engine.num_actorz: unknown key; did you mean engine.num_actors?"),
    ("input.promt_column=q", "input.promt_column: unknown key; did you mean input.prompt_column, input.body_column "
                             "or input.id_column?"),
    ("engin.device=cpu", "engin: unknown key; did you mean engine?"),
    ("ray_adress=auto", "ray_adress: unknown key; did you mean ray_address?"),
    ("cost.currancy=EUR", "cost.currancy: unknown key; did you mean cost.currency?"),
    ("scoring={scorers: [{kind: exact_match, normalize: {cas: true}}], referenc_column: a}",
     "scoring.scorers.0.exact_match.normalize.cas: unknown key; did you mean "
     "scoring.scorers.0.exact_match.normalize.case?"),
    ("scoring={scorers: [{kind: numeric, tolerence: 0.1}]}",
     "scoring.scorers.0.numeric.tolerence: unknown key; did you mean scoring.scorers.0.numeric.tolerance?"),
    ("sweep={models: [{path: x, pathh: y}]}", "sweep.models.0.pathh: unknown key; did you mean sweep.models.0.path?"),
    # the name of another section's key
    ("engine.id_column=x", "engine.id_column: unknown key; id_column is a key of input"),
    ("num_actors=2", "num_actors: unknown key; num_actors is a key of engine"),
    ("input.max_tokens=3", "input.max_tokens: unknown key; max_tokens is a key of defaults"),
    ("engine.columns=[a]", "engine.columns: unknown key; columns is a key of input and output"),
    ("engine.ray_address=auto", "engine.ray_address: unknown key; ray_address is a key of the top level"),
    ("engine.extract=x", "engine.extract: unknown key; extract is a key of scoring.scorers[i]"),
    # both, and neither
    ("output.id_column=k", "output.id_column: unknown key; id_column is a key of input, or did you mean "
                           "output.columns?"),
    ("cost.pric=1", "cost.pric: unknown key (check its spelling and section)"),
])
def test_an_unknown_key_suggests_what_it_may_have_meant(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], input="a", output="b")
    assert f"  {message}" in str(err.value).splitlines(), str(err.value)


def test_an_unknown_key_of_the_file_has_the_suggestion_too(tmp_path):
    path = write(tmp_path, "input: a\noutput:\n  path: b\n  rows_per_fil: 10\n  id_column: k\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"invalid config in {path}:\n"
                              "  output.rows_per_fil: unknown key; did you mean output.rows_per_file?\n"
                              "  output.id_column: unknown key; id_column is a key of input, or did you mean "
                              "output.columns?")
