"""vLLM's own engine metrics (running and waiting requests, KV-cache use, prefix-cache hits, time to first
token, inter-token latency, prompt and generation tokens, ...) through vLLM's Ray metrics logger
(`vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger`, what ray.data.llm and Ray Serve LLM use), with
the job's labels added: Ray exports them from each engine actor as `ray_vllm_*`.

vLLM labels its metrics `model_name` (the served name) and `engine` (its index in a data-parallel group,
always 0 here); the logger made here sets `engine` to the job's engine id (the same as on the job's own
metrics: actor, process and engine generation) and adds `output`, `variant`, `model` and `node`, so
that one query joins vLLM's figures and the job's. Nothing is re-implemented: vLLM records, Ray exports.
"""

from __future__ import annotations

from typing import Any


def stat_logger(tags: dict[str, str]) -> type:
    """A `RayPrometheusStatLogger` class (vLLM's `stat_loggers` take the class) whose metrics carry
    `tags` besides vLLM's own labels; `tags["engine"]` replaces vLLM's engine index."""
    from vllm.v1.metrics import ray_wrappers as vllm_ray

    if vllm_ray.ray_metrics is None:
        # vLLM 0.32 imports Ray Serve and Ray's metrics in one `try`: without Ray Serve's extras (not
        # needed here) it takes Ray for missing. Its Serve replica id then stays empty, as outside Serve.
        from ray.util import metrics as ray_metrics

        vllm_ray.ray_metrics, vllm_ray.Metric, vllm_ray.ray_serve = ray_metrics, ray_metrics.Metric, None
    class Tagged:
        """Mixed into vLLM's Ray metric wrappers: the job's tag keys on every metric, their values
        on every label set (also on a metric vLLM never labels)."""

        @staticmethod
        def _get_tag_keys(labelnames: list[str] | None) -> tuple[str, ...]:
            keys = list(labelnames or [])
            return (*keys, *(k for k in tags if k not in keys), "ReplicaId")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._tags = self._build_tags()

        def _build_tags(self, *labels: Any, **named: Any) -> dict[str, str]:
            named.update(zip(self.metric._tag_keys, labels))
            named.update(tags)
            named["ReplicaId"] = ""
            return {key: str(value) for key, value in named.items()}

    def tagged(cls: type) -> type:
        return type(cls.__name__, (Tagged, cls), {})

    gauge, counter, histogram = (tagged(vllm_ray.RayGaugeWrapper), tagged(vllm_ray.RayCounterWrapper),
                                 tagged(vllm_ray.RayHistogramWrapper))
    return type("JobRayPrometheusStatLogger", (vllm_ray.RayPrometheusStatLogger,), {
        "_gauge_cls": gauge, "_counter_cls": counter, "_histogram_cls": histogram,
        "_spec_decoding_cls": type("SpecDecoding", (vllm_ray.RaySpecDecodingProm,), {"_counter_cls": counter}),
        "_kv_connector_cls": type("KVConnector", (vllm_ray.RayKVConnectorProm,), {
            "_gauge_cls": gauge, "_counter_cls": counter, "_histogram_cls": histogram}),
        "_perf_metrics_cls": type("PerfMetrics", (vllm_ray.RayPerfMetricsProm,), {"_counter_cls": counter}),
    })
