"""Standing pools without Ray: which settings a job must share with its pool, how a pool's engine time
is split between the jobs on it, what a job is charged, and the one-line refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.job.engines_command import duration_s
from pipeline.pool import attached, local_head
from pipeline.pool.attached import NoSuchPool, mismatch
from pipeline.reporting import progress
from pipeline.reporting.cost import run_cost
from pipeline.reporting.progress import EngineMeter, EngineUse


def config(*overrides: str):
    return load_config("configs/local-cpu.yaml", list(overrides))


def test_a_job_with_the_pools_settings_fits():
    assert mismatch(config(), config()) is None
    # how the job feeds the engines is its own
    assert mismatch(config(), config("engine.num_actors=3", "engine.rows_in_flight=64", "engine.shards_in_flight=2",
                                     "engine.pool=p", "engine.if_no_pool=own_engines")) is None
    # a request's own fields are the job's: only the defaults the engine holds must match
    assert mismatch(config(), config("defaults.stop=[x]")) is None


@pytest.mark.parametrize("override, expected", [
    ("engine.max_model_len=256", "engine.max_model_len: the pool's engines have 4096, this job asks for 256"),
    ("engine.dtype=bfloat16", "engine.dtype: the pool's engines have 'float32', this job asks for 'bfloat16'"),
    ("engine.vllm={quantization: fp8}", "engine.vllm: the pool's engines have {}, this job asks for {'quantization': 'fp8'}"),
    ("defaults.temperature=0.7", "defaults.temperature: the pool's engines have 0.2, this job asks for 0.7"),
    ("model.adapters={a: builtin:tiny-lora-a}", "model.adapters: the pool's engines have {}, this job asks for "
                                                "{'a': 'builtin:tiny-lora-a'}"),
    ("model.path=/models/other", "model.path: the pool's engines have 'builtin:tiny-llama', this job asks for "
                                 "'/models/other'"),
])
def test_a_difference_is_named_in_one_line(override, expected):
    assert mismatch(config(), config(override)) == expected


def test_a_sweep_over_another_model_does_not_fit():
    sweep = config("sweep.models=[{path: /models/other, served_name: other}]")
    assert mismatch(config(), sweep).startswith("model.path: the pool's engines have 'builtin:tiny-llama'")
    assert mismatch(config(), config("sweep.grid={temperature: [0.0, 0.5]}")) is None  # variants of its model


def test_no_local_head_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_LOCAL_HEAD", str(tmp_path / "none.json"))
    with pytest.raises(NoSuchPool, match=r"^engine.pool is 'nightly', but no Ray cluster with pools runs on this "
                                         r"machine: start the pool first \(python -m pipeline engines start "):
        attached.ray_address(config("engine.pool=nightly"))
    assert local_head.find() is None


def test_a_dead_heads_record_is_not_a_head(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_LOCAL_HEAD", str(tmp_path / "head.json"))
    (tmp_path / "head.json").write_text('{"address": "127.0.0.1:1", "pid": 999999999, "token": "t", '
                                        '"temp_dir": "/tmp/x", "log": "/tmp/x/log"}')
    assert local_head.find() is None


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5h", 5400), ("45", 45)])
def test_idle_stop_durations(text, seconds):
    assert duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0s", "3d"])
def test_bad_idle_stop_is_refused(text):
    with pytest.raises(ValueError, match="give a duration such as 90s, 30m or 2h"):
        duration_s(text)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_is_split_between_the_jobs_by_their_rows_in_the_engine(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "time", clock)
    engine = EngineMeter(None, "a.1", "node")
    one, two = (EngineMeter(None, "a.1", "node", share=engine) for _ in range(2))
    for meter in (engine, one, two):
        meter.engine_started(0.0, counted=False)
    one.enter(); one.enter()  # noqa: E702 - two rows of job one
    clock.now += 10  # job one alone: 10 s its own
    two.enter()
    clock.now += 6  # both, 2 rows to 1: 4 s and 2 s
    one.leave(); one.leave()  # noqa: E702
    clock.now += 4  # job two alone
    two.leave()
    clock.now += 5  # idle: nobody's
    one.beat(); two.beat()  # noqa: E702
    assert (one.busy_s(), two.busy_s()) == (14.0, 6.0)
    assert engine.busy_s() == 20.0  # the engine's own busy time: the shares add up to it


def test_a_pool_job_is_charged_its_share_not_the_engines_life():
    own = EngineUse(engine="e-1", startup_s=20.0, alive_s=60.0, busy_s=30.0)
    pooled = EngineUse(engine="e-1", startup_s=20.0, alive_s=60.0, busy_s=30.0, pool="nightly")
    assert (own.charged_s(), pooled.charged_s()) == (80.0, 30.0)
    assert run_cost([pooled], 1.0, "CPU core", 100, 100, price=3.6).total == pytest.approx(0.03)


class FakeRay:
    """What the keeper asks of Ray, recorded (the GPU path cannot run here: no GPU, no CUDA vLLM)."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.groups: list[dict] = []
        self.removed: list[object] = []
        self.killed: list[object] = []

    def remote(self, cls):
        fake = self

        class Actor:
            def options(self, **options):
                fake.created.append(options)
                return SimpleNamespace(remote=lambda job: SimpleNamespace(
                    options=options, stop=SimpleNamespace(remote=lambda: "stopped")))
        return Actor()


