"""Adapter config, discovery and the tiny adapters, without an engine."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.models.adapters import AdapterError, AdapterSet, check_job, discover, localize, unknown_model_message
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.models.tiny_adapter import ADAPTERS, build, ensure_built

BUILTINS = {"tiny-lora-a": "builtin:tiny-lora-a", "tiny-lora-b": "builtin:tiny-lora-b"}


def job(**model) -> JobConfig:
    return JobConfig.model_validate({"input": "in", "output": "out", "model": model})


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_adapter_build_is_deterministic_peft_for_the_tiny_model(tmp_path):
    from safetensors import safe_open

    from pipeline.models.tiny_model import resolve_model

    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    for folder, name in ((a, "tiny-lora-a"), (b, "tiny-lora-a"), (other, "tiny-lora-b")):
        folder.mkdir()
        build(ADAPTERS[name], folder)
    assert digest(a) == digest(b)
    assert digest(a)["adapter_model.safetensors"] != digest(other)["adapter_model.safetensors"]
    config = json.loads((a / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    base = json.loads(open(resolve_model("builtin:tiny-llama") + "/config.json").read())
    with safe_open(str(a / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert len(keys) == 2 * 7 * base["num_hidden_layers"]
        down_a = weights.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight")
        down_b = weights.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
    assert tuple(down_a.shape) == (8, base["intermediate_size"])
    assert tuple(down_b.shape) == (base["hidden_size"], 8)


def test_named_adapters_are_discovered_with_their_ranks():
    found = discover(job(adapters=BUILTINS).model)
    assert found.paths == BUILTINS and found.ranks == {"tiny-lora-a": 8, "tiny-lora-b": 8}
    assert found.max_rank == 8
    assert found.target_modules() == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    local = localize(found)
    assert local.paths["tiny-lora-a"] == str(ensure_built("tiny-lora-a")) and local.ranks == found.ranks
    assert not discover(job().model) and not job().model.has_adapters()


def copy_adapter(name: str, to) -> None:
    shutil.copytree(ensure_built(name), to)


def test_an_adapter_folder_serves_each_subfolder_under_its_name(tmp_path):
    copy_adapter("tiny-lora-a", tmp_path / "support-bot")
    copy_adapter("tiny-lora-b", tmp_path / "legal")
    (tmp_path / ".cache").mkdir()  # hidden folders are not adapters
    (tmp_path / "notes.txt").write_text("not an adapter")
    found = discover(job(adapter_folder=str(tmp_path), adapters={"extra": "builtin:tiny-lora-a"}).model)
    assert found.paths == {"extra": "builtin:tiny-lora-a", "support-bot": f"{tmp_path}/support-bot",
                           "legal": f"{tmp_path}/legal"}
    # a URI the inputs accept works the same; a local one is used where it is
    uri = discover(job(adapter_folder=f"file://{tmp_path}").model)
    assert sorted(uri.paths) == ["legal", "support-bot"]
    assert localize(uri).paths["legal"] == f"{tmp_path}/legal"


@pytest.mark.parametrize("make, model, message", [
    (None, {"adapters": {"x": "{tmp}/missing"}}, "adapter folder {tmp}/missing does not exist"),
    ("empty", {"adapters": {"x": "{tmp}/empty"}}, "adapter {tmp}/empty has no adapter_config.json"),
    ("no-weights", {"adapters": {"x": "{tmp}/no-weights"}}, "has no weights: adapter_model.safetensors"),
    ("no-rank", {"adapters": {"x": "{tmp}/no-rank"}}, "has no LoRA rank `r`"),
    (None, {"adapter_folder": "{tmp}/nowhere"}, "model.adapter_folder {tmp}/nowhere does not exist"),
    ("folder/tiny-llama", {"adapter_folder": "{tmp}/folder"}, "has the base model's served name"),
    ("folder/empty", {"adapter_folder": "{tmp}/folder"}, "has no adapter_config.json"),
    ("folder/x", {"adapter_folder": "{tmp}/folder", "adapters": {"x": "builtin:tiny-lora-a"}},
     "is both in model.adapters and a subfolder"),
    (None, {"adapters": {"x": "builtin:tiny-lora-z"}}, "unknown builtin adapter 'builtin:tiny-lora-z'"),
])
def test_bad_adapters_are_errors_before_any_engine(tmp_path, make, model, message):
    if make is not None:
        folder = tmp_path / make
        if make.endswith(("tiny-llama", "/x")):
            copy_adapter("tiny-lora-a", folder)
        else:
            folder.mkdir(parents=True)
        if make == "no-weights":
            (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        if make == "no-rank":
            (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
            (folder / "adapter_model.safetensors").write_bytes(b"")
    model = json.loads(json.dumps(model).replace("{tmp}", str(tmp_path)))
    with pytest.raises(AdapterError, match=re.escape(message.replace("{tmp}", str(tmp_path)))):
        check_job(job(**model))


@pytest.mark.parametrize("model, message", [
    ({"adapters": {"tiny-llama": "builtin:tiny-lora-a"}}, "has the base model's served name"),
    ({"adapters": {"my adapter": "builtin:tiny-lora-a"}}, "must be non-empty and hold no whitespace"),
    ({"adapters": {"x": " "}}, "adapter 'x' has an empty path"),
    ({"adapters": ["builtin:tiny-lora-a"]}, "model.adapters"),
])
def test_bad_adapter_config_is_a_config_error(tmp_path, model, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "in", "output": "out", "model": model}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(path))


def test_a_sweep_names_the_base_and_its_adapters_as_rows_would():
    config = JobConfig.model_validate({
        "input": "in", "output": "out", "model": {"adapters": BUILTINS},
        "sweep": {"models": ["tiny-llama", "tiny-lora-a", {"path": "builtin:tiny-llama-b"}, "tiny-lora-b"],
                  "grid": {"max_tokens": [4]}}})
    variants = config.variants()
    assert [(v.name, v.served_name, v.adapter) for v in variants] == [
        ("tiny-llama_max_tokens4", "tiny-llama", None),
        ("tiny-lora-a_max_tokens4", "tiny-lora-a", "tiny-lora-a"),
        ("tiny-llama-b_max_tokens4", "tiny-llama-b", None),
        ("tiny-lora-b_max_tokens4", "tiny-lora-b", "tiny-lora-b")]
    assert variants[0].model == variants[1].model == variants[3].model == config.model  # one engine
    identity = config.identity()["variants"]
    assert identity["tiny-lora-a_max_tokens4"]["model"]["adapter"] == "tiny-lora-a"
    assert identity["tiny-llama-b_max_tokens4"]["model"] == {"path": "builtin:tiny-llama-b",
                                                              "served_name": "tiny-llama-b"}
    check_job(config)


def test_a_sweep_entry_must_name_something_the_model_serves(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "in", "output": "out", "model": {"adapters": BUILTINS},
                                    "sweep": {"models": ["tiny-llama", "builtin:tiny-llama-b"]}}))
    with pytest.raises(ConfigError, match=re.escape("sweep.models[1] is 'builtin:tiny-llama-b', which `model` "
                                                    "does not serve; a name must be one of tiny-llama, "
                                                    "tiny-lora-a, tiny-lora-b")):
        load_config(str(path))
    # a name in an adapter folder is only known once the folder is read: still before any engine
    copy_adapter("tiny-lora-a", tmp_path / "adapters" / "found")
    config = JobConfig.model_validate({"input": "in", "output": "out",
                                       "model": {"adapter_folder": str(tmp_path / "adapters")},
                                       "sweep": {"models": ["found", "missing"]}})
    with pytest.raises(AdapterError, match="sweep.models names 'missing', which is no adapter of tiny-llama; "
                                           "its adapters: found"):
        check_job(config)


def test_a_job_without_adapters_keeps_its_identity():
    identity = job().identity()["variants"][""]["model"]
    assert identity == {"path": "builtin:tiny-llama", "served_name": "tiny-llama"}


def test_the_unknown_model_message_lists_what_a_row_may_name():
    assert unknown_model_message("x", "tiny-llama", []) == \
        "The model `x` does not exist. Valid aliases: tiny-llama."  # the server's words, without adapters
    assert unknown_model_message("x", "base", ["b", "a"]) == \
        "The model `x` does not exist. Valid aliases: base; adapters: a, b."


def test_lora_engine_arguments_follow_the_adapters():
    from pipeline.config import EngineConfig
    from pipeline.engine.engine_args import lora_args

    gpu, cpu = EngineConfig(device="gpu"), EngineConfig(device="cpu")
    assert lora_args(gpu, AdapterSet()) == lora_args(cpu, AdapterSet()) == {}  # no adapters: LoRA off
    two = AdapterSet({"a": "/a", "b": "/b"}, {"a": 8, "b": 12}, {"a": ("q_proj", "v_proj"), "b": ("v_proj", "o_proj")})
    assert lora_args(gpu, two) == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2, "max_cpu_loras": 2,
                                   "lora_target_modules": ["o_proj", "q_proj", "v_proj"]}
    assert lora_args(EngineConfig(device="gpu", max_loras=1), two)["max_loras"] == 1
    # CPU: one slot more than adapters, never used, which rows without an adapter read
    assert lora_args(EngineConfig(device="cpu", max_loras=1), two) == {
        "enable_lora": True, "max_lora_rank": 16, "max_loras": 3, "max_cpu_loras": 3,
        "lora_target_modules": ["o_proj", "q_proj", "v_proj"]}
    # an adapter naming its layers by a pattern: every layer vLLM can adapt
    pattern = AdapterSet({"a": "/a"}, {"a": 8}, {"a": None})
    assert lora_args(gpu, pattern)["lora_target_modules"] is None
    with pytest.raises(AdapterError, match="adapter 'a' has LoRA rank 600; vLLM serves ranks up to 512"):
        lora_args(gpu, AdapterSet({"a": "/a"}, {"a": 600}))


@pytest.fixture
def s3(tmp_path):
    """An S3 endpoint on 127.0.0.1 (moto's server in a thread) and a URI maker for it."""
    import socket

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           access_key="k", secret_key="s", allow_bucket_creation=True)
    fs.create_dir("adapters")
    try:
        yield fs, lambda path: f"s3://{path}?{query}"
    finally:
        server.stop()


