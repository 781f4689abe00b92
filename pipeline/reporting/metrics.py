"""The job's figures as Ray metrics (`ray.util.metrics`): Ray's agent on each node exports them for
Prometheus (`ray start --metrics-export-port`, and Ray's service-discovery file), wherever the actors
run. Ray names them `ray_batch_completions_*` and adds its own labels (node address, worker, session).

Two kinds, both labelled by the job's output location (`output`; not `job`, which Prometheus gives
every scrape target and would rename ours to `exported_job`), variant and model:
- recorded, by the driver as each shard's records are written (the shard's tally), also labelled by
  the engine and node that wrote it: rows by status code, prompt and completion tokens, rows retried,
  recovered and failed, and shards by state (done, kept from an earlier run, failed, redone). They add
  up to the run's figures in `summary.json`.
- live, by each engine actor's meter at every beat (2 s; not per row), labelled by engine and node: rows answered (200s) and their
  output tokens, rows in flight, engine busy seconds, engine starts and restarts. Live figures count an
  answer when it is made, so a shard redone after its actor died counts twice there, never in the
  recorded ones.
And rows planned: the rows the run sets out to answer (progress and ETA on the dashboard).

Figures are best effort: a metric that cannot be recorded is logged at debug level and the job goes on;
a cluster that exports no metrics runs the job the same.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

from pipeline.io.tally import Tally

log = logging.getLogger(__name__)
PREFIX = "batch_completions_"
LABELS = ("output", "variant", "model", "engine", "node")
DESCRIPTIONS = {
    "rows_planned_total": "Rows this run set out to answer (shards not kept from an earlier run).",
    "rows_recorded_total": "Rows whose records were written, by status code (200, each 4xx, 500).",
    "prompt_tokens_total": "Prompt tokens of the rows recorded.",
    "completion_tokens_total": "Completion tokens of the rows recorded.",
    "rows_retried_total": "Rows answered again after their engine died or answered 500.",
    "rows_recovered_total": "Retried rows that got an answer.",
    "rows_failed_total": "Retried rows given up on (recorded as 500s).",
    "rows_shared_total": "Rows recorded with an earlier row's answer to the same request (no engine work).",
    "rows_from_store_total": "Rows recorded with an answer from the answer store (no engine work).",
    "prompt_tokens_cached_total": "Prompt tokens of the rows recorded that an engine read from its prefix cache.",
    "shards_total": "Shards by state: done (written by this run), kept (an earlier run's), failed, redone.",
    "rows_answered_total": "Rows the engines answered with a response (live; a redone shard counts again).",
    "output_tokens_total": "Output tokens of the rows answered (live).",
    "rows_in_flight": "Rows in the engine now.",
    "engine_busy_seconds_total": "Seconds in which the engine had at least one row in it.",
    "engine_starts_total": "Engines started (the first of each actor, and every replacement).",
    "engine_restarts_total": "Engines started to replace one that died or stalled.",
}


@functools.cache
def _metric(name: str, kind: str, tags: tuple[str, ...]) -> Any:
    from ray.util import metrics

    cls = {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind]
    return cls(PREFIX + name, description=DESCRIPTIONS[name], tag_keys=tags)


def _record(name: str, value: float, tags: dict[str, str], kind: str = "counter", zero: bool = False) -> None:
    """Add `value` to a counter (nothing when 0) or set a gauge; `zero`: start a counter's series at 0."""
    if kind == "counter" and not value and not zero:
        return
    try:
        import ray

        if not ray.is_initialized():  # a run with nothing to do starts no Ray: nothing to export to
            return
        metric = _metric(name, kind, tuple(tags))
        if zero:
            # Ray's Counter.inc refuses 0; its recording does not. A series born at its first export
            # with rows already counted would make Prometheus's rate() miss them. PRIVATE INTERNAL: no
            # public way to record 0; tests/unit/test_vllm_metrics.py fails if the pinned Ray changes it.
            metric._record(0.0, tags=tags)  # private-internal: ray Counter._record
        elif kind == "counter":
            metric.inc(value, tags=tags)
        else:
            metric.set(value, tags=tags)
    except Exception:  # noqa: BLE001 - figures are best effort; the records are what matters
        log.debug("could not record the metric %s", name, exc_info=True)


