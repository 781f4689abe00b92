"""Engine busy shares and the progress line, from the figures engine actors report."""

from pipeline.reporting.progress import BEAT_S, EngineMeter, ProgressLine, engine_use, utilisation


def test_busy_share_of_live_stopped_and_lost_engines():
    end = 1000.0
    engines = {
        "a.1-1": {"node": "n1", "startup_s": 20.0, "ready_at": 900.0, "last_at": end - 1, "busy_s": 90.0,
                  "rows": 10, "completion_tokens": 100},
        "a.1-2": {"node": "n1", "ready_at": 900.0, "last_at": 940.0, "stopped_at": 950.0, "busy_s": 25.0},
        "b.2-1": {"node": "n2", "ready_at": 900.0, "last_at": 960.0, "busy_s": 60.0},  # its node was lost
        "c.3-1": {"node": "n2"},  # reported a beat but never its start: ignored
    }
    used = {u.engine: u for u in engine_use(engines, end)}
    assert set(used) == {"a.1-1", "a.1-2", "b.2-1"}
    assert (used["a.1-1"].alive_s, used["a.1-1"].busy_share) == (100.0, 0.9)  # alive until the end
    assert (used["a.1-2"].alive_s, used["a.1-2"].busy_share) == (50.0, 0.5)  # until it was replaced
    assert (used["b.2-1"].alive_s, used["b.2-1"].busy_share) == (60.0, 1.0)  # until it went silent
    assert utilisation(list(used.values())) == round(175 / 210, 4)
    assert utilisation([]) == 0.0


def test_meter_counts_busy_time_only_with_rows_in_the_engine(monkeypatch):
    clock = iter([0.0, 10.0, 15.0, 20.0]).__next__
    monkeypatch.setattr("pipeline.reporting.progress.time.time", lambda: clock())
    sent = []

    class Stats:
        def __getattr__(self, method):
            return type("M", (), {"remote": staticmethod(lambda *a: sent.append((method, a)))})

    meter = EngineMeter(None, "a.1", "node")
    meter._stats = Stats()  # report without the background thread
    meter.engine_started(5.0)  # t=0
    meter.enter()  # t=10: busy from here
    meter.enter()  # a second row: still one busy stretch
    meter.leave()
    meter.leave()  # t=15: idle
    meter.answered(7, prompt_tokens=300, cached_tokens=256)
    meter.beat()  # t=20
    method, (engine, figures, at) = sent[-1]
    assert (method, engine, at) == ("beat", "a.1-1", 20.0)
    assert figures == {"rows": 1, "completion_tokens": 7, "prompt_tokens_computed": 44, "prompt_tokens_cached": 256,
                       "busy_s": 5.0}


def test_progress_line_shows_rows_rate_and_eta():
    line = ProgressLine(stats=None, total_rows=1000)
    line._started = 0.0
    snap = {"engines": {"a.1-1": {"ready_at": 0.0, "last_at": 10.0, "rows": 100, "completion_tokens": 1000,
                                  "busy_s": 9.0}}, "shard_starts": []}
    line.render(snap, 10.0)
    snap["engines"]["a.1-1"].update(last_at=20.0, rows=300, completion_tokens=3000, busy_s=19.0)
    text = line.render(snap, 20.0)
    assert text.startswith("progress: 300/1,000 rows (30%) | 200 output tok/s | 1 engine 95% busy | ETA 0:35")
    assert BEAT_S < 10


def test_progress_line_before_any_engine_is_up():
    line = ProgressLine(stats=None, total_rows=50)
    line._started = 0.0
    assert line.render({"engines": {}, "shard_starts": []}, 12.0) == \
        "progress: 0/50 rows (0%) | 0 output tok/s | engines starting | ETA -- | 12s"


def test_progress_line_rates_leave_out_the_start_up():
    # The engine is up at 25 s; lines before it saw no rows. The rate is over the time since, from the
    # first line after it (a short job's rows may all be done by then: the rate is not 0).
    line = ProgressLine(stats=None, total_rows=320)
    line._started = 0.0
    for now in (5.0, 10.0, 15.0, 20.0):
        line.render({"engines": {}, "shard_starts": []}, now)
    snap = {"engines": {"a.1-1": {"ready_at": 25.0, "last_at": 29.0, "rows": 224, "completion_tokens": 896,
                                  "busy_s": 4.0}}, "shard_starts": []}
    text = line.render(snap, 29.0)  # 224 rows in the 4 s since the engine came up
    assert "| 224 output tok/s |" in text and "| ETA 0:01 |" in text, text  # 96 rows to go at 56 rows/s
    snap["engines"]["a.1-1"].update(last_at=33.0, rows=320, completion_tokens=1280, busy_s=8.0)
    assert "| 160 output tok/s |" in line.render(snap, 33.0)  # 1,280 tokens in 8 s


def test_progress_line_says_when_nothing_moved_and_counts_restarts():
    line = ProgressLine(stats=None, total_rows=100)
    line._started = 0.0
    snap = {"engines": {"a.1-1": {"ready_at": 10.0, "last_at": 20.0, "rows": 40, "completion_tokens": 400}},
            "shard_starts": []}
    assert "nothing answered" not in line.render(snap, 20.0)
    snap["engines"]["a.1-2"] = {"ready_at": 50.0, "last_at": 79.0, "rows": 0}
    text = line.render(snap, 79.0)  # 59 s without a row answered
    assert "| 1 engine restart |" in text and "nothing answered" not in text
    text = line.render(snap, 85.0)
    assert "| nothing answered for 65s |" in text
    snap["engines"]["a.1-2"]["rows"] = 5
    assert "nothing answered" not in line.render(snap, 90.0)


def test_a_log_gets_a_line_when_something_moved_or_every_30s():
    line = ProgressLine(stats=None, total_rows=100)
    line._started = 0.0
    printed = []
    for now in range(5, 125, 5):  # two minutes of start-up, then rows
        snap = {"engines": {}, "shard_starts": []} if now < 100 else \
            {"engines": {"a.1-1": {"ready_at": 95.0, "last_at": now, "rows": (now - 95) * 2}}, "shard_starts": []}
        line.render(snap, float(now))
        if line.news(float(now)):
            printed.append(now)
    assert printed == [5, 35, 65, 95, 100, 105, 110, 115, 120]  # start-up: every 30 s; then every line moves


def test_rows_by_status_code_from_a_tally():
    from pipeline.io.tally import Tally
    from pipeline.reporting.metrics import status_codes

    tally = Tally(rows=10, completions=6, errors_by_type={"BadRequestError (400)": 2, "NotFoundError (404)": 1,
                                                          "InternalServerError (500)": 1})
    assert status_codes(tally) == {"200": 6, "400": 2, "404": 1, "500": 1}
    assert sum(status_codes(tally).values()) == tally.rows


def test_a_later_model_of_a_sweep_counts_on_from_the_job_rows_and_clock():
    # a sweep over two models: the second model's line starts at the first model's 1,280 rows of 2,560
    line = ProgressLine(stats=None, total_rows=2560, done_rows=1280, started=100.0)
    snap = {"engines": {"b.1-1": {"ready_at": 150.0, "last_at": 160.0, "rows": 320, "completion_tokens": 100,
                                  "busy_s": 9.0}}, "shard_starts": []}
    text = line.render(snap, 160.0)
    assert text.startswith("progress: 1,600/2,560 rows (62%)") and text.endswith("| 60s")
