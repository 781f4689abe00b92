"""Prefix-aware placement without Ray: an evaluation's requests cut into files of whole documents
(job/request_groups.py), and shards with the same affinity handed to the same actor (engine/shard_calls.py)."""

from __future__ import annotations

from pipeline.engine.shard_calls import Placement, next_actor
from pipeline.engine.work import ShardWork
from pipeline.io.plan import Shard
from pipeline.job import request_groups


def work(name: str, affinity: str = "") -> ShardWork:
    return ShardWork(Shard(name, f"{name}.parquet", 0, 10), "", name, affinity)


def test_an_actor_takes_the_shards_whose_prefix_it_holds_and_steals_only_when_nothing_else_waits():
    waiting = Placement([work("a1", "A"), work("a2", "A"), work("b1", "B"), work("a3", "A"), work("b2", "B"),
                         work("c1", "C")])
    assert waiting.take(0).out == "a1"  # A is actor 0's now
    assert waiting.take(1).out == "b1"  # not a2: A is actor 0's; B is actor 1's now
    assert waiting.take(1).out == "b2"
    assert waiting.take(0).out == "a2"
    assert waiting.take(1).out == "c1"  # the first affinity nobody holds before another's
    assert waiting.take(1).out == "a3"  # only actor 0's left: an idle engine is worse than a prefix computed twice
    assert not waiting


def test_shards_without_affinity_go_in_order_to_the_least_loaded():
    waiting = Placement([work(f"s{i}") for i in range(4)])
    load = {0: 0, 1: 0}
    taken = []
    while waiting and (i := next_actor(load, 2)) is not None:
        taken.append((i, waiting.take(i).out))
        load[i] += 1
    assert taken == [(0, "s0"), (1, "s1"), (0, "s2"), (1, "s3")]


def test_a_round_trip_through_ray_data_rows_keeps_the_affinity():
    item = work("x", "abc")
    assert ShardWork.from_row(item.as_row()) == item


def test_files_hold_whole_documents_and_end_where_the_shared_prefix_changes():
    # documents (a document's requests are neighbours); affinity per request: subject X then Y
    documents = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5]
    affinities = ["X"] * 12 + ["Y"] * 8
    files = request_groups.cut(documents, affinities, target_rows=6)
    assert files == [(0, 8, "X"), (8, 12, "X"), (12, 20, "Y")]  # 6 reached inside document 2: it stays whole
    for start, stop, _ in files:
        assert start == 0 or documents[start] != documents[start - 1]
    # a change of prefix ends a file once it holds half the target
    assert request_groups.cut(documents, affinities, target_rows=20) == [(0, 12, "X"), (12, 20, "Y")]
    assert request_groups.cut(documents, affinities, target_rows=100) == [(0, 20, "X")]
    assert request_groups.cut([7], ["Z"], target_rows=16) == [(0, 1, "Z")]


def test_a_file_name_carries_its_affinity():
    name = request_groups.file_name(3, request_groups.prefix_affinity(list(range(300))))
    assert name.startswith("00003-") and name.endswith(".parquet")
    assert request_groups.affinity_of(f"/out/requests/{name}") == request_groups.prefix_affinity(list(range(128)))
    assert request_groups.prefix_affinity(list(range(128)) + [1]) != request_groups.prefix_affinity([5] + list(range(128)))
    assert request_groups.prefix_affinity([list(range(200))]) == request_groups.prefix_affinity(list(range(200)))
    assert request_groups.prefix_affinity("a" * 600) == request_groups.prefix_affinity("a" * 512 + "b")
    assert request_groups.affinity_of("/in/part-0.parquet") == "0"  # not the harness's: a stable key all the same
    assert request_groups.affinity_of("/in/data.parquet") == ""


def test_records_read_from_a_position_hold_the_same_values_from_there():
    """harness.logprobs_from: what the harness reads of a log-likelihood record, cut in Arrow."""
    import pyarrow as pa

    from pipeline.io.plan import ROW_KEY
    from pipeline.io.records import response_body, result_arrays
    from pipeline.job.harness import logprobs_from

    def response(positions: int, n: int = 1, logprobs: bool = True) -> dict:
        lists = {"text_offset": list(range(positions)), "token_logprobs": [None] + [-0.5 * p for p in range(1, positions)],
                 "tokens": [f"t{p}" for p in range(positions)],
                 "top_logprobs": [None] + [{f"t{p}": -0.5 * p, "x": -9.0} for p in range(1, positions)]}
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "system_fingerprint": None,
                "choices": [{"index": i, "text": "t", "logprobs": lists if logprobs else None, "finish_reason": "length",
                             "stop_reason": None} for i in range(n)],
                "usage": {"prompt_tokens": positions, "completion_tokens": 1, "total_tokens": positions + 1}}

    answers = [(response(9), None), (response(5, n=2), None), (None, {"message": "no", "type": "BadRequestError",
                                                                       "param": None, "code": 400}),
               (response(4, logprobs=False), None), (response(3), None)]
    responses, errors = result_arrays(answers)
    keys = ["a", "b", "c", "d", "e"]
    table = pa.table({ROW_KEY: keys, "response": responses, "error": errors})
    keep = {"a": 6, "b": 2, "c": 3, "d": 1, "e": 10}  # e: past its end, so nothing is kept
    cut = {row[ROW_KEY]: row for row in logprobs_from(table, keep).to_pylist()}
    for key, (whole, error) in zip(keys, answers):
        if whole is None:
            assert cut[key]["response"] is None and cut[key]["error"] == error
            continue
        body = response_body(cut[key]["response"])
        assert body["usage"] == whole["usage"] and len(body["choices"]) == len(whole["choices"])
        for mine, theirs in zip(body["choices"], whole["choices"]):
            if theirs["logprobs"] is None:
                assert mine["logprobs"] is None
                continue
            for name, values in theirs["logprobs"].items():
                assert mine["logprobs"][name] == values[keep[key]:], (key, name)
