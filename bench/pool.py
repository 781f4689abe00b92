"""Standing engine pools (`python -m pipeline engines start`) against jobs that start their own engines.

    .venv/bin/python bench/pool.py                                   # all four parts, 3 rounds
    .venv/bin/python bench/pool.py --part cold-vs-attached --rounds 1
    .venv/bin/python bench/pool.py --part records-equal
    .venv/bin/python bench/pool.py --part concurrent
    .venv/bin/python bench/pool.py --part feeding --rounds 1

Every job is a subprocess `python -m pipeline run --config configs/local-cpu.yaml --input X --output Y
[--pool NAME] [--set ...]` into a fresh output folder: "cold" without `--pool` (the job starts its own
local Ray and engine), "attached" with `--pool NAME`. Every part starts the pools it needs with
`python -m pipeline engines start`, on a local Ray head of its own (`PIPELINE_LOCAL_HEAD` names a file in
the part's temp folder, so the user's head, ~/.local/state/batch-completions/ray-head.json, is never
touched), and stops them in a `finally` (`engines stop NAME`; stopping the last pool stops that head).

Parts (`--part`, default all; each runs alone):

  cold-vs-attached  One pool of 1 engine, started once (its start is timed). `--rounds` rounds, the two
                    modes taking turns (their order swapped every round), of two jobs: make demo's 320
                    rows (data/sample_prompts.parquet) and its first 20 rows. Per run: first record =
                    the earliest mtime of a file in <output>/data/ (shards are written atomically when
                    done) minus the command's start, read after it exits; wall = the command's start to
                    its exit. Medians. Targets: attached 20-row wall / cold 20-row wall <= 0.25,
                    attached first record <= 3 s.
  records-equal     24 rows (sample prompts, `id` as the row key): 12 greedy (temperature 0), 12 sampled
                    (temperature 0.8, a `seed` per row), max_tokens 32; run cold, then attached. Compares
                    each row's choices' text and finish_reason and the usage by row key. Target: 0 differ.
  concurrent        One pool of 2 engines; two jobs of 1,000 rows each (sample prompts varied, unique
                    ids, max_tokens 32, temperature 0, `--set engine.num_actors=2` so their shards are
                    sized for 2 engines) submitted together as two subprocesses. Checks: both exit 0,
                    2,000 records, no row key twice. Engine utilisation over the overlap (target >= 90%):
                    the overlap is [the later job's first shard start, the earlier job's last shard end]
                    (the shards' [start, end] intervals in <output>/shards/*.json); the engines' busy
                    time in it is read from the pool: a helper process (this file, `--poll`) asks the
                    pool's keeper for each engine's status every 0.5 s (busy_share x alive_s, the
                    engine's busy seconds since its actor started: time with at least one row in it),
                    and the busy seconds at the overlap's ends are interpolated between samples.
                    utilisation = sum over engines of busy seconds in the overlap / (2 x overlap s).
                    Also reported, from the jobs' summary.json only: (sum of both jobs' `engines[].busy_s`,
                    each job's share of the engines' busy time) / (2 x the overlap), and the same over
                    the union [first shard start, last shard end].
  feeding           1,920 rows (max_tokens 16, temperature 0) on one engine, attached and cold, in
                    40-row shards (`--set output.rows_per_file=40`) vs one shard (=1920); `--rounds`
                    rounds taking turns. Median wall per case; ratio 40-row / one shard, per mode (target
                    within 10%: 0.9..1.1). For cold runs also wall minus the summary's
                    first_engine_ready_s (the work after the engine was ready).

Writes bench/results/pool.json (each part's figures under its name; a part run alone replaces only its
own entry) and prints a table per part.

The machine (the development one has 2 cores) is shared by everything: the pool's engines (1 core each
reserved in Ray), the jobs' driver processes, a cold job's own Ray and engine start-up, the idle pool
while a cold job runs, the poller, and any other Ray cluster or process on the machine. With 2 engines
both cores are the engines', so the drivers of the two concurrent jobs compete with them. Run it on an
otherwise idle machine; the load average at each part's start is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = "configs/local-cpu.yaml"
SAMPLE = ROOT / "data" / "sample_prompts.parquet"
OUT = ROOT / "bench" / "results" / "pool.json"
PARTS = ("cold-vs-attached", "records-equal", "concurrent", "feeding")
ROW_KEY = "row_key"  # pipeline.io.plan.ROW_KEY (read from there in main, to stay in step)
POLL_S = 0.5


# ---------------------------------------------------------------------------------------------- helpers

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def base_env(head_file: Path) -> dict[str, str]:
    """The subprocesses' environment: this part's own local head record, no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["PIPELINE_LOCAL_HEAD"] = str(head_file)
    return env


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_job(env: dict[str, str], work: Path, label: str, input_path: Path, pool: str | None = None,
              sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start `python -m pipeline run` into a fresh output folder; `finish_job` waits for it."""
    output = work / "out" / label
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    command = pipeline_cmd("run", "--config", CONFIG, "--input", str(input_path), "--output", str(output),
                           *(["--pool", pool] if pool else []), *[a for s in sets for a in ("--set", s)])
    log_file = work / "logs" / f"{label}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "w")
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    return {"label": label, "mode": "attached" if pool else "cold", "output": output, "log": log_file,
            "command": command, "process": process, "started": started, "_out": out}


def finish_job(job: dict[str, Any]) -> dict[str, Any]:
    """Wait for the job; its exit code, wall time, first record time and summary figures."""
    rc = job["process"].wait()
    ended = time.time()
    job["_out"].close()
    output: Path = job["output"]
    files = sorted((output / "data").rglob("*.parquet")) if (output / "data").exists() else []
    mtimes = [f.stat().st_mtime for f in files]
    summary = json.loads((output / "summary.json").read_text()) if (output / "summary.json").exists() else {}
    spans = shard_intervals(output)
    result = {
        "label": job["label"], "mode": job["mode"], "rc": rc, "output": str(output), "log": str(job["log"]),
        "started": job["started"], "ended": ended, "wall_s": round(ended - job["started"], 3),
        "first_record_s": round(min(mtimes) - job["started"], 3) if mtimes else None,
        "last_record_s": round(max(mtimes) - job["started"], 3) if mtimes else None,
        "files": len(files), "rows_out": summary.get("rows_out"), "errors": summary.get("errors"),
        "summary_wall_s": summary.get("wall_s"), "first_engine_ready_s": summary.get("first_engine_ready_s"),
        "completion_tokens": summary.get("run_completion_tokens"),
        # the job's start-up: the command's start to its first shard's start (<output>/shards/*.json)
        "first_shard_start_s": round(min(a for a, _ in spans) - job["started"], 3) if spans else None,
        # the shards' work: the first shard's start to the last one's end
        "work_s": round(max(b for _, b in spans) - min(a for a, _ in spans), 3) if spans else None,
        "engine_busy_s": round(sum(e.get("busy_s", 0.0) for e in summary.get("engines", [])), 3),
        "engines": [{k: e.get(k) for k in ("engine", "busy_s", "alive_s", "busy_share", "rows", "pool")}
                    for e in summary.get("engines", [])],
    }
    if rc != 0:
        log(f"{job['label']}: exit {rc}; {' '.join(job['command'])}\n{tail(job['log'])}")
    return result


def run_job(env: dict[str, str], work: Path, label: str, input_path: Path, pool: str | None = None,
            sets: tuple[str, ...] = ()) -> dict[str, Any]:
    result = finish_job(start_job(env, work, label, input_path, pool, sets))
    first = f"{result['first_record_s']:.1f}s" if result["first_record_s"] is not None else "none"
    log(f"{label}: exit {result['rc']}, first record {first}, wall {result['wall_s']:.1f}s, "
        f"{result['rows_out']} records, {result['completion_tokens']} tokens, shard work {result['work_s']}s")
    return result


def shard_intervals(output: str | Path) -> list[tuple[float, float]]:
    spans = []
    for path in Path(output, "shards").rglob("*.json"):
        spans += [(a, b) for a, b in json.loads(path.read_text()).get("intervals", [])]
    return sorted(spans)


@contextlib.contextmanager
def pools(work: Path, specs: list[tuple[str, tuple[str, ...]]]) -> Iterator[dict[str, Any]]:
    """Start the named pools (name, --set overrides) on a local head of this part's own; yields each
    pool's start figures and the environment to run jobs with. Stops them (and so the head) after."""
    head_file = work / "ray-head.json"
    env = base_env(head_file)
    started: dict[str, Any] = {"env": env, "pools": {}}
    try:
        for name, sets in specs:
            log_file = work / "logs" / f"pool-{name}-start.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(log_file, "w") as out:
                rc = subprocess.run(pipeline_cmd("engines", "start", "--config", CONFIG, "--name", name,
                                                 *[a for s in sets for a in ("--set", s)]),
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL).returncode
            took = time.time() - t0
            if rc != 0:
                raise RuntimeError(f"engines start --name {name} exited {rc}:\n{tail(log_file)}")
            head_started = "started a local Ray head" in log_file.read_text()
            started["pools"][name] = {"start_s": round(took, 3), "head_started_too": head_started,
                                      "overrides": list(sets)}
            log(f"pool {name}: ready in {took:.1f}s" + (" (with the local head's start)" if head_started else ""))
        yield started
    finally:
        for name, _ in reversed(specs):
            result = subprocess.run(pipeline_cmd("engines", "stop", name), cwd=ROOT, env=env,
                                    capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                log(f"engines stop {name}: exit {result.returncode}: {(result.stdout + result.stderr)[-600:]}")
        stop_own_head(head_file)


def stop_own_head(head_file: Path) -> None:
    """If the head this part started is still up (a pool failed to start, or a stop failed), stop it
    as pipeline.pool.local_head.stop does: SIGTERM to its own `ray start --block` process."""
    try:
        pid = json.loads(head_file.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, 0)
    except OSError:
        return
    log(f"the part's local head (pid {pid}) is still up: stopping it")
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.5)
    log(f"the part's local head (pid {pid}) did not stop in 60 s")


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "NOT met")


