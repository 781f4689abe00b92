from pipeline.protocol import REQUEST_FIELDS, SPEC_FIELDS, RequestBuilder


def row_to_body(row, body_defaults, served_name, body_column=None):
    return RequestBuilder(served_name=served_name, body_defaults=body_defaults,
                          body_column=body_column).body(row)


def test_request_fields_match_installed_vllm():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    assert REQUEST_FIELDS == set(CompletionRequest.model_fields)
    assert set(SPEC_FIELDS) <= REQUEST_FIELDS


def test_row_values_beat_job_defaults_and_nulls_mean_not_given():
    row = {"id": "r1", "prompt": "hi", "max_tokens": None, "stop": ["x"], "temperature": 0.5}
    body = row_to_body(row, {"stop": ["\n"], "seed": 3}, "served")
    assert body == {"prompt": "hi", "stop": ["x"], "temperature": 0.5, "seed": 3, "model": "served"}


def test_row_model_is_kept():
    assert row_to_body({"prompt": "a", "model": "other"}, {}, "served")["model"] == "other"


def test_body_column_json_and_struct_with_column_overrides():
    row = {"body": '{"prompt": "from body", "max_tokens": 5, "stop": ["x"]}', "max_tokens": 7, "stop": None}
    assert row_to_body(row, {"seed": 1}, "m", "body") == {
        "seed": 1, "prompt": "from body", "max_tokens": 7, "stop": ["x"], "model": "m"}
    struct_row = {"body": {"prompt": "p", "n": None, "temperature": 0.0}}
    assert row_to_body(struct_row, {}, "m", "body") == {"prompt": "p", "temperature": 0.0, "model": "m"}


def test_bad_bodies_are_400_records():
    import pytest

    from pipeline.protocol import BodyError

    for raw, needle in (('{"prompt": "cut', "not valid JSON"), ("[1, 2]", "must be a JSON object")):
        with pytest.raises(BodyError, match=needle) as err:
            row_to_body({"body": raw}, {}, "m", "body")
        assert err.value.error["code"] == 400 and err.value.error["param"] == "body"
