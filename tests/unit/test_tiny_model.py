import hashlib
import json

from pipeline.models.tiny_model import SHAPES, build


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic_and_llama_shaped(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    build(SHAPES["tiny-llama"], a)
    build(SHAPES["tiny-llama"], b)
    assert digest(a) == digest(b)
    config = json.loads((a / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64 and config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["max_position_embeddings"] >= 4096


def test_tokenizer_adds_bos_and_has_eos(tmp_path):
    from transformers import AutoTokenizer

    build(SHAPES["tiny-llama"], tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token == "</s>" and tok.eos_token_id is not None
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert len(tok) == json.loads((tmp_path / "config.json").read_text())["vocab_size"]
