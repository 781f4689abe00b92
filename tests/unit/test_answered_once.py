"""What makes two rows one request (engine/shared_answers.py) and what the answer store keys, keeps
and skips (io/answer_store.py), without an engine."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.engine.shared_answers import SharedAnswers, copied, share_key
from pipeline.io.answer_store import AnswerStore
from pipeline.io.records import result_arrays

GREEDY = {"model": "tiny-llama", "prompt": "Once", "temperature": 0}


def test_greedy_and_seeded_rows_share_unseeded_sampled_rows_never():
    assert share_key(GREEDY, 0.2) == share_key(dict(reversed(GREEDY.items())), 0.2)  # key order does not matter
    assert share_key({"model": "m", "prompt": "Once", "temperature": 0.9, "seed": 3}, 0.2) is not None
    assert share_key({"model": "m", "prompt": "Once", "temperature": 0.9, "n": 2, "seed": 3}, 0.2) is not None
    assert share_key({"model": "m", "prompt": "Once", "temperature": 0.9}, 0.2) is None
    assert share_key({"model": "m", "prompt": "Once", "n": 3}, 0.2) is None  # the job's default samples
    assert share_key({"model": "m", "prompt": "Once"}, 0.0) is not None  # a greedy job default
    assert share_key({**GREEDY, "max_tokens": 5}, 0.2) != share_key(GREEDY, 0.2)


def test_one_leader_per_request_and_a_failed_leader_leads_no_one():
    async def scenario():
        shared = SharedAnswers()
        lead, future = shared.claim("k")
        follow, same = shared.claim("k")
        assert (lead, follow, same is future) == (True, False, True)
        future.set_exception(RuntimeError("no engine"))
        future.exception()
        again, fresh = shared.claim("k")  # the next row with the request leads again
        assert again and fresh is not future

    asyncio.run(scenario())


def test_a_copy_is_the_leaders_answer_with_its_own_id():
    answer = ({"id": "cmpl-a", "choices": [{"text": "x"}]}, None)
    response, error = copied(answer, "cmpl-b")
    assert response == {"id": "cmpl-b", "choices": [{"text": "x"}]} and error is None
    response["choices"][0]["text"] = "changed"
    assert answer[0]["choices"][0]["text"] == "x"  # not shared: a copy


def answer(text: str) -> dict:
    """A response body as the engine gives it (the fields the records keep)."""
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}


def store_answers(store: AnswerStore, bodies: list[dict], texts: list[str]) -> None:
    """Write (store.key(body), body, answer(text)) entries, as store_new_answers does: the records' array."""
    responses, _ = result_arrays([(answer(t), None) for t in texts])
    store.write([store.key(b) for b in bodies], bodies, responses)


def text(response: dict) -> str:
    return response["choices"][0]["text"]


def test_the_store_keys_the_context_too(tmp_path):
    one, other = AnswerStore(str(tmp_path), '{"model": 1}'), AnswerStore(str(tmp_path), '{"model": 2}')
    assert one.key(GREEDY) != other.key(GREEDY) and one.folder != other.folder
    store_answers(one, [GREEDY], ["x"])
    assert one.lookup({one.key(GREEDY)}) == {one.key(GREEDY): answer("x")}  # the body, field for field
    assert other.lookup({other.key(GREEDY)}) == {}
    store_answers(AnswerStore(str(tmp_path), '{"model": 1}', mode="read"), [GREEDY], ["y"])  # read-only: nothing
    assert len(list(tmp_path.rglob("part-*.parquet"))) == 1


def test_writers_at_once_leave_a_readable_store(tmp_path):
    store = AnswerStore(str(tmp_path), "{}")
    bodies = [{**GREEDY, "prompt": f"p{i}"} for i in range(40)]

    def write(part):
        for body in part:
            store_answers(store, [body], [body["prompt"]])

    threads = [threading.Thread(target=write, args=(bodies[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    found = AnswerStore(str(tmp_path), "{}").lookup({store.key(b) for b in bodies})
    assert sorted(text(r) for r in found.values()) == sorted(b["prompt"] for b in bodies)


@pytest.mark.parametrize("damage", [b"", b"PAR1 not really"])
def test_a_damaged_file_is_skipped(tmp_path, damage):
    store = AnswerStore(str(tmp_path), '{"d": 1}')
    store_answers(store, [GREEDY], ["kept"])
    (tmp_path / store.folder.rsplit("/", 1)[1] / "part-broken.parquet").write_bytes(damage)
    assert store.lookup({store.key(GREEDY)}) == {store.key(GREEDY): answer("kept")}


def test_lookups_at_once_each_find_every_stored_answer(tmp_path):
    """Shards of one actor look up at once, in threads: none may miss a file another is indexing."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.io import answer_store

    store = AnswerStore(str(tmp_path), "{}")
    bodies = [{**GREEDY, "prompt": f"p{i}"} for i in range(200)]
    for part in range(20):
        store_answers(store, bodies[part::20], [b["prompt"] for b in bodies[part::20]])
    for _ in range(5):  # a fresh process's index each time
        answer_store._INDEXES.pop(store.folder, None)
        keys = {store.key(b) for b in bodies}
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda _: store.lookup(keys), range(8)))
        assert all(len(f) == 200 for f in found)


def test_a_repeat_of_a_request_given_up_on_is_counted_failed_like_it():
    from types import SimpleNamespace

    from pipeline.engine.shared_answers import repeated

    async def main():
        counts = SimpleNamespace(shared=0, retried=0, failed=0, reused=lambda response: None)
        loop = asyncio.get_running_loop()
        given_up, answered = loop.create_future(), loop.create_future()
        given_up.set_result((None, {"code": 500, "message": "kills the engine"}))
        answered.set_result(({"id": "x", "choices": [], "usage": {}}, None))
        await repeated("k1", GREEDY, given_up, counts)
        await repeated("k2", GREEDY, answered, counts)
        return counts

    counts = asyncio.run(main())
    assert (counts.shared, counts.retried, counts.failed) == (2, 1, 1)


def test_a_store_written_before_as_json_is_still_read(tmp_path):
    """Stores written before 2026-12-05 hold each response as a JSON string."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    store = AnswerStore(str(tmp_path), "{}")
    folder = tmp_path / store.folder.rsplit("/", 1)[1]
    folder.mkdir()
    pq.write_table(pa.table({"key": [store.key(GREEDY)], "response": [json.dumps(answer("old"))],
                             "body": [json.dumps(GREEDY)], "stored_at": [1.0]}), folder / "part-old.parquet")
    store_answers(store, [{**GREEDY, "prompt": "new"}], ["new"])
    found = store.lookup({store.key(GREEDY), store.key({**GREEDY, "prompt": "new"})})
    assert sorted(text(r) for r in found.values()) == ["new", "old"]
