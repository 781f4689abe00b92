"""Entrypoint for `ray job submit --working-dir . -- python jobs/complete.py --config configs/....yaml`.

Runs the same way locally (`python jobs/complete.py --config configs/local-cpu.yaml`): with no Ray
cluster around, the job starts Ray in-process. Exit codes: 0 done, 1 failed, 2 bad config or input.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
