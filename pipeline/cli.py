"""`python -m pipeline run --config configs/local-cpu.yaml [--input ...] [--output ...] [--set key=value]`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, load_config
from pipeline.datasets import InputError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a batch completion job")
    run.add_argument("--config", help="job YAML (configs/local-cpu.yaml is the local demo)")
    run.add_argument("--input", help="Parquet file, folder or glob; overrides `input`")
    run.add_argument("--output", help="output folder; overrides `output`")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set engine.num_actors=2 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides, input=args.input, output=args.output)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from pipeline.runner import run

    try:
        summary = run(config)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import ray

    ray.shutdown()  # flush the actors' logs first, so the summary is the last thing printed
    print("\n== job summary ==\n" + summary.render(), flush=True)
    return EXIT_OK if summary.rows_out == summary.rows_in else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
