"""python -m pipeline {run,validate} --config FILE [--input PATH] [--output PATH] [--set KEY=VALUE]
python -m pipeline eval --config FILE --tasks TASKS [lm_eval's run arguments]
python -m pipeline engines {start,status,stop} ...   (standing engine pools: job/engines_command.py)

run:       run the batch job, or resume it: shards an earlier run into the same output finished are
           kept. Exit 0 done (also: nothing left to do), 1 failed (some rows have no record),
           2 bad config, unreadable input (a file without the columns, repeated row keys), or an
           output folder of another job, 3 failed: more of the run's rows are error records than
           output.max_error_share (every record written, no _SUCCESS; --redo-errors answers them again).
validate:  read the whole input and check every row's request without starting an engine.
           Exit 0 every row valid, 1 some rows invalid (a job would record them as errors), 2 as above.
eval:      lm-evaluation-harness tasks, their requests answered by pipeline jobs (job/eval_command.py);
           every other argument is lm_eval's own (--tasks, --num_fewshot, --limit, --output_path, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, in_ray_job, load_config
from pipeline.io.plan import InputError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ERROR_RECORDS = 0, 1, 2, 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("eval", help="lm-evaluation-harness tasks answered by the pipeline (lm_eval's arguments)",
                   add_help=False)
    sub.add_parser("engines", help="standing engine pools: engines start|status|stop (docs/engine-pools.md)",
                   add_help=False)
    for name, help_ in (("run", "run a batch completion job"),
                        ("validate", "check every row's request without starting an engine")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--config", help="job YAML (configs/local-cpu.yaml is the local demo)")
        cmd.add_argument("--input", help="input file, folder, glob or URI; overrides `input.path`")
        cmd.add_argument("--output", help="output folder; overrides `output.path`")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override any config key, e.g. --set engine.num_actors=2 (repeatable)")
        if name == "run":
            cmd.add_argument("--redo-errors", action="store_true",
                             help="answer again the shards of the output that hold error records "
                                  "(output.redo_errors), e.g. after a run failed for them (exit 3)")
            cmd.add_argument("--pool", metavar="NAME",
                             help="answer with the engines of the standing pool NAME (engine.pool)")
            cmd.add_argument("--validate", action="store_true",
                             help="only validate the input (as the validate command) and exit")
            cmd.add_argument("--verbose", action="store_true",
                             help="show Ray's, Ray Data's and vLLM's output on the terminal too (by default "
                                  "it goes to the job's log file; the summary says where)")
        if name == "validate":
            cmd.add_argument("--verbose", action="store_true",
                             help="show vLLM's output on the terminal too (by default it goes to the log "
                                  "file; the last line says where)")
    return p


_exit_code: list[int] = []  # set by exit_now: the code the last exit handler ends the process with


def skip_teardown() -> None:
    """Let `exit_now` end the process without the interpreter's teardown. Call it first thing, before
    anything registers an exit handler: the handler it registers then runs last (they run in reverse),
    after the interpreter has waited for the threads that are not daemons and run every later handler
    (Ray's shutdown); it flushes logging and the standard streams and ends the process there. Tearing
    down the modules and objects of a process that has imported the harness, torch and Ray took 2 s on
    the 2-core development machine after `pipeline eval` had written its results, with nothing left to
    do. Only for the command line (`python -m pipeline`), never in a process that goes on. Public API
    only: atexit's order and os._exit."""
    import atexit

    atexit.register(_end_without_teardown)


def _end_without_teardown() -> None:
    import os

    if not _exit_code:  # an exception, or sys.exit from elsewhere: the interpreter's own ending
        return
    logging.shutdown()  # registered before this handler: it would run after it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced: nothing to flush
            pass
    os._exit(_exit_code[0])


def exit_now(code: int | None) -> None:
    """End the process as `sys.exit(code)` does; after `skip_teardown`, without the interpreter's
    teardown."""
    _exit_code.append(int(code or 0))
    sys.exit(_exit_code[0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["engines"]:
        from pipeline.job.engines_command import main as engines

        return engines(argv[1:])
    if argv[:1] == ["eval"]:
        from pipeline.job.eval_command import main as evaluate

        return evaluate(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = args.overrides + (["output.redo_errors=true"] if getattr(args, "redo_errors", False) else [])
        overrides += [f"engine.pool={args.pool}"] if getattr(args, "pool", None) else []
        config = load_config(args.config, overrides, input=args.input, output=args.output)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline.pool.attached import join_local_head

    join_local_head(config)  # a pool on this machine's local head: its token, before Ray is imported

    if args.command == "validate" or getattr(args, "validate", False):
        return _validate(config, args.verbose)

    from pipeline.io.outputs import OutputError
    from pipeline.io.storage import StorageError
    from pipeline.job.run import ray_logs_dir, run
    from pipeline.reporting import console

    with console.session(verbose=args.verbose) as log_file:
        try:
            summary = run(config)
        except (ConfigError, InputError, OutputError, StorageError) as exc:
            console.say(f"error: {exc}")
            return EXIT_BAD_INPUT
        import ray

        if config.ray_address or in_ray_job() or config.engine.pool:
            from pipeline.reporting import metrics

            metrics.flush()  # the job's last figures reach the cluster's metrics agent
        ray_logs = ray_logs_dir()
        ray.shutdown()  # flush the actors' logs first, so the summary is the last thing printed
    print("\n== job summary ==\n" + summary.render(), flush=True)
    if summary.comparison:
        from pipeline.evaluation.compare import render

        print(render(summary.comparison), flush=True)
    print(f"log: {log_file}" + (f" | engine actors' logs: {ray_logs} (worker-*.out/.err, on each node)"
                                if ray_logs else ""), flush=True)
    if summary.rows_out != summary.records_expected:
        return EXIT_FAILED
    return EXIT_ERROR_RECORDS if summary.failure else EXIT_OK


def _validate(config, verbose: bool = False) -> int:
    """The validation block on the terminal, as `run` shows its summary: vLLM's and the libraries'
    lines go to the log file (reporting/console.py), named at the end; `verbose` shows them too."""
    from pipeline.job.validate import validate

    from pipeline.io.storage import StorageError
    from pipeline.reporting import console

    with console.session(verbose=verbose) as log_file:
        try:
            report = validate(config)
        except (ConfigError, InputError, StorageError) as exc:
            console.say(f"error: {exc}")
            return EXIT_BAD_INPUT
    print("\n== validation ==\n" + report.render(), flush=True)
    print(f"log: {log_file}", flush=True)
    return EXIT_OK if report.valid_rows == report.rows else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
