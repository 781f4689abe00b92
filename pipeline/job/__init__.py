"""The job: the main flow (run.py, read it first), `validate`, and the command line."""
