"""vLLM's Ray metrics logger with the job's labels (pipeline/engine/vllm_metrics.py): vLLM's own
wrappers, given the job's tag keys and values; vLLM's `engine` index replaced by the job's engine id.
(The metrics reaching a real Prometheus from a real job: tests/e2e/test_two_node_poison.py.)"""

import pytest

from pipeline.engine import vllm_metrics
from pipeline.reporting import metrics

TAGS = metrics.labels(output="/tmp/out", model="tiny", engine="ab12cd34.77-2", node="n1")


def test_vllms_labels_and_the_jobs_on_every_metric():
    logger = vllm_metrics.stat_logger(TAGS)
    gauge = logger._gauge_cls("vllm:num_requests_running", "running", labelnames=["model_name", "engine"])
    assert gauge.metric._tag_keys == ("model_name", "engine", "output", "variant", "model", "node", "ReplicaId")
    labelled = gauge.labels("tiny-served", "0")  # as vLLM labels it: served name, engine index
    assert labelled._tags == {"model_name": "tiny-served", "engine": "ab12cd34.77-2", "output": "/tmp/out",
                              "variant": "", "model": "tiny", "node": "n1", "ReplicaId": ""}
    counter = logger._counter_cls("vllm:corrupted_requests", "unlabelled")  # a metric vLLM gives no labels
    assert set(counter._tags) == set(counter.metric._tag_keys) and counter._tags["engine"] == "ab12cd34.77-2"
    histogram = logger._histogram_cls("vllm:time_to_first_token_seconds", "ttft", labelnames=["model_name", "engine"],
                                      buckets=[0.1, 1.0]).labels("tiny-served", "0")
    assert histogram._tags["engine"] == "ab12cd34.77-2" and histogram._tags["output"] == "/tmp/out"
    assert logger._spec_decoding_cls._counter_cls is logger._counter_cls


def test_a_meter_gives_the_next_engine_its_id_and_none_without_labels():
    from pipeline.reporting.progress import EngineMeter

    assert EngineMeter(None, "a.1", "node").next_engine_tags() is None
    logger = vllm_metrics.stat_logger(EngineMeter(None, "a.1", "node", labels={"output": "o", "model": "m"}).next_engine_tags())
    gauge = logger._gauge_cls("vllm:kv_cache_usage_perc", "kv", labelnames=["model_name", "engine"]).labels("m", "0")
    assert gauge._tags["engine"] == "a.1-1" and gauge._tags["node"] == "node"


def test_the_metrics_flush_waits_for_rays_report_interval_and_records_zero_through_rays_private_call(monkeypatch):
    """metrics.report_interval_ms is Ray's setting (its default, or RAY_metrics_report_interval_ms),
    and Counter._record, Ray's private recording the job uses to start a series at 0, still takes a
    value of 0 with the pinned Ray (its public inc refuses 0)."""
    import inspect

    import ray
    from ray.util.metrics import Counter

    from pipeline.reporting.metrics import report_interval_ms

    monkeypatch.delenv("RAY_metrics_report_interval_ms", raising=False)
    assert report_interval_ms() == ray._config.metrics_report_interval_ms()  # the pinned Ray's default
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "2500")
    assert report_interval_ms() == 2500
    assert list(inspect.signature(Counter._record).parameters)[:3] == ["self", "value", "tags"]
    with pytest.raises(ValueError):
        Counter("pipeline_test_zero", tag_keys=()).inc(0)
