"""Regenerate the evaluation sets (deterministic: the same files every run).

    .venv/bin/python data/make_eval.py

- data/eval_qa.parquet: 300 short questions with reference answers (240 sums and differences of small
  numbers, 60 capital cities), for generate-and-match scorers. Columns: id, task, prompt, answer.
- data/eval_choice.parquet: 200 multiple-choice questions (the same two kinds), four choices each, for
  the log-likelihood scorer. Columns: id, task, prompt, choices, answer (the right choice's index).
"""

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Greece", "Athens"), ("Ireland", "Dublin"), ("Turkey", "Ankara"),
    ("Russia", "Moscow"), ("Australia", "Canberra"), ("Argentina", "Buenos Aires"), ("Brazil", "Brasilia"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"),
]
SEED = 20261126


def _sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randrange(1, 50), rng.randrange(1, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", a - b


def qa_rows(arithmetic: int = 240, capitals: int = 60) -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    for _ in range(arithmetic):
        question, answer = _sum(rng)
        rows.append({"task": "arithmetic", "prompt": f"Question: {question}\nAnswer:", "answer": str(answer)})
    for i in range(capitals):
        country, city = CAPITALS[i % len(CAPITALS)]
        rows.append({"task": "capital", "prompt": f"Question: What is the capital of {country}?\nAnswer:",
                     "answer": city})
    return [{"id": f"qa-{i:04d}", **row} for i, row in enumerate(rows)]


def choice_rows(arithmetic: int = 140, capitals: int = 60) -> list[dict]:
    rng = random.Random(SEED + 1)
    rows = []
    for _ in range(arithmetic):
        question, answer = _sum(rng)
        wrong = rng.sample([d for d in range(-5, 6) if d], 3)
        choices = [answer] + [answer + d for d in wrong]
        rng.shuffle(choices)
        rows.append({"task": "arithmetic", "prompt": f"Question: {question}\nAnswer:",
                     "choices": [f" {c}" for c in choices], "answer": choices.index(answer)})
    for i in range(capitals):
        country, city = CAPITALS[i % len(CAPITALS)]
        others = rng.sample([c for _, c in CAPITALS if c != city], 3)
        choices = [city] + others
        rng.shuffle(choices)
        rows.append({"task": "capital", "prompt": f"Question: What is the capital of {country}?\nAnswer:",
                     "choices": [f" {c}" for c in choices], "answer": choices.index(city)})
    return [{"id": f"mc-{i:04d}", **row} for i, row in enumerate(rows)]


QA_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()), ("answer", pa.string())])
CHOICE_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                           ("choices", pa.list_(pa.string())), ("answer", pa.int64())])

if __name__ == "__main__":
    here = Path(__file__).parent
    pq.write_table(pa.Table.from_pylist(qa_rows(), schema=QA_SCHEMA), here / "eval_qa.parquet")
    pq.write_table(pa.Table.from_pylist(choice_rows(), schema=CHOICE_SCHEMA), here / "eval_choice.parquet")
    print(f"wrote {here / 'eval_qa.parquet'} and {here / 'eval_choice.parquet'}")
