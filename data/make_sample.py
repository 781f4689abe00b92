"""Regenerate data/sample_prompts.parquet, the demo dataset (deterministic: same file every run), or
write another day's prompts for the scheduled-enrichment recipe: new rows with new ids.

    .venv/bin/python data/make_sample.py                                  # data/sample_prompts.parquet
    .venv/bin/python data/make_sample.py --day 2 output/incoming/day-2.parquet   # ids day2-0000, ...
"""

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TASKS = [
    "Write a short story about {x}.",
    "Explain {x} to a ten year old.",
    "Question: What do you know about {x}? Answer:",
    "Summarize the history of {x} in three sentences.",
    "Write a haiku about {x}.",
    "List five facts about {x}:",
    "Translate into French: I would like to learn more about {x}.",
    "Describe {x} in one paragraph.",
]
SUBJECTS = [
    "the old mill by the river", "photosynthesis", "the capital of Japan", "a lighthouse keeper",
    "prime numbers", "volcanoes", "the Moon landing", "a small dragon afraid of fire", "forests",
    "the train to the mountains", "gravity", "a healthy breakfast", "the city council", "stars",
    "batch inference", "the library", "an orchestra", "the market", "sorting algorithms",
    "the ship leaving the harbor", "rain in the village", "the castle on the hill", "bread",
    "the museum", "a waterproof backpack", "Shakespeare", "leap years", "Jupiter", "the sea",
    "spreadsheets", "bicycle lanes", "the committee meeting", "language models", "Zürich",
    "a first aid kit", "wheat and barley", "the volcano eruption", "children learning to read",
]


def rows(n: int = 320, day: int = 1) -> list[dict]:
    """Day 1 is the demo dataset (ids sample-0000, ...); day N > 1 other prompts, ids dayN-0000, ..."""
    rng = random.Random(20261125 if day == 1 else 20261125 + day)
    prefix = "sample" if day == 1 else f"day{day}"
    out = []
    for i in range(n):
        prompt = rng.choice(TASKS).format(x=rng.choice(SUBJECTS))
        out.append({
            "id": f"{prefix}-{i:04d}",
            "prompt": prompt,
            # Mostly short budgets so the demo is quick; some rows leave max_tokens to the default.
            "max_tokens": None if i % 40 == 0 else rng.choice([16, 32, 64, 128]),
            "temperature": rng.choice([None, None, 0.0, 0.7, 1.0]),
            "seed": rng.choice([None, None, rng.randrange(1 << 31)]),
            "stop": rng.choice([None, None, None, ["\n\n"], ["."]]),
        })
    return out


SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("max_tokens", pa.int64()),
    ("temperature", pa.float64()), ("seed", pa.int64()), ("stop", pa.list_(pa.string())),
])

if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--day", type=int, default=1, help="1: the demo dataset; N > 1: day N's new rows")
    args.add_argument("path", nargs="?", help="where to write (default: data/sample_prompts.parquet)")
    given = args.parse_args()
    path = Path(given.path) if given.path else Path(__file__).parent / "sample_prompts.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows(day=given.day), schema=SCHEMA), path)
    print(f"wrote {path}")
