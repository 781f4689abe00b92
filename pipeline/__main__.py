import sys

from pipeline.job.cli import main

sys.exit(main())