def test_a_remote_adapter_folder_is_listed_there_and_copied_to_the_local_cache(s3, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    fs, uri = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    for name, builtin in (("support-bot", "tiny-lora-a"), ("legal", "tiny-lora-b")):
        pafs.copy_files(str(ensure_built(builtin)), f"adapters/{name}", destination_filesystem=fs)
    monkeypatch.setenv("PIPELINE_MODEL_CACHE", str(tmp_path / "cache"))
    found = discover(job(adapter_folder=uri("adapters")).model)
    assert sorted(found.paths) == ["legal", "support-bot"] and found.max_rank == 8
    local = localize(found)
    for name, builtin in (("support-bot", "tiny-lora-a"), ("legal", "tiny-lora-b")):
        copy = local.paths[name]
        assert copy.startswith(str(tmp_path / "cache")), copy
        assert {k: v for k, v in digest(Path(copy)).items() if k != "build.json"} == \
            {k: v for k, v in digest(ensure_built(builtin)).items() if k != "build.json"}
    stamp = Path(local.paths["legal"]) / "build.json"
    assert "endpoint_override" not in stamp.read_text()  # the cache records the URI without its query
    (Path(local.paths["legal"]) / "marker").write_text("")
    assert localize(found).paths == local.paths  # cached: the same folder, not copied again
    assert (Path(local.paths["legal"]) / "marker").exists()
    fs.delete_file("adapters/legal/adapter_config.json")
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        discover(job(adapter_folder=uri("adapters")).model)
    # the remote adapter changed (a file's size or time): copied again
    config = json.loads((ensure_built("tiny-lora-b") / "adapter_config.json").read_text())
    with fs.open_output_stream("adapters/legal/adapter_config.json") as out:
        out.write(json.dumps({**config, "revision": "v2"}).encode())
    assert localize(found).paths == local.paths
    assert not (Path(local.paths["legal"]) / "marker").exists()
    assert json.loads((Path(local.paths["legal"]) / "adapter_config.json").read_text())["revision"] == "v2"
