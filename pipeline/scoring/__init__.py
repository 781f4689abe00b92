"""Scoring: each record against its row's reference answer, into the records' `score` column.

Its rooms: config.py (the `scoring` section), score.py (the entry points below), text.py,
multiple_choice.py and stats.py. The flow calls score.py at two points, both set up from the job's
`scoring` section:
  - `request_builder` wraps the row -> body builder: a multiple-choice row becomes one request for the
    log-likelihood of each of its choices (multiple_choice.py);
  - `with_scores` adds a shard's answered records' `score` column (text.py for generated
    answers, multiple_choice.py for log-likelihoods), before the shard is written.
compare.py reads the column back for the means, intervals and paired differences (stats.py).
"""