def sample_table() -> pa.Table:
    return pq.read_table(SAMPLE)


def varied_rows(n: int, prefix: str, max_tokens: int) -> pa.Table:
    """n rows of the sample's prompts, varied (so no two are the same text), unique ids, greedy."""
    prompts = sample_table().column("prompt").to_pylist()
    return pa.table({
        "id": [f"{prefix}-{i:05d}" for i in range(n)],
        "prompt": [f"{prompts[i % len(prompts)]} (Part {i // len(prompts) + 1}, {prefix}.)" for i in range(n)],
        "max_tokens": pa.array([max_tokens] * n, pa.int64()),
        "temperature": pa.array([0.0] * n, pa.float64()),
    })


def read_records(output: str | Path, columns: list[str]) -> pa.Table:
    files = sorted(Path(output, "data").rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else pa.table({})


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ------------------------------------------------------------------------------------------------ parts

def part_cold_vs_attached(work: Path, rounds: int) -> dict[str, Any]:
    rows20 = work / "sample20.parquet"
    pq.write_table(sample_table().slice(0, 20), rows20)
    inputs = {"320 rows": SAMPLE, "20 rows": rows20}
    name = "bench-cva"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {w: {"cold": [], "attached": []} for w in inputs}
    with pools(work, [(name, ())]) as started:
        env = started["env"]
        for r in range(rounds):
            modes = ("cold", "attached") if r % 2 == 0 else ("attached", "cold")
            for workload, path in inputs.items():
                for mode in modes:
                    label = f"r{r + 1}-{workload.replace(' ', '')}-{mode}"
                    runs[workload][mode].append(run_job(env, work, label, path, pool=name if mode == "attached" else None))
    medians = {w: {m: {"wall_s": median([x["wall_s"] for x in rs]), "first_record_s": median([x["first_record_s"] for x in rs]),
                       "first_shard_start_s": median([x["first_shard_start_s"] for x in rs]),
                       "work_s": median([x["work_s"] for x in rs]),
                       "completion_tokens": median([x["completion_tokens"] for x in rs]),
                       "all_exit_0": all(x["rc"] == 0 for x in rs), "records": [x["rows_out"] for x in rs]}
                   for m, rs in by_mode.items()} for w, by_mode in runs.items()}
    ratio20 = (medians["20 rows"]["attached"]["wall_s"] / medians["20 rows"]["cold"]["wall_s"]
               if medians["20 rows"]["cold"]["wall_s"] else None)
    ratio320 = (medians["320 rows"]["attached"]["wall_s"] / medians["320 rows"]["cold"]["wall_s"]
                if medians["320 rows"]["cold"]["wall_s"] else None)
    firsts = [medians[w]["attached"]["first_record_s"] for w in inputs]
    result = {
        "rounds": rounds, "pool_start_s": started["pools"][name]["start_s"],
        "pool_start_included_head_start": started["pools"][name]["head_started_too"],
        "medians": medians,
        "ratio_wall_attached_over_cold_20_rows": round(ratio20, 3) if ratio20 else None,
        "ratio_wall_attached_over_cold_320_rows": round(ratio320, 3) if ratio320 else None,
        "target_ratio_20_rows_le_0.25": ratio20 is not None and ratio20 <= 0.25,
        "attached_first_record_s": dict(zip(inputs, firsts)),
        "target_attached_first_record_le_3s": all(f is not None and f <= 3 for f in firsts),
        "runs": runs,
        "how": "wall: subprocess start to exit; first record: min mtime of <output>/data/* minus the start "
               "(read after exit); first shard start: the earliest shard interval start (shards/*.json) minus "
               "the start; shard work: first shard start to last shard end (shards/*.json); out "
               "tokens: the run's completion tokens (the sample's rows that sample without a seed make "
               "them differ from run to run, e.g. a row with stop '.' and max_tokens 1024); medians over "
               "rounds; modes take turns, order swapped every round",
    }
    print(f"\n== cold vs attached: {rounds} round(s), medians; pool start {result['pool_start_s']:.1f}s"
          f"{' (including the local head start)' if result['pool_start_included_head_start'] else ''} ==")
    print(f"{'job':<10} {'mode':<9} {'first shard start':>17} {'first record':>13} {'wall':>8} {'shard work':>11} "
          f"{'out tokens':>11}  exit 0")
    for w in inputs:
        for m in ("cold", "attached"):
            x = medians[w][m]
            fr = f"{x['first_record_s']:.1f}s" if x["first_record_s"] is not None else "none"
            wl = f"{x['wall_s']:.1f}s" if x["wall_s"] is not None else "none"
            wk = f"{x['work_s']:.1f}s" if x["work_s"] is not None else "none"
            fs = f"{x['first_shard_start_s']:.1f}s" if x["first_shard_start_s"] is not None else "none"
            print(f"{w:<10} {m:<9} {fs:>17} {fr:>13} {wl:>8} {wk:>11} {x['completion_tokens']!s:>11}  "
                  f"{'yes' if x['all_exit_0'] else 'NO'}")
    print(f"attached / cold wall, 20 rows: {result['ratio_wall_attached_over_cold_20_rows']} "
          f"(target <= 0.25: {ok(result['target_ratio_20_rows_le_0.25'])}); 320 rows: "
          f"{result['ratio_wall_attached_over_cold_320_rows']}")
    print("attached first record: " + ", ".join(f"{w} {f:.1f}s" if f is not None else f"{w} none"
                                               for w, f in result["attached_first_record_s"].items())
          + f" (target <= 3 s: {ok(result['target_attached_first_record_le_3s'])})")
    return result


def part_records_equal(work: Path, rounds: int) -> dict[str, Any]:
    sample = sample_table()
    prompts = sample.column("prompt").to_pylist()[:24]
    n = len(prompts)
    table = pa.table({
        "id": [f"eq-{i:02d}" for i in range(n)],
        "prompt": prompts,
        "max_tokens": pa.array([32] * n, pa.int64()),
        "temperature": pa.array([0.0 if i < n // 2 else 0.8 for i in range(n)], pa.float64()),
        "seed": pa.array([None if i < n // 2 else 1000 + i for i in range(n)], pa.int64()),
    })
    path = work / "equal24.parquet"
    pq.write_table(table, path)
    sets = ("input.id_column=id",)
    name = "bench-eq"
    with pools(work, [(name, ())]) as started:
        env = started["env"]
        cold = run_job(env, work, "equal-cold", path, sets=sets)
        attached = run_job(env, work, "equal-attached", path, pool=name, sets=sets)
    columns = [ROW_KEY, "temperature", "response", "error"]
    answers = {}
    for run in (cold, attached):
        records = read_records(run["output"], columns).to_pylist()
        answers[run["mode"]] = {r[ROW_KEY]: r for r in records}

    def essence(record: dict[str, Any] | None) -> Any:
        if record is None:
            return None
        response = record["response"]
        if isinstance(response, str):
            response = json.loads(response)
        if response is None:
            return {"error": record["error"]}
        return {"choices": [(c["text"], c["finish_reason"]) for c in response["choices"]],
                "usage": response.get("usage")}

    keys = sorted(set(answers["cold"]) | set(answers["attached"]))
    differ = []
    counts = {"greedy": [0, 0], "seeded": [0, 0]}  # compared, differ
    errors = 0
    for key in keys:
        a, b = answers["cold"].get(key), answers["attached"].get(key)
        kind = "greedy" if (a or b)["temperature"] == 0.0 else "seeded"
        counts[kind][0] += 1
        errors += sum(1 for r in (a, b) if r is not None and r["response"] is None)
        if essence(a) != essence(b):
            counts[kind][1] += 1
            differ.append({"row_key": key, "kind": kind, "cold": essence(a), "attached": essence(b)})
    result = {
        "rows": n, "greedy_rows": n // 2, "seeded_rows": n - n // 2, "max_tokens": 32,
        "cold": {k: cold[k] for k in ("rc", "wall_s", "work_s", "rows_out", "errors", "completion_tokens")},
        "attached": {k: attached[k] for k in ("rc", "wall_s", "work_s", "rows_out", "errors", "completion_tokens")},
        "compared": len(keys), "differ": len(differ),
        "greedy_compared_differ": counts["greedy"], "seeded_compared_differ": counts["seeded"],
        "error_records": errors, "target_0_differ": len(differ) == 0 and len(keys) == n and errors == 0,
        "differences": differ[:5],
        "how": "by row_key (input.id_column=id): each choice's (text, finish_reason) and the usage of the "
               "response; cold run first, then attached",
    }
    print(f"\n== records equal: {n} rows ({n // 2} greedy, {n - n // 2} temperature 0.8 with a seed), "
          "cold vs attached ==")
    print(f"cold: exit {cold['rc']}, {cold['rows_out']} records, wall {cold['wall_s']:.1f}s, shard work "
          f"{cold['work_s']}s; attached: exit {attached['rc']}, {attached['rows_out']} records, wall "
          f"{attached['wall_s']:.1f}s, shard work {attached['work_s']}s; error records {errors}")
    print(f"compared {len(keys)} rows: greedy {counts['greedy'][0]} ({counts['greedy'][1]} differ), seeded "
          f"{counts['seeded'][0]} ({counts['seeded'][1]} differ); differ {len(differ)} "
          f"(target 0: {ok(result['target_0_differ'])})")
    for d in differ[:3]:
        print(f"  {d['row_key']} ({d['kind']}): cold {d['cold']} / attached {d['attached']}")
    return result


def part_concurrent(work: Path, rounds: int, rows: int = 1000, max_tokens: int = 32) -> dict[str, Any]:
    paths = {}
    for prefix in ("a", "b"):
        paths[prefix] = work / f"concurrent-{prefix}.parquet"
        pq.write_table(varied_rows(rows, prefix, max_tokens), paths[prefix])
    sets = ("input.id_column=id", "engine.num_actors=2")
    name = "bench-two"
    samples_file = work / "poll.jsonl"
    with pools(work, [(name, ("engine.num_actors=2",))]) as started:
        env = started["env"]
        poll_log = open(work / "logs" / "poll.log", "w")
        poller = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--poll", name,
                                   "--poll-out", str(samples_file)], cwd=ROOT, env=env, stdout=poll_log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_samples(samples_file, poller)
            jobs = [start_job(env, work, f"concurrent-{p}", paths[p], pool=name, sets=sets) for p in ("a", "b")]
            done = [finish_job(j) for j in jobs]
            time.sleep(2 * POLL_S)  # a sample after both ended
        finally:
            poller.send_signal(signal.SIGTERM)
            try:
                poller.wait(timeout=30)
            except subprocess.TimeoutExpired:
                poller.kill()
                poller.wait()
            poll_log.close()
    for d in done:
        log(f"{d['label']}: exit {d['rc']}, wall {d['wall_s']:.1f}s, {d['rows_out']} records")
    keys = {}
    for d in done:
        keys[d["label"]] = read_records(d["output"], [ROW_KEY]).column(ROW_KEY).to_pylist() if d["files"] else []
    repeated = {label: len(k) - len(set(k)) for label, k in keys.items()}
    both = [k for ks in keys.values() for k in ks]
    spans = {d["label"]: shard_intervals(d["output"]) for d in done}
    firsts = {label: min(a for a, _ in s) for label, s in spans.items() if s}
    lasts = {label: max(b for _, b in s) for label, s in spans.items() if s}
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()] \
        if samples_file.exists() else []
    result: dict[str, Any] = {
        "rows_per_job": rows, "max_tokens": max_tokens, "engines": 2,
        "pool_start_s": started["pools"][name]["start_s"],
        "jobs": done, "all_exit_0": all(d["rc"] == 0 for d in done),
        "records_total": len(both), "target_records": 2 * rows,
        "row_keys_repeated_within_job": repeated, "row_keys_repeated_across_jobs": len(both) - len(set(both)),
        "poll_samples": len(samples),
    }
    if len(firsts) == 2:
        overlap_start, overlap_end = max(firsts.values()), min(lasts.values())
        union_start, union_end = min(firsts.values()), max(lasts.values())
        overlap = overlap_end - overlap_start
        union = union_end - union_start
        jobs_busy = sum(d["engine_busy_s"] for d in done)
        engine_busy_overlap = busy_between(samples, overlap_start, overlap_end) if overlap > 0 else None
        engine_busy_union = busy_between(samples, union_start, union_end)
        result.update({
            "job_shard_work": {label: [round(firsts[label] - done[0]["started"], 3), round(lasts[label] - done[0]["started"], 3)]
                               for label in firsts},
            "overlap_s": round(overlap, 3), "union_s": round(union, 3),
            "engine_busy_s_in_overlap": engine_busy_overlap,
            "utilisation_overlap": round(sum(engine_busy_overlap.values()) / (2 * overlap), 4)
            if engine_busy_overlap and overlap > 0 else None,
            "engine_busy_s_in_union": engine_busy_union,
            "utilisation_union": round(sum(engine_busy_union.values()) / (2 * union), 4)
            if engine_busy_union and union > 0 else None,
            "jobs_busy_s_sum": round(jobs_busy, 3),
            "utilisation_from_summaries_over_overlap": round(jobs_busy / (2 * overlap), 4) if overlap > 0 else None,
            "utilisation_from_summaries_over_union": round(jobs_busy / (2 * union), 4) if union > 0 else None,
        })
    result["target_utilisation_ge_0.9"] = (result.get("utilisation_overlap") or 0) >= 0.9
    result["checks_pass"] = (result["all_exit_0"] and result["records_total"] == 2 * rows
                             and not any(repeated.values()) and result["row_keys_repeated_across_jobs"] == 0)
    result["how"] = (
        "overlap = [later job's first shard start, earlier job's last shard end] (<output>/shards/*.json "
        "intervals); utilisation_overlap = sum over the 2 engines of their busy seconds in the overlap "
        "(engine busy_share x alive_s from the pool keeper's status, sampled every 0.5 s by a helper "
        "process, linearly interpolated at the overlap's ends) / (2 x overlap). utilisation_union: the "
        "same over [first shard start, last shard end]. utilisation_from_summaries_*: sum of both jobs' "
        "summary.json engines[].busy_s (each job's share of the engines' busy time, whole job) over "
        "2 x the window (over the overlap it counts busy time outside the overlap too)")
    print(f"\n== concurrent: 2 jobs x {rows} rows (max_tokens {max_tokens}) on a pool of 2 engines "
          f"(pool start {result['pool_start_s']:.1f}s) ==")
    for d in done:
        first = f"{d['first_record_s']:.1f}s" if d["first_record_s"] is not None else "none"
        per_engine = "/".join(str(e["rows"]) for e in d["engines"])
        print(f"{d['label']:<14} exit {d['rc']}  wall {d['wall_s']:6.1f}s  first record {first}  "
              f"{d['rows_out']} records (rows per engine {per_engine})  share of the engines' busy time "
              f"{d['engine_busy_s']:.1f}s")
    print(f"records {result['records_total']} (target {2 * rows}); row keys repeated within a job "
          f"{repeated}, across jobs {result['row_keys_repeated_across_jobs']}: "
          f"{'pass' if result['checks_pass'] else 'FAIL'}")
    if "overlap_s" in result:
        print(f"overlap {result['overlap_s']:.1f}s of the union {result['union_s']:.1f}s; engine utilisation "
              f"over the overlap {fmt_pct(result['utilisation_overlap'])} (target >= 90%: "
              f"{ok(result['target_utilisation_ge_0.9'])}), over the union {fmt_pct(result['utilisation_union'])}; "
              f"from the summaries: {fmt_pct(result['utilisation_from_summaries_over_overlap'])} over the overlap, "
              f"{fmt_pct(result['utilisation_from_summaries_over_union'])} over the union "
              f"({len(samples)} pool status samples)")
    return result


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def wait_for_samples(samples_file: Path, poller: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if samples_file.exists() and samples_file.read_text().strip():
            return
        if poller.poll() is not None:
            raise RuntimeError(f"the pool poller exited {poller.returncode}")
        time.sleep(0.2)
    raise RuntimeError("the pool poller wrote no sample in 60 s")


def busy_between(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, float] | None:
    """Each engine's busy seconds in [start, end], interpolated between the poller's samples."""
    if not samples or samples[0]["t"] > start or samples[-1]["t"] < end:
        return None

    def at(engine: str, t: float) -> float:
        points = [(s["t"], s["busy_s"][engine]) for s in samples if engine in s["busy_s"]]
        for (t0, b0), (t1, b1) in zip(points, points[1:]):
            if t0 <= t <= t1:
                return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
        raise ValueError(f"no samples of {engine} around {t}")

    engines = sorted({e for s in samples for e in s["busy_s"]})
    return {e: round(at(e, end) - at(e, start), 3) for e in engines}


def part_feeding(work: Path, rounds: int, rows: int = 1920, small: int = 40, max_tokens: int = 16) -> dict[str, Any]:
    path = work / "feeding.parquet"
    pq.write_table(varied_rows(rows, "f", max_tokens), path)
    name = "bench-feed"
    cases = [(mode, size) for mode in ("attached", "cold") for size in (small, rows)]
    runs: dict[str, list[dict[str, Any]]] = {f"{m}-{s}": [] for m, s in cases}
    with pools(work, [(name, ())]) as started:
        env = started["env"]
        for r in range(rounds):
            order = cases if r % 2 == 0 else [(m, s) for m in ("cold", "attached") for s in (rows, small)]
            for mode, size in order:
                label = f"r{r + 1}-feeding-{mode}-{size}"
                runs[f"{mode}-{size}"].append(run_job(env, work, label, path, pool=name if mode == "attached" else None,
                                                      sets=(f"output.rows_per_file={size}", "input.id_column=id")))
    medians = {}
    for case, rs in runs.items():
        medians[case] = {
            "wall_s": median([x["wall_s"] for x in rs]),
            "after_engine_ready_s": median([x["wall_s"] - x["first_engine_ready_s"] for x in rs
                                            if x["first_engine_ready_s"] is not None]),
            "shards": rs[0]["files"] if rs else None, "all_exit_0": all(x["rc"] == 0 for x in rs),
            "records": [x["rows_out"] for x in rs],
        }
    ratios = {}
    for mode in ("attached", "cold"):
        a, b = medians[f"{mode}-{small}"], medians[f"{mode}-{rows}"]
        ratios[mode] = round(a["wall_s"] / b["wall_s"], 3) if a["wall_s"] and b["wall_s"] else None
        if mode == "cold" and a["after_engine_ready_s"] and b["after_engine_ready_s"]:
            ratios["cold_after_engine_ready"] = round(a["after_engine_ready_s"] / b["after_engine_ready_s"], 3)
    result = {
        "rows": rows, "small_shard_rows": small, "max_tokens": max_tokens, "rounds": rounds,
        "pool_start_s": started["pools"][name]["start_s"], "medians": medians,
        "ratio_small_over_one_shard": ratios,
        "target_within_10pct": {m: (r is not None and abs(r - 1) <= 0.10) for m, r in ratios.items()},
        "runs": runs,
        "how": "wall: subprocess start to exit, median over rounds; cases take turns (order reversed every "
               "other round); after_engine_ready: wall minus summary.json first_engine_ready_s",
    }
    print(f"\n== feeding: {rows} rows (max_tokens {max_tokens}) on one engine, {small}-row shards vs one shard, "
          f"{rounds} round(s), medians ==")
    print(f"{'mode':<9} {'shard rows':>10} {'shards':>6} {'wall':>8} {'after engine ready':>19}  exit 0")
    for mode, size in cases:
        x = medians[f"{mode}-{size}"]
        after = f"{x['after_engine_ready_s']:.1f}s" if x["after_engine_ready_s"] is not None else "n/a"
        print(f"{mode:<9} {size:>10} {x['shards']!s:>6} {x['wall_s']:>7.1f}s {after:>19}  "
              f"{'yes' if x['all_exit_0'] else 'NO'}")
    print("ratio small/one shard: " + ", ".join(f"{m} {r}" for m, r in ratios.items())
          + " (target within 10%: " + ", ".join(f"{m} {ok(v)}" for m, v in result["target_within_10pct"].items()) + ")")
    return result


# ------------------------------------------------------------------------------------------------ poller

def poll(name: str, out: Path) -> int:
    """Helper process of the concurrent part: every POLL_S, each engine's busy seconds since its actor
    started, from the pool keeper's status, as JSON lines {t, busy_s: {engine: s}}. Ends on SIGTERM."""
    from pipeline.pool import local_head
    from pipeline.pool.keeper import NAMESPACE

    head = local_head.find()
    if head is None:
        print("no local head", file=sys.stderr)
        return 2
    head.join()
    import ray

    ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False)
    keeper = ray.get_actor(name, namespace=NAMESPACE)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    with open(out, "a") as f:
        while not stopping:
            t0 = time.time()
            status = ray.get(keeper.status.remote())
            t1 = time.time()
            busy = {e.engine: e.busy_share * e.alive_s for e in status.engines if e.ready}
            f.write(json.dumps({"t": (t0 + t1) / 2, "busy_s": busy}) + "\n")
            f.flush()
            time.sleep(POLL_S)
    return 0


# -------------------------------------------------------------------------------------------------- main

RUNNERS = {"cold-vs-attached": part_cold_vs_attached, "records-equal": part_records_equal,
           "concurrent": part_concurrent, "feeding": part_feeding}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of cold-vs-attached and feeding")
    parser.add_argument("--concurrent-rows", type=int, default=1000, help="rows of each concurrent job")
    parser.add_argument("--feeding-rows", type=int, default=1920, help="rows of the feeding job (a multiple of 40)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folders (outputs, job logs)")
    parser.add_argument("--poll", help=argparse.SUPPRESS)
    parser.add_argument("--poll-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        return poll(args.poll, Path(args.poll_out))
    from pipeline.io.plan import ROW_KEY as key

    assert key == ROW_KEY, key
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.setdefault("parts", {})
    failed = False
    for part in PARTS if args.part == "all" else (args.part,):
        work = Path(tempfile.mkdtemp(prefix=f"bench-pool-{part}-"))
        log(f"part {part}: work folder {work}, load average {os.getloadavg()}")
        load = os.getloadavg()
        started = time.time()
        try:
            sizes = {"concurrent": {"rows": args.concurrent_rows}, "feeding": {"rows": args.feeding_rows}}
            figures = RUNNERS[part](work, args.rounds, **sizes.get(part, {}))
        except Exception as exc:  # noqa: BLE001 - the other parts still run; the failure is recorded
            log(f"part {part} failed: {type(exc).__name__}: {exc}")
            figures = {"failed": f"{type(exc).__name__}: {exc}"}
            failed = True
        figures.update({"machine": machine(), "load_average_at_start": [round(x, 2) for x in load],
                        "part_s": round(time.time() - started, 1), "work_folder": str(work) if args.keep else None})
        results["parts"][part] = figures
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwritten: {OUT.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