def labels(output: str, model: str, variant: str = "", engine: str = "", node: str = "") -> dict[str, str]:
    """A metric's labels (all of LABELS, some empty: a metric's label set is fixed)."""
    return {"output": output, "variant": variant, "model": model, "engine": engine, "node": node}


def status_codes(tally: Tally) -> dict[str, int]:
    """Rows by status code: 200 for a response, an error's code from `type (code)`."""
    codes = {"200": tally.completions} if tally.completions else {}
    for kind, rows in tally.errors_by_type.items():
        found = re.search(r"\((\d+)\)$", kind)
        code = found.group(1) if found else "unknown"
        codes[code] = codes.get(code, 0) + rows
    return codes


def shard_recorded(tags: dict[str, str], tally: Tally) -> None:
    """A shard's records were written (the driver, from the shard's tally)."""
    for code, rows in status_codes(tally).items():
        _record("rows_recorded_total", rows, {**tags, "code": code})
    for name, value in (("prompt_tokens_total", tally.prompt_tokens),
                        ("completion_tokens_total", tally.completion_tokens),
                        ("rows_retried_total", tally.rows_retried), ("rows_recovered_total", tally.rows_recovered),
                        ("rows_failed_total", tally.rows_failed), ("rows_shared_total", tally.rows_shared),
                        ("rows_from_store_total", tally.rows_from_store),
                        ("prompt_tokens_cached_total", tally.prefix_cached_tokens)):
        _record(name, value, tags)
    shards(tags, "done", 1)


def planned(tags: dict[str, str], rows: int) -> None:
    """The run sets out to answer `rows` rows (the driver, before the engines start)."""
    _record("rows_planned_total", rows, tags)


def shards(tags: dict[str, str], state: str, count: int) -> None:
    _record("shards_total", count, {**tags, "state": state})


def engine_work(tags: dict[str, str], rows: int, output_tokens: int, busy_s: float, in_flight: int) -> None:
    """An engine's work since its last report (the actor's meter, every beat)."""
    _record("rows_answered_total", rows, tags)
    _record("output_tokens_total", output_tokens, tags)
    _record("engine_busy_seconds_total", busy_s, tags)
    _record("rows_in_flight", in_flight, tags, kind="gauge")


def engine_starting(tags: dict[str, str]) -> None:
    """An engine is being started: its live counters' series start at 0, exported while it loads, so
    that rate() counts its first answers too (a series first exported with rows in it would not)."""
    for name in ("rows_answered_total", "output_tokens_total", "engine_busy_seconds_total", "engine_restarts_total"):
        _record(name, 0, tags, zero=True)


def engine_started(tags: dict[str, str], restart: bool) -> None:
    _record("engine_starts_total", 1, tags)
    if restart:
        _record("engine_restarts_total", 1, tags)


REPORT_INTERVAL_MS = 10_000  # Ray's default `metrics_report_interval_ms` (ray_config_def.h)


def report_interval_ms() -> int:
    """How often Ray exports a process's metrics: its `metrics_report_interval_ms` setting, which (as
    every Ray system setting) a `RAY_<name>` environment variable changes, else Ray's default."""
    return int(os.environ.get("RAY_metrics_report_interval_ms") or REPORT_INTERVAL_MS)


def flush() -> None:
    """Wait until Ray has exported what this process recorded (its report interval), before the
    driver exits: what a process records in its last seconds is otherwise never exported."""
    import time

    interval = report_interval_ms() / 1000
    time.sleep(interval + (1.0 if interval >= 1 else 0.5))  # the next export, and time for it to go out
