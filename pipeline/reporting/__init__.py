"""Reporting: the engines' figures while the job runs, the progress line, and the job summary."""
