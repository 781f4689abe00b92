"""Input and output: planning, reading rows, records and their tallies, the output folder, storage."""
