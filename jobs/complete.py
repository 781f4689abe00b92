"""Entrypoint for `ray job submit --working-dir . -- python jobs/complete.py --config configs/....yaml`.

Runs the same way locally (`python jobs/complete.py --config configs/local-cpu.yaml`): with no Ray
cluster around, the job starts Ray in-process. Exit codes: 0 done, 1 failed, 2 bad config or input, 3 too many error records
(or a Python without the project's dependencies).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from pipeline.job.cli import main
except ModuleNotFoundError as exc:
    if (exc.name or "").startswith("pipeline"):
        raise
    # `ray job submit` runs the command with the `python` first on the PATH `ray start` had on the head.
    print(f"error: {sys.executable} cannot import {exc.name!r}: it is not the Python the project is "
          "installed in. Under `ray job submit`, `python` is the first one on the PATH Ray was started "
          "with on the head: start Ray with the project's environment active (`. .venv/bin/activate && "
          "ray start --head`), or name the interpreter after `--` (`/path/to/.venv/bin/python "
          "jobs/complete.py ...`).", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
