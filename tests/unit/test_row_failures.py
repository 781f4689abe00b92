"""Plumbing: whatever goes wrong with one row becomes that row's error record (no engine needed)."""

import asyncio
from types import SimpleNamespace

from pipeline.config import ModelConfig, Variant
from pipeline.protocol import completion_id
from pipeline.io.records import ERROR_TYPE, RESPONSE_TYPE, result_arrays
from pipeline.engine.actor import EngineActor, _Retries
from pipeline.engine.supervisor import EngineSupervisor, Row


class Meter:
    def enter(self): ...
    def leave(self): ...
    def answered(self, tokens): ...


class ExplodingBuilder:
    served_name = "tiny-llama"

    def body(self, row, served_name=None):
        if row["prompt"] == "boom":
            raise RuntimeError("an unforeseen bug")
        return {"prompt": row["prompt"]}


class ExplodingEngine:
    async def complete(self, body, request=None):
        raise RuntimeError("an unforeseen bug")


def test_an_exception_building_one_row_is_that_rows_500_record():
    actor = EngineActor.__new__(EngineActor)  # no engine: the body fails before it is needed
    job = SimpleNamespace(builder=ExplodingBuilder())
    variant = Variant("", ModelConfig(), {}, "tiny-llama")
    response, error = actor._body(job, "r1", {"prompt": "boom"}, None, variant)
    assert response is None
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    assert "RuntimeError: an unforeseen bug" in error["message"]
    assert actor._body(job, "r2", {"prompt": "fine"}, None, variant) == {"prompt": "fine"}


def test_an_exception_answering_one_row_is_that_rows_500_record():
    actor = EngineActor.__new__(EngineActor)
    actor._meter = Meter()
    actor._supervisor = EngineSupervisor(ExplodingEngine(), ExplodingEngine, row_retries=0, retry_backoff_s=0,
                                         stall_timeout_s=60, meter=actor._meter)
    on = SimpleNamespace(meter=actor._meter)  # the job as the actor answers it: its meter
    response, error = asyncio.run(actor._answer(on, "r1", Row({"prompt": "boom"}), _Retries()))
    assert response is None
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    assert "RuntimeError: an unforeseen bug" in error["message"] and "other rows were answered" in error["message"]
    responses, errors = result_arrays([(response, error)])
    assert responses.type == RESPONSE_TYPE and errors.type == ERROR_TYPE and errors[0]["code"].as_py() == 500


def test_a_row_problem_found_while_reading_is_kept_as_is():
    actor = EngineActor.__new__(EngineActor)
    problem = {"message": "bad bytes", "type": "BadRequestError", "param": "prompt", "code": 400}
    variant = Variant("", ModelConfig(), {}, "tiny-llama")
    assert actor._body(SimpleNamespace(), "r1", None, problem, variant) == (None, problem)


def test_completion_id_of_a_body_with_a_lone_surrogate():
    assert completion_id("k", {"prompt": "a\ud800b"}).startswith("cmpl-")
    assert completion_id("k", {"prompt": "a\ud800b"}) != completion_id("k", {"prompt": "a\ud801b"})


def test_an_answer_arrow_cannot_hold_is_stored_escaped_and_the_others_untouched():
    quoting = {"message": "stop must not be '\ud800'", "type": "BadRequestError", "param": "stop", "code": 400}
    fine = {"message": "n must be at least 1", "type": "BadRequestError", "param": "n", "code": 400}
    unstorable = {"message": "too big", "type": "BadRequestError", "param": None, "code": 10**30}
    responses, errors = result_arrays([(None, quoting), (None, fine), (None, unstorable)])
    stored = errors.to_pylist()
    assert stored[0]["message"] == "stop must not be '\\ud800'" and stored[0]["code"] == 400
    assert stored[1] == fine
    assert stored[2]["code"] == 500 and "could not be stored" in stored[2]["message"]
    assert responses.null_count == 3
