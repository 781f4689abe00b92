"""Evaluation: each record scored against its row's reference answer (the records' `score` column),
and a sweep's comparison of its variants.

Its modules: record_scores.py (the entry points below), text.py, multiple_choice.py, stats.py and compare.py;
the `scoring` section itself is config/scoring.py. The flow calls record_scores.py at two points, both set up
from the job's `scoring` section:
  - `request_builder` wraps the row -> body builder: a multiple-choice row becomes one request for the
    log-likelihood of each of its choices (multiple_choice.py), in the job's request builder;
  - `with_scores` adds a shard's answered records' `score` column (text.py for generated
    answers, multiple_choice.py for log-likelihoods), before the shard is written: the job hands it
    to the engine actors, which do not import this room.
compare.py reads the column back for the means, intervals and paired differences (stats.py).
"""
