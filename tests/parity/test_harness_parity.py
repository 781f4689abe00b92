"""lm-evaluation-harness tasks answered by the pipeline equal `lm_eval --model local-completions` against
vLLM's OpenAI server (the reference server), item by item, and give the same results table.

One local task of each request kind (data/make_harness_tasks.py: multiple choice, generation, rolling
log-likelihood; few-shot examples from their train splits; nothing downloaded). The harness builds the
requests in both runs; only who answers them differs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.models.tiny_model import resolve_model
from tests.integration.conftest import CONTEXT
from tests.parity.conftest import SERVED

pytestmark = [pytest.mark.engine, pytest.mark.slow]
lm_eval = pytest.importorskip("lm_eval")

TASKS = ["tiny_choice", "tiny_qa", "tiny_text"]
TOLERANCE = 1e-4


def _evaluate(model, include_path: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(include_path=str(include_path)),
                           log_samples=True, bootstrap_iters=1000)


@pytest.fixture(scope="module")
def harness(tmp_path_factory, run_job):  # run_job: the session's Ray, shut down at the end
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data"))
    from make_harness_tasks import make

    from pipeline.job.harness_model import register

    folder = tmp_path_factory.mktemp("harness")
    include_path = make(folder / "tasks")
    config = folder / "pipeline.yaml"
    config.write_text(json.dumps({
        "output": str(folder / "records"), "model": {"path": "builtin:tiny-llama", "served_name": SERVED},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
    }))
    pipeline_lm = register()(config=str(config))
    return folder, include_path, pipeline_lm, _evaluate(pipeline_lm, include_path)


def test_every_item_and_the_results_table_equal_local_completions(harness, reference):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import make_table

    _, include_path, _, ours = harness
    theirs = _evaluate(LocalCompletionsAPI(base_url=f"{reference.url}/v1/completions", model=SERVED,
                                           tokenizer=resolve_model("builtin:tiny-llama"),
                                           tokenizer_backend="huggingface", max_length=CONTEXT), include_path)
    worst = {}
    for task in TASKS:
        mine, server = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in server] and mine
        kind = ours["configs"][task]["output_type"]
        for a, b in zip(mine, server):
            assert a["arguments"] == b["arguments"]  # the harness built the same requests
            for x, y in zip(a["resps"], b["resps"], strict=True):
                x, y = x[0], y[0]
                if isinstance(x, str):  # a greedy generation: identical
                    assert x == y, (task, a["doc_id"])
                else:  # (log-likelihood, is_greedy) or a rolling log-likelihood
                    x, y = (x, y) if isinstance(x, float) else (x[0], y[0])
                    worst[kind] = max(worst.get(kind, 0.0), abs(x - y))
                    assert abs(x - y) <= TOLERANCE, (task, a["doc_id"], x, y)
    print("largest log-likelihood difference per kind:", worst)
    assert set(worst) == {"multiple_choice", "loglikelihood_rolling"}
    assert make_table(ours) == make_table(theirs)


def test_requests_are_records_and_a_stopped_evaluation_resumes(harness):
    folder, include_path, pipeline_lm, first = harness
    kinds = sorted(p.name.rsplit("-", 1)[0] for p in (folder / "records").iterdir() if p.name != "answers")
    assert kinds == ["generate_until", "loglikelihood", "loglikelihood_rolling"]
    assert list((folder / "records" / "answers").rglob("part-*.parquet"))  # the evaluation's answer store
    generations = next((folder / "records").glob("generate_until-*"))
    requests = pq.read_table(generations / "requests")
    records = pq.read_table(generations / "records" / "data")
    assert requests.num_rows == records.num_rows == len(first["samples"]["tiny_qa"])
    assert set(records.column("task").to_pylist()) == {"tiny_qa"}
    assert set(records.column("kind").to_pylist()) == {"generate_until"}
    assert sorted(records.column("doc_id").to_pylist()) == sorted(s["doc_id"] for s in first["samples"]["tiny_qa"])
    # a shard lost (as if the evaluation stopped before it was written): the same evaluation again
    # answers only that shard's requests and gives the same results
    lost = sorted((generations / "records" / "data").iterdir())[0]
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()
    again = _evaluate(pipeline_lm, include_path)
    summary = json.loads((generations / "records" / "summary.json").read_text())
    assert summary["rows_run"] == lost_rows and summary["shards_kept"] == summary["shards"] - 1
    assert again["results"] == first["results"]


def test_a_sweep_evaluates_each_variant_and_compares_them_per_task_and_metric(harness, monkeypatch):
    from pipeline.job.eval_command import main

    folder, include_path, _, _ = harness
    config = folder / "sweep.yaml"
    config.write_text(json.dumps({
        "output": str(folder / "sweep-records"),
        "model": {"path": "builtin:tiny-llama", "served_name": SERVED, "adapters": {"tiny-lora-a": "builtin:tiny-lora-a"}},
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
        "sweep": {"models": [SERVED, "tiny-lora-a"]},
        "cost": {"price_per_accelerator_hour": 3.6},
    }))
    results = folder / "sweep-results"
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the harness's command line reads sys.argv
    assert main(["--config", str(config), "--include_path", str(include_path), "--tasks", "tiny_choice",
                 "--limit", "8", "--output_path", str(results)]) == 0
    comparison = json.loads((results / "comparison.json").read_text())
    assert [line["variant"] for line in comparison] == [SERVED, "tiny-lora-a"]
    for line in comparison:
        assert set(line["scores"]) == {"tiny_choice/acc", "tiny_choice/acc_norm"}
        assert all(s["scored"] == 8 and s["pairs"] == 8 for s in line["scores"].values())
    assert comparison[0]["scores"]["tiny_choice/acc"]["diff"] == 0.0  # the baseline against itself
    for line in comparison:  # each variant's cost: its requests' job summaries, added up
        summary = json.loads(next((folder / "sweep-records" / line["variant"]).glob("loglikelihood-*/records/summary.json"))
                             .read_text())
        assert line["cost"]["accelerator_s"] == pytest.approx(summary["cost"]["accelerator_s"])
        assert line["cost"]["total"] == pytest.approx(summary["cost"]["total"])
        assert line["cost"]["accelerator_s"] > 0 and line["cost"]["total"] > 0
    for variant in (SERVED, "tiny-lora-a"):  # the harness's own results, per variant
        assert list((results / variant).glob("results_*.json")) and list((results / variant).glob("samples_tiny_choice_*"))
    # the same requests, each variant's own answers: the adapter changes the log-likelihoods
    answers = {}
    for variant in (SERVED, "tiny-lora-a"):
        records = pq.read_table(next((folder / "sweep-records" / variant).glob("loglikelihood-*")) / "records" / "data")
        answers[variant] = {r["row_key"]: r["response"]["choices"][0]["logprobs"]["token_logprobs"]
                            for r in records.to_pylist()}
        assert {json.loads(b)["model"] for b in records.column("body").to_pylist()} == {variant}
    assert answers[SERVED].keys() == answers["tiny-lora-a"].keys()
    assert any(answers[SERVED][k] != answers["tiny-lora-a"][k] for k in answers[SERVED])


def _summaries(records: Path) -> dict[str, dict]:
    """Each request kind's job summary in an evaluation's records folder (the newest job of a kind)."""
    jobs = sorted(records.glob("*-*/records/summary.json"), key=lambda p: p.stat().st_mtime)
    return {p.parents[1].name.rsplit("-", 1)[0]: json.loads(p.read_text()) for p in jobs}


def test_only_requests_not_answered_before_reach_an_engine(harness):
    """Tasks over the same documents, a rerun with the limit raised, and the same evaluation elsewhere:
    the answer store (`answers/` of the evaluation's output) and merging leave the engine only what is new."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from pipeline.job.harness_model import register

    folder, include_path, _, _ = harness
    tasks = folder / "tasks-again"
    tasks.mkdir()
    for name in ("tiny_choice", "tiny_qa"):
        spec = json.loads((include_path / f"{name}.yaml").read_text())
        (tasks / f"{name}.yaml").write_text(json.dumps(spec))
        (tasks / f"{name}_again.yaml").write_text(json.dumps({**spec, "task": f"{name}_again"}))
    manager = TaskManager(include_path=str(tasks))

    def evaluate(output: Path, names: list[str], limit: int, store: Path | None = None) -> dict:
        config = folder / f"{output.name}.yaml"
        config.write_text(json.dumps({
            "output": str(output), "model": {"path": "builtin:tiny-llama", "served_name": SERVED},
            "engine": {"device": "cpu", "dtype": "float32", "max_model_len": CONTEXT, "gpu_memory_utilization": 0.5},
            **({"answer_store": {"path": str(store)}} if store else {})}))
        return simple_evaluate(model=register()(config=str(config)), tasks=names, task_manager=manager,
                               limit=limit, bootstrap_iters=0)

    first = folder / "again-records"
    evaluate(first, ["tiny_choice", "tiny_qa"], limit=4)
    asked = {kind: s["rows_run"] for kind, s in _summaries(first).items()}
    assert set(asked) == {"loglikelihood", "generate_until"} and all(asked.values())

    # the limit raised, and a second task over the same documents: the first run's requests come from the
    # store, the copies' are merged with their originals; the engine answers only the new documents'
    names = ["tiny_choice", "tiny_choice_again", "tiny_qa", "tiny_qa_again"]
    raised = evaluate(first, names, limit=6)
    for kind, summary in _summaries(first).items():
        per_task = summary["rows_run"] // 2  # a task's requests for 6 documents; the copy has the same
        assert summary["rows_run"] == 2 * per_task > 2 * asked[kind], kind
        assert summary["rows_from_store"] == 2 * asked[kind], kind  # both tasks' first 4 documents
        assert summary["rows_shared"] == per_task - asked[kind], kind  # the copy's 2 new documents
        assert summary["cost"]["output_tokens"] > 0

    # the same evaluation into another output, sharing the store: no request reaches an engine
    elsewhere = folder / "elsewhere-records"
    again = evaluate(elsewhere, names, limit=6, store=first / "answers")
    for kind, summary in _summaries(elsewhere).items():
        assert summary["rows_from_store"] + summary["rows_shared"] == summary["rows_run"] > 0, kind
        assert summary["cost"]["input_tokens"] == summary["cost"]["output_tokens"] == 0, kind
    assert make_table(again) == make_table(raised)
    for task in names:
        assert [s["resps"] for s in again["samples"][task]] == [s["resps"] for s in raised["samples"][task]]
