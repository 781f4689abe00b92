from pipeline.protocol import REQUEST_FIELDS, SPEC_FIELDS, row_to_body


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
