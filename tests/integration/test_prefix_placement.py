"""An evaluation on two engines (`python -m pipeline eval`, the real command): a document's requests land
on one engine, documents after the same few-shot examples on the same engine (job/request_groups.py,
engine/shard_calls.py `Placement`), and every number equals an evaluation with the reuse off on one engine.

Two MMLU-shaped tasks (data/make_harness_tasks.py), each with five examples of its own before every
document (MMLU's `first_n`): tiny_mmlu's answers are one token (the letter), tiny_options_5shot's the
options' texts (several tokens). Their log-likelihood requests are one job; each request's shard tally
says which engine answered it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("tiny_mmlu", "tiny_options_5shot")
DOCS = 12
ENGINE = {"device": "cpu", "cpus_per_actor": 1, "dtype": "float32", "max_model_len": 1280,
          "gpu_memory_utilization": 0.5, "cpu_kvcache_space_gb": 1}


def evaluate(folder: Path, include_path: Path, name: str, **engine: object) -> tuple[Path, dict]:
    """`python -m pipeline eval` of TASKS into folder/name; the records' folder and the harness's results."""
    config = folder / f"{name}.yaml"
    config.write_text(json.dumps({"output": str(folder / name / "records"),
                                  "model": {"path": "builtin:tiny-llama", "served_name": "tiny-llama"},
                                  "engine": {**ENGINE, **engine}}))
    env = {**os.environ, "PIPELINE_LOG_DIR": str(folder / "logs"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--config", str(config), "--include_path",
                             str(include_path), "--tasks", ",".join(TASKS), "--limit", str(DOCS), "--log_samples",
                             "--output_path", str(folder / name / "results")],
                            capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return folder / name / "records", samples(folder / name / "results")


def samples(results: Path) -> dict:
    """(task, doc_id) -> (each choice's (log-likelihood, is_greedy), acc, acc_norm), from the harness's samples."""
    found = {}
    for task in TASKS:
        (path,) = results.rglob(f"samples_{task}_*.jsonl")
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            choices = [(float(r[0][0]), str(r[0][1]) == "True") for r in sample["resps"]]
            found[(task, sample["doc_id"])] = (choices, sample["acc"], sample["acc_norm"])
    return found


def shard_engines(records: Path) -> dict[str, tuple[list[str], list[tuple[str, int]], str]]:
    """The log-likelihood job's shards: name -> (the engines its tally names, its requests' documents, its file)."""
    (job,) = records.glob("loglikelihood-*/records")
    shards = {}
    for data in sorted((job / "data").glob("*.parquet")):
        tally = json.loads((job / "shards" / f"{data.stem}.json").read_text())
        table = pq.read_table(data, columns=["task", "doc_id"])
        shards[data.stem] = (tally["engines"], list(zip(table.column("task").to_pylist(),
                                                        table.column("doc_id").to_pylist())), data.stem)
    return shards


def test_a_documents_requests_land_on_one_engine_with_the_numbers_of_the_reuse_off(tmp_path_factory):
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(ROOT / "data"))
    from make_harness_tasks import make

    folder = tmp_path_factory.mktemp("placement")
    include_path = make(folder / "tasks")
    records, placed = evaluate(folder, include_path, "two-engines", num_actors=2)
    _, plain = evaluate(folder, include_path, "reuse-off", num_actors=1, prompt_logprob_reuse=False)

    # every number equal, per document: log-likelihoods within 1e-3, is_greedy, acc and acc_norm
    assert placed.keys() == plain.keys() and len(placed) == len(TASKS) * DOCS
    worst = 0.0
    for key, (choices, acc, acc_norm) in placed.items():
        other, other_acc, other_norm = plain[key]
        assert [g for _, g in choices] == [g for _, g in other] and (acc, acc_norm) == (other_acc, other_norm), key
        worst = max([worst] + [abs(a - b) for (a, _), (b, _) in zip(choices, other, strict=True)])
    assert worst <= 1e-3, worst

    shards = shard_engines(records)
    engine_of: dict[tuple[str, int], set[str]] = {}
    for engines, documents, _ in shards.values():
        assert len(engines) == 1, engines  # a shard's rows: one engine (none was replaced)
        for document in documents:
            engine_of.setdefault(document, set()).update(engines)
    assert len(engine_of) == len(TASKS) * DOCS
    assert all(len(e) == 1 for e in engine_of.values()), engine_of  # a document's requests: one engine
    # each task's documents (their own five examples first) on one engine, the two tasks on two
    by_task = {task: set().union(*(e for (t, _), e in engine_of.items() if t == task)) for task in TASKS}
    assert all(len(e) == 1 for e in by_task.values()) and len(set.union(*by_task.values())) == 2, by_task

    summary = json.loads(next(records.glob("loglikelihood-*/records/summary.json")).read_text())
    engines = [e for e in summary["engines"] if e["rows"]]
    assert len(engines) == 2
    for engine in engines:  # each engine computed its task's examples once, and read them back after
        assert engine["prompt_tokens_cached"] > engine["prompt_tokens_computed"], engine
    assert summary["prompt_tokens_cached"] == sum(e["prompt_tokens_cached"] for e in engines)
    print(f"\n{len(shards)} shards on 2 engines; prompt tokens computed/cached per engine: "
          f"{[(e['prompt_tokens_computed'], e['prompt_tokens_cached']) for e in engines]}; largest "
          f"log-likelihood difference from the reuse off {worst:.1e}")