def test_a_gpu_pool_asks_ray_for_a_placement_group_per_engine_and_removes_them(monkeypatch):
    import ray

    from pipeline.engine import sizing
    from pipeline.pool.keeper import PoolKeeper, PoolSpec

    fake = FakeRay()

    def group(layout):
        fake.groups.append(layout)
        return {"scheduling_strategy": SimpleNamespace(placement_group=f"group-{len(fake.groups)}")}

    monkeypatch.setattr(sizing, "engine_placement_group", group)
    monkeypatch.setattr(ray, "remote", fake.remote)
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: fake.killed.append(actor))
    monkeypatch.setattr(ray.util, "remove_placement_group", fake.removed.append)
    gpu = config("engine.device=gpu", "engine.num_actors=2", "engine.tensor_parallel_size=8",
                 "engine.vllm={pipeline_parallel_size: 2}")
    keeper = PoolKeeper(PoolSpec("big", SimpleNamespace(config=gpu), None))
    # one placement group of 16 {GPU: 1, CPU: 1} bundles, PACK, per engine; the actor restarted by Ray
    assert fake.groups == [{"bundles": [{"GPU": 1, "CPU": 1}] * 16, "strategy": "PACK"}] * 2
    assert [(o["num_gpus"], o["num_cpus"], o["max_restarts"], o["max_task_retries"]) for o in fake.created] == \
        [(0, 1, -1, -1)] * 2
    assert [o["scheduling_strategy"].placement_group for o in fake.created] == ["group-1", "group-2"]
    keeper.stop()
    assert len(fake.killed) == 2 and fake.removed == ["group-1", "group-2"]
    assert keeper.attach() is None  # a stopped pool takes no job


def test_a_cpu_pool_asks_for_the_engines_cpus_and_no_placement_group(monkeypatch):
    import ray

    from pipeline.pool.keeper import PoolKeeper, PoolSpec

    fake = FakeRay()
    monkeypatch.setattr(ray, "remote", fake.remote)
    keeper = PoolKeeper(PoolSpec("small", SimpleNamespace(config=config("engine.cpus_per_actor=2")), None))
    assert [(o["num_cpus"], "scheduling_strategy" in o) for o in fake.created] == [(2, False)]
    assert len(keeper.attach()) == 1


def test_shards_spread_over_the_engines_before_any_takes_a_second():
    from pipeline.engine.shard_calls import next_actor

    load, order = {0: 0, 1: 0}, []
    while (i := next_actor(load, 3)) is not None:
        load[i] += 1
        order.append(i)
    assert order == [0, 1, 0, 1, 0, 1]  # then each has its 3 in flight
    load[1] -= 1  # a shard of engine 1 done: the next goes there
    assert next_actor(load, 3) == 1


def test_a_job_on_a_pool_keeps_its_own_metric_labels():
    pool = EngineMeter(None, "a.1", "node", labels={"output": "pool:nightly", "model": "tiny-llama"})
    job = EngineMeter(None, "a.1", "node", labels={"output": "s3://bucket/day-2", "model": "tiny-llama"}, share=pool)
    job.engine_started(0.0, counted=False, pool="nightly")
    assert job.next_engine_tags()["output"] == "s3://bucket/day-2"
    assert pool.next_engine_tags()["output"] == "pool:nightly"


def test_status_and_stop_without_any_pool_say_so(tmp_path, monkeypatch, capsys):
    from pipeline.job.engines_command import main

    monkeypatch.setenv("PIPELINE_LOCAL_HEAD", str(tmp_path / "none.json"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    assert main(["status"]) == 0
    assert main(["stop", "nightly"]) == 2
    assert main(["stop"]) == 2
    out, err = capsys.readouterr()
    assert out.count("no pools: no Ray cluster with pools runs on this machine") == 2
    assert "error: name the pool to stop" in err
