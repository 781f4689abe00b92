"""The answer store (io/answer_store.py): a later job's greedy and seeded rows answered from it, the
same records as the engine's; never a stored answer for another model, engine setting or an error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.engine


def rows(prefix: str, n: int, **columns) -> pa.Table:
    return pa.table({"id": [f"{prefix}-{i}" for i in range(n)],
                     "prompt": [f"Line {i} of the old ledger reads" for i in range(n)],
                     "max_tokens": [10] * n, **columns})


def answers(result) -> dict[str, tuple]:
    out = {}
    for key in result.table.column("row_key").to_pylist():
        r = result.response(key)
        out[key.split("-", 1)[1]] = (r["choices"], r["usage"])
    return out


def test_a_later_job_is_answered_from_the_store_and_only_there(run_job, tmp_path):
    store = {"path": str(tmp_path / "store")}
    # 6 greedy rows, 2 seeded, 2 sampling without a seed (never stored nor read)
    mixed = {"temperature": [0.0] * 6 + [0.9] * 4, "seed": pa.array([None] * 6 + [5, 6, None, None], pa.int64())}
    first = run_job(rows("a", 10, **mixed), input={"id_column": "id"}, answer_store=store)
    assert first.summary.rows_run == 10 and first.summary.rows_from_store == 0
    second = run_job(rows("b", 10, **mixed), input={"id_column": "id"}, answer_store=store)
    assert second.summary.rows_from_store == 8  # new row keys, the same requests: no engine work
    assert {k: v for k, v in answers(second).items() if int(k) < 8} == \
        {k: v for k, v in answers(first).items() if int(k) < 8}
    assert second.summary.cost.output_tokens == sum(second.response(f"b-{i}")["usage"]["completion_tokens"]
                                                    for i in (8, 9))  # the engine's work: the unseeded rows
    ids = {second.response(f"b-{i}")["id"] for i in range(10)} | {first.response(f"a-{i}")["id"] for i in range(10)}
    assert len(ids) == 20  # each row its own response id
    stored = pq.read_table(store["path"]).to_pylist()
    assert len(stored) == 8 and all(json.loads(r["body"])["temperature"] == 0.0 or json.loads(r["body"])["seed"]
                                    for r in stored)


@pytest.mark.slow
def test_a_damaged_store_file_is_skipped_and_its_rows_answered_again(run_job, tmp_path):
    store = {"path": str(tmp_path / "store")}
    greedy = {"temperature": [0.0] * 4}
    run_job(rows("a", 4, **greedy), input={"id_column": "id"}, answer_store=store)
    (part,) = Path(store["path"]).rglob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:50])  # cut short
    again = run_job(rows("b", 4, **greedy), input={"id_column": "id"}, answer_store=store)
    assert again.summary.rows_from_store == 0 and again.summary.completions == 4
    third = run_job(rows("c", 4, **greedy), input={"id_column": "id"}, answer_store=store)
    assert third.summary.rows_from_store == 4  # rebuilt: the second job stored them anew


@pytest.mark.slow
def test_retrained_weights_another_adapter_or_engine_setting_are_a_miss(run_job, tmp_path):
    """The base model's answers are found by a job whose adapter changed; an answer of other weights never."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.models.tiny_model import resolve_model

    model = tmp_path / "tiny"
    shutil.copytree(resolve_model("builtin:tiny-llama"), model)
    store = {"path": str(tmp_path / "store")}
    table = rows("a", 4, temperature=[0.0] * 4, model=["tiny", "tiny", "tuned", "tuned"])

    def job(prefix: str, adapter: str):
        return run_job(table.set_column(0, "id", pa.array([f"{prefix}-{i}" for i in range(4)])),
                       input={"id_column": "id"}, answer_store=store,
                       model={"path": str(model), "served_name": "tiny", "adapters": {"tuned": adapter}})

    first = job("a", "builtin:tiny-lora-a")
    assert first.summary.rows_from_store == 0 and first.summary.completions == 4
    # another adapter under the same name: its rows miss, the base model's rows are found
    other = job("b", "builtin:tiny-lora-b")
    assert other.summary.rows_from_store == 2
    assert [answers(other)[k] for k in ("0", "1")] == [answers(first)[k] for k in ("0", "1")]
    # the checkpoint retrained in place: the same names, shapes and sizes (the output's fingerprint
    # does not change), other values: every row misses
    weights = load_file(model / "model.safetensors")
    save_file({name: tensor + 1e-3 * torch.randn_like(tensor) for name, tensor in weights.items()},
              str(model / "model.safetensors"), metadata={"format": "pt"})
    retrained = job("c", "builtin:tiny-lora-a")
    assert retrained.summary.rows_from_store == 0 and retrained.summary.completions == 4
    # an engine setting that changes answers
    other = run_job(table.set_column(0, "id", pa.array([f"d-{i}" for i in range(4)])), input={"id_column": "id"},
                    answer_store=store, engine={"max_logprobs": 5},
                    model={"path": str(model), "served_name": "tiny", "adapters": {"tuned": "builtin:tiny-lora-a"}})
    assert other.summary.rows_from_store == 0
